"""The queue runner: take messages out of the queue and deliver them, never losing one.

The runner drives delivery; it does not decide. What becomes of a message after an
attempt is `decision.decide()`'s answer (a pure function), and `settle.Settler`
carries it out - the file moved, the delivery state saved, the notices queued. The
runner lists the queue, reads messages, has their local recipients delivered
(routing.py), hands the others to a relay session (relay.py, relays.py) and
settles what comes back.

Invariants (SPEC §4, §7):
- exactly one process delivers a file at a time: the runner works only while its
  reader holds the queue lock (`QueueReader.try_lock`) and reads each file where it
  lies (no claim rename); a deferred message keeps its name and mtime, so its place;
- every time in a decision is the time the attempt ended (`clock()` then), never
  the start of a pass;
- local delivery never waits for a relay: while the relay keeps the runner waiting
  (a connect, a slow reply, the rate limit) the relay connection calls back
  `_local_work`, which delivers the local recipients of the next messages and
  settles them at once (a crash never delivers them twice), keeping what needs only
  the relay for later in this pass or the next;
- no single message, file or folder can stop the runner: an unreadable queue
  folder is logged once and tried again; a bug while preparing one message is
  logged and that message backs off; what cannot be moved is the Settler's;
- each pass takes the whole queue oldest first and the runner looks again at once
  when a pass did anything; otherwise it waits on an Event that the watchdog
  observer (or a stop, or an operator's request) sets, at most until the next
  message or relay is due, at most `poll_interval` (never a busy loop);
- one relay session carries the pass, pipelined (RFC 2920): while the relay works
  on message N the runner settles N-1 and reads N+1. A message leaves the queue
  (`finish`) as soon as its outcome is read; after a crash only the messages in
  flight (at most two) and those whose unlink still waits behind (`FINISH_BACKLOG`)
  are sent again (at-least-once, like every MTA). A stop holds back what was not
  sent; on TERM the reader's close() flushes the finished ones before the exit;
- operators' requests (hold, release, delete, flush) are applied on the runner's
  thread between two messages, also to a message read or in flight (`request`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.sender.client import OutgoingMessage
from services.sender.control import WHOLE_REQUEST, RunnerEnded
from services.sender.decision import (
    Backoff,
    Outcome,
    RetryPolicy,
    Status,
)
from services.sender.local import LocalDelivery
from services.sender.notices import Notifier
from services.sender.outbound import Outbound
from services.sender.rate import TokenBucket
from services.sender.relay import RelayConnection, RelayError
from services.sender.relays import RelayPool, RelayRoute
from services.sender.rewrite import SenderRewriter
from services.sender.routing import Router
from services.sender.settle import Job, Settler, format_time
from shared.aliases import AliasTable
from shared.config import Config
from shared.dkim import DkimSigner
from shared.log import EventLog
from shared.metrics.figures import SenderFigures
from shared.queue import (
    QueueEntry,
    QueueFormatError,
    QueueReader,
    QueueWriter,
    arrival_time,
    operations,
)
from shared.smtp import Reply

PROGRAM = "S-SMTP"
MIN_SLEEP = 0.01  # seconds; the shortest wait between passes
READY_MAX = 16  # messages read and waiting for the relay, at most...
READY_MAX_BYTES = 32 * 1024 * 1024  # ... and their data in bytes
# Seconds a relay session may stay idle while a message waits for the rate limit's
# token (Postfix's smtp_connection_cache_time_limit); a longer wait ends it with QUIT:
# an idle session holds one of the relay's connection slots for nothing, and a relay
# may drop it without a word (RFC 5321 §4.5.3.2.7) - which `still_open` cannot
# always see before the next message is handed to it.
RATE_IDLE_SESSION = 2.0


@dataclass
class AdminRequest:
    """An operator's change (`mailbag hold ID...`), applied by the runner between two
    messages; `results` says, per id, what was done."""

    action: str  # one of operations.ACTIONS
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
        self.reader = reader
        self.log = log
        self.stop = stop or threading.Event()
        self.clock = clock
        self.figures = figures or SenderFigures()  # counts nothing unless metrics are on
        self.bucket: TokenBucket | None = None
        self.settler = Settler(reader, *self._rules(config, QueueWriter(reader.dir)), log,
                               self.figures)
        self._use_settings(config, relays, local or LocalDelivery(config.local.maildir),
                           signer or DkimSigner([]))
        # Called at the start of every pass, on the runner's thread (the program's
        # reload on HUP: new settings take effect between passes).
        self.before_pass: Callable[[], None] | None = None
        self._conn: RelayConnection | None = None
        self._route: RelayRoute | None = None  # the relay `_conn` talks to
        # This pass's messages: listed and due, and read but waiting for the relay.
        self._due: deque[QueueEntry] = deque()
        self._ready: deque[Job] = deque()
        self._ready_bytes = 0
        self._flight: dict[str, Job] = {}  # handed to the relay session, outcome not read
        self._in_hand: Job | None = None  # read, its relay session being opened
        # Operators' requests (another thread puts them), and what to do with a
        # message held or deleted while it was being delivered, once its attempt ends.
        self._requests: queue.SimpleQueue[AdminRequest] = queue.SimpleQueue()
        self._requests_lock = threading.Lock()  # orders a request against the runner's end
        self._ended = False  # run() has returned: no request will be served any more
        self._after_attempt: dict[str, str] = {}
        self._wake: threading.Event | None = None
        # Messages read while the relay kept us waiting and found to have no local
        # recipient: later waits pass them by without reading them again.
        self._remote_only: set[str] = set()
        self._scan_error: str | None = None

    def _use_settings(self, config: Config, relays: RelayPool, local: LocalDelivery,
                      signer: DkimSigner) -> None:
        """Everything the runner takes from the config (at start, and on a reload)."""
        snd, log = config.sender, self.log
        self.config = config
        self.relays = relays
        self.router = Router(AliasTable(config.aliases, config.local.domains), local,
                             frozenset(config.local.domains), log)
        self.outbound = Outbound(SenderRewriter.from_config(config.rewrite), signer)
        self.poll_interval = snd.poll_interval
        self.per_connection = snd.messages_per_connection
        if snd.rate is None:
            self.bucket = None
        elif self.bucket is None:  # the level the last run left
            self.bucket = TokenBucket.load(snd.rate, self.reader.dir, self.clock())
        elif self.bucket.rate != snd.rate:  # a reload: a new rate, the tokens kept
            self.bucket = TokenBucket(snd.rate, self.bucket.tokens, self.bucket.at)

    def _rules(self, config: Config, writer: QueueWriter) -> tuple[RetryPolicy, Notifier]:
        """The settler's rules: retry times and lifetimes, and how notices are sent."""
        snd = config.sender
        policy = RetryPolicy(Backoff(snd.retry_initial, snd.retry_max),
                             snd.max_queue_lifetime, config.bounce.delay_warning)
        return policy, Notifier(writer, config.hostname, policy, self.log, self.figures)

    def reconfigure(self, config: Config, relays: RelayPool, signer: DkimSigner) -> None:
        """New settings (a reload), on the runner's thread between two passes: the
        relay session still open is ended (QUIT), the next one uses `relays`; what
        the queue remembers (states, stuck moves) stays. The queue folders are not
        among them (they need a restart)."""
        self.close_relay()
        self.settler.policy, self.settler.notifier = self._rules(
            config, self.settler.notifier.writer)
        local = self.router.local
        if config.local.maildir != self.config.local.maildir:
            local = LocalDelivery(config.local.maildir)
        self._use_settings(config, relays, local, signer)

    # -- the loop ---------------------------------------------------------------------

    def run(self, wake: threading.Event) -> None:
        """Pass after pass until stopped; between passes wait on `wake` (watchdog/stop).

        The reader must hold the queue lock (one deliverer per queue)."""
        if not self.reader.locked:
            raise RuntimeError("the queue runner needs the queue lock (QueueReader.try_lock)")
        self._wake = wake
        self.settler.load_states()
        try:
            while not self.stop.is_set():
                wake.clear()
                if self.before_pass is not None:
                    self.before_pass()
                self._serve_requests()
                if self.run_pass():
                    continue  # something happened: look again at once
                self.close_relay()  # QUIT before sleeping
                if self.stop.is_set():
                    break
                wake.wait(self.sleep_time(self.clock()))
            self.close_relay()
        finally:
            with self._requests_lock:
                self._ended = True
            self._serve_requests()  # those that came during the last pass, at rest now

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
        self.settler.forget_gone(present, {name for name, _ in scan.strange})
        self._remote_only &= present
        worked = False
        for name, kind in scan.strange:
            worked |= self.settler.quarantine(name, f"not a regular file ({kind})")
        now = self.clock()
        self._due = deque()
        for entry in scan.ready:
            name = entry.name
            if name in self.settler.undeletable:
                self.reader.finish(self.reader.path_of(name))  # try the unlink again
            elif name in self.settler.stuck:
                worked |= self.settler.retry_stuck(entry)
            elif self.settler.is_due(name, now):
                self._due.append(entry)
        worked |= self._drain()
        self.settler.report_unfinished(self.reader.flush())
        return worked

    def sleep_time(self, now: float) -> float:
        """Until the next message or relay is due, at most poll_interval."""
        wake_at = min(now + self.poll_interval, self.settler.next_due())
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
                if self._ready and not self._wait_for_rate():  # held back by the limit
                    self._release_ready()  # woken: the next pass lists the queue again
                    return True
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
            if self._withdrawn(job):
                continue
            if not job.remote:
                self._settle(job, [])
                continue
            if self.bucket is not None and self.bucket.wait(self.clock()) > 0:
                self._put_ready(job, front=True)  # its turn comes with the next token
                break
            self._in_hand = job  # opening a session serves requests: they must see it
            try:
                conn, why = self._connection()
            finally:
                self._in_hand = None
            if self._withdrawn(job):
                continue
            if conn is None:
                self._hold(job, why)
                continue
            sender, data = self._outgoing(job, conn)
            conn.submit(OutgoingMessage(job.queue_id, sender, job.remote, data))
            self._flight[job.queue_id] = job
            if self.bucket is not None:
                self.bucket.take(self.clock())
                self.bucket.save(self.reader.dir)
        return worked

    def _withdrawn(self, job: Job) -> bool:
        """True if an operator held or deleted `job` after it was read: the change is
        applied now. The operator was answered already; a delete that fails is logged
        (the message stays queued, and may be deleted again)."""
        action = self._after_attempt.pop(job.queue_id, None)
        if action is None:
            return False
        answer = self._apply_to_read(job, action)
        if answer.startswith(operations.ERROR_PREFIX):
            self.log.error(action, id=job.queue_id,
                           error=answer.removeprefix(operations.ERROR_PREFIX))
        return True

    def _outgoing(self, job: Job, conn: RelayConnection) -> tuple[str, bytes]:
        """The envelope sender and data for the relay: rewritten and signed when so
        configured; as queued if that fails (logged with the id), never a crash."""
        sender, data = job.message.sender, job.message.data
        if not self.outbound.active:
            return sender, data
        try:
            return self.outbound.prepare(job.queue_id, sender, data,
                                         conn.client.extensions, conn.log)
        except Exception as exc:  # noqa: BLE001 - one odd message must not stop delivery
            conn.log.error("outbound", id=job.queue_id, exc=exc)
            return sender, data

    def _wait_for_rate(self) -> bool:
        """Wait for the rate limit's next token, delivering local mail and serving
        requests meanwhile (the held-back message is not deferred: no backoff).

        False when the runner is woken first (a new file, a reload): a token may be
        an hour away ("1/h"), and what arrived since the pass began - local mail, a
        new config - must not wait that long. A stop is the caller's to see."""
        assert self.bucket is not None
        while not self.stop.is_set():
            wait = self.bucket.wait(self.clock())
            if wait <= 0:
                return True
            if self._wake is not None and self._wake.is_set():
                return False
            if wait > RATE_IDLE_SESSION:
                self.close_relay()  # nothing is in flight: the next token opens a new one
            if not self._local_work():
                (self._wake or self.stop).wait(min(wait, 0.5))
        return True

    def _release_ready(self) -> None:
        """End the pass with messages read but not handed to the relay: those whose
        local recipients are delivered are settled (else those would get the message
        again), the others are left as they are queued for the next pass to read."""
        while self._ready:
            job = self._take_ready()
            if job.outcomes:
                self._hold(job, "waiting for the rate limit")

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
            unsent = conn.take_unsent()
            broke = self._relay_broke_the_session(conn, len(flight), len(unsent))
            self._settle_results(conn)  # what came before the failure
            for message in reversed(unsent):  # never started: first in the next session
                self._put_ready(flight.pop(message.ref), front=True)
            if broke and not self.stop.is_set():  # a stop is not the relay's fault
                assert self._route is not None
                self._relay_failed(self._route, conn, err)
            for job in list(flight.values()):
                conn.log.fail("transaction", id=job.queue_id, error=str(err))
                self._settle(job, [Outcome(r, Status.DEFERRED, str(err), conn.peer)
                                   for r in job.remote])
            flight.clear()
            self.close_relay()

    @staticmethod
    def _relay_broke_the_session(conn: RelayConnection, in_flight: int, unsent: int) -> bool:
        """Did the session end the way of a relay that does not work: a transaction
        under way cut off with no reply, or ended by a 421 - with not one message of
        this session answered otherwise? A relay that has answered messages and then
        goes away (its limit of messages per session, or a 421 right after a 250)
        works; only the message that met the 421 is deferred.
        `in_flight`: this session's messages not settled, of which `unsent` never
        started; those with an outcome are in `conn.results`."""
        answered = conn.messages - in_flight  # settled before: each had its reply
        cut_off = in_flight - unsent > len(conn.results)
        for done in conn.results:
            if any(reply.code == 421 for _, reply in done.results):
                cut_off = True
            else:
                answered += 1
        return cut_off and answered == 0

    def _relay_failed(self, route: RelayRoute, conn: RelayConnection,
                      err: RelayError) -> None:
        """The relay `route` failed now, through its session `conn`: it could not be
        used (connect, TLS, the greeting, AUTH), or the session broke before it
        answered any message (`_relay_broke_the_session`). It backs off, and the rest
        of the pass goes to the next relay."""
        failed_at = self.clock()
        self.figures.relay_session(False, failed_at)
        retry_at = route.state.failed(failed_at)
        event = {"connect": "connect", "tls": "tls", "STARTTLS": "tls",
                 "AUTH": "auth"}.get(err.stage, "session")
        conn.log.error(event, error=str(err), retry=format_time(retry_at))

    def _settle_results(self, conn: RelayConnection) -> None:
        results = conn.results
        while results:
            done = results.popleft()
            job = self._flight.pop(done.ref)
            if not job.outcomes and self._all_sent(done.results):
                self._after_attempt.pop(job.queue_id, None)  # delivered: nothing to do
                self.settler.finish_sent(job, conn.peer, done.results, self.clock())
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

    def _hold_unsent(self, why: str) -> None:
        """Take back the messages the session has not started (a stop): not attempted."""
        if self._conn is None:
            return
        for message in self._conn.take_unsent():
            self._hold(self._flight.pop(message.ref), why)

    def _hold(self, job: Job, why: str, *, held: bool = False) -> None:
        """Settle a job whose relayed recipients were not attempted. Never drop one:
        its local recipients are already delivered, and only settling takes them out
        of the file - else they would get the message again. `held`: the operator's."""
        peer = self.relays.name
        self._settle(job, [Outcome(r, Status.WAITING, why, peer) for r in job.remote],
                     held=held)

    # -- while the relay keeps us waiting ------------------------------------------------

    def _local_work(self) -> bool:
        """One step of work that needs no relay (the relay connection's on_idle hook):
        an operator's request, or the next due message with its local recipients
        delivered. A message that had local recipients is settled at once (the rest
        waits for the relay's next turn); one for the relay only waits in `_ready`,
        or when that is full goes to the next pass. True if it did anything."""
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
        elif job.outcomes:  # its local part is done: written down now, the rest waits
            self._hold(job, "the relay was busy")
        elif room:
            self._put_ready(job)
        else:  # a message for the relay only, untouched: the next pass takes it
            self._remote_only.add(job.queue_id)
        return True

    def _put_ready(self, job: Job, *, front: bool = False) -> None:
        """Keep a read message for the relay; `front`: before those read after it."""
        if front:
            self._ready.appendleft(job)
        else:
            self._ready.append(job)
        self._ready_bytes += len(job.message.data)

    def _take_ready(self) -> Job:
        job = self._ready.popleft()
        self._ready_bytes -= len(job.message.data)
        return job

    def _settle(self, job: Job, relayed: Sequence[Outcome], *, held: bool = False) -> None:
        """Settle a message now: the local outcomes and `relayed`, at the clock's time;
        what waits for a relay may be tried when the first relay is due again (at
        once after a restart, when the program is stopping). `held`: the operator
        held it before it was attempted."""
        at = self.clock()
        after = self._after_attempt.pop(job.queue_id, None)  # held/deleted in flight
        decision = self.settler.settle(
            job, job.outcomes + list(relayed), at=at, hold=held or after == "hold",
            waiting_until=at if self.stop.is_set() else self.relays.next_retry())
        if decision is None:  # its move is stuck (retried each pass): decided all the same
            decision = self.settler.stuck[job.queue_id].decision
        if decision is None or not decision.remaining:
            return
        # The operator was told "unless this attempt delivers it": say how it ended.
        if after == "hold":
            self.log.info("hold", id=job.queue_id, reason="held by the operator in flight")
        elif after == "delete":
            answer = self._operate("delete", job.queue_id)
            if answer.startswith(operations.ERROR_PREFIX):  # it stays queued; the
                self.log.error("delete", id=job.queue_id,  # operator may delete it again
                               error=answer.removeprefix(operations.ERROR_PREFIX))
                return
            self.log.ok("delete", id=job.queue_id, reason="deleted by the operator in flight")

    # -- operators' requests ------------------------------------------------------------

    def request(self, action: str, ids: Sequence[str], timeout: float) -> dict[str, str] | None:
        """Called from another thread (the control socket): have the runner apply an
        operator's change between two messages. The result per id, or None when the
        runner did not get to it within `timeout` (it still will)."""
        if action not in operations.ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        request = AdminRequest(action, tuple(ids))
        with self._requests_lock:
            if self._ended:
                raise RunnerEnded("the sender is stopping")
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
                # Delivered messages whose unlink waits behind are no longer queued:
                # no operator's change may apply to them (a hold would be a lie).
                self.settler.report_unfinished(self.reader.flush())
                ids = request.ids or (operations.deferred_ids(self.settler.states, self.clock())
                                     if request.action == "flush" else ())
                if request.action == "flush":
                    self.relays.reset()  # the relays are due now too
                for queue_id in ids:
                    request.results[queue_id] = self._apply(request.action, queue_id)
            except Exception as exc:  # noqa: BLE001 - the operator gets the error, we go on
                self.log.error("request", action=request.action, exc=exc)
                request.results[WHOLE_REQUEST] = f"{operations.ERROR_PREFIX}{exc}"
            finally:
                request.done.set()
        return served

    def _apply(self, action: str, queue_id: str) -> str:
        """One operator's change to one message, wherever it is in the pass."""
        if queue_id in self.settler.undeletable and action != "delete":
            return "delivered already (its file could not be removed)"
        if queue_id in self._flight:  # its bytes are on their way: decided after it
            if action in ("hold", "delete"):
                self._after_attempt[queue_id] = action
                done = "held" if action == "hold" else "deleted"
                return f"being delivered now: {done} unless this attempt delivers it"
            return "being delivered now"
        if self._in_hand is not None and self._in_hand.queue_id == queue_id \
                and action in ("hold", "delete"):  # applied before it can be handed over
            self._after_attempt[queue_id] = action
            return "held" if action == "hold" else "deleted"
        job = next((j for j in self._ready if j.queue_id == queue_id), None)
        if job is not None and action in ("hold", "delete"):  # read, waiting for the relay
            self._ready.remove(job)
            self._ready_bytes -= len(job.message.data)
            return self._apply_to_read(job, action)
        return self._operate(action, queue_id)

    def _apply_to_read(self, job: Job, action: str) -> str:
        """Hold or delete a message already read (its local recipients delivered):
        settled without the relay, so that those never get it again."""
        if action == "delete":
            return self._operate("delete", job.queue_id)
        self._hold(job, "held by the operator", held=True)
        return "held"

    def _operate(self, action: str, queue_id: str) -> str:
        """A change to a message at rest (see shared/queue/operations.py)."""
        return operations.apply(action, self.reader.dir, self.settler.store,
                                self.settler.states, queue_id, self.clock())

    # -- one message -------------------------------------------------------------------

    def _next_job(self) -> Job | None:
        """The next due message, read, its local recipients delivered (None if there
        is nothing more to do with it now). A bug while preparing one message is
        logged and skips that message; it never stops the runner."""
        entry = self._due.popleft()
        try:
            return self._prepare(entry)
        except Exception as exc:  # noqa: BLE001 - one message must not stop delivery
            self.log.error("prepare", id=entry.name, exc=exc)
            self.settler.defer_untried(entry, f"internal error: {exc}", self.clock())
            return None

    def _prepare(self, entry: QueueEntry) -> Job | None:
        queue_id = entry.name
        if not self.settler.is_due(queue_id, self.clock()):  # held or changed since listed
            return None
        path = self.reader.path_of(queue_id)
        try:
            message = self.reader.read(path, entry.size)
        except FileNotFoundError:
            return None  # removed since the listing (by hand, or by `mailbag delete`)
        except QueueFormatError as err:
            self.settler.quarantine(queue_id, str(err))
            return None
        except OSError as err:
            self.settler.unreadable(entry, err, self.clock())
            return None
        state = self.settler.states.get(queue_id)
        routes = self.router.route(queue_id, message,
                                   expanded=state is not None and state.expanded)
        return Job(queue_id, path, message, arrival_time(queue_id, entry.mtime_ns / 1e9),
                    routes.local, routes.remote, routes.origins, routes.expanded)

    def _connection(self) -> tuple[RelayConnection | None, str]:
        """The open relay session, or a new one with the first relay that answers;
        None (and why) when there is none."""
        conn = self._conn
        if conn is not None and conn.messages < self.per_connection and conn.still_open():
            return conn, ""
        self.close_relay()
        if not self.relays.configured:
            return None, "no relay configured; non-local mail stays queued"
        why = ""
        for route in self.relays.candidates(self.clock()):
            if self.stop.is_set():
                return None, "stopping"
            conn = route.connect()
            conn.on_idle = self._local_work
            try:
                conn.open()
            except RelayError as err:
                conn.close()
                if self.stop.is_set():  # abandoned for the stop: not the relay's fault
                    return None, "stopping"
                self._relay_failed(route, conn, err)
                why = f"{route.name}: {err}"
                continue
            route.state.succeeded()
            self.figures.relay_session(True, self.clock())
            self._conn, self._route = conn, route
            return conn, ""
        until = format_time(self.relays.next_retry())
        return None, f"relay unavailable until {until}" + (f" ({why})" if why else "")

