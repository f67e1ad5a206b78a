"""The smarthosts the sender may use, in order, and when each may be tried again.

A relay that cannot be reached (connect, TLS, greeting, EHLO, AUTH) backs off like
a message does: `Backoff` from its first failure, doubling, reset by a success.
While it backs off no message is tried against it; messages for the relay wait
(they are not deferred: no attempt was made, SPEC §7) until the earliest relay
is due again. `reset()` (an operator's flush) makes every relay due now.

Pure bookkeeping: times are passed in, connections are made by the runner.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.sender.decision import Backoff
from services.sender.relay import RelayConnection


@dataclass
class RelayState:
    """Whether one relay may be tried now."""

    backoff: Backoff
    failures: int = 0
    retry_at: float = 0.0

    def available(self, now: float) -> bool:
        return now >= self.retry_at

    def failed(self, at: float) -> float:
        """A failure at `at`; returns when the relay may be tried again."""
        self.failures += 1
        self.retry_at = at + self.backoff.delay(self.failures)
        return self.retry_at

    def succeeded(self) -> None:
        self.failures = 0
        self.retry_at = 0.0


@dataclass
class RelayRoute:
    """One smarthost: its name in the log and how to open a session with it."""

    name: str  # host:port
    connect: Callable[[], RelayConnection]
    state: RelayState = field(default_factory=lambda: RelayState(Backoff(60.0, 3600.0)))


class RelayPool:
    """The configured relays, tried in order (empty: no relay configured)."""

    def __init__(self, routes: Sequence[RelayRoute]) -> None:
        self.routes = list(routes)

    @property
    def configured(self) -> bool:
        return bool(self.routes)

    @property
    def name(self) -> str:
        """How the log names "the relay" where no single one is meant."""
        return ",".join(r.name for r in self.routes) or "-"

    def candidates(self, now: float) -> list[RelayRoute]:
        """The relays that may be tried now, in order."""
        return [r for r in self.routes if r.state.available(now)]

    def next_retry(self) -> float:
        """When the first relay becomes due again (inf: no relay configured)."""
        return min((r.state.retry_at for r in self.routes), default=math.inf)

    def reset(self) -> None:
        for route in self.routes:
            route.state.succeeded()
