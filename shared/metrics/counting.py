"""The counters behind `ReceiverFigures` / `SenderFigures` when metrics are on.

Kept apart from figures.py so that a program with metrics off never imports
prometheus_client (a tenth of a second at every start).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.metrics.figures import (
    BOUNCES,
    DEFERRED,
    DELIVERED,
    DELIVERY_BUCKETS,
    DELIVERY_SECONDS,
    FAILED,
    HELP,
    RECEIVED,
    REJECTED,
    RELAY_DOWN_SINCE,
    RELAY_UP,
    ROUTES,
    ReceiverFigures,
    SenderFigures,
)

# A `_created` series beside every counter doubles what is stored and is read by
# nothing here; Prometheus handles counter resets without it.
disable_created_metrics()


class CountingReceiverFigures(ReceiverFigures):
    """The receiver's counters, in `registry`. Called from every session thread."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._received = Counter(RECEIVED, HELP[RECEIVED], registry=registry)
        self._rejected = Counter(REJECTED, HELP[REJECTED], ["code"], registry=registry)
        self._rejected_by_code: dict[int, Counter] = {}  # labels() takes a lock each call

    def received(self) -> None:
        self._received.inc()

    def rejected(self, code: int) -> None:
        child = self._rejected_by_code.get(code)
        if child is None:
            child = self._rejected_by_code.setdefault(
                code, self._rejected.labels(code=str(code)))
        child.inc()


class CountingSenderFigures(SenderFigures):
    """The sender's counters, in `registry`. Called from the queue runner's thread."""

    def __init__(self, registry: CollectorRegistry) -> None:
        delivered = Counter(DELIVERED, HELP[DELIVERED], ["route"], registry=registry)
        # Both routes from the start: a series that appears only at its first
        # delivery hides that first increase from rate().
        self._delivered = {route: delivered.labels(route=route) for route in ROUTES}
        self._deferred = Counter(DEFERRED, HELP[DEFERRED], registry=registry)
        self._failed = Counter(FAILED, HELP[FAILED], registry=registry)
        self._bounces = Counter(BOUNCES, HELP[BOUNCES], registry=registry)
        self._delivery = Histogram(DELIVERY_SECONDS, HELP[DELIVERY_SECONDS],
                                   buckets=DELIVERY_BUCKETS, registry=registry)
        self._relay = RelayStatus()
        registry.register(self._relay)

    def delivered(self, route: str, recipients: int) -> None:
        self._delivered[route].inc(recipients)

    def deferred(self) -> None:
        self._deferred.inc()

    def failed(self, recipients: int) -> None:
        self._failed.inc(recipients)

    def delivery_time(self, seconds: float) -> None:
        self._delivery.observe(max(0.0, seconds))

    def bounced(self) -> None:
        self._bounces.inc()

    def relay_session(self, ok: bool, at: float) -> None:
        self._relay.session(ok, at)


class RelayStatus(Collector):
    """`mailbag_relay_up` and the time it went down: absent until the first session,
    which a plain Gauge (always exported, 0 at first) cannot say. Both values are
    replaced as one tuple, so the snapshot thread never reads half a change."""

    def __init__(self) -> None:
        self._now: tuple[bool, float | None] | None = None  # (up, down since)

    def session(self, ok: bool, at: float) -> None:
        down_since = self._now[1] if self._now else None
        self._now = (True, None) if ok else (False, down_since if down_since else at)

    def collect(self) -> Iterator[Metric]:
        now = self._now
        if now is None:
            return
        up, down_since = now
        yield GaugeMetricFamily(RELAY_UP, HELP[RELAY_UP], value=1.0 if up else 0.0)
        if down_since is not None:
            yield GaugeMetricFamily(RELAY_DOWN_SINCE, HELP[RELAY_DOWN_SINCE], value=down_since)
