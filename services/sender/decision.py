"""What happens to a message after an attempt: a pure function of what happened.

`decide()` takes each recipient's outcome, the time the attempt ended, the
message's arrival and its delivery state, and returns a `Decision`: which
recipients are done, which failed for good, what is left and when it is tried
again, and whether its sender hears about it (a bounce, a delay warning). No
clock, no file, no log: the runner carries decisions out (runner.py) and the
rules below are tested from a table (tests/test_sender_decision.py).

The rules (SPEC §4, §7, §8):
- the reply code alone decides (RFC 5321 §4.2.1): 2xx sent, 4xx deferred, 5xx
  failed; a recipient not attempted at all (the relay is away, no relay is
  configured, the sender is stopping) is waiting, which is not a failure;
- a message leaves the queue only when every recipient is sent or failed;
- a deferral counts an attempt and waits `backoff.delay(attempts)` from the time
  of the failure (never from the start of a pass); waiting counts nothing and
  lasts until the time the runner names (when the relay may be tried again);
- from arrival + `lifetime` on, whatever is still deferred or waiting fails
  (status 4.4.7, "delivery time expired"); no retry is scheduled past that time,
  nor past the delay-warning time while no warning was sent;
- failed recipients bounce (RFC 3464) unless the sender is the null sender `<>`,
  whose messages never cause a notice (no loops); one delay warning per message;
- the state's `held` flag (an operator's hold) is kept as it is;
- outcomes of an alias expansion (`expanded`) are per target: when a partial
  delivery rewrites the file with what is left, those targets are final, and the
  state says so (`expanded`): the aliases never apply to them again.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace

from shared.queue import BLANK, DeliveryState
from shared.smtp import Reply


class Status(enum.Enum):
    """What happened to one recipient in one attempt."""

    SENT = "sent"
    DEFERRED = "deferred"  # a temporary failure: try again after a backoff
    FAILED = "failed"  # a permanent failure
    WAITING = "waiting"  # not attempted: no failure counted


@dataclass(frozen=True)
class Outcome:
    """One recipient's outcome: the reply (or why nothing was tried) and who said it."""

    recipient: str
    status: Status
    detail: str  # the reply as one line, or why nothing was tried
    peer: str  # relay host:port, "local", or "-" when nobody was asked
    enhanced: str = ""  # the RFC 3463 status code, when known (a DSN's Status)
    reply: Reply | None = None  # the reply itself, when there was one

    @classmethod
    def of_reply(cls, recipient: str, reply: Reply, peer: str) -> Outcome:
        return cls(recipient, classify(reply), str(reply), peer, reply.enhanced, reply)


def classify(reply: Reply) -> Status:
    """By the code, never the text (RFC 5321 §4.2.1)."""
    if reply.is_success:
        return Status.SENT
    return Status.DEFERRED if reply.is_transient else Status.FAILED


class Backoff:
    """Exponential backoff: `initial`, doubling per failure, at most `maximum` seconds."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum

    def delay(self, failures: int) -> float:
        """The wait after the `failures`-th failure in a row (1 -> initial)."""
        exponent = min(max(failures - 1, 0), 64)
        return min(self.initial * (2**exponent), self.maximum)


@dataclass(frozen=True)
class RetryPolicy:
    backoff: Backoff
    lifetime: float  # seconds a message may stay queued (max_queue_lifetime)
    delay_warning: float | None = None  # seconds deferred before one notice; None: off


class Action(enum.Enum):
    """What becomes of the queue file."""

    FINISH = "finish"  # every recipient sent: the file goes
    FAIL = "fail"  # nothing left to try and some failed: the file goes to failed/
    PARTIAL = "partial"  # some done, some left: record the failed ones, rewrite the rest
    KEEP = "keep"  # nothing done: the file stays untouched, only its state changes


@dataclass(frozen=True)
class Decision:
    action: Action
    outcomes: tuple[Outcome, ...]  # as they stand after expiry
    failed: tuple[Outcome, ...]  # failed for good in this attempt
    remaining: tuple[str, ...]  # still to deliver, in queue order
    state: DeliveryState  # the state of what remains (BLANK when nothing does)
    bounce: bool  # failed recipients go back to the sender in a notice
    warn: bool  # a delay warning goes to the sender now
    expired: bool  # the lifetime ran out in this attempt


EXPIRED_STATUS = "4.4.7"  # RFC 3463: delivery time expired


def expires_at(arrival: float, policy: RetryPolicy) -> float:
    return arrival + policy.lifetime


def decide(
    outcomes: Sequence[Outcome],
    *,
    sender: str,
    state: DeliveryState,
    at: float,
    arrival: float,
    policy: RetryPolicy,
    waiting_until: float,
    expanded: bool = False,
) -> Decision:
    """The decision after an attempt that ended at `at` (see the module doc).

    `outcomes`: one per recipient still queued before the attempt, in queue order
    (per alias target when `expanded`: the queued recipients went through the aliases).
    `waiting_until`: when the waiting recipients may be tried again.
    """
    deadline = expires_at(arrival, policy)
    expired = at >= deadline and any(
        o.status in (Status.DEFERRED, Status.WAITING) for o in outcomes)
    if expired:
        outcomes = [_expire(o, policy.lifetime) for o in outcomes]
    failed = tuple(o for o in outcomes if o.status is Status.FAILED)
    later = [o for o in outcomes if o.status in (Status.DEFERRED, Status.WAITING)]
    remaining = tuple(o.recipient for o in later)
    bounce = bool(failed) and sender != ""
    if not remaining:
        action = Action.FAIL if failed else Action.FINISH
        return Decision(action, tuple(outcomes), failed, (), BLANK, bounce, False, expired)
    deferred = [o for o in later if o.status is Status.DEFERRED]
    attempts = state.attempts + (1 if deferred else 0)
    if deferred:
        next_attempt = at + policy.backoff.delay(attempts)
    else:
        next_attempt = waiting_until
    warn = (policy.delay_warning is not None and not state.warned and sender != ""
            and at - arrival >= policy.delay_warning)
    next_attempt = min(next_attempt, deadline)
    if policy.delay_warning is not None and not (state.warned or warn) and sender != "":
        next_attempt = min(next_attempt, arrival + policy.delay_warning)
    action = Action.PARTIAL if len(remaining) < len(outcomes) else Action.KEEP
    new_state = replace(state, attempts=attempts, next_attempt=next_attempt,
                        last_reply=(deferred or later)[0].detail,
                        warned=state.warned or warn,
                        expanded=state.expanded or (expanded and action is Action.PARTIAL))
    return Decision(action, tuple(outcomes), failed, remaining, new_state, bounce, warn,
                    expired)


def _expire(outcome: Outcome, lifetime: float) -> Outcome:
    if outcome.status not in (Status.DEFERRED, Status.WAITING):
        return outcome
    detail = f"message expired after {lifetime:g}s in the queue; last: {outcome.detail}"
    return Outcome(outcome.recipient, Status.FAILED, detail, outcome.peer, EXPIRED_STATUS,
                   outcome.reply)
