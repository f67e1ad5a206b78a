"""The sender's socket shell: drive a `ClientSession` against the smarthost.

All SMTP decisions are made by `services/sender/client.py`; this module connects,
runs TLS, keeps the RFC 5321 §4.5.3.2 timeouts and moves bytes.

- `tls = "tls"`: implicit TLS before the greeting (port 465, RFC 8314);
  `tls = "starttls"`: STARTTLS is required, a relay without it is an error — never a
  silent fall-back to plain text (RFC 3207 §4 / RFC 8314 §3.2).
- Certificates are checked against the system CAs (or `ca_file`) with the host name
  of `[sender] relay`; only `tls_verify = false` turns that off.
- Every failure to talk to the relay is a `RelayError` (connect, TLS, protocol,
  timeout, or a refused greeting/EHLO/STARTTLS/AUTH): the messages stay queued.
- A stop (TERM) lets the transaction in progress finish for `STOP_GRACE` seconds,
  then abandons it: without its 250 the message simply stays queued. Every wait -
  the name lookup, the connect, the TLS handshake, each reply - watches the stop
  flag, so the sender exits well within supervisord's stopwaitsecs.
- While it waits for the relay longer than `IDLE_AFTER`, the connection calls its
  `on_idle` hook (the runner delivers local mail meanwhile): local delivery never
  waits behind a slow or hanging relay.

Many messages on one session (RFC 2920): `submit()` hands messages to the session,
`pump()` carries out what it says without blocking (everything it asks to send
goes out in ONE write: a body and the next message's commands), `wait()` blocks
for the relay's next bytes. Outcomes queue up in `results` as they come, so a
failure never loses one that arrived before it. `deliver()` is the one-message
form of the same loop.

Syscalls per message matter: the socket is non-blocking from the connect on; a
read or write is tried first and poll(2) runs only when it would block. No
settimeout() per call (each is an ioctl, and every recv/send under a timeout is a
poll + the call). Timeouts (RFC 5321 §4.5.3.2, `Timeouts`) are kept as deadlines;
the stop flag is looked at every `READ_SLICE` while waiting.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.sender.client import (
    NEED_DATA,
    ClientPolicy,
    ClientSession,
    Closed,
    MessageDone,
    OutgoingMessage,
    ProtocolError,
    Ready,
    Send,
    SessionError,
    StartTLS,
)
from shared.config import HostPort, RouteConfig, SenderConfig
from shared.log import EventLog, describe_exception
from shared.smtp import Reply

READ_SLICE = 0.5  # seconds a wait may block before the stop flag is looked at
IDLE_AFTER = 0.02  # seconds of waiting for the relay before the on_idle hook runs
STOP_GRACE = 2.5  # seconds a transaction may still take after TERM
QUIT_TIMEOUT = 5.0  # waiting for the 221 when we are leaving anyway
QUIT_TIMEOUT_STOPPING = 1.0  # ... and when the program is stopping
BLOCK_SIZE = 64 * 1024  # one "data block" of RFC 5321 §4.5.3.2.5
RECV_SIZE = 64 * 1024


class RelayError(Exception):
    """Talking to the relay failed; str() is one line. `reply` if the relay said why."""

    def __init__(self, stage: str, detail: str, reply: Reply | None = None) -> None:
        super().__init__(f"{stage}: {detail}" + (f" ({reply})" if reply else ""))
        self.stage = stage
        self.detail = detail
        self.reply = reply


@dataclass(frozen=True)
class Timeouts:
    """RFC 5321 §4.5.3.2: how long each reply may take, in seconds. The field names
    are the kinds `ClientSession.waiting_for` names."""

    connect: float = 30.0
    greeting: float = 300.0  # §4.5.3.2.1
    command: float = 300.0  # MAIL, RCPT, and the handshake's commands
    data_init: float = 120.0  # the 354 after DATA
    data_block: float = 180.0  # each block of data written
    data_end: float = 600.0  # the reply to the final dot

    @classmethod
    def from_config(cls, sender: SenderConfig) -> Timeouts:
        return cls(sender.connect_timeout, sender.greeting_timeout, sender.command_timeout,
                   sender.data_init_timeout, sender.data_block_timeout,
                   sender.data_end_timeout)

    def of(self, kind: str) -> float:
        return float(getattr(self, kind))


@dataclass(frozen=True)
class RelaySettings:
    """Everything needed to reach the smarthost (built once from the config)."""

    address: HostPort
    hostname: str
    tls: str = "none"  # none | starttls | tls
    tls_verify: bool = True
    ca_file: Path | None = None
    username: str = ""
    password: str = ""
    auth_without_tls: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)

    @classmethod
    def from_route(cls, route: RouteConfig, sender: SenderConfig, hostname: str,
                   password: str) -> RelaySettings:
        return cls(
            address=route.address,
            hostname=hostname,
            tls=route.tls,
            tls_verify=route.tls_verify,
            ca_file=route.ca_file,
            username=route.username,
            password=password,
            auth_without_tls=route.auth_without_tls,
            timeouts=Timeouts.from_config(sender),
        )


def build_tls_context(settings: RelaySettings) -> ssl.SSLContext:
    """System CAs (or ca_file), host name checked, TLS 1.2 at least."""
    context = ssl.create_default_context(
        cafile=str(settings.ca_file) if settings.ca_file else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not settings.tls_verify:  # the explicit opt-out, `tls_verify = false`
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class RelayConnection:
    """One SMTP session with the relay: `open()`, messages, `close()`."""

    def __init__(
        self,
        settings: RelaySettings,
        log: EventLog,
        stop: threading.Event | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.stop = stop or threading.Event()
        self.tls_context = tls_context
        if settings.tls != "none" and tls_context is None:
            self.tls_context = build_tls_context(settings)
        self.log = log.with_peer(str(settings.address))
        self.peer = str(settings.address)
        self.client = ClientSession(
            ClientPolicy(
                hostname=settings.hostname,
                require_starttls=settings.tls == "starttls",
                username=settings.username,
                password=settings.password,
                auth_without_tls=settings.auth_without_tls,
            ),
            tls_active=settings.tls == "tls",  # implicit TLS: encrypted before the greeting
        )
        self.sock: socket.socket | None = None
        self._poll = select.poll()
        self.usable = False  # greeted and not closing: may take messages
        self.idle = False  # Ready: nothing in flight (QUIT may follow)
        self.messages = 0  # submitted on this session
        self.results: deque[MessageDone] = deque()  # outcomes not yet taken
        # Called while a wait for the relay lasts longer than IDLE_AFTER; returns True
        # if it did some work (then the wait polls again at once).
        self.on_idle: Callable[[], bool] | None = None
        self._stopped_at: float | None = None
        self._reply_deadline: float | None = None  # of the reply being read

    # -- public --------------------------------------------------------------------

    def open(self) -> None:
        """Connect, greet, STARTTLS/AUTH as configured; RelayError if the relay is not usable."""
        address = self.settings.address
        self._use(self._connect())
        assert self.sock is not None
        try:
            ip = self.sock.getpeername()[0]
        except OSError as err:  # reset between the connect and this call
            self._drop()
            raise RelayError("connect", _os_error_text(err)) from None
        if ip != address.host:
            self.peer = f"{address.host}[{ip}]:{address.port}"
            self.log = self.log.with_peer(self.peer)
        if self.settings.tls == "tls":
            self._handshake()
        self._run_until(Ready, stage="session")
        assert self.sock is not None
        self.usable = self.idle = True
        self.log.ok(
            "connect",
            tls=self.sock.version() if isinstance(self.sock, ssl.SSLSocket) else "no",
            auth=self.settings.username or "no",
            esmtp=" ".join(sorted(self.client.extensions)) or "no",
        )

    def submit(self, message: OutgoingMessage) -> None:
        """Hand a message to the session; its outcome comes in `results` (after pump())."""
        if not self.usable:
            raise RelayError("session", "the connection is not usable")
        self.client.send_message(message)
        self.messages += 1
        self.idle = False

    def still_open(self) -> bool:
        """May this session take another message? Not once the relay has ended it: a
        relay may close a session left idle (RFC 5321 §4.5.3.2.7), with a 421 or
        without a word, and a message sent into it would meet that 421 and be
        deferred for it. Anything the relay sends while nothing is outstanding is such
        an end, so the session is dropped (nothing to QUIT) and a new one is opened."""
        if not self.usable or self.sock is None:
            return False
        if not self.idle:
            return True  # replies are due: the session's own reading sees any end
        pending = getattr(self.sock, "pending", lambda: 0)()  # TLS: decrypted, unread
        poll = select.poll()
        poll.register(self.sock, select.POLLIN)
        if pending or poll.poll(0):
            self._drop()
            return False
        return True

    @property
    def unsent(self) -> int:
        """Submitted messages none of whose commands has gone out yet."""
        return self.client.unsent

    def take_unsent(self) -> list[OutgoingMessage]:
        """Withdraw the submitted messages that have not started (e.g. to stop)."""
        return self.client.take_unsent()

    def pump(self, stage: str = "transaction") -> None:
        """Carry out the session's events up to the point it needs the relay's reply.

        Never blocks on the relay (a write may wait for buffer space). RelayError if
        the session failed: the connection is then closed; `results` keeps what came.
        """
        self._run_until(None, stage)

    def wait(self, stage: str = "transaction") -> None:
        """Block for the relay's next bytes (the timeout of the reply awaited)."""
        self._read(stage, None)

    def deliver(self, message: OutgoingMessage) -> tuple[tuple[str, Reply], ...]:
        """Relay one message; each recipient with its deciding reply.

        RelayError if the connection broke before the outcome was known: then no
        recipient counts as delivered.
        """
        self.submit(message)
        while True:
            self.pump()
            if self.results:
                break
            self.wait()
        done = self.results.popleft()
        self._settle()  # Ready for the next message, or closed
        return done.results

    def close(self) -> None:
        """QUIT and read the 221 (RFC 5321 §4.1.1.10); then close the socket. Idempotent.

        What is still in flight (e.g. an RSET) is finished first; messages not started
        are withdrawn; outcomes read on the way stay in `results`.
        """
        if self.sock is None:
            return
        try:
            if self.usable:
                self.client.take_unsent()
                limit = QUIT_TIMEOUT_STOPPING if self.stop.is_set() else QUIT_TIMEOUT
                if not self.idle:
                    self._run_until(Ready, stage="quit", limit=limit)
                self.usable = False
                self.client.quit()
                self._run_until(Closed, stage="quit", limit=limit)
        except RelayError as err:
            self.log.fail("quit", error=str(err))
        self._drop()

    # -- connecting -----------------------------------------------------------------

    def _connect(self) -> socket.socket:
        """A non-blocking connect to each address of the relay in turn, every wait
        bounded by the connect timeout and watching the stop flag."""
        address = self.settings.address
        timeout = self.settings.timeouts.connect
        deadline = time.monotonic() + timeout
        infos = self._resolve(address, deadline)
        error = "no address"
        for family, kind, proto, _, sockaddr in infos:
            try:  # no socket at all (EMFILE, an address family the host lacks) is the same
                sock = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                     proto)
            except OSError as err:
                error = _os_error_text(err)
                continue
            try:
                code = sock.connect_ex(sockaddr)
                if code not in (0, errno.EINPROGRESS):
                    raise OSError(code, os.strerror(code))
                if code:
                    self._wait_fd(sock, select.POLLOUT, deadline, "connect",
                                  "the connection", timeout)
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        raise OSError(code, os.strerror(code))
                return sock
            except OSError as err:
                sock.close()
                error = _os_error_text(err)
            except RelayError:
                sock.close()
                raise
        raise RelayError("connect", error)

    def _resolve(self, address: HostPort, deadline: float) -> list:
        """getaddrinfo, off the main thread unless the host is an IP literal: a lookup
        cannot be interrupted, so the wait for it is what watches the stop flag."""
        try:
            ipaddress.ip_address(address.host)
            literal = True
        except ValueError:
            literal = False
        if literal:
            return socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        found: list = []
        failure: list[OSError] = []
        done = threading.Event()

        def lookup() -> None:
            try:
                found.extend(socket.getaddrinfo(address.host, address.port,
                                                type=socket.SOCK_STREAM))
            except OSError as err:
                failure.append(err)
            done.set()

        threading.Thread(target=lookup, name="relay-lookup", daemon=True).start()
        what, timeout = f"the address of {address.host}", self.settings.timeouts.connect
        while not done.is_set():
            busy = self.on_idle is not None and not self.stop.is_set() and self.on_idle()
            wait = self._slice(deadline, "connect", what, timeout)
            done.wait(0 if busy else wait)
        if failure:
            raise RelayError("connect", f"cannot resolve {address.host}: "
                             f"{_os_error_text(failure[0])}")
        return found

    # -- driving the machine ----------------------------------------------------------

    def _run_until(self, wanted: type | None, stage: str, limit: float | None = None) -> object:
        """Carry out events until one of type `wanted` (None: until the session needs
        data, without reading); RelayError on any failure. The Sends met on the way
        go out together, in one write, before anything else is done."""
        writes: list[Send] = []
        while True:
            try:
                event = self.client.next_event()
            except ProtocolError as err:  # a reply that makes no sense now: defer
                self._drop()
                raise RelayError(stage, f"protocol error: {err}") from None
            if isinstance(event, Send):
                writes.append(event)
                continue
            if isinstance(event, MessageDone):
                self.results.append(event)
                continue
            if isinstance(event, Ready):
                self.idle = True
                if wanted is not Ready:
                    continue
            if writes:
                self._write(writes, stage)
                writes = []
            if wanted is not None and isinstance(event, wanted):
                return event
            if event is NEED_DATA:
                if wanted is None:
                    return None
                self._read(stage, limit)
            elif isinstance(event, StartTLS):
                self._handshake()
                self.client.tls_started()
            elif isinstance(event, SessionError):
                self._finish_after_error(event, limit)
                raise RelayError(event.step.value, event.detail, event.reply)
            elif isinstance(event, Closed):
                self._drop()
                raise RelayError(stage, f"the session ended ({event.reason})")

    def _finish_after_error(self, error: SessionError, limit: float | None) -> None:
        """After a SessionError the machine sends QUIT (or closes after 421): do it."""
        self.usable = False
        try:
            self._run_until(Closed, stage="quit", limit=limit or QUIT_TIMEOUT)
        except RelayError:
            pass
        self._drop()

    def _settle(self) -> None:
        """After a MessageDone: run to Ready, or to the end of the session (logged)."""
        try:
            while not self.idle:
                self.wait("reset")
                self.pump("reset")
        except RelayError as err:
            self.log.fail("session", error=str(err))
            self._drop()

    def _read(self, stage: str, limit: float | None) -> None:
        """One recv of whatever the relay sent; waits (poll) only if nothing is there."""
        sock = self._need_sock(stage)
        kind = self.client.waiting_for or "command"
        timeout = limit or self.settings.timeouts.of(kind)
        # One deadline per reply, not per recv: a relay trickling a reply line by line
        # (or a line byte by byte) does not keep the session alive past its timeout.
        if self._reply_deadline is None or not self.client.reply_in_progress:
            self._reply_deadline = time.monotonic() + timeout
        deadline = self._reply_deadline
        while True:
            try:
                data = sock.recv(RECV_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError):
                self._wait_io(select.POLLIN, deadline, stage, f"the {kind} reply", timeout)
                continue
            except ssl.SSLWantWriteError:
                self._wait_io(select.POLLOUT, deadline, stage, f"the {kind} reply", timeout)
                continue
            except (OSError, ssl.SSLError) as err:
                self._drop()
                raise RelayError(stage, f"connection lost: {_os_error_text(err)}") from None
            if not data:
                self._drop()
                raise RelayError(stage, "the relay closed the connection")
            try:
                self.client.receive_data(data)
            except ProtocolError as err:
                self._drop()
                raise RelayError(stage, f"protocol error: {err}") from None
            return

    def _write(self, sends: list[Send], stage: str) -> None:
        """Send these events' bytes as one write (RFC 2920: one group per write).

        §4.5.3.2.5: while data goes out the timeout applies to each block — any
        progress restarts it; commands alone have the command timeout.
        """
        sock = self._need_sock(stage)
        data = sends[0].data if len(sends) == 1 else b"".join([s.data for s in sends])
        view = memoryview(data)
        if len(data) <= BLOCK_SIZE:  # the usual case: one send, no clock, no poll
            try:
                sent = sock.send(data)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                sent = 0  # no room yet: the loop below waits for it
            except (OSError, ssl.SSLError) as err:
                self._drop()
                raise RelayError(stage, f"cannot send: {_os_error_text(err)}") from None
            if sent == len(data):
                return
            view = view[sent:]
        timeout = self.settings.timeouts.of(
            "data_block" if any(s.body for s in sends) else "command"
        )
        deadline = time.monotonic() + timeout
        while view:
            try:
                view = view[sock.send(view[:BLOCK_SIZE]):]
            except (BlockingIOError, ssl.SSLWantWriteError):
                self._wait_io(select.POLLOUT, deadline, stage, "room to send", timeout)
                continue
            except ssl.SSLWantReadError:
                self._wait_io(select.POLLIN, deadline, stage, "room to send", timeout)
                continue
            except (OSError, ssl.SSLError) as err:
                self._drop()
                raise RelayError(stage, f"cannot send: {_os_error_text(err)}") from None
            deadline = time.monotonic() + timeout

    def _wait_io(
        self, events: int, deadline: float, stage: str, what: str, timeout: float
    ) -> None:
        """Wait until the session's socket is ready (see `_wait_fd`)."""
        self._wait_fd(self._need_sock(stage), events, deadline, stage, what, timeout)

    def _wait_fd(self, sock: socket.socket, events: int, deadline: float, stage: str,
                 what: str, timeout: float) -> None:
        """poll(2) until `sock` is ready, at most READ_SLICE at a time; RelayError on
        the deadline, or when a stop has waited STOP_GRACE. A wait longer than
        IDLE_AFTER lets the `on_idle` hook work in between."""
        fd = sock.fileno()
        self._poll.register(fd, events)
        try:
            if self._poll.poll(int(min(IDLE_AFTER, max(0.0, deadline - time.monotonic()))
                                   * 1000)):
                return
            while True:
                busy = self.on_idle is not None and not self.stop.is_set() and self.on_idle()
                wait = 0.0 if busy else self._slice(deadline, stage, what, timeout)
                if self._poll.poll(int(wait * 1000)):
                    return
                if busy:
                    self._slice(deadline, stage, what, timeout)  # the deadline still holds
        finally:
            self._poll.unregister(fd)

    def _slice(self, deadline: float, stage: str, what: str, timeout: float) -> float:
        """How long the next wait may block (at most READ_SLICE); RelayError when the
        deadline has passed or a stop has waited long enough."""
        now = time.monotonic()
        if now >= deadline:
            self._drop()
            raise RelayError(stage, f"timeout after {timeout:g}s waiting for {what}")
        if self.stop.is_set() and now >= self._stop_deadline():
            self._drop()  # abandoned: without its 250 the message stays queued
            raise RelayError(stage, f"abandoned waiting for {what}: stopping")
        return max(0.01, min(READ_SLICE, deadline - now))

    def _stop_deadline(self) -> float:
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        return self._stopped_at + STOP_GRACE

    def _use(self, sock: socket.socket) -> None:
        """From now on the session runs on `sock`, non-blocking (see the module doc)."""
        self.sock = sock
        sock.settimeout(0.0)

    def _handshake(self) -> None:
        """The TLS handshake, non-blocking: each wait bounded by the connect timeout
        and watching the stop flag."""
        sock = self._need_sock("tls")
        assert self.tls_context is not None
        timeout = self.settings.timeouts.connect
        deadline = time.monotonic() + timeout
        try:
            wrapped = self.tls_context.wrap_socket(
                sock, server_hostname=self.settings.address.host, do_handshake_on_connect=False
            )
        except (OSError, ssl.SSLError, ValueError) as err:
            self._drop(sock)
            raise RelayError("tls", _os_error_text(err)) from None
        self._use(wrapped)
        while True:
            try:
                wrapped.do_handshake()
                return
            except ssl.SSLWantReadError:
                self._wait_io(select.POLLIN, deadline, "tls", "the TLS handshake", timeout)
            except ssl.SSLWantWriteError:
                self._wait_io(select.POLLOUT, deadline, "tls", "the TLS handshake", timeout)
            except (OSError, ssl.SSLError, ValueError) as err:
                self._drop()
                raise RelayError("tls", _os_error_text(err)) from None

    def _need_sock(self, stage: str) -> socket.socket:
        if self.sock is None:
            raise RelayError(stage, "not connected")
        return self.sock

    def _drop(self, sock: socket.socket | None = None) -> None:
        """Close without QUIT: only after Closed, a 421, or a broken connection."""
        self.usable = False
        for each in (sock, self.sock):
            if each is not None:
                try:
                    each.close()
                except OSError:
                    pass
        self.sock = None
        self.client.connection_lost()


def _os_error_text(err: BaseException) -> str:
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {err.verify_message or err.reason}"
    if isinstance(err, ssl.SSLError):
        return f"TLS error: {err.reason or err}"
    if isinstance(err, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return describe_exception(err)
