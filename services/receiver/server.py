"""The receiver's socket shell: a ThreadingTCPServer with a bounded pool of session slots.

All SMTP decisions are made by `ServerSession`; this module moves bytes, keeps time,
stores messages through the queue (`shared/queue/`) with the trace `trace.py` adds,
and carries out the session's events.

- Slots (`pool.py`): at most `max_connections` sessions (and
  `max_connections_per_ip` per client), counted over all listeners together (one
  `SlotPool` shared by the plain and the implicit-TLS server). The connection after
  that is accepted, answered 421 and closed at once, from the accepting thread, so
  it never waits for a slot (SPEC §3). A session gives its slot back before it sends
  its last reply (221, or a 421): a client that reconnects as soon as it sees that
  reply and the close (Postfix does) finds the slot free.
- Threads (`pool.py`): sessions run on `SessionThreads`, threads that outlive their
  sessions: a connection costs no thread start.
- Sockets: TCP_NODELAY and the read slices (SO_RCVTIMEO / SO_SNDTIMEO) are set on
  the listening socket, which every accepted socket inherits (Linux): a connection
  costs no setsockopt. The accept loop blocks in accept(2) for one slice at a time.
- Time: a session reads in short slices so that it notices its timers and a graceful
  stop without any extra thread. `idle_timeout` bounds the wait for each line - a
  command, or a line of DATA - from the moment the server waits for it, so a client
  trickling a byte at a time is cut like an idle one (Postfix's
  smtpd_per_record_deadline); `session_deadline` bounds the whole session, and a
  TLS handshake (a stalled handshake must not hold a slot longer).
- Log: a `queued` line per message (with the peer, and whether it came over TLS);
  a `close` line when a session ends, saying why, unless it ended with QUIT after
  queuing messages (their lines said it all); and the rejections: the first of each
  kind (command and reply code) as it happens, repeats counted into one line per
  kind at the end, so no client can flood the log. Nothing is written at connect,
  but for connections refused over a limit (`RefusalLog`: the first, then a count).
  A line costs more than a session's SMTP work: the common session - connect, one
  message, QUIT - writes one line.
- Graceful stop (SPEC §6): `begin_shutdown()` stops accepting; a session in the middle
  of DATA reads its message to the end, stores it and answers 250; every other
  session is answered 421 and closed; `wait_for_sessions()` bounds the wait.
"""

from __future__ import annotations

import ctypes
import ipaddress
import math
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from services.receiver import replies as R
from services.receiver.pool import SessionThreads, Slot, SlotPool
from services.receiver.session import (
    NEED_DATA,
    AuthRequest,
    CloseConnection,
    MessageReady,
    SendReply,
    ServerSession,
    SessionPolicy,
    StartTLS,
)
from services.receiver.trace import stored_chunks
from shared.config import IPNetwork
from shared.log import EventLog, describe_exception
from shared.metrics.figures import ReceiverFigures
from shared.queue import MessageStore, QueueWriteError, new_queue_id
from shared.smtp import Reply

PROGRAM = "R-SMTP"
READ_SLICE = 0.5  # seconds a recv may block before timers and the stop flag are checked
RECV_SIZE = 64 * 1024  # receive buffer of a session thread: one loopback segment
AUTH_FAILURE_DELAY = 1.0  # seconds a failed login waits before its 535 (slows guessing)
TRIM_AFTER = 1024 * 1024  # a message or a session's input this big: give memory back
RELAY_DECISIONS_KEPT = 4096  # client addresses whose relay decision is remembered


@dataclass(frozen=True)
class ServerLimits:
    idle_timeout: float = 300.0
    session_deadline: float = 1800.0
    max_connections: int = 5
    max_connections_per_ip: int = 0  # 0 = no per-IP limit
    tls_handshake_timeout: float = 30.0


