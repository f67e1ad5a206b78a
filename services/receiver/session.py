"""The receiver's SMTP session as a state machine with no I/O in it (sans-I/O, like h11).

Everything that decides what the server says lives here; the socket shell
(`server.py`) only moves bytes and carries out the events this module returns.

Use::

    session = ServerSession(policy, client_ip="127.0.0.1", may_relay=True)
    session.greeting()                      # -> SendReply(220 ...)
    session.receive_data(b"EHLO x\\r\\n")    # buffer bytes from the wire
    while (event := session.next_event()) is not NEED_DATA:
        ...                                 # SendReply / MessageReady / AuthRequest /
                                            # StartTLS / CloseConnection

After `MessageReady` the shell stores the message and MUST call `message_stored(id)`
or `message_not_stored(reply)` before asking for the next event; after `AuthRequest`
it calls `auth_result(ok)`; after `StartTLS` it wraps the socket and calls
`tls_started()`. The replies those calls produce come out of `next_event()` in order,
so pipelined commands are always answered one reply per command, in order
(RFC 2920), whatever the client does.

Rules this module guarantees (SPEC §3):
- transitions are the ONE table `TRANSITIONS`; a stateful command with no entry for
  the current state is out of sequence (503); only a positive reply moves the state;
- the message data is read by `DataReader` (data.py) as it streams: the end of data
  is `<CRLF>.<CRLF>` and nothing else; data with a bare CR, bare LF or NUL is
  rejected whole (SMTP smuggling), as is a line over 1000 octets, and a message
  with more than `max_hops` Received: fields (a mail loop, RFC 5321 §6.3);
- input is held in bounded memory: an over-long command line is dropped as it
  arrives, an oversize message is counted and discarded while it is read to its end;
- every command answered 5xx counts against `max_bad_commands`, and so does a 452
  for too many recipients once a transaction has had `max_recipients` of them.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from services.receiver import replies as R
from services.receiver.data import DataReader, Refusal
from shared.headers import HeaderSection
from shared.smtp import (
    MAX_COMMAND_LINE,
    ArgumentSyntaxError,
    PathSyntaxError,
    Reply,
    check_mailbox,
    domain_of,
    mailbox_name,
    parse_path_argument,
)


class SessionState(enum.Enum):
    INITIAL = "initial"  # connected, not greeted
    GREETED = "greeted"  # HELO/EHLO done, no transaction
    MAIL = "mail"  # MAIL accepted
    RCPT = "rcpt"  # at least one RCPT accepted
    DATA = "data"  # reading message data

    # Members are singletons compared by identity: hash them the same way. Enum's own
    # __hash__ is Python code (hash of the name), and TRANSITIONS is looked up with
    # the state on every command (its cost: bench/README.md).
    __hash__ = object.__hash__


END_OF_DATA = "<CRLF>.<CRLF>"  # the pseudo-command that ends the DATA state
_S = SessionState

# THE state machine: {state: {command: next state}}, taken only on a positive reply.
# A stateful command missing from the current state's row gets 503.
TRANSITIONS: dict[SessionState, dict[str, SessionState]] = {
    _S.INITIAL: {"HELO": _S.GREETED, "EHLO": _S.GREETED, "RSET": _S.INITIAL},
    _S.GREETED: {"MAIL": _S.MAIL, "RSET": _S.GREETED, "STARTTLS": _S.INITIAL,
                 "AUTH": _S.GREETED},
    _S.MAIL: {"RCPT": _S.RCPT, "RSET": _S.GREETED},
    _S.RCPT: {"RCPT": _S.RCPT, "DATA": _S.DATA, "RSET": _S.GREETED},
    _S.DATA: {END_OF_DATA: _S.GREETED},
}
STATEFUL_COMMANDS = frozenset(cmd for row in TRANSITIONS.values() for cmd in row) - {END_OF_DATA}
# Recognised but not implemented (SPEC §3): 502.
NOT_IMPLEMENTED = frozenset({"VRFY", "EXPN", "SOML", "SAML", "TURN", "SEND"})

BODY_TYPES = frozenset({"7BIT", "8BITMIME"})


# ---------------------------------------------------------------------------- events

class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()  # next_event(): feed more bytes with receive_data()


@dataclass(frozen=True)
class SendReply:
    """Write `data` to the client. `command` is the verb it answers (for the log)."""

    reply: Reply
    data: bytes
    command: str


@dataclass(frozen=True)
class Origin:
    """Where a message came from, for its Received: field (RFC 5321 §4.4)."""

    helo: str  # the name the client gave in HELO/EHLO
    client_ip: str
    protocol: str  # SMTP, ESMTP, ESMTPS, ESMTPA or ESMTPSA (RFC 3848)
    trusted: bool  # may relay or authenticated: missing Date:/Message-ID: are added


@dataclass(frozen=True)
class MessageReady:
    """A complete, valid message: store it, then call message_stored()/not_stored().

    The data is in `chunks` (runs of whole lines, dot-unstuffed, in order): written
    out as they are, never joined into one copy of the message. `headers` is its
    header section as read while it streamed."""

    envelope: Envelope
    chunks: Sequence[bytes | bytearray]
    headers: HeaderSection
    origin: Origin

    @property
    def size(self) -> int:
        return sum(map(len, self.chunks))


@dataclass(frozen=True)
class AuthRequest:
    """Check these credentials, then call auth_result(ok)."""

    mechanism: str
    username: str
    password: str


@dataclass(frozen=True)
class StartTLS:
    """Flush the 220, run the TLS handshake, then call tls_started()."""


@dataclass(frozen=True)
class CloseConnection:
    """Close the connection (after QUIT's 221, or a 421)."""

    reason: str


Event = SendReply | MessageReady | AuthRequest | StartTLS | CloseConnection | _NeedData


@dataclass
class Envelope:
    """One transaction (aiosmtpd's vocabulary), cleared by RSET and after each message."""

    mail_from: str = ""
    rcpt_tos: list[str] = field(default_factory=list)
    declared_size: int | None = None
    body_type: str = "7BIT"
    smtputf8: bool = False  # MAIL ... SMTPUTF8 (RFC 6531): UTF-8 addresses may follow


@dataclass(frozen=True)
class SessionPolicy:
    """What a session needs to know of the configuration; limits cite their RFC."""

    hostname: str
    max_message_bytes: int = 10 * 1024 * 1024  # SIZE, RFC 1870
    max_recipients: int = 100  # RFC 5321 §4.5.3.1.8: at least 100
    max_bad_commands: int = 20
    max_hops: int = 50  # Received: fields a message may have (RFC 5321 §6.3: loops)
    local_domains: frozenset[str] = frozenset({"localhost"})
    tls_available: bool = False  # STARTTLS is advertised only when configured (RFC 3207)
    auth_available: bool = False  # AUTH is advertised only under TLS (RFC 4954 §4)
    require_auth: bool = False

    @functools.cached_property
    def unavailable_verbs(self) -> frozenset[str]:
        """Extensions that are not configured: "not implemented" in every state."""
        return frozenset(verb for verb, configured in (("STARTTLS", self.tls_available),
                                                       ("AUTH", self.auth_available))
                         if not configured)


class SessionUsageError(RuntimeError):
    """The shell called the session out of order (a bug in the shell, not the client)."""


@dataclass
class _AuthExchange:
    """A SASL exchange in progress: what we still wait for."""

    mechanism: str
    username: str | None = None


# ---------------------------------------------------------------------------- session

class ServerSession:
    """One SMTP session, server side. Feed bytes in, take events out."""

    def __init__(
        self,
        policy: SessionPolicy,
        client_ip: str,
        *,
        may_relay: bool,
        tls_active: bool = False,
    ) -> None:
        self.policy = policy
        self.client_ip = client_ip
        self.may_relay = may_relay
        self.tls_active = tls_active
        self.state = SessionState.INITIAL
        self.envelope = Envelope()
        self.helo_name = ""
        self.authenticated_user: str | None = None
        self.bad_commands = 0
        self._esmtp = False  # greeted with EHLO: enhanced status codes on (RFC 2034)
        self._buffer = bytearray()
        self._pending: deque[Event] = deque()
        self._waiting_for: str | None = None  # "store", "auth", "tls": shell owes us a call
        self._discarding_long_line = False
        self._recipient_overshoot = 0  # 452s for too many recipients in this transaction
        self._reader: DataReader | None = None  # the message being read (DATA)
        self._auth: _AuthExchange | None = None
        self._closed = False
        self._unavailable = policy.unavailable_verbs

    # -- the shell's API ----------------------------------------------------------

    def greeting(self) -> SendReply:
        return self._reply(R.S220_GREETING.format(hostname=self.policy.hostname), "")

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the client; nothing is decided until next_event()."""
        self._buffer += data

    def next_event(self) -> Event:
        if self._pending:
            return self._pending.popleft()
        if self._waiting_for:
            raise SessionUsageError(f"the shell owes the session a result ({self._waiting_for})")
        if self._closed:
            return NEED_DATA
        if self.state is SessionState.DATA:
            return self._next_data_event()
        return self._next_command_event()

    def message_stored(self, queue_id: str) -> None:
        self._expect("store")
        self._pending.append(self._reply(R.S250_QUEUED.format(queue_id=queue_id), END_OF_DATA))

    def message_not_stored(self, reply: Reply) -> None:
        self._expect("store")
        self._pending.append(self._reply(reply, END_OF_DATA))

    def auth_result(self, ok: bool, username: str = "") -> None:
        self._expect("auth")
        if ok:
            self.authenticated_user = username
            self._pending.append(self._reply(R.S235_AUTH_OK, "AUTH"))
        else:
            self._pending.append(self._reply(R.S535_AUTH_FAILED, "AUTH", bad=True))

    def tls_started(self) -> None:
        """The handshake is done: start over (RFC 3207 §4.2), nothing kept from before."""
        self._expect("tls")
        self.tls_active = True

    def timed_out(self) -> SendReply:
        """The shell's idle timer fired: the 421 to send before closing."""
        self._closed = True
        return self._reply(R.S421_TIMEOUT.format(hostname=self.policy.hostname), "")

    def local_error(self) -> SendReply:
        """The shell failed unexpectedly: the 421 to send before closing."""
        self._closed = True
        return self._reply(R.S421_LOCAL_ERROR.format(hostname=self.policy.hostname), "")

    def shutting_down(self) -> SendReply:
        self._closed = True
        return self._reply(R.S421_SHUTDOWN.format(hostname=self.policy.hostname), "")

    @property
    def in_data(self) -> bool:
        """True while a message is being received (a graceful stop lets it finish)."""
        return self.state is SessionState.DATA or self._waiting_for == "store"

    # -- plumbing -------------------------------------------------------------------

    def _expect(self, what: str) -> None:
        if self._waiting_for != what:
            raise SessionUsageError(f"no {what} result expected now")
        self._waiting_for = None

    def _reply(self, reply: Reply, command: str, *, bad: bool = False) -> SendReply:
        if bad:
            self.bad_commands += 1
        return SendReply(reply, _wire_bytes(reply, self._esmtp), command)

    def _next_command_event(self) -> Event:
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > MAX_COMMAND_LINE:
                # Bounded memory: drop an over-long line as it comes, answer at its end.
                self._buffer.clear()
                self._discarding_long_line = True
            return NEED_DATA
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        if self._discarding_long_line or len(line) + 2 > MAX_COMMAND_LINE:
            self._discarding_long_line = False
            event = self._reply(R.S500_LINE_TOO_LONG, "", bad=True)
        elif self._auth is not None:
            event = self._auth_response(line)
        else:
            event = self._command(line)
        return self._check_error_budget(event)

    def _check_error_budget(self, event: Event) -> Event:
        if self.bad_commands > self.policy.max_bad_commands and not self._closed:
            self._closed = True
            self._pending.append(
                self._reply(R.S421_TOO_MANY_ERRORS.format(hostname=self.policy.hostname), "")
            )
            self._pending.append(CloseConnection("too many errors"))
        return event

    def _command(self, line: bytes) -> Event:
        if b"\r" in line or b"\0" in line:
            return self._reply(R.S500_BARE_CR, "", bad=True)
        text = line.decode("utf-8", "surrogateescape")
        verb, _, argument = text.strip(" ").partition(" ")
        # Verbs are ASCII (RFC 5321 §4.1.1): no Unicode case mapping ("ſ" -> "S").
        verb = verb.upper() if verb.isascii() else verb
        argument = argument.strip(" ")
        handler = _HANDLERS.get(verb)
        if handler is None or verb in self._unavailable:
            known = verb in NOT_IMPLEMENTED or verb in self._unavailable
            reply = R.S502_NOT_IMPLEMENTED if known else R.S500_UNRECOGNISED
            return self._reply(reply, verb if verb.isalpha() else "", bad=True)
        if verb in STATEFUL_COMMANDS and verb not in TRANSITIONS[self.state]:
            hint = R.SEQUENCE_HINTS.get(verb, "not allowed now")
            return self._reply(R.S503_BAD_SEQUENCE.format(hint=hint), verb, bad=True)
        reply = handler(self, argument)
        if reply is None:  # the handler queued an event for the shell instead
            return self._pending.popleft()
        event = self._reply(reply, verb, bad=reply.code >= 500)
        if reply.is_positive and verb in STATEFUL_COMMANDS:
            self.state = TRANSITIONS[self.state][verb]
        return event

    # -- command handlers: each returns the reply; the table moves the state ----------

    def _helo(self, argument: str) -> Reply:
        argument = argument.split(" ")[0]
        if not argument:
            return R.S501_HELO_SYNTAX.format(verb="HELO")
        self.helo_name, self._esmtp = argument, False
        return R.S250_HELO.format(hostname=self.policy.hostname, client=argument)

    def _ehlo(self, argument: str) -> Reply:
        argument = argument.split(" ")[0]
        if not argument:
            return R.S501_HELO_SYNTAX.format(verb="EHLO")
        self.helo_name, self._esmtp = argument, True
        lines = [
            f"{self.policy.hostname} Hello {argument} [{self.client_ip}]",
            "PIPELINING",
            f"SIZE {self.policy.max_message_bytes}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
        ]
        if self.policy.tls_available and not self.tls_active:
            lines.append("STARTTLS")
        if self.policy.auth_available and self.tls_active:
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        return Reply(250, "\n".join(lines))

    def _mail(self, argument: str) -> Reply:
        if self.policy.require_auth and self.authenticated_user is None:
            return R.S530_AUTH_REQUIRED
        try:
            path = parse_path_argument(argument, "FROM")
            if path.address:
                check_mailbox(path.address)
        except ArgumentSyntaxError as err:
            return R.S501_SYNTAX.format(detail=str(err))
        except PathSyntaxError as err:
            return R.S501_BAD_SENDER.format(detail=str(err))
        envelope = Envelope(mail_from=path.address)
        self._recipient_overshoot = 0
        for name, value in path.params.items():
            if name == "SIZE":
                if value is None or not value.isdigit():
                    return R.S501_SYNTAX.format(detail="SIZE needs a number")
                envelope.declared_size = int(value)
                if envelope.declared_size > self.policy.max_message_bytes:
                    return R.S552_TOO_BIG.format(limit=self.policy.max_message_bytes)
            elif name == "BODY":
                if (value or "").upper() not in BODY_TYPES:
                    return R.S501_SYNTAX.format(detail="BODY must be 7BIT or 8BITMIME")
                envelope.body_type = (value or "").upper()
            elif name == "AUTH":
                pass  # RFC 4954 §5: may be ignored
            elif name == "SMTPUTF8" and value is None:
                envelope.smtputf8 = True
            else:
                return R.S555_BAD_PARAMETER.format(name=name)
        if not (path.address.isascii() or envelope.smtputf8):
            return R.S553_NEEDS_SMTPUTF8.format(address=path.address)
        self.envelope = envelope
        return R.S250_SENDER_OK.format(address=path.address)

    def _rcpt(self, argument: str) -> Reply:
        try:
            path = parse_path_argument(argument, "TO")
            address = path.address
            is_postmaster = address.lower() == "postmaster"
            if not is_postmaster:
                check_mailbox(address)
        except ArgumentSyntaxError as err:
            return R.S501_SYNTAX.format(detail=str(err))
        except PathSyntaxError as err:
            return R.S501_BAD_ADDRESS.format(detail=str(err))
        if path.params:
            return R.S555_BAD_PARAMETER.format(name=next(iter(path.params)))
        if not (address.isascii() or self.envelope.smtputf8):
            return R.S553_NEEDS_SMTPUTF8.format(address=address)
        if not is_postmaster and domain_of(address) in self.policy.local_domains:
            try:
                mailbox_name(address)  # a Maildir folder name: no path tricks
            except ValueError as err:
                return R.S550_BAD_MAILBOX.format(address=address, why=str(err))
        if len(self.envelope.rcpt_tos) >= self.policy.max_recipients:
            # A client that sends a few too many still delivers to the first ones
            # (RFC 5321 §4.5.3.1.10); past as many again each one is a bad command,
            # like Postfix's smtpd_recipient_overshoot_limit.
            self._recipient_overshoot += 1
            if self._recipient_overshoot > self.policy.max_recipients:
                self.bad_commands += 1
            return R.S452_TOO_MANY_RECIPIENTS
        if not (is_postmaster or self._may_send_to(address)):
            return R.S554_RELAY_DENIED.format(address=address)
        self.envelope.rcpt_tos.append(address)
        return R.S250_RECIPIENT_OK.format(address=address)

    def _may_send_to(self, address: str) -> bool:
        """The relay decision (no open relay): on the client, never on MAIL FROM."""
        if self.may_relay or self.authenticated_user is not None:
            return True
        return domain_of(address) in self.policy.local_domains

    def _data(self, argument: str) -> Reply:
        if argument:
            return R.S501_NO_ARGUMENTS.format(verb="DATA")
        self._reader = DataReader(self.policy.max_message_bytes)
        self._reader.start(self._buffer)
        return R.S354_START_DATA

    def _rset(self, argument: str) -> Reply:
        if argument:
            return R.S501_NO_ARGUMENTS.format(verb="RSET")
        self.envelope = Envelope()
        return R.S250_RESET

    def _noop(self, _argument: str) -> Reply:
        return R.S250_OK

    def _help(self, _argument: str) -> Reply:
        return R.S214_HELP

    def _quit(self, argument: str) -> Reply:
        if argument:
            return R.S501_NO_ARGUMENTS.format(verb="QUIT")
        self._closed = True
        self._pending.append(CloseConnection("quit"))
        return R.S221_CLOSING.format(hostname=self.policy.hostname)

    def _starttls(self, argument: str) -> Reply:
        if argument:
            return R.S501_NO_ARGUMENTS.format(verb="STARTTLS")
        if self.tls_active:
            return R.S503_BAD_SEQUENCE.format(hint="TLS already active")
        # RFC 3207 §4.2: forget everything, including whatever was pipelined after
        # STARTTLS in plain text (CVE-2011-0411 class).
        self._buffer.clear()
        self.envelope = Envelope()
        self.helo_name, self._esmtp = "", False
        self.authenticated_user = None
        self._waiting_for = "tls"
        self._pending.append(StartTLS())
        return R.S220_READY_FOR_TLS

    # -- AUTH (RFC 4954; PLAIN RFC 4616, LOGIN) --------------------------------------

    def _auth_command(self, argument: str) -> Reply | None:
        if not self.tls_active:
            return R.S538_ENCRYPTION_REQUIRED
        if self.authenticated_user is not None:
            return R.S503_ALREADY_AUTHENTICATED
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in ("PLAIN", "LOGIN"):
            return R.S504_AUTH_MECHANISM
        self._auth = _AuthExchange(mechanism)
        if initial:
            # The exchange continues with the initial response as if it had been sent.
            return self._auth_step(initial.encode("ascii", "replace"))
        challenge = "" if mechanism == "PLAIN" else "VXNlcm5hbWU6"  # "Username:"
        return R.S334_CHALLENGE.format(challenge=challenge)

    def _auth_response(self, line: bytes) -> Event:
        reply = self._auth_step(line)
        if reply is None:  # credentials complete: an AuthRequest is queued
            return self._pending.popleft()
        return self._reply(reply, "AUTH", bad=reply.code >= 500)

    def _auth_step(self, line: bytes) -> Reply | None:
        """One client line of the SASL exchange; a 334 asks for more, else it is done."""
        exchange = self._auth
        assert exchange is not None
        if line.strip() == b"*":
            self._auth = None
            return R.S501_AUTH_CANCELLED
        try:
            decoded = base64.b64decode(line.strip(), validate=True)
            text = decoded.decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            self._auth = None
            return R.S501_AUTH_SYNTAX
        if exchange.mechanism == "PLAIN":
            parts = text.split("\0")
            if len(parts) != 3:
                self._auth = None
                return R.S501_AUTH_SYNTAX
            return self._auth_done(parts[1], parts[2])
        if exchange.username is None:
            exchange.username = text
            return R.S334_CHALLENGE.format(challenge="UGFzc3dvcmQ6")  # "Password:"
        return self._auth_done(exchange.username, text)

    def _auth_done(self, username: str, password: str) -> Reply | None:
        mechanism = self._auth.mechanism if self._auth else "PLAIN"
        self._auth = None
        self._waiting_for = "auth"
        self._pending.append(AuthRequest(mechanism, username, password))
        return None

    # -- DATA ----------------------------------------------------------------------------

    def _next_data_event(self) -> Event:
        reader = self._reader
        assert reader is not None
        if not reader.read(self._buffer):
            return NEED_DATA
        self._reader = None
        envelope, self.envelope = self.envelope, Envelope()
        self.state = TRANSITIONS[SessionState.DATA][END_OF_DATA]
        refusal = reader.refusal
        if refusal is not None:
            return self._reply(self._refusal_reply(refusal), END_OF_DATA)
        # SMTP data is CRLF lines (a bare LF is refused): fields added at the end of
        # the header section end in CRLF, also when the data has no line end at all.
        headers = replace(reader.headers.finish(), eol=b"\r\n")
        if headers.received > self.policy.max_hops:
            return self._reply(R.S554_TOO_MANY_HOPS.format(hops=headers.received,
                                                           limit=self.policy.max_hops),
                               END_OF_DATA)
        self._waiting_for = "store"
        return MessageReady(envelope, reader.chunks, headers, self._origin(envelope))

    def _origin(self, envelope: Envelope) -> Origin:
        """Who sent it, for the trace: the protocol names of RFC 3848 and, for a
        transaction with SMTPUTF8, of RFC 6531 §3.7.3 (UTF8SMTP, UTF8SMTPSA, ...)."""
        authenticated = self.authenticated_user is not None
        if self._esmtp:
            base = "UTF8SMTP" if envelope.smtputf8 else "ESMTP"
            protocol = base + "S" * self.tls_active + "A" * authenticated
        else:
            protocol = "SMTP"
        return Origin(self.helo_name, self.client_ip, protocol,
                      trusted=self.may_relay or authenticated)

    def _refusal_reply(self, refusal: Refusal) -> Reply:
        if refusal is Refusal.TOO_BIG:
            return R.S552_TOO_BIG.format(limit=self.policy.max_message_bytes)
        if refusal is Refusal.BARE_NEWLINE:
            return R.S554_BARE_NEWLINE
        return R.S554_LINE_TOO_LONG


# Command handlers by verb: each returns the reply (None: it queued an event instead).
_HANDLERS: dict[str, Callable[[ServerSession, str], Reply | None]] = {
    "HELO": ServerSession._helo,
    "EHLO": ServerSession._ehlo,
    "MAIL": ServerSession._mail,
    "RCPT": ServerSession._rcpt,
    "DATA": ServerSession._data,
    "RSET": ServerSession._rset,
    "NOOP": ServerSession._noop,
    "HELP": ServerSession._help,
    "QUIT": ServerSession._quit,
    "STARTTLS": ServerSession._starttls,
    "AUTH": ServerSession._auth_command,
}


@functools.lru_cache(maxsize=1024)
def _wire_bytes(reply: Reply, esmtp: bool) -> bytes:
    """`reply.to_bytes(esmtp)`, remembered: most replies repeat (constants, the same
    sender), and rendering each one again was a large share of the receiver's Python
    time (bench/README.md)."""
    return reply.to_bytes(esmtp)
