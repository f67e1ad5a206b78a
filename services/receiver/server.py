"""The receiver's socket shell: a ThreadingTCPServer with a bounded pool of session slots.

All SMTP decisions are made by `ServerSession`; this module moves bytes, keeps time,
stores messages through the queue (`shared/queue.py`), and carries out the session's events.

- Slots: at most `max_connections` sessions (and `max_connections_per_ip` per client),
  counted over all listeners together (one `SlotPool` shared by the plain and the
  implicit-TLS server).
  The connection after that is accepted, answered 421 and closed at once, from the
  accepting thread, so it never waits for a slot (SPEC §3).
- Time: a session reads in short slices so that it notices the idle timeout, its
  total deadline and a graceful stop without any extra thread. A TLS handshake is
  bounded by the same deadline (a stalled handshake must not hold a slot longer).
- Graceful stop (SPEC §6): `begin_shutdown()` stops accepting; a session in the middle
  of DATA reads its message to the end, stores it and answers 250; every other
  session is answered 421 and closed; `wait_for_sessions()` bounds the wait.
"""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.receiver import replies as R
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
from shared.config import IPNetwork
from shared.log import EventLog, describe_exception
from shared.metrics.figures import ReceiverFigures
from shared.queue import MessageStore, QueueWriteError

PROGRAM = "R-SMTP"
READ_SLICE = 0.5  # seconds a recv may block before timers and the stop flag are checked
RECV_SIZE = 64 * 1024  # per-session buffer (zeroed, so resident): one loopback segment
AUTH_FAILURE_DELAY = 1.0  # seconds a failed login waits before its 535 (slows guessing)


class SlotPool:
    """The session slots of the whole receiver: `max_connections` in all, and at most
    `max_connections_per_ip` for one client address (0 = no per-address limit).
    `resize` (a reload) changes the limits for the sessions to come; sessions over a
    lowered limit go on until they end."""

    def __init__(self, max_connections: int, max_per_ip: int = 0) -> None:
        self._max = max_connections
        self._max_per_ip = max_per_ip
        self._taken = 0
        self._per_ip: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, ip: str) -> bool:
        """A slot for this client, or False at once (never waits)."""
        with self._lock:
            if self._taken >= self._max:
                return False
            if self._max_per_ip and self._per_ip.get(ip, 0) >= self._max_per_ip:
                return False
            self._taken += 1
            self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        return True

    def give_back(self, ip: str) -> None:
        with self._lock:
            self._taken -= 1
            left = self._per_ip.get(ip, 1) - 1
            if left:
                self._per_ip[ip] = left
            else:
                self._per_ip.pop(ip, None)

    def resize(self, max_connections: int, max_per_ip: int) -> None:
        with self._lock:
            self._max = max_connections
            self._max_per_ip = max_per_ip


@dataclass(frozen=True)
class ServerLimits:
    idle_timeout: float = 300.0
    session_deadline: float = 1800.0
    max_connections: int = 5
    max_connections_per_ip: int = 0  # 0 = no per-IP limit
    tls_handshake_timeout: float = 30.0


