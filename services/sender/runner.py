"""The queue runner: take messages out of the queue and deliver them, never losing one.

Invariants (SPEC §4, issue 3):
- a message leaves `queue.dir` only when every recipient is delivered or has failed
  for good: delivered recipients are removed from the file (`rewrite`) so they never
  get the message twice; failed ones go to the failed folder with the reply;
- exactly one process delivers a file at a time: the runner works only while its
  reader holds the queue lock (`QueueReader.try_lock`, see shared/queue.py), and
  reads each file where it lies in queue.dir (no claim rename); an unparseable
  file is quarantined with the reason, and the runner keeps going;
- a deferred message is not moved: it keeps its name and mtime, so its place in
  the queue; a rewrite (fewer recipients left) keeps the mtime too;
- the decision is taken by the reply code alone: 2xx sent, 4xx (and connection,
  timeout, TLS errors) deferred, 5xx failed;
- a deferred message waits `retry_initial` seconds, doubling on each further
  failure up to `retry_max`; once older than `max_queue_lifetime` (counted from the
  arrival time in its queue id) whatever is still deferred fails;
- when the relay cannot be reached the relay itself backs off (same schedule): no
  message is tried against it until then; local recipients are still delivered;
- each pass takes the whole queue oldest first and the runner looks again at once
  when a pass did anything; otherwise it waits on an Event that the watchdog
  observer sets when a file arrives, at most `poll_interval` (never a busy loop);
- one relay session carries the pass, pipelined (RFC 2920): while the relay works
  on message N, the runner settles N-1 and reads N+1, which is handed
  to the session so that its commands follow N's final dot. At most one message
  waits unsent; a failure settles what came back and defers the messages whose
  commands went out, while the unsent one goes to the next session. A message
  leaves the queue (`finish`) as soon as its outcome is read, before the runner
  reads any further reply: after a crash only the messages in flight - the
  relay's 250 not yet read or not yet acted on, at most two - and those whose
  unlink still waits behind (`FINISH_BACKLOG`) are sent again by the next lock
  holder (at-least-once, like every MTA). A stop holds the unsent message back;
  on TERM the reader's close() flushes the finished ones before the exit.

The retry schedule lives in memory, keyed by queue id. Across a restart it is lost
on purpose: every queued message is due once at start-up and its backoff starts
again from `retry_initial`; `max_queue_lifetime` is unaffected because it is
counted from the queue id. Time is always passed in (`now`) so tests drive it.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from services.sender.client import OutgoingMessage
from services.sender.local import LocalDelivery, is_local
from services.sender.relay import RelayConnection, RelayError
from shared.config import Config
from shared.log import EventLog
from shared.queue import QueueEntry, QueueFile, QueueFormatError, QueueReader, arrival_time
from shared.smtp import Reply

PROGRAM = "S-SMTP"
MIN_SLEEP = 0.01  # seconds; the shortest wait between passes


def format_time(when: float) -> str:
    if math.isinf(when):
        return "never"
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds")


class Backoff:
    """Exponential backoff: `initial`, doubling per failure, at most `maximum` seconds."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum

    def delay(self, failures: int) -> float:
        """The wait after the `failures`-th failure in a row (1 -> initial)."""
        exponent = min(max(failures - 1, 0), 64)
        return min(self.initial * (2**exponent), self.maximum)


@dataclass
class Deferral:
    attempts: int  # failed attempts so far (held-back passes do not count)
    until: float
    reason: str
    held: bool = False  # waiting for the relay, not backing off after a failure


class RetrySchedule:
    """When each deferred message may be tried again (in memory, keyed by queue id)."""

    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff
        self._entries: dict[str, Deferral] = {}

    def due(self, queue_id: str, now: float) -> bool:
        entry = self._entries.get(queue_id)
        return entry is None or entry.until <= now

    def defer(self, queue_id: str, now: float, reason: str) -> float:
        """A failed attempt: back off once more. Returns the time of the next try."""
        entry = self._entries.get(queue_id)
        attempts = (entry.attempts if entry else 0) + 1
        until = now + self.backoff.delay(attempts)
        self._entries[queue_id] = Deferral(attempts, until, reason)
        return until

    def hold(self, queue_id: str, until: float, reason: str) -> None:
        """Not attempted (the relay is away): wait until `until`, no failure counted."""
        entry = self._entries.get(queue_id)
        self._entries[queue_id] = Deferral(entry.attempts if entry else 0, until, reason, True)

    def get(self, queue_id: str) -> Deferral | None:
        return self._entries.get(queue_id)

    def forget(self, queue_id: str) -> None:
        self._entries.pop(queue_id, None)

    def prune(self, present: set[str]) -> None:
        """Drop entries of messages no longer queued (delivered, failed, removed by hand)."""
        for queue_id in [q for q in self._entries if q not in present]:
            del self._entries[queue_id]

    def next_due(self) -> float | None:
        return min((e.until for e in self._entries.values()), default=None)


