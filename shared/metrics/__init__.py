"""mailbag's figures for Prometheus (SPEC §9): what is counted, and how the two
programs' figures meet in ONE endpoint.

    figures.py   every metric's name and meaning, and the programs' counting calls
                 (which count nothing when metrics are off)
    counting.py  the same calls counting into prometheus_client's metrics
    alive.py     "this program runs": a lock the kernel drops when the program dies
    share.py     the sender's figures, written to a file the endpoint reads

The receiver serves the endpoint (services/monitoring/): its own counters live in
its process; the sender keeps ordinary in-process counters too and rewrites its
whole exposition into `<metrics dir>/sender.prom` at most once a second when
something changed. The endpoint adds that file's figures while the sender holds its
alive lock, and leaves them out when it does not (a stopped sender's counters
vanish; when it starts again they begin at 0, a reset `rate()` understands).
The queue gauges are computed from the queue on disk at each scrape.

When `[metrics] listen` is empty nothing is counted: the programs use the no-op
figures (`ReceiverFigures`, `SenderFigures`), no file is written, no lock held.
"""