class ReceiverServer(socketserver.ThreadingTCPServer):
    """One listening socket; sessions run in their own threads, at most N at once."""

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
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.check_password = check_password
        self.stopping = threading.Event()
        self.slots = slots or SlotPool(limits.max_connections, limits.max_connections_per_ip)
        self.figures = figures or ReceiverFigures()  # counts nothing unless metrics are on
        self._lock = threading.Lock()
        self._sessions: set[threading.Thread] = set()
        self._open_sockets: set[socket.socket] = set()
        self.log = EventLog(PROGRAM, "-")
        super().__init__(address, SessionHandler)

    # -- slots ---------------------------------------------------------------------

    def process_request(self, request: socket.socket, client_address: tuple) -> None:  # type: ignore[override]
        ip = client_address[0]
        if not self._take_slot(ip):
            self._refuse(request, client_address)
            return
        thread = threading.Thread(
            target=self._run_session, args=(request, client_address), daemon=True
        )
        with self._lock:
            self._sessions.add(thread)
            self._open_sockets.add(request)
        thread.start()

    def _take_slot(self, ip: str) -> bool:
        return not self.stopping.is_set() and self.slots.take(ip)

    def _refuse(self, request: socket.socket, client_address: tuple) -> None:
        """Over the limit: 421 at once, then close; never blocks the accepting thread."""
        log = self.log.with_peer(_peer_text(client_address))
        try:
            request.setblocking(False)
            request.send(R.S421_UNAVAILABLE.format(hostname=self.policy.hostname).to_bytes())
        except OSError:
            pass
        finally:
            self.shutdown_request(request)
        log.fail("connect", reason="too many connections", reply=421)
        self.figures.rejected(421)

    def _run_session(self, request: socket.socket, client_address: tuple) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception as exc:  # noqa: BLE001 - a session's bug must not kill the server
            self.handle_error(request, client_address, exc)
        finally:
            self.shutdown_request(request)
            self.slots.give_back(client_address[0])
            with self._lock:
                self._sessions.discard(threading.current_thread())
                self._open_sockets.discard(request)

    def handle_error(  # type: ignore[override]
        self, request: object, client_address: tuple, exc: BaseException | None = None
    ) -> None:
        """Log a session's unexpected error as one line (the default prints to stderr)."""
        exc = exc or sys.exc_info()[1]
        self.log.with_peer(_peer_text(client_address)).error("session", exc=exc)

    def replace_socket(self, old: socket.socket, new: socket.socket) -> None:
        """A session wrapped its socket in TLS: track the new one for a forced stop."""
        with self._lock:
            self._open_sockets.discard(old)
            self._open_sockets.add(new)

    # -- settings ---------------------------------------------------------------------

    def reconfigure(
        self, *, policy: SessionPolicy, limits: ServerLimits,
        relay_networks: tuple[IPNetwork, ...], tls_context: ssl.SSLContext | None,
        check_password: Callable[[str, str], bool] | None,
    ) -> None:
        """New settings for the sessions that start from now on (a reload); a session
        already open keeps the ones it started with (`session_settings`)."""
        with self._lock:
            self.policy, self.limits, self.relay_networks = policy, limits, relay_networks
            self.tls_context, self.check_password = tls_context, check_password

    def session_settings(self, ip: str) -> tuple[SessionPolicy, ServerLimits, bool,
                                                 ssl.SSLContext | None,
                                                 Callable[[str, str], bool] | None]:
        """What a new session keeps for its whole life: the policy, the limits,
        whether `ip` may relay, the TLS context and the password check - all of one
        reload."""
        with self._lock:
            return (self.policy, self.limits, self.may_relay(ip), self.tls_context,
                    self.check_password)

    def may_relay(self, ip: str) -> bool:
        address = ipaddress.ip_address(ip.split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.relay_networks)

    # -- graceful stop ----------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Stop accepting now; sessions see `stopping` within READ_SLICE seconds."""
        self.stopping.set()
        self.shutdown()  # stops serve_forever (called from another thread)
        self.server_close()

    def wait_for_sessions(self, timeout: float) -> bool:
        """Wait for the sessions to end; after `timeout`, cut the stragglers off."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = list(self._sessions)
            if not threads:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                break
            threads[0].join(min(left, 0.2))
        with self._lock:
            sockets = list(self._open_sockets)
        for sock in sockets:  # nothing acknowledged is lost: their DATA never got 250
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return False

    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)


def _peer_text(client_address: tuple) -> str:
    host, port = client_address[0], client_address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class SessionHandler(socketserver.BaseRequestHandler):
    """Runs one session: the loop between the socket and `ServerSession`."""

    server: ReceiverServer

    def setup(self) -> None:
        server = self.server
        ip = self.client_address[0]
        self.log = server.log.with_peer(_peer_text(self.client_address))
        self.sock: socket.socket = self.request
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        policy, self.limits, may_relay, self.tls_context, self.check_password = (
            server.session_settings(ip))
        self.session = ServerSession(
            policy, ip, may_relay=may_relay, tls_active=server.implicit_tls
        )
        self.outgoing: list[bytes] = []
        # recv_into one buffer per session: a fresh 256 KiB bytes object per recv()
        # cost an mmap, page faults, an mremap and an munmap (a TLB shootdown across
        # the threads), all with the GIL held - a third of the receiver's syscalls.
        self._recv_view = memoryview(bytearray(RECV_SIZE))
        self.started = self.last_input = time.monotonic()
        self.close_reason = "peer"

    def handle(self) -> None:
        self.log.ok("connect", tls="implicit" if self.server.implicit_tls else "no")
        try:
            if self.server.implicit_tls and not self._start_tls():
                return
            self._use_read_slices()
            self._send_now(self.session.greeting())
            self._loop()
        except (ConnectionError, ssl.SSLError, TimeoutError, BlockingIOError) as err:
            self.close_reason = f"error: {describe_exception(err)}"
        except Exception as exc:  # noqa: BLE001 - a bug of ours: say 421, never a silent drop
            self.close_reason = "error: internal"
            self.log.error("session", exc=exc)
            self._say_goodbye_after_error()
        finally:
            outcome = self.log.fail if self.close_reason.startswith("error") else self.log.ok
            outcome("close", reason=self.close_reason)

    def _say_goodbye_after_error(self) -> None:
        """Send the replies already produced, then 421: the client knows where it stands."""
        self.outgoing.append(self.session.local_error().data)
        try:
            self._flush()
        except OSError:
            pass

    def finish(self) -> None:
        try:
            self.sock.close()  # after STARTTLS this is the TLS socket, not self.request
        except OSError:
            pass

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
                    self.log.fail("reject", command=event.command, reply=str(event.reply))
                    self.server.figures.rejected(event.reply.code)
            elif isinstance(event, MessageReady):
                self._store(event)
            elif isinstance(event, AuthRequest):
                self._authenticate(event)
            elif isinstance(event, StartTLS):
                self._flush()
                if not self._start_tls():
                    return
                session.tls_started()
            elif isinstance(event, CloseConnection):
                self._flush()
                self.close_reason = event.reason
                return

    def _read_more(self) -> bool:
        """Read the next bytes, or decide the session is over. False = close now."""
        while True:
            now = time.monotonic()
            if self.server.stopping.is_set() and not self.session.in_data:
                self._send_now(self.session.shutting_down())
                self.close_reason = "shutdown"
                return False
            if now - self.last_input > self.limits.idle_timeout:
                return self._time_out("idle timeout")
            if now - self.started > self.limits.session_deadline:
                return self._time_out("session deadline")
            try:
                size = self.sock.recv_into(self._recv_view)
            except (TimeoutError, BlockingIOError):  # the slice elapsed: check the timers
                continue
            if not size:
                self.close_reason = "peer closed"
                return False
            self.last_input = time.monotonic()
            self.session.receive_data(self._recv_view[:size])
            return True

    def _time_out(self, reason: str) -> bool:
        self._send_now(self.session.timed_out())
        self.close_reason = reason
        return False

    def _store(self, event: MessageReady) -> None:
        envelope = event.envelope
        try:
            queue_id = self.server.queue.store(envelope.mail_from, envelope.rcpt_tos, event.data)
        except QueueWriteError as err:
            reply = R.S452_NO_SPACE if err.no_space else R.S451_LOCAL_ERROR
            self.session.message_not_stored(reply)
            self.log.error("queue", exc=err, sender=f"<{envelope.mail_from}>", reply=reply.code)
            return
        self.session.message_stored(queue_id)
        self.server.figures.received()
        # Logged before the 250 goes out: a message the client was told is queued
        # always has its line, and it comes before the sender's line about it.
        self.log.ok(
            "queued",
            id=queue_id,
            sender=f"<{envelope.mail_from}>",
            rcpts=len(envelope.rcpt_tos),
            size=len(event.data),
        )

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
        plain = self.sock
        try:
            self.sock = context.wrap_socket(plain, server_side=True)
            self.server.replace_socket(plain, self.sock)
        except (ssl.SSLError, OSError) as err:
            self.log.fail("tls", error=describe_exception(err))
            self.close_reason = "tls handshake failed"
            return False
        self._use_read_slices()
        self.log.ok("tls", version=self.sock.version(), cipher=(self.sock.cipher() or ("",))[0])
        return True

    def _use_read_slices(self) -> None:
        """Make every recv and send give up after READ_SLICE seconds.

        Plain TCP: a blocking socket with the kernel's SO_RCVTIMEO/SO_SNDTIMEO. Python's
        own socket timeout would poll(2) before every recv and send: two syscalls, and
        two GIL hand-offs between busy session threads, where one does. An elapsed
        slice then shows as BlockingIOError (EAGAIN). A TLS socket keeps Python's
        timeout: ssl's blocking read would retry EAGAIN forever.
        """
        if isinstance(self.sock, ssl.SSLSocket):
            self.sock.settimeout(READ_SLICE)
            return
        self.sock.settimeout(None)
        seconds = int(READ_SLICE)
        timeval = struct.pack("ll", seconds, int((READ_SLICE - seconds) * 1_000_000))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)

    def _send_now(self, event: SendReply) -> None:
        self.outgoing.append(event.data)
        self._flush()

    def _flush(self) -> None:
        if self.outgoing:
            data = b"".join(self.outgoing)
            self.outgoing.clear()
            self.sock.sendall(data)
