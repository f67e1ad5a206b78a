"""The queue runner: take messages out of the queue and deliver them, never losing one.

Invariants (SPEC §4, issue 3):
- a message leaves `queue.dir` only when every recipient is delivered or has failed
  for good: delivered recipients are removed from the file (`rewrite`) so they never
  get the message twice; failed ones go to the failed folder with the reply;
- a file is claimed by an atomic rename before anything is done with it, so two
  sender processes never handle the same message; an unparseable file is
  quarantined with the reason, and the runner keeps going;
- the decision is taken by the reply code alone: 2xx sent, 4xx (and connection,
  timeout, TLS errors) deferred, 5xx failed;
- a deferred message waits `retry_initial` seconds, doubling on each further
  failure up to `retry_max`; once older than `max_queue_lifetime` (counted from the
  arrival time in its queue id) whatever is still deferred fails;
- when the relay cannot be reached the relay itself backs off (same schedule): no
  message is tried against it until then; local recipients are still delivered;
- each pass takes the whole queue oldest first and the runner looks again at once
  when a pass did anything; otherwise it waits on an Event that the watchdog
  observer sets when a file arrives, at most `poll_interval` (never a busy loop).

The retry schedule lives in memory, keyed by queue id. Across a restart it is lost
on purpose: every queued message is due once at start-up and its backoff starts
again from `retry_initial`; `max_queue_lifetime` is unaffected because it is
counted from the queue id. Time is always passed in (`now`) so tests drive it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from services.sender.client import OutgoingMessage
from services.sender.local import LocalDelivery, is_local
from services.sender.relay import RelayConnection, RelayError
from shared.config import Config
from shared.log import EventLog
from shared.queue import QueueFile, QueueFormatError, QueueReader
from shared.smtp import Reply

PROGRAM = "S-SMTP"
MIN_SLEEP = 0.01  # seconds; the shortest wait between passes


def format_time(when: float) -> str:
    if math.isinf(when):
        return "never"
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds")


def arrival_time(queue_id: str, fallback: float) -> float:
    """The arrival time encoded in a queue id (16 hex digits of time_ns), else `fallback`."""
    try:
        return int(queue_id[:16], 16) / 1e9 if len(queue_id) >= 16 else fallback
    except ValueError:
        return fallback


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
        """Drop entries of messages no longer queued (e.g. another process took them)."""
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
        self._waiting_for_relay = 0  # messages held back in this pass
        self._last_notice: tuple[tuple[object, ...], float] | None = None
        # Names this runner gave back to queue.dir: their "file created" event is
        # ours, not an arrival, and must not wake the runner (see watch.py).
        self.own_moves: set[str] = set()
        self._own_moves_lock = threading.Lock()

    # -- the loop ---------------------------------------------------------------------

    def run(self, wake: threading.Event, clock: Callable[[], float] = time.time) -> None:
        """Pass after pass until stopped; between passes wait on `wake` (watchdog/stop)."""
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
        entries = self.reader.list_ready()
        present = {e.name for e in entries}
        self.schedule.prune(present)
        with self._own_moves_lock:
            self.own_moves &= present
        self._waiting_for_relay = 0
        worked = False
        for entry in entries:
            if self.stop.is_set():
                break
            if not self.schedule.due(entry.name, now):
                if self._held_for_relay(entry.name):
                    self._waiting_for_relay += 1
                continue
            worked |= self.process(entry.name, now, entry.mtime_ns / 1e9)
        self._report_waiting(now)
        return worked

    def is_own_move(self, name: str) -> bool:
        """True (once) if `name` appeared in queue.dir because this runner put it back."""
        with self._own_moves_lock:
            if name in self.own_moves:
                self.own_moves.discard(name)
                return True
        return False

    def _release(self, path: Path) -> None:
        with self._own_moves_lock:
            self.own_moves.add(path.name)
        self.reader.release(path)

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

    # -- one message -------------------------------------------------------------------

    def process(self, queue_id: str, now: float, mtime: float | None = None) -> bool:
        """Claim, deliver and settle one message. False if another process had it."""
        path = self.reader.claim(queue_id)
        if path is None:
            return False
        try:
            message = self.reader.read(path)
        except QueueFormatError as err:
            self.reader.quarantine(path, str(err))
            self.schedule.forget(queue_id)
            self.log.fail("quarantine", id=queue_id, reason=str(err))
            return True
        except OSError as err:
            self.log.error("read", id=queue_id, error=err.strerror or str(err))
            self.schedule.defer(queue_id, now, f"cannot read: {err.strerror}")
            self._release(path)
            return True
        outcomes = []
        local = [r for r in message.recipients if is_local(r, self.local_domains)]
        remote = [r for r in message.recipients if not is_local(r, self.local_domains)]
        for recipient in local:
            reply = self.local.deliver(message.sender, recipient, message.data)
            outcomes.append(Outcome(recipient, classify(reply), str(reply), "local"))
        if remote:
            outcomes.extend(self._relay_send(queue_id, message, remote, now))
        expires = arrival_time(queue_id, mtime if mtime is not None else now) + self.lifetime
        self._settle(path, queue_id, message, outcomes, now, expires)
        return True

    def _relay_send(
        self, queue_id: str, message: QueueFile, recipients: list[str], now: float
    ) -> list[Outcome]:
        def held(why: str) -> list[Outcome]:
            self._waiting_for_relay += 1
            return [Outcome(r, "held", why, self.relay_peer) for r in recipients]

        if self.connect is None:
            return held("no relay configured")
        conn = self._connection(now)
        if conn is None:
            return held(f"relay unavailable until {format_time(self.relay.retry_at)}")
        outgoing = OutgoingMessage(queue_id, message.sender, tuple(recipients), message.data)
        try:
            results = conn.deliver(outgoing)
        except RelayError as err:
            conn.log.fail("transaction", id=queue_id, error=str(err))
            self.close_relay()
            return [Outcome(r, "deferred", str(err), conn.peer) for r in recipients]
        return [Outcome(r, classify(reply), str(reply), conn.peer) for r, reply in results]

    def _connection(self, now: float) -> RelayConnection | None:
        """The open relay session, or a new one; None while the relay is backing off."""
        conn = self._conn
        if conn is not None and conn.usable and conn.messages < self.per_connection:
            return conn
        self.close_relay()
        if not self.relay.available(now) or self.connect is None:
            return None
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
            return None
        self.relay.succeeded()
        self._conn = conn
        return conn

    def _settle(
        self,
        path: Path,
        queue_id: str,
        message: QueueFile,
        outcomes: Sequence[Outcome],
        now: float,
        expires: float,
    ) -> None:
        """Log every outcome and move the file accordingly (the queue invariants)."""
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
                    self.reader.fail(path, failed_part, reasons)
                else:
                    self.reader.finish(path)
                return
            if failed:  # first the record, then the rewrite: a crash between repeats it
                self.reader.fail_some(path, failed_part, reasons)
            if len(later) < len(message.recipients):
                rest = tuple(o.recipient for o in later)
                self.reader.rewrite(path, QueueFile(message.sender, rest, message.data))
            self._release(path)
        except OSError as err:  # e.g. disk full: keep it, try again after a backoff
            self.log.error("queue", id=queue_id, error=err.strerror or str(err))
            self.schedule.defer(queue_id, now, f"queue error: {err.strerror or err}")
            self._give_back(path)

    def _give_back(self, path: Path) -> None:
        try:
            self._release(path)
        except OSError:
            pass  # still in our work folder: recovered at the next start

    def _log_outcomes(self, queue_id: str, outcomes: Sequence[Outcome], until: float) -> None:
        groups: dict[tuple[str, str, str], list[str]] = {}
        for o in outcomes:
            if o.status != "held":
                groups.setdefault((o.peer, o.status, o.detail), []).append(o.recipient)
        for (peer, status, detail), recipients in groups.items():
            log = self.log.with_peer(peer)
            to = ",".join(f"<{r}>" for r in recipients)
            if status == "sent":
                log.ok("sent", id=queue_id, to=to, reply=detail)
            elif status == "failed":
                log.fail("failed", id=queue_id, to=to, reply=detail)
            else:
                log.defer("deferred", id=queue_id, to=to, until=format_time(until), reply=detail)

    # -- helpers ------------------------------------------------------------------------

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