class ReceiverServer(socketserver.ThreadingTCPServer):
    """One listening socket; sessions run on pooled threads, at most N at once."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        *,
        policy: SessionPolicy,
        limits: ServerLimits,
        queue: MessageStore,
        relay_networks: tuple[IPNetwork, ...],
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        check_password: Callable[[str, str], bool] | None = None,
        slots: SlotPool | None = None,
        figures: ReceiverFigures | None = None,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.policy = policy
        self.limits = limits
        self.queue = queue
        self.relay_networks = relay_networks
        self._relay_decisions: dict[str, bool] = {}
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.check_password = check_password
        self.stopping = threading.Event()
        self.slots = slots or SlotPool(limits.max_connections, limits.max_connections_per_ip)
        self.figures = figures or ReceiverFigures()  # counts nothing unless metrics are on
        self.log = EventLog(PROGRAM, "-")
        self.refusals = RefusalLog(self.log)
        self.threads = SessionThreads(self._run_session, _thread_limit(limits))
        self._lock = threading.Condition()
        self._sessions: set[SessionHandler] = set()
        self._serving = threading.Event()
        self._stopped = threading.Event()
        super().__init__(address, SessionHandler)

    def server_bind(self) -> None:
        """Set what every accepted socket inherits (see the module doc), then bind."""
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        seconds = int(READ_SLICE)
        timeval = struct.pack("ll", seconds, int((READ_SLICE - seconds) * 1_000_000))
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        super().server_bind()

    # -- accepting -------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = READ_SLICE) -> None:
        """Accept until `shutdown()`: one accept(2) per connection, no poll before it
        (the listening socket's SO_RCVTIMEO ends each wait after READ_SLICE, which
        takes the place of `poll_interval`)."""
        self._serving.set()
        try:
            while not self.stopping.is_set():
                try:
                    request, client_address = self.socket.accept()
                except (BlockingIOError, TimeoutError):
                    continue  # the slice elapsed: look at the stop flag
                except OSError:
                    if self.stopping.is_set():
                        break
                    time.sleep(READ_SLICE / 10)  # e.g. out of descriptors: no busy loop
                    continue
                self.process_request(request, client_address)
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop `serve_forever` and wait until it has returned (from another thread)."""
        self.stopping.set()
        if self._serving.is_set():
            self._stopped.wait()

    def process_request(self, request: socket.socket, client_address: tuple) -> None:  # type: ignore[override]
        ip = client_address[0]
        if self.stopping.is_set() or not self.slots.take(ip):
            self._refuse(request, client_address)
            return
        self.threads.submit(request, client_address)

    def _refuse(self, request: socket.socket, client_address: tuple) -> None:
        """Over the limit: 421 at once, then close; never blocks the accepting thread."""
        try:
            reply = R.S421_UNAVAILABLE.format(hostname=self.policy.hostname).to_bytes()
            request.send(reply, socket.MSG_DONTWAIT)
        except OSError:
            pass
        finally:
            request.close()
        self.refusals.refused(_peer_text(client_address))
        self.figures.rejected(421)

    def _run_session(self, request: socket.socket, client_address: tuple) -> None:
        slot = Slot(self.slots, client_address[0])
        received = 0
        try:
            received = SessionHandler(request, client_address, self, slot).received
        except Exception as exc:  # noqa: BLE001 - a session's bug must not kill the server
            self.handle_error(request, client_address, exc)
        finally:
            slot.give_back()
            request.close()
        if received >= TRIM_AFTER:  # the session and its buffers are gone now
            give_memory_back()

    def handle_error(  # type: ignore[override]
        self, request: object, client_address: tuple, exc: BaseException | None = None
    ) -> None:
        """Log a session's unexpected error as one line (the default prints to stderr)."""
        exc = exc or sys.exc_info()[1]
        self.log.with_peer(_peer_text(client_address)).error("session", exc=exc)

    # -- sessions ---------------------------------------------------------------------

    def session_started(self, handler: SessionHandler) -> None:
        with self._lock:
            self._sessions.add(handler)

    def session_ended(self, handler: SessionHandler) -> None:
        with self._lock:
            self._sessions.discard(handler)
            if not self._sessions:
                self._lock.notify_all()

    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    # -- settings ---------------------------------------------------------------------

    def reconfigure(
        self, *, policy: SessionPolicy, limits: ServerLimits,
        relay_networks: tuple[IPNetwork, ...], tls_context: ssl.SSLContext | None,
        check_password: Callable[[str, str], bool] | None,
    ) -> None:
        """New settings for the sessions that start from now on (a reload); a session
        already open keeps the ones it started with (`settings_for`). The slot
        pool may be shared by several servers: each resizes it to the same limits."""
        with self._lock:
            self.policy, self.limits, self.relay_networks = policy, limits, relay_networks
            self.tls_context, self.check_password = tls_context, check_password
            self._relay_decisions = {}
        self.slots.resize(limits.max_connections, limits.max_connections_per_ip)
        self.threads.resize(_thread_limit(limits))

    def settings_for(self, ip: str) -> tuple[SessionPolicy, ServerLimits, bool,
                                                 ssl.SSLContext | None,
                                                 Callable[[str, str], bool] | None]:
        """What a new session keeps for its whole life: the policy, the limits,
        whether `ip` may relay, the TLS context and the password check - all of one
        reload."""
        with self._lock:
            return (self.policy, self.limits, self.may_relay(ip), self.tls_context,
                    self.check_password)

    def may_relay(self, ip: str) -> bool:
        """Whether a client address is in relay_networks (remembered per address)."""
        known = self._relay_decisions.get(ip)
        if known is None:
            address = ipaddress.ip_address(ip.split("%")[0])
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            known = any(address in network for network in self.relay_networks)
            if len(self._relay_decisions) >= RELAY_DECISIONS_KEPT:
                self._relay_decisions.clear()
            self._relay_decisions[ip] = known
        return known

    # -- graceful stop ----------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Stop accepting now; sessions see `stopping` within READ_SLICE seconds."""
        self.shutdown()
        self.server_close()
        self.refusals.flush()

    def wait_for_sessions(self, timeout: float) -> bool:
        """Wait for the sessions to end; after `timeout`, cut the stragglers off."""
        with self._lock:
            done = self._lock.wait_for(lambda: not self._sessions, timeout)
            stragglers = [handler.sock for handler in self._sessions]
        for sock in stragglers:  # nothing acknowledged is lost: their DATA never got 250
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.threads.close()
        return done


