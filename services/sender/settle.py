"""Settling a message: from what happened to it, to its file and state on disk.

`Settler.settle` asks `decide()` (pure) what becomes of a message after an attempt,
logs the outcome (one line per peer and outcome, each with the message's id),
counts it (shared/metrics/figures.py: nothing when metrics are off),
queues the notices the decision calls for (notices.py) and carries the decision
out: the file finished, failed, rewritten or left, its delivery state saved. The
runner (runner.py) drives delivery; this module owns what the queue remembers.

Invariants (SPEC §4, §7):
- a message leaves `queue.dir` only when every recipient is delivered or has failed
  for good: delivered recipients are removed from the file (`rewrite`) so they never
  get the message twice; failed ones go to the failed folder with the reply;
- each message's delivery state (attempts, next attempt, last reply, held) lives on
  disk next to it (`shared/queue/state.py`) and is honoured after a restart; the
  state of a message that is gone is removed (`forget_gone`);
- no single message or file can stop the sender: a decision whose move fails (full
  disk, another filesystem) is kept, logged once, and the move alone is retried each
  pass - the message is not delivered again meanwhile; a file that cannot be read
  backs off like a deferral and is quarantined when its lifetime is over; an entry
  that is no file is quarantined; what cannot be quarantined stays, logged once.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from services.sender.decision import (
    Action,
    Decision,
    Outcome,
    RetryPolicy,
    Status,
    decide,
    expires_at,
)
from services.sender.notices import Notifier
from shared.log import EventLog
from shared.metrics.figures import SenderFigures
from shared.queue import (
    BLANK,
    DeliveryState,
    QueueEntry,
    QueueFile,
    QueueFormatError,
    QueueReader,
    StateStore,
    arrival_time,
)
from shared.smtp import Reply


def format_time(when: float) -> str:
    """A log line's time (UTC, to the second); "never" for infinity (no relay will
    be due)."""
    if math.isinf(when):
        return "never"
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds")


class Job:
    """A queued message on its way through a pass: what settling it needs.

    A plain slotted class, not a dataclass: one is made per message."""

    __slots__ = ("queue_id", "path", "message", "arrival", "outcomes", "remote", "origins",
                 "expanded")

    def __init__(self, queue_id: str, path: str, message: QueueFile, arrival: float,
                 outcomes: list[Outcome], remote: tuple[str, ...],
                 origins: dict[str, str] | None = None, expanded: bool = False) -> None:
        self.queue_id = queue_id
        self.path = path  # in queue.dir (a plain string: see QueueReader.path_of)
        self.message = message
        self.arrival = arrival
        self.outcomes = outcomes  # decided so far (the local recipients)
        self.remote = remote  # for the relay
        self.origins = origins or {}  # alias target -> the recipient as queued
        self.expanded = expanded  # the recipients went through the aliases (routing.py)


@dataclass(frozen=True)
class Stuck:
    """A move that failed: the message is not delivered again, only the move is
    retried - a decision carried out, or (`decision` None) a quarantine."""

    error: str  # why the move failed
    decision: Decision | None = None
    reason: str = ""  # a quarantine's reason

    @property
    def move(self) -> str:
        return self.decision.action.value if self.decision else "quarantine"


class Settler:
    """The queue's memory of each message, and every move of its file after an attempt.

    Used by the runner's one thread only (operators' changes reach it through the
    runner's requests), so it needs no lock but for `_own_moves`, which the watch
    thread reads."""

    def __init__(self, reader: QueueReader, policy: RetryPolicy, notifier: Notifier,
                 log: EventLog, figures: SenderFigures) -> None:
        self.reader = reader
        self.policy = policy
        self.notifier = notifier
        self.log = log
        self.figures = figures
        self.store = StateStore(reader.dir)
        self.states: dict[str, DeliveryState] = {}
        self._peer_logs: dict[str, EventLog] = {}
        # Delivered messages whose unlink failed: still in queue.dir, but done. Not
        # sent again by this process (the unlink is retried each pass); after a
        # restart they are, once (at-least-once).
        self.undeletable: set[str] = set()
        self.stuck: dict[str, Stuck] = {}
        self._unreadable_states: set[str] = set()  # state files load_all could not read
        # Names renamed into queue.dir by our own rewrites: their "moved in" event is
        # not an arrival and must not wake the runner (see watch.py).
        self._own_moves: set[str] = set()
        self._own_moves_lock = threading.Lock()

    # -- what the queue remembers ----------------------------------------------------

    def load_states(self) -> None:
        """Read every message's delivery state from disk (at start: honour what a
        previous run decided). A state file that cannot be read is logged and
        counts as none: the message is simply tried."""
        states, problems = self.store.load_all()
        self.states = states
        self._unreadable_states = {name for name, _ in problems}
        for name, why in problems:
            self.log.error("state", id=name, error=why)

    def is_due(self, name: str, now: float) -> bool:
        """Not held, and its next attempt has come (a message with no state is due)."""
        state = self.states.get(name)
        return state is None or (not state.held and state.next_attempt <= now)

    def next_due(self) -> float:
        """When the first message that is not held is due (inf: none waits). A message
        whose move is stuck is not due: the move is retried once per pass, and passes
        come at least every poll_interval."""
        return min((s.next_attempt for name, s in self.states.items()
                    if not s.held and name not in self.stuck), default=math.inf)

    def set_state(self, queue_id: str, state: DeliveryState) -> None:
        """Remember a message's state, on disk too when it changed: the disk first,
        so that a state in memory is one on disk (a failed save - OSError - leaves
        both as they were, and the next try writes it)."""
        old = self.states.get(queue_id, BLANK)
        if old == state:
            return
        # Only a change of the held or expanded flag must survive a power cut; a lost
        # next attempt means the message is simply tried once more.
        self.store.save(queue_id, state, durable=state.held != old.held
                        or state.expanded != old.expanded)
        if state.is_blank:
            self.states.pop(queue_id, None)
        else:
            self.states[queue_id] = state

    def forget_gone(self, present: set[str], strange: set[str]) -> None:
        """Drop what is known of messages no longer queued (delivered, failed,
        removed by hand), on disk too: a finished message's state never lingers."""
        gone = [name for name in self.states if name not in present]
        for name in gone:
            del self.states[name]
        if gone or not self._unreadable_states <= present:
            self.store.prune(present)
            self._unreadable_states &= present
        self.undeletable &= present
        for name in [n for n in self.stuck if n not in present and n not in strange]:
            del self.stuck[name]
        with self._own_moves_lock:
            self._own_moves &= present

    def is_own_move(self, name: str) -> bool:
        """True (once) if `name` appeared in queue.dir by our own rename."""
        with self._own_moves_lock:
            if name in self._own_moves:
                self._own_moves.discard(name)
                return True
        return False

    def report_unfinished(self, failed: Sequence[tuple[str, OSError]]) -> None:
        """Log (once) the delivered messages whose unlink failed; they stay done."""
        for path, err in failed:
            name = os.path.basename(path)
            if name not in self.undeletable:
                self.undeletable.add(name)
                self.log.error("finish", id=name, error=err.strerror or str(err))

    # -- after an attempt ------------------------------------------------------------

    def settle(self, job: Job, outcomes: Sequence[Outcome], *, at: float,
               waiting_until: float, hold: bool = False) -> Decision | None:
        """Ask decide() what becomes of the message, log and count it, queue its
        notices, carry it out. `hold`: an operator held it, before or during the
        attempt. The decision, or None when its move failed (kept and retried: see
        `retry_stuck`)."""
        state = self.states.get(job.queue_id, BLANK)
        if hold:
            state = replace(state, held=True)
        decision = decide(outcomes, sender=job.message.sender, state=state, at=at,
                          arrival=job.arrival, policy=self.policy,
                          waiting_until=waiting_until, expanded=job.expanded)
        self.log_outcomes(job.queue_id, decision)
        self.count(decision, job.arrival, at)
        if decision.bounce or decision.warn:  # queued before the move: never lost
            self._notify(job, decision, at)
        try:
            self.carry_out(job, decision)
        except (OSError, QueueFormatError) as err:  # e.g. a full disk: keep it, retry
            self._set_stuck(job.queue_id, Stuck(_why(err), decision))
            return None
        return decision

    def _notify(self, job: Job, decision: Decision, at: float) -> None:
        """Queue the notices; a notice that cannot be built (whatever the sender's
        address holds) is logged with the id and never stops the message's move."""
        try:
            self.notifier.notify(job.queue_id, job.message, decision, job.origins,
                                 job.arrival, at)
        except Exception as exc:  # noqa: BLE001 - one odd address must not stop delivery
            self.log.error("bounce", id=job.queue_id, to=f"<{job.message.sender}>", exc=exc)

    def finish_sent(self, job: Job, peer: str, results: Sequence[tuple[str, Reply]],
                    at: float) -> None:
        """The common case of `settle`, without its lists: every recipient relayed with
        one 2xx at `at`, none was local. decide() would say FINISH; the same log line
        and figures."""
        to = ",".join([f"<{r}>" for r, _ in results])
        self.peer_log(peer).ok("sent", id=job.queue_id, to=to, reply=str(results[0][1]))
        self.figures.delivered("relay", len(results))
        self.figures.delivery_time(at - job.arrival)
        self.reader.finish(job.path)
        if job.queue_id in self.states:
            self.set_state(job.queue_id, BLANK)

    def carry_out(self, job: Job, decision: Decision) -> None:
        """Move the file and its state as `decision` says; OSError/QueueFormatError if
        a step fails (the queued file is then as it was, or rewritten whole)."""
        queue_id, message = job.queue_id, job.message
        path = Path(job.path)
        if decision.action is Action.FINISH:
            self.reader.finish(job.path)
        elif decision.action is Action.FAIL:
            failed_part, reasons = _failed_part(message, decision)
            try:
                self.reader.fail(path, failed_part, reasons)
            except QueueFormatError:  # cannot be written again: move it as it is
                self.reader.quarantine(path, "; ".join(reasons))
        elif decision.action is Action.PARTIAL:
            if decision.failed:  # first the record, then the rewrite: a crash repeats it
                self.reader.fail_some(path, *_failed_part(message, decision))
            with self._own_moves_lock:
                self._own_moves.add(queue_id)
            self.reader.rewrite(path, QueueFile(message.sender, decision.remaining,
                                                message.data))
        self.set_state(queue_id, decision.state)

    # -- what cannot be read or moved ------------------------------------------------

    def unreadable(self, entry: QueueEntry, err: OSError, at: float) -> None:
        """A file that cannot be read (EACCES, EIO): retried with backoff like a
        deferral, and quarantined once its lifetime is over."""
        reason = f"cannot read: {err.strerror or err}"
        arrival = arrival_time(entry.name, entry.mtime_ns / 1e9)
        if at >= expires_at(arrival, self.policy):
            self.quarantine(entry.name, f"{reason}, for longer than max_queue_lifetime")
            return
        self.log.error("read", id=entry.name, error=reason)
        self.defer_untried(entry, reason, at)

    def defer_untried(self, entry: QueueEntry, reason: str, at: float) -> None:
        """A message that could not even be tried (unreadable, a bug while reading):
        back off like a deferral, never past its expiry."""
        state = self.states.get(entry.name, BLANK)
        attempts = state.attempts + 1
        expiry = expires_at(arrival_time(entry.name, entry.mtime_ns / 1e9), self.policy)
        next_attempt = min(at + self.policy.backoff.delay(attempts), expiry)
        backed_off = replace(state, attempts=attempts, next_attempt=next_attempt,
                             last_reply=reason)
        try:
            self.set_state(entry.name, backed_off)
        except OSError as err:  # a full disk: the backoff holds in memory, for this run
            self.states[entry.name] = backed_off
            self.log.error("state", id=entry.name, error=err.strerror or str(err))

    def quarantine(self, queue_id: str, reason: str) -> bool:
        """Set an unreadable file (or a non-file) aside; if that fails, it stays where
        it is, logged once, and the move is retried each pass. True if moved."""
        try:
            self.reader.quarantine(Path(self.reader.path_of(queue_id)), reason)
        except OSError as err:
            self._set_stuck(queue_id, Stuck(_why(err), reason=reason))
            return False
        self.stuck.pop(queue_id, None)
        self.states.pop(queue_id, None)
        self.log.fail("quarantine", id=queue_id, reason=reason)
        return True

    def retry_stuck(self, entry: QueueEntry) -> bool:
        """Try a failed move again; True if it succeeded."""
        stuck = self.stuck[entry.name]
        if stuck.decision is None:
            return self.quarantine(entry.name, stuck.reason)
        decision = stuck.decision
        if self.states.get(entry.name, BLANK).held:  # held by an operator meanwhile
            decision = replace(decision, state=replace(decision.state, held=True))
        try:
            message = self.reader.read(self.reader.path_of(entry.name), entry.size)
            job = Job(entry.name, self.reader.path_of(entry.name), message,
                      arrival_time(entry.name, entry.mtime_ns / 1e9), [], ())
            self.carry_out(job, decision)
        except (OSError, QueueFormatError) as err:
            self._set_stuck(entry.name, replace(stuck, error=_why(err)))
            return False
        del self.stuck[entry.name]
        self.log.ok("unstuck", id=entry.name, move=stuck.move)
        return True

    def _set_stuck(self, queue_id: str, stuck: Stuck) -> None:
        """Remember a failed move; logged once (again only if the error changes)."""
        known = self.stuck.get(queue_id)
        self.stuck[queue_id] = stuck
        if known is None or known.error != stuck.error:
            details = {"reason": stuck.reason} if stuck.reason else {}
            self.log.error("stuck", id=queue_id, move=stuck.move, error=stuck.error, **details)

    # -- the log -----------------------------------------------------------------------

    def log_outcomes(self, queue_id: str, decision: Decision) -> None:
        """One line per peer and outcome, each with the message's id."""
        until = format_time(decision.state.next_attempt) if decision.remaining else ""
        groups: dict[tuple[str, Status, str], list[str]] = {}
        for o in decision.outcomes:
            groups.setdefault((o.peer, o.status, o.detail), []).append(o.recipient)
        for (peer, status, detail), recipients in groups.items():
            log = self.peer_log(peer)
            to = ",".join(f"<{r}>" for r in recipients)
            if status is Status.SENT:
                log.ok("sent", id=queue_id, to=to, reply=detail)
            elif status is Status.FAILED:
                log.fail("failed", id=queue_id, to=to, reply=detail)
            elif status is Status.DEFERRED:
                log.defer("deferred", id=queue_id, to=to, until=until, reply=detail)
            else:
                log.defer("waiting", id=queue_id, to=to, until=until, reason=detail)

    def count(self, decision: Decision, arrival: float, at: float) -> None:
        """The attempt's figures: recipients delivered (per route) and failed for
        good, whether it ended in a temporary failure, and the time to the relay."""
        relayed = local = failed = 0
        deferred = False
        for outcome in decision.outcomes:
            status = outcome.status
            if status is Status.SENT:
                if outcome.peer == "local":
                    local += 1
                else:
                    relayed += 1
            elif status is Status.FAILED:
                failed += 1
            elif status is Status.DEFERRED:
                deferred = True
        figures = self.figures
        if relayed:
            figures.delivered("relay", relayed)
            figures.delivery_time(at - arrival)
        if local:
            figures.delivered("local", local)
        if failed:
            figures.failed(failed)
        if deferred:
            figures.deferred()

    def peer_log(self, peer: str) -> EventLog:
        """One EventLog per peer: with_peer() binds a new loguru logger each time."""
        log = self._peer_logs.get(peer)
        if log is None:
            log = self._peer_logs[peer] = self.log.with_peer(peer)
        return log


def _failed_part(message: QueueFile, decision: Decision) -> tuple[QueueFile, list[str]]:
    """What the failed folder keeps of a message: its failed recipients only, and
    the reason for each (`QueueReader.fail`'s arguments)."""
    return (QueueFile(message.sender, tuple(o.recipient for o in decision.failed),
                      message.data),
            [f"<{o.recipient}>: {o.detail}" for o in decision.failed])


def _why(err: BaseException) -> str:
    return getattr(err, "strerror", None) or str(err)
