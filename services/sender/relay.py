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
  then abandons it: without its 250 the message simply stays queued.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass
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
from shared.config import HostPort, SenderConfig
from shared.log import EventLog, describe_exception
from shared.smtp import Reply

READ_SLICE = 0.5  # seconds a recv may block before the stop flag is looked at
STOP_GRACE = 5.0  # seconds a transaction may still take after TERM
QUIT_TIMEOUT = 5.0  # waiting for the 221 when we are leaving anyway
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
    connect_timeout: float = 30.0
    timeouts: dict[str, float] | None = None  # greeting/command/data_init/data_block/data_end

    @classmethod
    def from_config(cls, sender: SenderConfig, hostname: str, password: str) -> RelaySettings:
        assert sender.relay is not None
        return cls(
            address=sender.relay,
            hostname=hostname,
            tls=sender.tls,
            tls_verify=sender.tls_verify,
            ca_file=sender.ca_file,
            username=sender.username,
            password=password,
            auth_without_tls=sender.auth_without_tls,
            connect_timeout=sender.connect_timeout,
            timeouts={
                "greeting": sender.greeting_timeout,
                "command": sender.command_timeout,
                "data_init": sender.data_init_timeout,
                "data_block": sender.data_block_timeout,
                "data_end": sender.data_end_timeout,
            },
        )

    def timeout(self, kind: str) -> float:
        return (self.timeouts or {}).get(kind, 300.0)


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
    """One SMTP session with the relay: `open()`, `deliver()` many times, `close()`."""

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
        self.usable = False  # Ready for another message
        self.messages = 0

    # -- public --------------------------------------------------------------------

    def open(self) -> None:
        """Connect, greet, STARTTLS/AUTH as configured; RelayError if the relay is not usable."""
        address = self.settings.address
        try:
            sock = socket.create_connection(
                (address.host, address.port), timeout=self.settings.connect_timeout
            )
        except OSError as err:
            raise RelayError("connect", _os_error_text(err)) from None
        self.sock = sock
        ip = sock.getpeername()[0]
        if ip != address.host:
            self.peer = f"{address.host}[{ip}]:{address.port}"
            self.log = self.log.with_peer(self.peer)
        if self.settings.tls == "tls":
            self._handshake()
        self._run_until(Ready, stage="session")
        self.usable = True
        self.log.ok(
            "connect",
            tls=self.sock.version() if isinstance(self.sock, ssl.SSLSocket) else "no",
            auth=self.settings.username or "no",
            esmtp=" ".join(sorted(self.client.extensions)) or "no",
        )

    def deliver(self, message: OutgoingMessage) -> tuple[tuple[str, Reply], ...]:
        """Relay one message; each recipient with its deciding reply.

        RelayError if the connection broke before the outcome was known: then no
        recipient counts as delivered.
        """
        if not self.usable:
            raise RelayError("session", "the connection is not usable")
        self.usable = False
        self.client.send_message(message)
        done = self._run_until(MessageDone, stage="transaction")
        self.messages += 1
        self.usable = self._settle()  # Ready for the next message, or closed
        assert isinstance(done, MessageDone)
        return done.results

    def close(self) -> None:
        """QUIT and read the 221 (RFC 5321 §4.1.1.10); then close the socket. Idempotent."""
        if self.sock is None:
            return
        try:
            if self.usable:
                self.usable = False
                self.client.quit()
                self._run_until(Closed, stage="quit", limit=QUIT_TIMEOUT)
        except RelayError as err:
            self.log.fail("quit", error=str(err))
        self._drop()

    # -- driving the machine ----------------------------------------------------------

    def _run_until(self, wanted: type, stage: str, limit: float | None = None) -> object:
        """Carry out events until one of type `wanted`; RelayError on any failure."""
        while True:
            try:
                event = self.client.next_event()
            except ProtocolError as err:  # a reply that makes no sense now: defer
                self._drop()
                raise RelayError(stage, f"protocol error: {err}") from None
            if event is NEED_DATA:
                self._read(stage, limit)
                continue
            if isinstance(event, wanted):
                return event
            if isinstance(event, Send):
                self._write(event, stage)
            elif isinstance(event, StartTLS):
                self._handshake()
                self.client.tls_started()
            elif isinstance(event, SessionError):
                self._finish_after_error(event, limit)
                raise RelayError(event.step.value, event.detail, event.reply)
            elif isinstance(event, Closed):
                self._drop()
                raise RelayError(stage, f"the session ended ({event.reason})")
            elif isinstance(event, MessageDone | Ready):
                raise AssertionError(f"{event} while waiting for {wanted.__name__}")

    def _finish_after_error(self, error: SessionError, limit: float | None) -> None:
        """After a SessionError the machine sends QUIT (or closes after 421): do it."""
        self.usable = False
        try:
            self._run_until(Closed, stage="quit", limit=limit or QUIT_TIMEOUT)
        except RelayError:
            pass
        self._drop()

    def _settle(self) -> bool:
        """After a MessageDone: run to Ready (True) or to the end of the session (False)."""
        try:
            self._run_until(Ready, stage="reset")
        except RelayError as err:
            self.log.fail("session", error=str(err))
            self._drop()
            return False
        return True

    def _read(self, stage: str, limit: float | None) -> None:
        sock = self._need_sock(stage)
        kind = self.client.waiting_for or "command"
        timeout = limit or self.settings.timeout(kind)
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if now >= deadline:
                self._drop()
                raise RelayError(stage, f"timeout after {timeout:g}s waiting for the {kind} reply")
            if self.stop.is_set() and now >= self._stop_deadline():
                self._drop()  # abandoned: without its 250 the message stays queued
                raise RelayError(stage, f"abandoned waiting for the {kind} reply: stopping")
            sock.settimeout(max(0.01, min(READ_SLICE, deadline - now)))
            try:
                data = sock.recv(RECV_SIZE)
            except (TimeoutError, ssl.SSLWantReadError):
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

    _stopped_at: float | None = None

    def _stop_deadline(self) -> float:
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        return self._stopped_at + STOP_GRACE

    def _write(self, event: Send, stage: str) -> None:
        sock = self._need_sock(stage)
        try:
            if not event.body:
                sock.settimeout(self.settings.timeout("command"))
                sock.sendall(event.data)
                return
            # §4.5.3.2.5: the timeout applies to each block, not to the whole message.
            sock.settimeout(self.settings.timeout("data_block"))
            view = memoryview(event.data)
            for start in range(0, len(view), BLOCK_SIZE):
                sock.sendall(view[start : start + BLOCK_SIZE])
        except (OSError, ssl.SSLError) as err:
            self._drop()
            raise RelayError(stage, f"cannot send: {_os_error_text(err)}") from None

    def _handshake(self) -> None:
        sock = self._need_sock("tls")
        assert self.tls_context is not None
        sock.settimeout(self.settings.connect_timeout)
        try:
            self.sock = self.tls_context.wrap_socket(
                sock, server_hostname=self.settings.address.host
            )
        except (OSError, ssl.SSLError, ValueError) as err:
            self._drop(sock)
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
