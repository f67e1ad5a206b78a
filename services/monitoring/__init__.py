"""The metrics endpoint (SPEC §9), served by the receiver.

    endpoint.py   the HTTP server: /metrics and /healthz, bounded so it cannot disturb SMTP
    look.py       one look at the queue, the sender and the sessions, at each request
    health.py     the /healthz rules (pure)

Why the receiver serves it: the receiver is what clients depend on, so an endpoint
that does not answer ("down" to every monitor and load balancer) means exactly that
mail is not being accepted; a sender that is down is seen from the receiver (its
alive lock is free) while the queue gauges show the mail piling up. The sender,
whose drain is the hot path with the fewest threads, does no HTTP at all.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from services.monitoring.endpoint import MetricsEndpoint
from services.monitoring.look import Monitor
from shared.config import Config
from shared.log import EventLog


def start(config: Config, registry: CollectorRegistry, sessions: Callable[[], int],
          log: EventLog) -> MetricsEndpoint | None:
    """Serve `registry` and the monitor's figures at `[metrics] listen`. A port that
    cannot be had is said in one line (log and stderr) and SMTP goes on without the
    endpoint: None."""
    listen = config.metrics.listen
    assert listen is not None, "metrics are off"
    monitor = Monitor(config, sessions, log)
    registry.register(monitor)
    try:
        endpoint = MetricsEndpoint(listen, registry, monitor, log)
    except OSError as err:
        why = err.strerror or str(err)
        log.fail("metrics", listen=listen, error=why, reason="running without the endpoint")
        print(f"receiver: metrics: cannot listen on {listen}: {why}; "
              "SMTP goes on without the metrics endpoint", file=sys.stderr, flush=True)
        return None
    endpoint.start()
    # The first look at a large queue reads every state file (seconds for 100,000):
    # taken now, so that the first scrape finds it done.
    threading.Thread(target=monitor.look, name="metrics-first-look", daemon=True).start()
    log.ok("metrics", listen=listen, folder=config.metrics_dir)
    return endpoint
