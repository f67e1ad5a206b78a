"""What `/healthz` answers (SPEC §9): pure rules over one look at the appliance.

200 and "ok" when no rule applies; 503 with one line per rule that does:

- the sender is not running (nobody holds its alive lock, shared/metrics/alive.py);
- the relay has been down for longer than `relay_down_after` while messages wait:
  its last session failed, and both its first failure since the last success and
  the oldest waiting message are older than that - mail that arrived a minute ago
  has not waited ten minutes on a relay that died an hour ago;
- the oldest waiting message is older than `max_queue_age`;
- the queue cannot be read (then nothing else about it is known).

Waiting means ready or deferred: a held message waits for an operator, not for
delivery, and never makes mailbag unhealthy. The receiver serves the endpoint, so
a receiver that is down is seen as an endpoint that does not answer.
No I/O here: `Look` is gathered by services/monitoring/look.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from services.admin.listing import duration


@dataclass(frozen=True)
class Look:
    """The appliance as seen at one moment (`at`, epoch seconds)."""

    at: float
    sender_running: bool
    relay_up: bool | None = None  # None: unknown (no session yet, no sender)
    relay_down_since: float | None = None  # first failure since the last success
    waiting: int = 0  # ready + deferred messages
    oldest_waiting: float | None = None  # arrival of the oldest of them
    queue_error: str = ""  # why the queue could not be counted ("" when it could)


@dataclass(frozen=True)
class Limits:
    relay_down_after: float  # seconds
    max_queue_age: float  # seconds


def problems(look: Look, limits: Limits) -> list[str]:
    """Why mailbag is unhealthy, one line each; [] when it is healthy."""
    found = []
    if not look.sender_running:
        found.append("sender: not running")
    if look.queue_error:
        found.append(f"queue: cannot be read: {look.queue_error}")
    oldest_age = look.at - look.oldest_waiting if look.oldest_waiting is not None else None
    if look.relay_up is False and look.relay_down_since is not None and oldest_age is not None:
        down_for = look.at - look.relay_down_since
        if min(down_for, oldest_age) > limits.relay_down_after:
            since = datetime.fromtimestamp(look.relay_down_since, UTC).isoformat(
                timespec="seconds")
            found.append(f"relay: down for {duration(down_for)} (since {since}), "
                         f"{look.waiting} message{'' if look.waiting == 1 else 's'} waiting "
                         f"(relay_down_after {duration(limits.relay_down_after)})")
    if oldest_age is not None and oldest_age > limits.max_queue_age:
        found.append(f"queue: the oldest waiting message is {duration(oldest_age)} old "
                     f"(max_queue_age {duration(limits.max_queue_age)})")
    return found
