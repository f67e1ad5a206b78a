"""What an operator may do to a queued message (SPEC §7): hold, release, delete, flush.

Only the queue's owner calls these: the running sender (which applies the
`mailbag` command's requests between two messages, services/sender/control.py) or
the `mailbag` command itself while it holds the queue lock because no sender runs.
So a message is never changed under a delivery in progress: the sender handles the
ones it is delivering itself, and these functions see only messages at rest.

Each returns what it did as a short phrase for the operator ("held", "not held",
...); `NOT_QUEUED` when there is no such message. `states` is the owner's view of
the delivery states (shared/queue/state.py), kept in step with the disk. `apply`
is the one entry for both owners: one message's change that cannot be made (an
OSError) is that message's answer, `"error: ..."`, and the next id still gets its
change - so an operator's command reports, and logs, every id it acted upon.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from shared.queue.files import fsync_dir, unlink_quietly
from shared.queue.state import BLANK, DeliveryState, StateStore

ACTIONS = ("hold", "release", "delete", "flush")  # what an operator may ask for
NOT_QUEUED = "not in the queue"
ERROR_PREFIX = "error: "  # an answer saying the change could not be made


def apply(action: str, queue_dir: Path, store: StateStore,
          states: dict[str, DeliveryState], queue_id: str, now: float) -> str:
    """One of ACTIONS to one message at rest: what became of it (see the module doc)."""
    if action not in ACTIONS:
        raise ValueError(f"no such change: {action!r}")
    try:
        if action == "hold":
            return hold(queue_dir, store, states, queue_id)
        if action == "release":
            return release(queue_dir, store, states, queue_id, now)
        if action == "flush":
            return flush(queue_dir, store, states, queue_id, now)
        return delete(queue_dir, store, states, queue_id)
    except OSError as err:
        return f"{ERROR_PREFIX}{err.strerror or err}"


def succeeded(answer: str) -> bool:
    """The answer of `apply` says the message was there and the change was made."""
    return answer != NOT_QUEUED and not answer.startswith(ERROR_PREFIX)


def is_queued(queue_dir: Path, queue_id: str) -> bool:
    """A message of that id is in queue.dir (ids never start with a dot)."""
    return (not queue_id.startswith(".") and "/" not in queue_id
            and os.path.isfile(os.path.join(queue_dir, queue_id)))


def deferred_ids(states: dict[str, DeliveryState], now: float) -> list[str]:
    """The messages waiting for a next attempt after `now` (held ones not counted):
    what `flush` with no ids makes due."""
    return [queue_id for queue_id, state in states.items()
            if not state.held and state.next_attempt > now]


def _save(store: StateStore, states: dict[str, DeliveryState], queue_id: str,
          state: DeliveryState, *, durable: bool) -> None:
    store.save(queue_id, state, durable=durable)
    if state.is_blank:
        states.pop(queue_id, None)
    else:
        states[queue_id] = state


def hold(queue_dir: Path, store: StateStore, states: dict[str, DeliveryState],
         queue_id: str) -> str:
    """Keep the message queued and unsent until it is released (durably)."""
    if not is_queued(queue_dir, queue_id):
        return NOT_QUEUED
    state = states.get(queue_id, BLANK)
    if state.held:
        return "already held"
    _save(store, states, queue_id, replace(state, held=True), durable=True)
    return "held"


def release(queue_dir: Path, store: StateStore, states: dict[str, DeliveryState],
            queue_id: str, now: float) -> str:
    """Undo a hold: the message is due now (its attempts so far still count)."""
    if not is_queued(queue_dir, queue_id):
        return NOT_QUEUED
    state = states.get(queue_id, BLANK)
    if not state.held:
        return "not held"
    _save(store, states, queue_id, replace(state, held=False, next_attempt=min(
        state.next_attempt, now)), durable=True)
    return "released"


def flush(queue_dir: Path, store: StateStore, states: dict[str, DeliveryState],
          queue_id: str, now: float) -> str:
    """Make a deferred message due now; a held one stays held, others are due anyway."""
    if not is_queued(queue_dir, queue_id):
        return NOT_QUEUED
    state = states.get(queue_id, BLANK)
    if state.held:
        return "held (release it first)"
    if state.next_attempt <= now:
        return "due already"
    _save(store, states, queue_id, replace(state, next_attempt=now), durable=False)
    return "due now"


def delete(queue_dir: Path, store: StateStore, states: dict[str, DeliveryState],
           queue_id: str) -> str:
    """Remove the message and its state for good."""
    if not is_queued(queue_dir, queue_id):
        return NOT_QUEUED
    os.unlink(os.path.join(queue_dir, queue_id))
    unlink_quietly(store.path(queue_id))
    states.pop(queue_id, None)
    try:
        fsync_dir(queue_dir)  # a power cut must not bring it back
    except OSError as err:  # gone all the same: say so, and what is not yet sure
        return f"deleted (not yet on disk: {err.strerror or err})"
    return "deleted"
