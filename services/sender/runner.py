"""The queue runner: take messages out of the queue and deliver them, never losing one.

The runner carries out decisions; it does not make them. What becomes of a
message after an attempt is `decision.decide()`'s answer (a pure function); the
runner reads messages, delivers local recipients, hands the others to a relay
session, asks `decide()`, and moves files and delivery states accordingly.

Invariants (SPEC §4, §7):
- a message leaves `queue.dir` only when every recipient is delivered or has failed
  for good: delivered recipients are removed from the file (`rewrite`) so they never
  get the message twice; failed ones go to the failed folder with the reply;
- exactly one process delivers a file at a time: the runner works only while its
  reader holds the queue lock (`QueueReader.try_lock`) and reads each file where it
  lies (no claim rename); a deferred message keeps its name and mtime, so its place;
- each message's delivery state (attempts, next attempt, last reply, held) lives on
  disk next to it (`shared/queue/state.py`) and is honoured after a restart: a
  deferred message waits for its next attempt, a held one for its release;
- every time in a decision is the time the attempt ended (`clock()` then), never
  the start of a pass;
- local delivery never waits for a relay: while the relay keeps the runner waiting
  (a connect, a slow reply) the relay connection calls back `_local_work`, which
  delivers the local recipients of the next messages and sets aside, for the next
  pass, what needs the relay;
- no single message, file or folder can stop the runner: a file that cannot be
  read is retried with backoff and quarantined when its lifetime is over; an entry
  that is no file (symlink, FIFO, folder) is quarantined; a decision whose move
  fails (full disk, another filesystem) is kept, logged once, and the move alone is
  retried each pass - the message is not delivered again meanwhile;
- each pass takes the whole queue oldest first and the runner looks again at once
  when a pass did anything; otherwise it waits on an Event that the watchdog
  observer (or a stop) sets, at most until the next message or relay is due, at
  most `poll_interval` (never a busy loop);
- one relay session carries the pass, pipelined (RFC 2920): while the relay works
  on message N the runner settles N-1 and reads N+1. A message leaves the queue
  (`finish`) as soon as its outcome is read; after a crash only the messages in
  flight (at most two) and those whose unlink still waits behind (`FINISH_BACKLOG`)
  are sent again (at-least-once, like every MTA). A stop holds back what was not
  sent; on TERM the reader's close() flushes the finished ones before the exit.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from services.sender.client import OutgoingMessage
from services.sender.decision import (
    Action,
    Backoff,
    Decision,
    Outcome,
    RetryPolicy,
    Status,
    decide,
    expires_at,
)
from services.sender.local import LocalDelivery
from services.sender.notices import Notifier
from services.sender.outbound import Outbound
from services.sender.rate import TokenBucket
from services.sender.relay import RelayConnection, RelayError
from services.sender.relays import RelayPool
from services.sender.rewrite import SenderRewriter
from services.sender.routing import Router
from shared.aliases import AliasTable
from shared.config import Config
from shared.dkim import DkimSigner
from shared.log import EventLog
from shared.metrics.figures import SenderFigures
from shared.queue import (
    BLANK,
    DeliveryState,
    QueueEntry,
    QueueFile,
    QueueFormatError,
    QueueReader,
    QueueWriter,
    StateStore,
    arrival_time,
    operations,
)
from shared.smtp import Reply

PROGRAM = "S-SMTP"
MIN_SLEEP = 0.01  # seconds; the shortest wait between passes
READY_MAX = 16  # messages read and waiting for the relay, at most...
READY_MAX_BYTES = 32 * 1024 * 1024  # ... and their data in bytes


def format_time(when: float) -> str:
    if math.isinf(when):
        return "never"
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds")


class _Job:
    """A queued message on its way through a pass: what settling it needs.

    A plain slotted class, not a dataclass: one is made per message."""

    __slots__ = ("queue_id", "path", "message", "arrival", "outcomes", "remote", "origins")

    def __init__(self, queue_id: str, path: str, message: QueueFile, arrival: float,
                 outcomes: list[Outcome], remote: tuple[str, ...],
                 origins: dict[str, str] | None = None) -> None:
        self.queue_id = queue_id
        self.path = path  # in queue.dir (a plain string: see QueueReader.path_of)
        self.message = message
        self.arrival = arrival
        self.outcomes = outcomes  # decided so far (the local recipients)
        self.remote = remote  # for the relay
        self.origins = origins or {}  # alias target -> the recipient as queued


@dataclass(frozen=True)
class _Stuck:
    """A move that failed: the message is not delivered again, only the move is
    retried - a decision carried out, or (`decision` None) a quarantine."""

    error: str  # why the move failed
    decision: Decision | None = None
    reason: str = ""  # a quarantine's reason

    @property
    def move(self) -> str:
        return self.decision.action.value if self.decision else "quarantine"


ACTIONS = ("hold", "release", "delete", "flush")


@dataclass
class AdminRequest:
    """An operator's change (`mailbag hold ID...`), applied by the runner between two
    messages; `results` says, per id, what was done."""

    action: str  # one of ACTIONS
    ids: tuple[str, ...]  # flush: () means every deferred message
    results: dict[str, str] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)


class QueueRunner:
    """Drains the queue: local recipients to Maildirs, the others through the relays."""

    def __init__(
        self,
        config: Config,
        reader: QueueReader,
        log: EventLog,
        *,
        relays: RelayPool,
        local: LocalDelivery | None = None,
        signer: DkimSigner | None = None,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.time,
        figures: SenderFigures | None = None,
    ) -> None:
        snd = config.sender
        self.figures = figures or SenderFigures()
        self.config = config
        self.reader = reader
        self.log = log
        self.relays = relays
        self.router = Router(AliasTable(config.aliases, config.local.domains),
                             local or LocalDelivery(config.local.maildir),
                             frozenset(config.local.domains), log)
        self.outbound = Outbound(SenderRewriter.from_config(config.rewrite),
                                 signer or DkimSigner([]))
        self.notifier = Notifier(QueueWriter(reader.dir), config.hostname,
                                 snd.max_queue_lifetime, log, self.figures)
        self.stop = stop or threading.Event()
        self.clock = clock
        self.policy = RetryPolicy(Backoff(snd.retry_initial, snd.retry_max),
                                  snd.max_queue_lifetime, config.bounce.delay_warning)
        self.poll_interval = snd.poll_interval
        self.per_connection = snd.messages_per_connection
        self.store = StateStore(reader.dir)
        self.states: dict[str, DeliveryState] = {}
        rate = snd.rate
        self.bucket = TokenBucket.load(rate, reader.dir, clock()) if rate else None
        self._conn: RelayConnection | None = None
        self._peer_logs: dict[str, EventLog] = {}
        # This pass's messages: listed and due, and read but waiting for the relay.
        self._due: deque[QueueEntry] = deque()
        self._ready: deque[_Job] = deque()
        self._ready_bytes = 0
        self._flight: dict[str, _Job] = {}  # handed to the relay session, outcome not read
        # Operators' requests (another thread puts them), and what to do with a
        # message held or deleted while it was being delivered, once its attempt ends.
        self._requests: queue.SimpleQueue[AdminRequest] = queue.SimpleQueue()
        self._after_attempt: dict[str, str] = {}
        self._wake: threading.Event | None = None
        # Delivered messages whose unlink failed: still in queue.dir, but done. Not
        # sent again by this process (the unlink is retried each pass); after a
        # restart they are, once (at-least-once).
        self._undeletable: set[str] = set()
        # Messages read while the relay kept us waiting and found to have no local
        # recipient: later waits pass them by without reading them again.
        self._remote_only: set[str] = set()
        self._stuck: dict[str, _Stuck] = {}
        self._scan_error: str | None = None
        # Names this runner renamed into queue.dir (a rewrite over the original):
        # their "moved in" event is ours, not an arrival, and must not wake the
        # runner (see watch.py).
        self.own_moves: set[str] = set()
        self._own_moves_lock = threading.Lock()

    # -- the loop ---------------------------------------------------------------------

    def load_states(self) -> None:
        """Read every message's delivery state from disk (at start: honour what a
        previous run decided). A state file that cannot be read is logged and
        counts as none: the message is simply tried."""
        states, problems = self.store.load_all()
        self.states = states
        for name, why in problems:
            self.log.error("state", id=name, error=why)

    def run(self, wake: threading.Event) -> None:
        """Pass after pass until stopped; between passes wait on `wake` (watchdog/stop).

        The reader must hold the queue lock (one deliverer per queue)."""
        if not self.reader.locked:
            raise RuntimeError("the queue runner needs the queue lock (QueueReader.try_lock)")
        self._wake = wake
        self.load_states()
        while not self.stop.is_set():
            wake.clear()
            self._serve_requests()
            if self.run_pass():
                continue  # something happened: look again at once
            self.close_relay()  # QUIT before sleeping
            if self.stop.is_set():
                break
            wake.wait(self.sleep_time(self.clock()))
        self.close_relay()

    def run_pass(self) -> bool:
        """One pass over the whole queue, oldest first. True if any message was handled."""
        try:
            scan = self.reader.scan()
        except OSError as err:
            reason = err.strerror or str(err)
            if self._scan_error != reason:  # once, until it changes or recovers
                self.log.error("queue", folder=self.reader.dir, error=reason)
                self._scan_error = reason
            return False
        if self._scan_error is not None:
            self.log.ok("queue", folder=self.reader.dir, reason="readable again")
            self._scan_error = None
        present = {e.name for e in scan.ready}
        self._forget_gone(present, {name for name, _ in scan.strange})
        worked = False
        for name, kind in scan.strange:
            worked |= self._quarantine(name, f"not a regular file ({kind})")
        now = self.clock()
        self._due = deque()
        for entry in scan.ready:
            name = entry.name
            if name in self._undeletable:
                self.reader.finish(self.reader.path_of(name))  # try the unlink again
            elif name in self._stuck:
                worked |= self._retry_stuck(entry)
            elif self._is_due(name, now):
                self._due.append(entry)
        worked |= self._drain()
        self.report_unfinished(self.reader.flush())
        return worked

    def _is_due(self, name: str, now: float) -> bool:
        state = self.states.get(name)
        return state is None or (not state.held and state.next_attempt <= now)

    def _forget_gone(self, present: set[str], strange: set[str]) -> None:
        """Drop what is known of messages no longer queued (delivered, failed,
        removed by hand), on disk too: a finished message's state never lingers."""
        gone = [name for name in self.states if name not in present]
        for name in gone:
            del self.states[name]
        if gone:
            self.store.prune(present)
        self._undeletable &= present
        self._remote_only &= present
        for name in [n for n in self._stuck if n not in present and n not in strange]:
            del self._stuck[name]
        with self._own_moves_lock:
            self.own_moves &= present

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

    def sleep_time(self, now: float) -> float:
        """Until the next message or relay is due, at most poll_interval."""
        wake_at = now + self.poll_interval
        for state in self.states.values():
            if not state.held:
                wake_at = min(wake_at, state.next_attempt)
        return max(MIN_SLEEP, wake_at - now)

    def close_relay(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- the pass's pipeline -------------------------------------------------------------

    def _drain(self) -> bool:
        """Take the due messages through reading, delivery and settling; True if any."""
        worked = False
        while True:
            self._serve_requests()
            if self.stop.is_set():
                self._hold_unsent("stopping")
            else:
                worked |= self._feed()
            if not self._flight:
                if self.stop.is_set():
                    while self._ready:
                        self._hold(self._take_ready(), "stopping")
                    return worked
                if not (self._due or self._ready):
                    return worked
                if self._ready:  # held back by the rate limit
                    self._wait_for_rate()
                continue
            self._exchange()

    def _feed(self) -> bool:
        """Prepare messages and hand them to the relay until one waits unsent there."""
        worked = False
        while (self._due or self._ready) and self._room() and not self.stop.is_set():
            self._serve_requests()
            job = self._take_ready() if self._ready else self._next_job()
            if job is None:
                continue
            worked = True
            if self._after_attempt.get(job.queue_id):  # held or deleted meanwhile
                self._apply_to_read(job, self._after_attempt.pop(job.queue_id))
                continue
            if not job.remote:
                self._settle(job, [])
                continue
            if self.bucket is not None and self.bucket.wait(self.clock()) > 0:
                self._put_ready(job, front=True)  # its turn comes with the next token
                break
            conn, why = self._connection()
            if conn is None:
                self._hold(job, why)
                continue
            sender, data = job.message.sender, job.message.data
            if self.outbound.active:
                sender, data = self.outbound.prepare(job.queue_id, sender, data,
                                                     conn.client.extensions, conn.log)
            conn.submit(OutgoingMessage(job.queue_id, sender, job.remote, data))
            self._flight[job.queue_id] = job
            if self.bucket is not None:
                self.bucket.take(self.clock())
                self.bucket.save(self.reader.dir)
        return worked

    def _wait_for_rate(self) -> None:
        """Wait for the rate limit's next token, delivering local mail and serving
        requests meanwhile (the held-back message is not deferred: no backoff)."""
        assert self.bucket is not None
        while not self.stop.is_set():
            wait = self.bucket.wait(self.clock())
            if wait <= 0:
                return
            if not self._local_work():
                self.stop.wait(min(wait, 0.5))

    def _room(self) -> bool:
        """May another message go to the relay now? With none in flight, always (a new
        session may be opened); else only on the same session, none waiting unsent."""
        conn = self._conn
        if not self._flight:
            return True
        return (conn is not None and conn.usable and conn.unsent == 0
                and conn.messages < self.per_connection)

    def _exchange(self) -> None:
        """Let the session write what it can, settle the outcomes that came, then (if
        anything is still in flight) wait for the relay's next bytes."""
        conn, flight = self._conn, self._flight
        assert conn is not None
        try:
            conn.pump()
            self._settle_results(conn)
            if flight:
                conn.wait()
        except RelayError as err:
            self.figures.relay_session(False, self.clock())
            self._settle_results(conn)  # what came before the failure
            for message in reversed(conn.take_unsent()):  # never started: first in
                self._put_ready(flight.pop(message.ref), front=True)  # the next session
            for job in list(flight.values()):
                conn.log.fail("transaction", id=job.queue_id, error=str(err))
                self._settle(job, [Outcome(r, Status.DEFERRED, str(err), conn.peer)
                                   for r in job.remote])
            flight.clear()
            self.close_relay()

    def _settle_results(self, conn: RelayConnection) -> None:
        results = conn.results
        while results:
            done = results.popleft()
            job = self._flight.pop(done.ref)
            if not job.outcomes and self._all_sent(done.results):
                self._finish_sent(job, conn.peer, done.results)
                continue
            self._settle(job, [Outcome.of_reply(r, reply, conn.peer)
                               for r, reply in done.results])

    @staticmethod
    def _all_sent(results: Sequence[tuple[str, Reply]]) -> bool:
        """Every recipient took the same 2xx (the reply to the final dot)."""
        first = results[0][1]
        if not first.is_success:
            return False
        return all(reply is first or reply == first for _, reply in results)

    def _finish_sent(self, job: _Job, peer: str, results: Sequence[tuple[str, Reply]]) -> None:
        """The common case of `_settle` without its lists: every recipient relayed with
        one 2xx, none was local. decide() would say FINISH; the same log line."""
        if self._after_attempt:
            self._after_attempt.pop(job.queue_id, None)  # delivered: nothing left to do
        to = ",".join([f"<{r}>" for r, _ in results])
        self._peer_log(peer).ok("sent", id=job.queue_id, to=to, reply=str(results[0][1]))
        self.figures.delivered("relay", len(results))
        self.figures.delivery_time(self.clock() - job.arrival)
        self.reader.finish(job.path)
        if job.queue_id in self.states:
            self._set_state(job.queue_id, BLANK)

    def _hold_unsent(self, why: str) -> None:
        """Take back the messages the session has not started (a stop): not attempted."""
        if self._conn is None:
            return
        for message in self._conn.take_unsent():
            self._hold(self._flight.pop(message.ref), why)

    def _hold(self, job: _Job, why: str) -> None:
        """Settle a job whose relayed recipients were not attempted. Never drop one:
        its local recipients are already delivered, and only settling takes them out
        of the file - else they would get the message again."""
        peer = self.relays.name
        self._settle(job, [Outcome(r, Status.WAITING, why, peer) for r in job.remote])

    # -- while the relay keeps us waiting ------------------------------------------------

    def _local_work(self) -> bool:
        """One step of work that needs no relay (the relay connection's on_idle hook):
        an operator's request, or the next due message with its local recipients
        delivered. What it has for the relay waits in `_ready`, or when that is full
        goes to the next pass. True if it did anything."""
        if self._serve_requests():
            return True
        if not self._due or self.stop.is_set():
            return False
        room = len(self._ready) < READY_MAX and self._ready_bytes < READY_MAX_BYTES
        if not room and self._due[0].name in self._remote_only:
            self._due.popleft()  # nothing local in it: the next pass takes it
            return True
        job = self._next_job()
        if job is None:
            return True
        if not job.remote:
            self._settle(job, [])
        elif room:
            self._put_ready(job)
        elif job.outcomes:  # its local part is done: keep the rest for the next pass
            self._hold(job, "the relay was busy")
        else:  # a message for the relay only, untouched: the next pass takes it
            self._remote_only.add(job.queue_id)
        return True

    def _put_ready(self, job: _Job, *, front: bool = False) -> None:
        """Keep a read message for the relay; `front`: before those read after it."""
        if front:
            self._ready.appendleft(job)
        else:
            self._ready.append(job)
        self._ready_bytes += len(job.message.data)

    def _take_ready(self) -> _Job:
        job = self._ready.popleft()
        self._ready_bytes -= len(job.message.data)
        return job

    # -- operators' requests ------------------------------------------------------------

    def request(self, action: str, ids: Sequence[str], timeout: float) -> dict[str, str] | None:
        """Called from another thread (the control socket): have the runner apply an
        operator's change between two messages. The result per id, or None when the
        runner did not get to it within `timeout` (it still will)."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        request = AdminRequest(action, tuple(ids))
        self._requests.put(request)
        if self._wake is not None:
            self._wake.set()
        return request.results if request.done.wait(timeout) else None

    def _serve_requests(self) -> bool:
        """Apply the requests waiting (on the runner's thread, between two messages);
        True if there were any."""
        served = False
        while not self._requests.empty():
            request = self._requests.get_nowait()
            served = True
            try:
                ids = request.ids or (self._deferred_ids() if request.action == "flush" else ())
                if request.action == "flush":
                    self.relays.reset()  # the relays are due now too
                for queue_id in ids:
                    request.results[queue_id] = self._apply(request.action, queue_id)
            except Exception as exc:  # noqa: BLE001 - the operator gets the error, we go on
                self.log.error("request", action=request.action, exc=exc)
                request.results["*"] = f"error: {_why(exc)}"
            finally:
                request.done.set()
        return served

    def _deferred_ids(self) -> list[str]:
        now = self.clock()
        return [q for q, s in self.states.items() if not s.held and s.next_attempt > now]

    def _apply(self, action: str, queue_id: str) -> str:
        """One operator's change to one message, wherever it is in the pass."""
        if queue_id in self._flight:  # its bytes are on their way: decided after it
            if action in ("hold", "delete"):
                self._after_attempt[queue_id] = action
                done = "held" if action == "hold" else "deleted"
                return f"being delivered now: {done} unless this attempt delivers it"
            return "being delivered now"
        job = next((j for j in self._ready if j.queue_id == queue_id), None)
        if job is not None and action in ("hold", "delete"):  # read, waiting for the relay
            self._ready.remove(job)
            self._ready_bytes -= len(job.message.data)
            return self._apply_to_read(job, action)
        return self._operate(action, queue_id)

    def _apply_to_read(self, job: _Job, action: str) -> str:
        """Hold or delete a message already read (its local recipients delivered):
        settled without the relay, so that those never get it again."""
        if action == "delete":
            return self._operate("delete", job.queue_id)
        self._after_attempt[job.queue_id] = "hold"
        self._hold(job, "held by the operator")
        return "held"

    def _operate(self, action: str, queue_id: str) -> str:
        """A change to a message at rest (see shared/queue/operations.py)."""
        queue_dir, store, states = self.reader.dir, self.store, self.states
        if action == "hold":
            return operations.hold(queue_dir, store, states, queue_id)
        if action == "release":
            return operations.release(queue_dir, store, states, queue_id, self.clock())
        if action == "flush":
            return operations.flush(queue_dir, store, states, queue_id, self.clock())
        return operations.delete(queue_dir, store, states, queue_id)

    # -- one message -------------------------------------------------------------------

    def _next_job(self) -> _Job | None:
        """The next due message, read, its local recipients delivered (None if there
        is nothing more to do with it now). A bug while preparing one message is
        logged and skips that message; it never stops the runner."""
        entry = self._due.popleft()
        try:
            return self._prepare(entry)
        except Exception as exc:  # noqa: BLE001 - one message must not stop delivery
            self.log.error("prepare", id=entry.name, exc=exc)
            self._defer_untried(entry.name, entry, f"internal error: {exc}")
            return None

    def _prepare(self, entry: QueueEntry) -> _Job | None:
        queue_id = entry.name
        if not self._is_due(queue_id, self.clock()):  # held or changed since the listing
            return None
        path = self.reader.path_of(queue_id)
        try:
            message = self.reader.read(path, entry.size)
        except FileNotFoundError:
            return None  # removed since the listing (by hand, or by `mailbag delete`)
        except QueueFormatError as err:
            self._quarantine(queue_id, str(err))
            return None
        except OSError as err:
            self._unreadable(entry, err)
            return None
        routes = self.router.route(queue_id, message)
        return _Job(queue_id, path, message, arrival_time(queue_id, entry.mtime_ns / 1e9),
                    routes.local, routes.remote, routes.origins)

    def _unreadable(self, entry: QueueEntry, err: OSError) -> None:
        """A file that cannot be read (EACCES, EIO): retried with backoff like a
        deferral, and quarantined once its lifetime is over."""
        reason = f"cannot read: {err.strerror or err}"
        arrival = arrival_time(entry.name, entry.mtime_ns / 1e9)
        if self.clock() >= expires_at(arrival, self.policy):
            self._quarantine(entry.name, f"{reason}, for longer than max_queue_lifetime")
            return
        self.log.error("read", id=entry.name, error=reason)
        self._defer_untried(entry.name, entry, reason)

    def _defer_untried(self, queue_id: str, entry: QueueEntry, reason: str) -> None:
        at = self.clock()
        state = self.states.get(queue_id, BLANK)
        attempts = state.attempts + 1
        next_attempt = min(at + self.policy.backoff.delay(attempts),
                           expires_at(arrival_time(queue_id, entry.mtime_ns / 1e9),
                                      self.policy))
        self._set_state(queue_id, replace(state, attempts=attempts,
                                          next_attempt=next_attempt, last_reply=reason))

    def _connection(self) -> tuple[RelayConnection | None, str]:
        """The open relay session, or a new one with the first relay that answers;
        None (and why) when there is none."""
        conn = self._conn
        if conn is not None and conn.usable and conn.messages < self.per_connection:
            return conn, ""
        self.close_relay()
        if not self.relays.configured:
            return None, "no relay configured; non-local mail stays queued"
        why = ""
        for route in self.relays.candidates(self.clock()):
            conn = route.connect()
            conn.on_idle = self._local_work
            try:
                conn.open()
            except RelayError as err:
                failed_at = self.clock()
                self.figures.relay_session(False, failed_at)
                retry_at = route.state.failed(failed_at)
                event = {"connect": "connect", "tls": "tls", "STARTTLS": "tls",
                         "AUTH": "auth"}.get(err.stage, "session")
                conn.log.error(event, error=str(err), retry=format_time(retry_at))
                conn.close()
                why = f"{route.name}: {err}"
                continue
            route.state.succeeded()
            self.figures.relay_session(True, self.clock())
            self._conn = conn
            return conn, ""
        until = format_time(self.relays.next_retry())
        return None, f"relay unavailable until {until}" + (f" ({why})" if why else "")

    def _settle(self, job: _Job, relayed: Sequence[Outcome]) -> None:
        """Ask decide() what becomes of the message, log it, carry it out."""
        at = self.clock()
        waiting_until = at if self.stop.is_set() else self.relays.next_retry()
        state = self.states.get(job.queue_id, BLANK)
        after = self._after_attempt.pop(job.queue_id, None)
        if after == "hold":
            state = replace(state, held=True)
        decision = decide(job.outcomes + list(relayed), sender=job.message.sender,
                          state=state, at=at, arrival=job.arrival, policy=self.policy,
                          waiting_until=waiting_until)
        self._log_outcomes(job.queue_id, decision)
        self._count(decision, job.arrival, at)
        if decision.bounce or decision.warn:  # queued before the move: never lost
            self.notifier.notify(job.queue_id, job.message, decision, job.origins,
                                 job.arrival, at)
        try:
            self._carry_out(job, decision)
        except (OSError, QueueFormatError) as err:  # e.g. a full disk: keep it, retry
            self._set_stuck(job.queue_id, _Stuck(_why(err), decision))
            return
        if after == "delete" and decision.remaining:
            self._operate("delete", job.queue_id)

    def _carry_out(self, job: _Job, decision: Decision) -> None:
        """Move the file and its state as `decision` says; OSError/QueueFormatError if
        a step fails (the queued file is then as it was, or rewritten whole)."""
        queue_id, message = job.queue_id, job.message
        path = Path(job.path)
        reasons = [f"<{o.recipient}>: {o.detail}" for o in decision.failed]
        failed_part = QueueFile(message.sender, tuple(o.recipient for o in decision.failed),
                                message.data)
        if decision.action is Action.FINISH:
            self.reader.finish(job.path)
        elif decision.action is Action.FAIL:
            try:
                self.reader.fail(path, failed_part, reasons)
            except QueueFormatError:  # cannot be written again: move it as it is
                self.reader.quarantine(path, "; ".join(reasons))
        elif decision.action is Action.PARTIAL:
            if decision.failed:  # first the record, then the rewrite: a crash repeats it
                self.reader.fail_some(path, failed_part, reasons)
            with self._own_moves_lock:
                self.own_moves.add(queue_id)
            self.reader.rewrite(path, QueueFile(message.sender, decision.remaining,
                                                message.data))
        self._set_state(queue_id, decision.state)

    def _set_state(self, queue_id: str, state: DeliveryState) -> None:
        """Remember a message's state, on disk too when it changed."""
        old = self.states.get(queue_id, BLANK)
        if old == state:
            return
        if state.is_blank:
            self.states.pop(queue_id, None)
        else:
            self.states[queue_id] = state
        # Only a change of the held flag must survive a power cut; a lost next
        # attempt means the message is simply tried once more.
        self.store.save(queue_id, state, durable=state.held != old.held)

    # -- what cannot be moved ------------------------------------------------------------

    def _quarantine(self, queue_id: str, reason: str) -> bool:
        """Set an unreadable file (or a non-file) aside; if that fails, it stays where
        it is, logged once, and the move is retried each pass. True if moved."""
        try:
            self.reader.quarantine(Path(self.reader.path_of(queue_id)), reason)
        except OSError as err:
            self._set_stuck(queue_id, _Stuck(_why(err), reason=reason))
            return False
        self._stuck.pop(queue_id, None)
        self.states.pop(queue_id, None)
        self.log.fail("quarantine", id=queue_id, reason=reason)
        return True

    def _set_stuck(self, queue_id: str, stuck: _Stuck) -> None:
        """Remember a failed move; logged once (again only if the error changes)."""
        known = self._stuck.get(queue_id)
        self._stuck[queue_id] = stuck
        if known is None or known.error != stuck.error:
            details = {"reason": stuck.reason} if stuck.reason else {}
            self.log.error("stuck", id=queue_id, move=stuck.move, error=stuck.error, **details)

    def _retry_stuck(self, entry: QueueEntry) -> bool:
        """Try a failed move again; True if it succeeded."""
        stuck = self._stuck[entry.name]
        if stuck.decision is None:
            return self._quarantine(entry.name, stuck.reason)
        try:
            message = self.reader.read(self.reader.path_of(entry.name), entry.size)
            job = _Job(entry.name, self.reader.path_of(entry.name), message,
                       arrival_time(entry.name, entry.mtime_ns / 1e9), [], ())
            self._carry_out(job, stuck.decision)
        except (OSError, QueueFormatError) as err:
            self._set_stuck(entry.name, replace(stuck, error=_why(err)))
            return False
        del self._stuck[entry.name]
        self.log.ok("unstuck", id=entry.name, move=stuck.move)
        return True

    # -- the log -----------------------------------------------------------------------

    def _log_outcomes(self, queue_id: str, decision: Decision) -> None:
        """One line per peer and outcome, each with the message's id."""
        until = format_time(decision.state.next_attempt) if decision.remaining else ""
        groups: dict[tuple[str, Status, str], list[str]] = {}
        for o in decision.outcomes:
            groups.setdefault((o.peer, o.status, o.detail), []).append(o.recipient)
        for (peer, status, detail), recipients in groups.items():
            log = self._peer_log(peer)
            to = ",".join(f"<{r}>" for r in recipients)
            if status is Status.SENT:
                log.ok("sent", id=queue_id, to=to, reply=detail)
            elif status is Status.FAILED:
                log.fail("failed", id=queue_id, to=to, reply=detail)
            elif status is Status.DEFERRED:
                log.defer("deferred", id=queue_id, to=to, until=until, reply=detail)
            else:
                log.defer("waiting", id=queue_id, to=to, until=until, reason=detail)

    def _count(self, decision: Decision, arrival: float, at: float) -> None:
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

    def _peer_log(self, peer: str) -> EventLog:
        """One EventLog per peer: with_peer() binds a new loguru logger each time."""
        log = self._peer_logs.get(peer)
        if log is None:
            log = self._peer_logs[peer] = self.log.with_peer(peer)
        return log


def _why(err: BaseException) -> str:
    return getattr(err, "strerror", None) or str(err)
