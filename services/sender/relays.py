"""The smarthosts the sender may use, in order, and when each may be tried again.

Relays are tried in their configured order. One that cannot be reached (connect,
TLS, a refused or 421 greeting, EHLO, AUTH, a timeout on the way), or whose session
breaks with a transaction in it before it answered any message (a 421, a timeout, a
dropped connection), backs off:
`Backoff` from its first failure, doubling, but never longer than `relay_retry`,
and reset by a success; meanwhile the next relay carries the mail, and the first
one is tried again after at most `relay_retry`. While every relay backs off,
messages for the relays wait (not deferred: no attempt was made, SPEC §7) until
the earliest one is due again. `reset()` (an operator's flush) makes every relay
due now. A relay that answers a message with 5xx has judged it: that is final,
no other relay is asked (decision.py).

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
    longest: float = math.inf  # relay_retry: the longest a failed relay is left alone
    failures: int = 0
    retry_at: float = 0.0

    def available(self, now: float) -> bool:
        return now >= self.retry_at

    def failed(self, at: float) -> float:
        """A failure at `at`; returns when the relay may be tried again."""
        self.failures += 1
        self.retry_at = at + min(self.backoff.delay(self.failures), self.longest)
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

    def keep_state_of(self, old: RelayPool) -> None:
        """A reload: a relay configured before and still now keeps its backoff."""
        before = {route.name: route.state for route in old.routes}
        for route in self.routes:
            if route.name in before:
                route.state.failures = before[route.name].failures
                route.state.retry_at = before[route.name].retry_at