_thread_buffers = threading.local()


def _receive_buffer() -> tuple[bytearray, memoryview]:
    """The calling thread's receive buffer, made once and kept for its next sessions:
    recv_into one buffer - a fresh bytes object per recv() cost an mmap, page faults
    and an munmap - without zeroing 64 KiB per connection."""
    buffers = getattr(_thread_buffers, "buffers", None)
    if buffers is None:
        buffer = bytearray(RECV_SIZE)
        buffers = _thread_buffers.buffers = (buffer, memoryview(buffer))
    return buffers


def _thread_limit(limits: ServerLimits) -> int:
    """Room for every session, and two more finishing their last reply after giving
    their slot back (a connection waits for one of them, not for a slot)."""
    return limits.max_connections + 2


class RefusalLog:
    """Connections refused over the limit, logged at most once per `interval`: a
    storm of connections must not rotate the log's history away. The refusals in
    between are counted into the next line (`repeated=N`), or into a last line at
    the stop (`flush`)."""

    def __init__(self, log: EventLog, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._last = -math.inf
        self._unlogged = 0  # refusals since the last line
        self._peer = ""

    def refused(self, peer: str) -> None:
        with self._lock:
            now = self._clock()
            if now - self._last < self._interval:
                self._unlogged += 1
                self._peer = peer
                return
            repeated, self._unlogged, self._last = self._unlogged, 0, now
        self._write(peer, repeated)

    def flush(self) -> None:
        with self._lock:
            repeated, peer, self._unlogged = self._unlogged, self._peer, 0
        if repeated:
            self._write(peer, repeated - 1)

    def _write(self, peer: str, repeated: int) -> None:
        details = {"repeated": repeated} if repeated else {}
        self._log.with_peer(peer).fail("connect", reason="too many connections", reply=421,
                                       **details)


def _peer_text(client_address: tuple) -> str:
    host, port = client_address[0], client_address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RejectionLog:
    """A session's refused commands in the log: the first of each kind (command and
    reply code) as it happens, the repeats as one line per kind at the session's end.

    The kinds are few: every refusal but a handful of 4xx counts against
    `max_bad_commands`, which ends the session."""

    def __init__(self, log: EventLog) -> None:
        self._log = log
        self._repeats: dict[tuple[str, int], tuple[int, Reply]] = {}

    def rejected(self, command: str, reply: Reply) -> None:
        key = (command, reply.code)
        seen = self._repeats.get(key)
        if seen is None:
            self._repeats[key] = (0, reply)
            self._log.fail("reject", command=command, reply=str(reply))
        else:
            self._repeats[key] = (seen[0] + 1, reply)

    def summarize(self) -> None:
        """One line per kind that was repeated, with the count and the last reply."""
        for (command, _code), (count, reply) in self._repeats.items():
            if count:
                self._log.fail("reject", command=command, reply=str(reply), repeated=count)


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim(3): hands freed heap pages back to the system."""
    try:
        function = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


_malloc_trim = _load_malloc_trim()


def give_memory_back() -> None:
    """After a big message, or a session that sent a lot: without this, glibc keeps
    what was freed (runs of lines, long lines dropped) in the session thread's arena,
    and the resident size stays at its high-water mark."""
    if _malloc_trim is not None:
        _malloc_trim(0)


class SessionHandler(socketserver.BaseRequestHandler):
    """Runs one session: the loop between the socket and `ServerSession`."""

    server: ReceiverServer

    def __init__(self, request: socket.socket, client_address: tuple, server: ReceiverServer,
                 slot: Slot) -> None:
        self.slot = slot
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        server = self.server
        ip = self.client_address[0]
        self.log = server.log.with_peer(_peer_text(self.client_address))
        self.rejections = RejectionLog(self.log)
        self.sock: socket.socket = self.request
        policy, self.limits, may_relay, self.tls_context, self.check_password = (
            server.settings_for(ip))
        self.session = ServerSession(
            policy, ip, may_relay=may_relay, tls_active=server.implicit_tls
        )
        self.outgoing: list[bytes] = []
        self._recv_buffer, self._recv_view = _receive_buffer()
        self.started = self.line_started = time.monotonic()
        self.close_reason = "peer"
        self.queued = 0  # messages this session queued
        self.received = 0  # bytes read from the client
        server.session_started(self)

    def handle(self) -> None:
        try:
            if self.server.implicit_tls and not self._start_tls():
                return
            self._send_now(self.session.greeting())
            self._loop()
        except (ConnectionError, ssl.SSLError, TimeoutError, BlockingIOError) as err:
            self.close_reason = f"error: {describe_exception(err)}"
        except Exception as exc:  # noqa: BLE001 - a bug of ours: say 421, never a silent drop
            self.close_reason = "error: internal"
            self.log.error("session", exc=exc)
            self._say_goodbye_after_error()
        finally:
            self.slot.give_back()
            self.rejections.summarize()
            if not (self.queued and self.close_reason == "quit"):
                outcome = self.log.fail if self.close_reason.startswith("error") else self.log.ok
                outcome("close", reason=self.close_reason, tls=self._tls_mode())

    def _say_goodbye_after_error(self) -> None:
        """Send the replies already produced, then 421: the client knows where it stands."""
        self.outgoing.append(self.session.local_error().data)
        try:
            self._last_words()
        except OSError:
            pass

    def finish(self) -> None:
        self.slot.give_back()
        try:
            self.sock.close()  # after STARTTLS this is the TLS socket, not self.request
        except OSError:
            pass
        self.server.session_ended(self)

    def _loop(self) -> None:
        session = self.session
        while True:
            event = session.next_event()
            if event is NEED_DATA:
                self._flush()
                if not self._read_more():
                    return
            elif isinstance(event, SendReply):
                self.outgoing.append(event.data)
                if event.reply.code >= 400:
                    self.rejections.rejected(event.command, event.reply)
                    self.server.figures.rejected(event.reply.code)
            elif isinstance(event, MessageReady):
                size = self._store(event)
                del event  # the message's chunks: free before the next read
                if size >= TRIM_AFTER:
                    give_memory_back()
            elif isinstance(event, AuthRequest):
                self._authenticate(event)
            elif isinstance(event, StartTLS):
                self._flush()
                if not self._start_tls():
                    return
                session.tls_started()
            elif isinstance(event, CloseConnection):
                self.close_reason = event.reason
                self._last_words()
                return

    def _read_more(self) -> bool:
        """Read the next bytes, or decide the session is over. False = close now."""
        limits = self.limits
        while True:
            now = time.monotonic()
            if self.server.stopping.is_set() and not self.session.in_data:
                self.outgoing.append(self.session.shutting_down().data)
                self.close_reason = "shutdown"
                self._last_words()
                return False
            if now - self.line_started > limits.idle_timeout:
                return self._time_out("idle timeout")
            if now - self.started > limits.session_deadline:
                return self._time_out("session deadline")
            try:
                size = self.sock.recv_into(self._recv_view)
            except (TimeoutError, BlockingIOError):  # the slice elapsed: check the timers
                continue
            if not size:
                self.close_reason = "peer closed"
                return False
            self.received += size
            if self._recv_buffer.find(b"\n", 0, size) >= 0:
                self.line_started = time.monotonic()  # a line is complete: the next begins
            self.session.receive_data(self._recv_view[:size])
            return True

    def _time_out(self, reason: str) -> bool:
        self.outgoing.append(self.session.timed_out().data)
        self.close_reason = reason
        self._last_words()
        return False

    def _store(self, event: MessageReady) -> int:
        """Store the message; its size. The session then has the reply to send."""
        envelope = event.envelope
        size = event.size
        queue_id = new_queue_id()
        chunks = stored_chunks(event, hostname=self.session.policy.hostname, queue_id=queue_id,
                               now=datetime.now().astimezone())
        try:
            self.server.queue.store(envelope.mail_from, envelope.rcpt_tos, chunks,
                                    queue_id=queue_id)
        except QueueWriteError as err:
            reply = R.S452_NO_SPACE if err.no_space else R.S451_LOCAL_ERROR
            self.session.message_not_stored(reply)
            self.log.error("queue", exc=err, sender=f"<{envelope.mail_from}>", reply=reply.code)
            return size
        self.session.message_stored(queue_id)
        self.queued += 1
        self.server.figures.received()
        # Logged before the 250 goes out: a message the client was told is queued
        # always has its line, and it comes before the sender's line about it.
        self.log.ok("queued", id=queue_id, sender=f"<{envelope.mail_from}>",
                    rcpts=len(envelope.rcpt_tos), size=size, tls=self._tls_mode())
        return size

    def _authenticate(self, event: AuthRequest) -> None:
        check = self.check_password
        ok = bool(check and check(event.username, event.password))
        if ok:
            self.log.ok("auth", user=event.username, mechanism=event.mechanism)
        else:
            self.log.fail("auth", user=event.username, mechanism=event.mechanism)
            self._flush()
            time.sleep(AUTH_FAILURE_DELAY)
        self.session.auth_result(ok, event.username)

    def _start_tls(self) -> bool:
        context = self.tls_context
        assert context is not None
        # One bound for the whole handshake (ssl applies a socket timeout to the whole
        # do_handshake), never beyond the idle timeout or the session's deadline.
        limits = self.limits
        left = limits.session_deadline - (time.monotonic() - self.started)
        bound = min(limits.tls_handshake_timeout, limits.idle_timeout, left)
        self.sock.settimeout(max(0.01, bound))
        try:
            self.sock = context.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError) as err:
            self.log.fail("tls", error=describe_exception(err))
            self.close_reason = "tls handshake failed"
            return False
        # A TLS socket keeps Python's timeout: ssl's blocking read would retry the
        # kernel's EAGAIN of a plain socket's read slice forever.
        self.sock.settimeout(READ_SLICE)
        self.line_started = time.monotonic()
        self.log.ok("tls", version=self.sock.version(), cipher=(self.sock.cipher() or ("",))[0])
        return True

    def _tls_mode(self) -> str:
        if not isinstance(self.sock, ssl.SSLSocket):
            return "no"
        return "implicit" if self.server.implicit_tls else "starttls"

    def _send_now(self, event: SendReply) -> None:
        self.outgoing.append(event.data)
        self._flush()

    def _last_words(self) -> None:
        """Give the slot back, then send what is left: a client that reconnects on
        seeing this reply and the close finds the slot free."""
        self.slot.give_back()
        self._flush()

    def _flush(self) -> None:
        if self.outgoing:
            data = b"".join(self.outgoing)
            self.outgoing.clear()
            self.sock.sendall(data)
            self.line_started = time.monotonic()  # the client may answer only now
