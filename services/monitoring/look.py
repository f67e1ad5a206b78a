"""One look at the appliance from the receiver's process, for `/metrics` and `/healthz`.

At every request (and once at start, so that the first scrape of a large queue
finds its listing made), `Monitor` reads what it reports:

- the queue on disk: `listing.Census` (names and ids only, never a message;
  folders listed again only when they changed, a state file parsed again only
  when it changed), so a scrape stays cheap with a large queue (bench/README.md);
- whether the sender runs: its alive lock (shared/metrics/alive.py);
- the sender's figures: its snapshot file, only while it runs (share.py);
- the receiver's sessions: counted by its servers.

It is also the prometheus_client collector of everything computed here
(`mailbag_queue_*`, `mailbag_sessions_active`, `mailbag_program_up`) and of the
sender's figures. Looks are taken one at a time (a lock): concurrent scrapes
queue up instead of scanning the queue side by side. A problem reading a file is
logged once (again only when it changes) and leaves that part out.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.admin.listing import STATES, Census, ListingError, QueueCensus, listing_error
from services.monitoring.health import Limits, Look, problems
from shared.config import Config
from shared.log import EventLog
from shared.metrics.figures import (
    HELP,
    PROGRAM_UP,
    QUEUE_MESSAGES,
    QUEUE_OLDEST,
    RELAY_DOWN_SINCE,
    RELAY_UP,
    SESSIONS_ACTIVE,
)
from shared.metrics.share import read_snapshot, sender_is_alive


@dataclass(frozen=True)
class Seen:
    """What one look found: the health rules' view and the sender's own figures."""

    look: Look
    census: QueueCensus | None
    sender_figures: list[Metric] = field(default_factory=list)


class Monitor(Collector):
    """Looks at the queue, the sender and the sessions; see the module docstring."""

    def __init__(self, config: Config, sessions: Callable[[], int], log: EventLog,
                 clock: Callable[[], float] = time.time) -> None:
        self.queue_dir = config.queue.dir
        self.folder = config.metrics_dir
        self.reconfigure(config)
        self.sessions = sessions
        self.log = log
        self.clock = clock
        self._counter = Census(config.queue.dir, config.queue.failed)
        self._lock = threading.Lock()
        self._said: dict[str, str] = {}  # what went wrong last, per source: said once

    def reconfigure(self, config: Config) -> None:
        """The health limits from `config` (at start, and on a reload)."""
        self.limits = Limits(config.metrics.relay_down_after, config.metrics.max_queue_age)

    def health(self) -> list[str]:
        """`/healthz`: why mailbag is unhealthy, [] when it is not."""
        return problems(self.look().look, self.limits)

    def collect(self) -> Iterator[Metric]:
        """`/metrics`: the gauges computed now, and the sender's figures."""
        seen = self.look()
        yield from seen.sender_figures
        up = GaugeMetricFamily(PROGRAM_UP, HELP[PROGRAM_UP], labels=["program"])
        up.add_metric(["receiver"], 1.0)  # it answers this scrape
        up.add_metric(["sender"], 1.0 if seen.look.sender_running else 0.0)
        yield up
        yield GaugeMetricFamily(SESSIONS_ACTIVE, HELP[SESSIONS_ACTIVE], value=self.sessions())
        if seen.census is None:
            return  # the queue could not be read: no figure rather than a wrong one
        messages = GaugeMetricFamily(QUEUE_MESSAGES, HELP[QUEUE_MESSAGES], labels=["state"])
        for state in STATES:
            messages.add_metric([state], seen.census.counts[state])
        yield messages
        oldest = seen.census.oldest_waiting
        age = max(0.0, seen.look.at - oldest) if oldest is not None else 0.0
        yield GaugeMetricFamily(QUEUE_OLDEST, HELP[QUEUE_OLDEST], value=age)

    def look(self) -> Seen:
        with self._lock:
            now = self.clock()
            running = sender_is_alive(self.folder)
            figures = self._sender_figures() if running else []
            queue, error = self._census(now)
        relay = {metric.name: metric.samples[0].value for metric in figures
                 if metric.name in (RELAY_UP, RELAY_DOWN_SINCE) and metric.samples}
        up = relay.get(RELAY_UP)
        look = Look(
            at=now, sender_running=running,
            relay_up=None if up is None else up == 1.0,
            relay_down_since=relay.get(RELAY_DOWN_SINCE),
            waiting=queue.counts["ready"] + queue.counts["deferred"] if queue else 0,
            oldest_waiting=queue.oldest_waiting if queue else None,
            queue_error=error)
        return Seen(look, queue, figures)

    def _census(self, now: float) -> tuple[QueueCensus | None, str]:
        try:
            self._check_queue_folder()
            found = self._counter.count(now)
        except (ListingError, OSError) as err:
            why = str(err) if isinstance(err, ListingError) else (err.strerror or str(err))
            self._say("queue", why, folder=self.queue_dir)
            return None, why
        self._say("queue", "", folder=self.queue_dir)
        return found, ""

    def _check_queue_folder(self) -> None:
        """The receiver made the queue folder at its start, so one that is gone now
        (removed or renamed by mistake) is no empty queue - every message gets 451 -
        but a queue that cannot be read: ListingError, worded as the listing's."""
        try:
            os.stat(self.queue_dir)
        except OSError as err:
            raise listing_error(err, self.queue_dir) from None

    def _sender_figures(self) -> list[Metric]:
        try:
            figures = read_snapshot(self.folder)
        except (OSError, ValueError) as err:
            self._say("snapshot", getattr(err, "strerror", None) or str(err), folder=self.folder)
            return []
        self._say("snapshot", "", folder=self.folder)
        return figures

    def _say(self, source: str, error: str, **details: object) -> None:
        """Log a source's trouble once, and once that it is over."""
        if self._said.get(source, "") == error:
            return
        self._said[source] = error
        if error:
            self.log.error("metrics", source=source, error=error, **details)
        else:
            self.log.ok("metrics", source=source, reason="readable again", **details)