class RelayState:
    """Whether the relay may be tried now; it backs off like a message does."""

    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff
        self.failures = 0
        self.retry_at = 0.0

    def available(self, now: float) -> bool:
        return now >= self.retry_at

    def failed(self, now: float) -> float:
        self.failures += 1
        self.retry_at = now + self.backoff.delay(self.failures)
        return self.retry_at

    def succeeded(self) -> None:
        self.failures = 0
        self.retry_at = 0.0


class _Job:
    """A queued message on its way through a pass: what settling it needs.

    A plain slotted class, not a dataclass: one is made per message (issue 6)."""

    __slots__ = ("queue_id", "path", "message", "mtime_ns", "outcomes", "remote")

    def __init__(self, queue_id: str, path: str, message: QueueFile, mtime_ns: int,
                 outcomes: list[Outcome], remote: tuple[str, ...]) -> None:
        self.queue_id = queue_id
        self.path = path  # in queue.dir (a plain string: see QueueReader.path_of)
        self.message = message
        self.mtime_ns = mtime_ns  # as listed: the arrival time if the id has none
        self.outcomes = outcomes  # decided so far (the local recipients)
        self.remote = remote  # for the relay

    def expires(self, lifetime: float) -> float:
        return arrival_time(self.queue_id, self.mtime_ns / 1e9) + lifetime


@dataclass(frozen=True)
class Outcome:
    """What happened to one recipient in one attempt."""

    recipient: str
    status: str  # sent | deferred | failed | held (not attempted)
    detail: str  # the reply, or why nothing was tried
    peer: str  # relay host:port or "local"


def classify(reply: Reply) -> str:
    """By the code, never the text (RFC 5321 §4.2.1)."""
    if reply.code // 100 == 2:
        return "sent"
    return "deferred" if reply.is_transient else "failed"


class QueueRunner:
    """Drains the queue: local recipients to Maildirs, the others through the relay."""

    def __init__(
        self,
        config: Config,
        reader: QueueReader,
        log: EventLog,
        *,
        connect: Callable[[], RelayConnection] | None,
        local: LocalDelivery | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        snd = config.sender
        self.config = config
        self.reader = reader
        self.log = log
        self.connect = connect  # None: no relay configured
        self.local = local or LocalDelivery(config.local.maildir)
        self.local_domains = frozenset(config.local.domains)
        self.stop = stop or threading.Event()
        self.schedule = RetrySchedule(Backoff(snd.retry_initial, snd.retry_max))
        self.relay = RelayState(Backoff(snd.retry_initial, snd.retry_max))
        self.relay_peer = str(snd.relay) if snd.relay else "-"
        self.poll_interval = snd.poll_interval
        self.lifetime = snd.max_queue_lifetime
        self.per_connection = snd.messages_per_connection
        self._conn: RelayConnection | None = None
        self._peer_logs: dict[str, EventLog] = {}
        self._waiting_for_relay = 0  # messages held back in this pass
        # Delivered messages whose unlink failed: still in queue.dir, but done. Not
        # sent again by this process (the unlink is retried each pass); after a
        # restart they are, once (at-least-once), as the claims' design gave them back.
        self._undeletable: set[str] = set()
        self._last_notice: tuple[tuple[object, ...], float] | None = None
        # Names this runner renamed into queue.dir (a rewrite over the original):
        # their "moved in" event is ours, not an arrival, and must not wake the
        # runner (see watch.py).
        self.own_moves: set[str] = set()
        self._own_moves_lock = threading.Lock()

    # -- the loop ---------------------------------------------------------------------

    def run(self, wake: threading.Event, clock: Callable[[], float] = time.time) -> None:
        """Pass after pass until stopped; between passes wait on `wake` (watchdog/stop).

        The reader must hold the queue lock (one deliverer per queue)."""
        if not self.reader.locked:
            raise RuntimeError("the queue runner needs the queue lock (QueueReader.try_lock)")
        while not self.stop.is_set():
            wake.clear()
            if self.run_pass(clock()):
                continue  # something happened: look again at once
            self.close_relay()  # QUIT before sleeping
            if self.stop.is_set():
                break
            wake.wait(self.sleep_time(clock()))
        self.close_relay()

    def run_pass(self, now: float) -> bool:
        """One pass over the whole queue, oldest first. True if any message was handled."""
        entries = self.reader.scan().ready
        present = {e.name for e in entries}
        self.schedule.prune(present)
        with self._own_moves_lock:
            self.own_moves &= present
        self._waiting_for_relay = 0
        due: deque[QueueEntry] = deque()
        self._undeletable &= present
        for name in self._undeletable:
            self.reader.finish(self.reader.path_of(name))  # try the unlink again
        for entry in entries:
            if entry.name in self._undeletable:
                continue
            if self.schedule.due(entry.name, now):
                due.append(entry)
            elif self._held_for_relay(entry.name):
                self._waiting_for_relay += 1
        worked = self._drain(due, now)
        self.report_unfinished(self.reader.flush())
        self._report_waiting(now)
        return worked

    def report_unfinished(self, failed: Sequence[tuple[str, OSError]]) -> None:
        """Log (once) the delivered messages whose unlink failed; they stay done."""
        for path, err in failed:
            name = os.path.basename(path)
            if name not in self._undeletable:
                self._undeletable.add(name)
                self.log.error("finish", id=name, error=err.strerror or str(err))

    def is_own_move(self, name: str) -> bool:
        """True (once) if `name` appeared in queue.dir by this runner's own rename."""
        with self._own_moves_lock:
            if name in self.own_moves:
                self.own_moves.discard(name)
                return True
        return False

    def _rewrite(self, path: str, message: QueueFile) -> None:
        """Rewrite a queued file in place; its rename over the original is ours."""
        with self._own_moves_lock:
            self.own_moves.add(os.path.basename(path))
        self.reader.rewrite(Path(path), message)

    def sleep_time(self, now: float) -> float:
        """Until the next deferred message or relay retry is due, at most poll_interval."""
        wake_at = now + self.poll_interval
        next_due = self.schedule.next_due()
        if next_due is not None:
            wake_at = min(wake_at, next_due)
        if not self.relay.available(now):
            wake_at = min(wake_at, max(self.relay.retry_at, now))
        return max(MIN_SLEEP, wake_at - now)

    def close_relay(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- the pass's pipeline -------------------------------------------------------------

    def _drain(self, due: deque[QueueEntry], now: float) -> bool:
        """Take the due messages through reading, delivery and settling; True if any."""
        worked = False
        ready: deque[_Job] = deque()  # read, waiting for the relay
        flight: dict[str, _Job] = {}  # handed to the relay session, outcome not read
        while True:
            if self.stop.is_set():
                self._hold_unsent(flight, "stopping", now)
            else:
                worked |= self._feed(due, ready, flight, now)
            if not flight:
                if self.stop.is_set():
                    self._hold_ready(ready, "stopping", now)
                    return worked
                if not (due or ready):
                    return worked
                continue
            self._exchange(flight, ready, now)

    def _feed(
        self, due: deque[QueueEntry], ready: deque[_Job], flight: dict[str, _Job], now: float
    ) -> bool:
        """Prepare messages and hand them to the relay until one waits unsent there."""
        worked = False
        while (due or ready) and self._room(flight):
            job = ready.popleft() if ready else self._prepare(due.popleft(), now)
            if job is None:
                continue
            worked = True
            if not job.remote:
                self._settle(job, [], now)
                continue
            conn, why = self._connection(now)
            if conn is None:
                self._waiting_for_relay += 1
                self._settle(job, [Outcome(r, "held", why, self.relay_peer)
                                   for r in job.remote], now)
                continue
            conn.submit(OutgoingMessage(job.queue_id, job.message.sender, job.remote,
                                        job.message.data))
            flight[job.queue_id] = job
        return worked

    def _room(self, flight: dict[str, _Job]) -> bool:
        """May another message go to the relay now? With none in flight, always (a new
        session may be opened); else only on the same session, none waiting unsent."""
        conn = self._conn
        if not flight:
            return True
        return (conn is not None and conn.usable and conn.unsent == 0
                and conn.messages < self.per_connection)

    def _exchange(self, flight: dict[str, _Job], ready: deque[_Job], now: float) -> None:
        """Let the session write what it can, settle the outcomes that came, then (if
        anything is still in flight) wait for the relay's next bytes."""
        conn = self._conn
        assert conn is not None
        try:
            conn.pump()
            self._settle_results(conn, flight, now)
            if flight:
                conn.wait()
        except RelayError as err:
            self._settle_results(conn, flight, now)  # what came before the failure
            for message in conn.take_unsent():  # never started: the next session's
                ready.append(flight.pop(message.ref))
            for job in list(flight.values()):
                conn.log.fail("transaction", id=job.queue_id, error=str(err))
                self._settle(job, [Outcome(r, "deferred", str(err), conn.peer)
                                   for r in job.remote], now)
            flight.clear()
            self.close_relay()

    def _settle_results(self, conn: RelayConnection, flight: dict[str, _Job], now: float) -> None:
        results = conn.results
        while results:
            done = results.popleft()
            job = flight.pop(done.ref)
            if not job.outcomes and self._all_sent(done.results):
                self._finish_sent(job, conn.peer, done.results, now)
                continue
            outcomes = [Outcome(r, classify(reply), str(reply), conn.peer)
                        for r, reply in done.results]
            self._settle(job, outcomes, now)

    @staticmethod
    def _all_sent(results: Sequence[tuple[str, Reply]]) -> bool:
        """Every recipient took the same 2xx (the reply to the final dot)."""
        first = results[0][1]
        if first.code // 100 != 2:
            return False
        return all(reply is first or reply == first for _, reply in results)

    def _finish_sent(
        self, job: _Job, peer: str, results: Sequence[tuple[str, Reply]], now: float
    ) -> None:
        """The common case of `_settle`, without its lists: every recipient was
        relayed with one 2xx, none was local. Same log line, same move (finish)."""
        to = ",".join([f"<{r}>" for r, _ in results])
        self._peer_log(peer).ok("sent", id=job.queue_id, to=to, reply=str(results[0][1]))
        self.schedule.forget(job.queue_id)
        try:
            self.reader.finish(job.path)
        except OSError as err:  # as in _settle
            self._queue_error(job, err, now)

    def _hold_unsent(self, flight: dict[str, _Job], why: str, now: float) -> None:
        """Take back the messages the session has not started (a stop): not attempted."""
        if self._conn is None:
            return
        for message in self._conn.take_unsent():
            self._hold(flight.pop(message.ref), why, now)

    def _hold_ready(self, ready: deque[_Job], why: str, now: float) -> None:
        """Settle the messages read but never handed to a session (a stop). Never drop
        one: its local recipients are already delivered, and only `_settle` takes them
        out of the file - else they would get the message again at the next start."""
        while ready:
            self._hold(ready.popleft(), why, now)

    def _hold(self, job: _Job, why: str, now: float) -> None:
        self._settle(job, [Outcome(r, "held", why, self.relay_peer) for r in job.remote], now)

    # -- one message -------------------------------------------------------------------

    def _prepare(self, entry: QueueEntry, now: float) -> _Job | None:
        """Read a message, deliver its local recipients. None if there is nothing
        more to do with it (gone since the listing, quarantined, unreadable)."""
        queue_id = entry.name
        path = self.reader.path_of(queue_id)
        try:
            message = self.reader.read(path, entry.size)
        except FileNotFoundError:
            self.schedule.forget(queue_id)
            return None  # removed since the listing (by hand: we are the only sender)
        except QueueFormatError as err:
            self.reader.quarantine(Path(path), str(err))
            self.schedule.forget(queue_id)
            self.log.fail("quarantine", id=queue_id, reason=str(err))
            return None
        except OSError as err:
            self.log.error("read", id=queue_id, error=err.strerror or str(err))
            self.schedule.defer(queue_id, now, f"cannot read: {err.strerror}")
            return None
        outcomes: list[Outcome] = []
        if not self.local_domains:  # no local delivery configured: all for the relay
            return _Job(queue_id, path, message, entry.mtime_ns, outcomes, message.recipients)
        remote = []
        for recipient in message.recipients:
            if is_local(recipient, self.local_domains):
                reply = self.local.deliver(message.sender, recipient, message.data)
                outcomes.append(Outcome(recipient, classify(reply), str(reply), "local"))
            else:
                remote.append(recipient)
        return _Job(queue_id, path, message, entry.mtime_ns, outcomes, tuple(remote))

    def _connection(self, now: float) -> tuple[RelayConnection | None, str]:
        """The open relay session, or a new one; None (and why) when there is none."""
        conn = self._conn
        if conn is not None and conn.usable and conn.messages < self.per_connection:
            return conn, ""
        self.close_relay()
        if self.connect is None:
            return None, "no relay configured"
        if not self.relay.available(now):
            return None, f"relay unavailable until {format_time(self.relay.retry_at)}"
        conn = self.connect()
        try:
            conn.open()
        except RelayError as err:
            retry_at = self.relay.failed(now)
            event = {"connect": "connect", "tls": "tls", "STARTTLS": "tls", "AUTH": "auth"}
            conn.log.error(
                event.get(err.stage, "session"),
                error=str(err),
                retry=format_time(retry_at),
            )
            conn.close()
            return None, f"relay unavailable until {format_time(retry_at)}"
        self.relay.succeeded()
        self._conn = conn
        return conn, ""

    def _settle(self, job: _Job, relayed: Sequence[Outcome], now: float) -> None:
        """Log every outcome and move the file accordingly (the queue invariants)."""
        path, queue_id, message = job.path, job.queue_id, job.message
        expires = job.expires(self.lifetime)
        outcomes: Sequence[Outcome] = job.outcomes + list(relayed)
        if now > expires:
            age = f"message expired after {self.lifetime:g}s in the queue"
            outcomes = [
                Outcome(o.recipient, "failed", f"{age}; last: {o.detail}", o.peer)
                if o.status in ("deferred", "held") else o
                for o in outcomes
            ]
        failed = [o for o in outcomes if o.status == "failed"]
        later = [o for o in outcomes if o.status in ("deferred", "held")]
        deferred = [o for o in later if o.status == "deferred"]
        until = math.inf
        if deferred:
            until = self.schedule.defer(queue_id, now, deferred[0].detail)
        elif later:
            # Held back without a try: until the relay's retry, or (no relay at all)
            # until the message expires, when it fails.
            until = self.relay.retry_at if self.connect is not None else expires
            self.schedule.hold(queue_id, until, later[0].detail)
        self._log_outcomes(queue_id, outcomes, until)
        reasons = [f"<{o.recipient}>: {o.detail}" for o in failed]
        failed_part = QueueFile(message.sender, tuple(o.recipient for o in failed), message.data)
        try:
            if not later:
                self.schedule.forget(queue_id)
                if failed:
                    self.reader.fail(Path(path), failed_part, reasons)
                else:
                    self.reader.finish(path)
                return
            if failed:  # first the record, then the rewrite: a crash between repeats it
                self.reader.fail_some(Path(path), failed_part, reasons)
            if len(later) < len(message.recipients):
                rest = tuple(o.recipient for o in later)
                self._rewrite(path, QueueFile(message.sender, rest, message.data))
            # Deferred: the file stays where it is, in its place.
        except OSError as err:  # e.g. disk full: keep it, try again after a backoff
            self._queue_error(job, err, now)

    def _queue_error(self, job: _Job, err: OSError, now: float) -> None:
        """A move failed: the file is still queued (unchanged); back off."""
        queue_id = job.queue_id
        self.log.error("queue", id=queue_id, error=err.strerror or str(err))
        self.schedule.defer(queue_id, now, f"queue error: {err.strerror or err}")

    def _log_outcomes(self, queue_id: str, outcomes: Sequence[Outcome], until: float) -> None:
        groups: dict[tuple[str, str, str], list[str]] = {}
        for o in outcomes:
            if o.status != "held":
                groups.setdefault((o.peer, o.status, o.detail), []).append(o.recipient)
        for (peer, status, detail), recipients in groups.items():
            log = self._peer_log(peer)
            to = ",".join(f"<{r}>" for r in recipients)
            if status == "sent":
                log.ok("sent", id=queue_id, to=to, reply=detail)
            elif status == "failed":
                log.fail("failed", id=queue_id, to=to, reply=detail)
            else:
                log.defer("deferred", id=queue_id, to=to, until=format_time(until), reply=detail)

    # -- helpers ------------------------------------------------------------------------

    def _peer_log(self, peer: str) -> EventLog:
        """One EventLog per peer: with_peer() binds a new loguru logger each time."""
        log = self._peer_logs.get(peer)
        if log is None:
            log = self._peer_logs[peer] = self.log.with_peer(peer)
        return log

    def _held_for_relay(self, queue_id: str) -> bool:
        entry = self.schedule.get(queue_id)
        return entry is not None and entry.held

    def _report_waiting(self, now: float) -> None:
        """Say once per pass that mail waits for a relay (none configured, or down).

        A pass that finds the same situation as the last notice, less than
        `poll_interval` ago, does not repeat it (passes can follow each other fast).
        """
        if not self._waiting_for_relay:
            self._last_notice = None
            return
        situation = (self.connect is None, self._waiting_for_relay, self.relay.retry_at)
        if self._last_notice is not None:
            last_situation, last_time = self._last_notice
            if last_situation == situation and now - last_time < self.poll_interval:
                return
        self._last_notice = (situation, now)
        log = self.log.with_peer(self.relay_peer)
        if self.connect is None:
            log.defer("no-relay", waiting=self._waiting_for_relay,
                      reason="no relay configured; non-local mail stays queued")
        else:
            log.defer("relay-down", waiting=self._waiting_for_relay,
                      retry=format_time(self.relay.retry_at))
