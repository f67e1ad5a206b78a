"""The sender's SMTP client session as a state machine with no I/O in it (sans-I/O).

The mirror of `services/receiver/session.py`: everything that decides what the
sender says to a relay lives here; `relay.py` only moves bytes, keeps time and
carries out the events this module returns.

Use::

    client = ClientSession(ClientPolicy(hostname="mailbag.example"))
    client.receive_data(b"220 relay ESMTP\\r\\n")   # bytes from the relay
    while (event := client.next_event()) is not NEED_DATA:
        ...   # Send / StartTLS / Ready / MessageDone / SessionError / Closed

After the first `Ready` the shell may call `send_message(...)` at any time: the
message waits in the session's queue until the protocol lets it go (below). When
the session is `Ready` (idle, nothing queued) the shell may also `quit()`. After
`StartTLS` it runs the handshake and calls `tls_started()`. The shell writes all
the `Send`s it got before it needs data in one write.

Rules this module guarantees (SPEC §4):
- it advances only on a positive reply (2xx; 334 inside AUTH, 354 after DATA); a
  4xx/5xx never moves it forward. The per-step moves are the table `ON_SUCCESS`;
- EHLO answered 5xx falls back to HELO (RFC 5321 §4.1.1.1);
- STARTTLS, when required, is never skipped: no STARTTLS → the session fails;
- a session ends with QUIT and the 221 is read; it closes without QUIT only after
  a 421 (RFC 5321 §3.8) — a broken connection is the shell's business;
- per-recipient results: a recipient is delivered only by the 2xx to the final dot;
  DATA goes out only if at least one RCPT was accepted (otherwise RSET);
- the data is re-encoded by `to_wire_data` (CRLF only, dot-stuffed, no NUL), so no
  queued body can smuggle an end-of-data past the relay;
- 8-bit data goes with `BODY=8BITMIME` to a relay that offers it, and is converted
  to 7 bit for one that does not (`downgrade.py`); a message that cannot be
  converted is never started: every recipient gets 554 5.6.3 (`CANNOT_CONVERT`);
- a message with a UTF-8 address in its envelope goes with `SMTPUTF8` on MAIL
  (RFC 6531) to a relay that offers it; to one that does not it is never started:
  every recipient gets 553 5.6.7 (`NO_SMTPUTF8`), a failure that bounces;
- with PIPELINING (RFC 2920) MAIL, every RCPT and DATA go out in one write, and the
  next queued message's MAIL/RCPT/DATA follow the previous message's final dot
  without waiting for its reply (§3.1: the message content may be the first
  "command" of a group, DATA is its last): one round trip per message;
- replies are attributed by position (RFC 2920 §3.2: in the order of the commands):
  each expected reply is queued with its step AND its transaction, so when message
  N's dot fails while N+1's commands are in flight, N's outcome gets that reply and
  N+1's replies still go to N+1, never to N;
- a 421 ends every transaction in flight (its undecided recipients get the 421);
  queued messages that never started are handed back by `take_unsent()`.
"""

from __future__ import annotations

import base64
import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from services.sender.downgrade import NotConvertible, for_relay
from shared.smtp import Reply, ReplyParser, to_wire_data

# RFC 6152 §3 / RFC 3463 X.6.3: 8-bit data that a relay without 8BITMIME cannot take.
CANNOT_CONVERT = Reply(554, "8-bit data for a relay without 8BITMIME: {why}", "5.6.3")
NO_SMTPUTF8 = Reply(553, "the relay does not offer SMTPUTF8, needed for {address}", "5.6.7")


class Step(enum.Enum):
    """What the session waits for: the reply to this command (or event)."""

    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    TLS = "TLS handshake"  # the shell is running the handshake
    AUTH = "AUTH"
    READY = "ready"  # greeted, nothing outstanding, no transaction
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    BODY = "end of data"  # the reply to the final dot
    RSET = "RSET"
    QUIT = "QUIT"
    CLOSED = "closed"


# THE handshake machine: the step that follows a positive reply. AFTER_HELLO is
# resolved by the policy: STARTTLS if still needed, then AUTH if configured, then READY.
AFTER_HELLO = "after hello"
ON_SUCCESS: dict[Step, Step | str] = {
    Step.GREETING: Step.EHLO,
    Step.EHLO: AFTER_HELLO,
    Step.HELO: AFTER_HELLO,
    Step.STARTTLS: Step.TLS,
    Step.TLS: Step.EHLO,  # RFC 3207 §4.2: start over with EHLO after the handshake
    Step.AUTH: AFTER_HELLO,
}

# Which RFC 5321 §4.5.3.2 timeout applies while waiting for the reply to a step.
TIMEOUT_KIND: dict[Step, str] = {
    Step.GREETING: "greeting",
    Step.DATA: "data_init",
    Step.BODY: "data_end",
}


# ---------------------------------------------------------------------------- events

class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True)
class Send:
    """Write these bytes to the relay. `body`: the message data (data block timeout)."""

    data: bytes
    body: bool = False


@dataclass(frozen=True)
class StartTLS:
    """The relay said 220 to STARTTLS: run the handshake, then call tls_started()."""


@dataclass(frozen=True)
class Ready:
    """Greeted and idle: call send_message() or quit()."""


@dataclass(frozen=True)
class MessageDone:
    """One message's outcome: each recipient with the reply that decided it.

    A 2xx means delivered (it is the reply to the final dot), 4xx try again later,
    5xx failed for good. Decide by `reply.code`, never by its text.
    """

    ref: str
    results: tuple[tuple[str, Reply], ...]


@dataclass(frozen=True)
class SessionError:
    """The session cannot carry mail: greeting, EHLO/HELO, STARTTLS or AUTH failed,
    or the relay closes (421). A QUIT follows unless the relay said 421."""

    step: Step
    reply: Reply | None
    detail: str


@dataclass(frozen=True)
class Closed:
    """Close the connection now (after the 221, or after a 421)."""

    reason: str


Event = Send | StartTLS | Ready | MessageDone | SessionError | Closed | _NeedData


class ProtocolError(Exception):
    """The relay sent something that is not SMTP or a reply nobody asked for."""


class SessionUsageError(RuntimeError):
    """The shell called the session out of order (a bug in the shell)."""


@dataclass(frozen=True)
class ClientPolicy:
    """What a client session needs to know of the configuration."""

    hostname: str  # our name in EHLO/HELO
    require_starttls: bool = False  # RFC 3207; never falls back to plain text
    username: str = ""  # AUTH (RFC 4954) when set
    password: str = ""
    # RFC 4954 §4 / RFC 8314: never send a password in clear text unless told to.
    auth_without_tls: bool = False
    use_pipelining: bool = True  # when the relay offers it (RFC 2920)


@dataclass(frozen=True)
class OutgoingMessage:
    """A message to relay: the envelope and the data as queued."""

    ref: str  # the queue id, echoed in MessageDone
    sender: str
    recipients: tuple[str, ...]
    data: bytes


class _Transaction:
    """One message in flight (aiosmtpd's Envelope, client side). A slotted class,
    not a dataclass: one is made per message, on the sender's hot path."""

    __slots__ = ("message", "wire", "pipelined", "mail_reply", "next_rcpt", "results",
                 "accepted", "discard")

    def __init__(self, message: OutgoingMessage, wire: bytes, pipelined: bool) -> None:
        self.message = message
        self.wire = wire
        self.pipelined = pipelined
        self.mail_reply: Reply | None = None
        self.next_rcpt = 0  # index of the RCPT whose reply comes next
        self.results: dict[int, Reply] = {}  # refused recipients
        self.accepted: list[int] = []
        self.discard = False  # DATA got 354 although nothing was accepted

    @property
    def mail_ok(self) -> bool:
        return self.mail_reply is not None and self.mail_reply.is_success


# ---------------------------------------------------------------------------- session

class ClientSession:
    """One SMTP session, client side. Feed reply bytes in, take events out."""

    def __init__(self, policy: ClientPolicy, *, tls_active: bool = False) -> None:
        self.policy = policy
        self.tls_active = tls_active
        self.step = Step.GREETING
        self.extensions: dict[str, str] = {}  # EHLO keyword -> parameters
        self.authenticated = False
        self._parser = ReplyParser()
        # The replies still to come, in order, each with the transaction it belongs to.
        self._expected: deque[tuple[Step, _Transaction | None]] = deque(
            [(Step.GREETING, None)]
        )
        self._pending: deque[Event] = deque()
        self._replies: deque[Reply] = deque()
        self._txns: deque[_Transaction] = deque()  # started, undecided; oldest first
        self._queued: deque[OutgoingMessage] = deque()  # given, not started
        self._greeted = False  # the handshake is done: messages may be given
        self._auth_lines: deque[bytes] = deque()  # LOGIN: what to answer the next 334s
        self._handlers: dict[Step, Callable[[Reply], None]] = {
            Step.GREETING: self._on_greeting,
            Step.EHLO: self._on_ehlo,
            Step.HELO: self._on_helo,
            Step.STARTTLS: self._on_starttls,
            Step.AUTH: self._on_auth,
            Step.RSET: self._on_rset,
            Step.QUIT: self._on_quit,
        }
        self._txn_handlers: dict[Step, Callable[[Reply, _Transaction], None]] = {
            Step.MAIL: self._on_mail,
            Step.RCPT: self._on_rcpt,
            Step.DATA: self._on_data,
            Step.BODY: self._on_body,
        }

    # -- the shell's API ----------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the relay. Raises ProtocolError if they are not SMTP replies."""
        try:
            self._replies.extend(self._parser.feed(data))
        except ValueError as err:  # ReplySyntaxError
            raise ProtocolError(str(err)) from None

    def next_event(self) -> Event:
        while not self._pending and self._replies:
            self._take_reply(self._replies.popleft())
        if self._pending:
            return self._pending.popleft()
        return NEED_DATA

    @property
    def waiting_for(self) -> str | None:
        """The timeout that applies now: greeting, command, data_init, data_end, or None."""
        if not self._expected:
            return None
        return TIMEOUT_KIND.get(self._expected[0][0], "command")

    @property
    def reply_in_progress(self) -> bool:
        """Part of a reply has arrived: its timeout runs from when it was awaited."""
        return self._parser.partial

    @property
    def unsent(self) -> int:
        """Messages given to send_message() whose commands have not gone out yet."""
        return len(self._queued)

    def send_message(self, message: OutgoingMessage) -> None:
        """Give a message to send. It starts at once when the session is idle; else it
        waits for the protocol: after the previous final dot with PIPELINING (RFC 2920
        §3.1), after the previous message's outcome without (RFC 5321 §3.3)."""
        if not self._greeted or self.step in (Step.QUIT, Step.CLOSED):
            raise SessionUsageError(f"send_message() while {self.step.value}")
        if not message.recipients:
            raise SessionUsageError("a message needs at least one recipient")
        self._queued.append(message)
        if not self._txns and not self._expected:
            self._idle()

    def take_unsent(self) -> list[OutgoingMessage]:
        """Withdraw the queued messages that have not started (nothing of them was sent)."""
        unsent = list(self._queued)
        self._queued.clear()
        return unsent

    def quit(self) -> None:
        """End the session politely: QUIT, then Closed once the 221 is read."""
        if self.step in (Step.QUIT, Step.CLOSED):
            return
        if self._txns or self._queued or self._expected or self.step is Step.TLS:
            raise SessionUsageError(f"quit() while {self.step.value}")
        self._command(b"QUIT\r\n", Step.QUIT)

    def tls_started(self) -> None:
        """The handshake succeeded: forget what the relay said in plain text, EHLO again."""
        if self.step is not Step.TLS:
            raise SessionUsageError("tls_started() without STARTTLS")
        self.tls_active = True
        self.extensions = {}
        self._parser = ReplyParser()  # RFC 3207 §4.2: nothing from before the handshake
        self._replies.clear()
        self._ehlo()

    def connection_lost(self) -> None:
        """The shell saw the connection end; nothing more can be sent."""
        self.step = Step.CLOSED
        self._expected.clear()

    # -- plumbing -------------------------------------------------------------------

    def _send(self, data: bytes, step: Step, *, body: bool = False) -> None:
        self.step = step
        self._pending.append(Send(data, body))

    def _command(self, line: bytes, step: Step, txn: _Transaction | None = None) -> None:
        self._expected.append((step, txn))
        self._send(line, step)

    def _take_reply(self, reply: Reply) -> None:
        if not self._expected:
            if reply.code == 421:  # e.g. the relay's idle timeout while we were Ready
                self._relay_closing(Step.READY, reply)
                return
            raise ProtocolError(f"unexpected reply while {self.step.value}: {reply}")
        step, txn = self._expected.popleft()
        if reply.code == 421:
            self._relay_closing(step, reply)
        elif txn is None:
            self._handlers[step](reply)
        else:
            self._txn_handlers[step](reply, txn)

    def _relay_closing(self, step: Step, reply: Reply) -> None:
        """421 (RFC 5321 §3.8): the relay is going away; do not QUIT, just close.

        Every transaction in flight ends with it (pipelined: the one whose dot is
        awaited and the next one); queued messages stay for take_unsent().
        """
        if step is Step.QUIT:
            self._closed("quit")
            return
        while self._txns:
            self._finish_transaction(self._txns[0], reply, unresolved_only=True)
        self._pending.append(SessionError(step, reply, "the relay is closing the connection"))
        self._closed("421")

    def _closed(self, reason: str) -> None:
        self._expected.clear()
        self.step = Step.CLOSED
        self._pending.append(Closed(reason))

    def _fail(self, step: Step, reply: Reply | None, detail: str) -> None:
        """The session cannot go on: say why, then QUIT and read the 221."""
        self._pending.append(SessionError(step, reply, detail))
        self._expected.clear()
        self._command(b"QUIT\r\n", Step.QUIT)

    def _advance(self, step: Step) -> None:
        """A positive reply to `step`: take the move the table gives."""
        following = ON_SUCCESS[step]
        if following == AFTER_HELLO:
            self._after_hello()
        elif following is Step.EHLO:
            self._ehlo()
        elif following is Step.TLS:
            self.step = Step.TLS
            self._pending.append(StartTLS())
        else:
            raise AssertionError(following)

    # -- handshake ------------------------------------------------------------------

    def _on_greeting(self, reply: Reply) -> None:
        if reply.is_success:
            self._advance(Step.GREETING)
        else:  # RFC 5321 §3.1: a 554 greeting still waits for our QUIT
            self._fail(Step.GREETING, reply, "the relay refused the session")

    def _ehlo(self) -> None:
        self._command(f"EHLO {self.policy.hostname}\r\n".encode(), Step.EHLO)

    def _on_ehlo(self, reply: Reply) -> None:
        if reply.is_success:
            self.extensions = parse_extensions(reply)
            self._advance(Step.EHLO)
        elif reply.is_permanent:  # RFC 5321 §4.1.1.1: an old server, try HELO
            self._command(f"HELO {self.policy.hostname}\r\n".encode(), Step.HELO)
        else:
            self._fail(Step.EHLO, reply, "EHLO refused")

    def _on_helo(self, reply: Reply) -> None:
        if reply.is_success:
            self.extensions = {}
            self._advance(Step.HELO)
        else:
            self._fail(Step.HELO, reply, "HELO refused")

    def _after_hello(self) -> None:
        if self.policy.require_starttls and not self.tls_active:
            if "STARTTLS" not in self.extensions:
                self._fail(self.step, None, "the relay does not offer STARTTLS")
            else:
                self._command(b"STARTTLS\r\n", Step.STARTTLS)
        elif self.policy.username and not self.authenticated:
            if self.tls_active or self.policy.auth_without_tls:
                self._start_auth()
            else:
                self._fail(self.step, None, "refusing to send the password without TLS "
                           "(set sender.tls, or sender.auth_without_tls = true)")
        else:
            self._greeted = True
            self._idle()

    def _on_starttls(self, reply: Reply) -> None:
        if reply.is_success:
            self._advance(Step.STARTTLS)
        else:
            self._fail(Step.STARTTLS, reply, "STARTTLS refused")

    # -- AUTH (RFC 4954; PLAIN RFC 4616; LOGIN) ---------------------------------------

    def _start_auth(self) -> None:
        offered = self.extensions.get("AUTH", "").upper().split()
        user = self.policy.username.encode()
        password = self.policy.password.encode()
        if "PLAIN" in offered:
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            self._command(b"AUTH PLAIN " + token + b"\r\n", Step.AUTH)
        elif "LOGIN" in offered:
            self._auth_lines = deque([base64.b64encode(user), base64.b64encode(password)])
            self._command(b"AUTH LOGIN\r\n", Step.AUTH)
        else:
            detail = "the relay offers no AUTH PLAIN or LOGIN" + (
                "" if self.tls_active else " (without TLS)"
            )
            self._fail(self.step, None, detail)

    def _on_auth(self, reply: Reply) -> None:
        if reply.code == 334 and self._auth_lines:
            self._command(self._auth_lines.popleft() + b"\r\n", Step.AUTH)
        elif reply.is_success:
            self.authenticated = True
            self._auth_lines.clear()
            self._advance(Step.AUTH)
        elif reply.code == 334:  # a challenge we have no answer for: cancel (RFC 4954 §4)
            self._command(b"*\r\n", Step.AUTH)
        else:
            self._auth_lines.clear()
            self._fail(Step.AUTH, reply, "authentication failed")

    # -- a transaction ----------------------------------------------------------------

    def _refuse(self, message: OutgoingMessage, reply: Reply) -> bool:
        """A message this relay cannot take: its outcome at once, nothing sent."""
        self._pending.append(MessageDone(message.ref, tuple((r, reply)
                                                            for r in message.recipients)))
        return False

    def _mail_command(self, sender: str, size: int, eight_bit: bool, utf8: bool) -> bytes:
        params = ""
        if "SIZE" in self.extensions:  # RFC 1870
            params += f" SIZE={size}"
        if eight_bit:  # RFC 6152: only ever when the relay offers 8BITMIME
            params += " BODY=8BITMIME"
        if utf8:  # RFC 6531 §3.4: only ever when the relay offers SMTPUTF8
            params += " SMTPUTF8"
        return f"MAIL FROM:<{sender}>{params}\r\n".encode("utf-8", "surrogateescape")

    @staticmethod
    def _rcpt_command(recipient: str) -> bytes:
        return f"RCPT TO:<{recipient}>\r\n".encode("utf-8", "surrogateescape")

    def _start_queued(self) -> None:
        """Start the first queued message this relay can take; fail those before it."""
        while self._queued:
            if self._start(self._queued.popleft()):
                return

    def _start(self, message: OutgoingMessage) -> bool:
        """Send a message's commands: all at once with PIPELINING (RFC 2920), else MAIL.

        False, with its outcome already given, for data the relay cannot take.
        """
        utf8 = needs_smtputf8(message)
        if utf8 and "SMTPUTF8" not in self.extensions:  # RFC 6531 §3.4: never downgraded
            return self._refuse(message, NO_SMTPUTF8.format(address=utf8))
        try:
            data, eight_bit = for_relay(message.data, "8BITMIME" in self.extensions)
        except NotConvertible as err:
            return self._refuse(message, CANNOT_CONVERT.format(why=str(err)))
        wire = to_wire_data(data)
        txn = _Transaction(message, wire, self.policy.use_pipelining and self._pipelining)
        self._txns.append(txn)
        mail = self._mail_command(message.sender, len(wire) - 3, eight_bit, bool(utf8))
        if not txn.pipelined:
            self._command(mail, Step.MAIL, txn)
            return True
        commands = [mail]
        commands.extend(self._rcpt_command(r) for r in message.recipients)
        commands.append(b"DATA\r\n")
        self._expected.append((Step.MAIL, txn))
        self._expected.extend((Step.RCPT, txn) for _ in message.recipients)
        self._expected.append((Step.DATA, txn))
        self._send(b"".join(commands), Step.MAIL)
        return True

    @property
    def _pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    def _idle(self) -> None:
        """Nothing in flight: start the next queued message, or say Ready."""
        self._start_queued()
        if not self._txns:
            self.step = Step.READY
            self._pending.append(Ready())

    def _on_mail(self, reply: Reply, txn: _Transaction) -> None:
        if reply.is_intermediate:  # nonsense from the relay: never a verdict on the mail
            raise ProtocolError(f"MAIL answered {reply}")
        txn.mail_reply = reply
        if not reply.is_success:
            # Every recipient shares the sender's fate. Pipelined: the RCPT/DATA
            # replies still to come are read and ignored.
            for index in range(len(txn.message.recipients)):
                txn.results[index] = reply
            if not txn.pipelined:
                self._end_transaction(txn, rset=False)
            return
        if not txn.pipelined:
            self._command(self._rcpt_command(txn.message.recipients[0]), Step.RCPT, txn)

    def _on_rcpt(self, reply: Reply, txn: _Transaction) -> None:
        if reply.is_intermediate:
            raise ProtocolError(f"RCPT answered {reply}")
        index = txn.next_rcpt
        txn.next_rcpt += 1
        if txn.mail_ok:
            if reply.is_success:
                txn.accepted.append(index)
            else:
                txn.results[index] = reply
        if txn.pipelined:
            return
        if txn.next_rcpt < len(txn.message.recipients):
            self._command(
                self._rcpt_command(txn.message.recipients[txn.next_rcpt]), Step.RCPT, txn
            )
        elif txn.accepted:
            self._command(b"DATA\r\n", Step.DATA, txn)
        else:
            self._end_transaction(txn, rset=True)  # nobody accepted: no DATA

    def _on_data(self, reply: Reply, txn: _Transaction) -> None:
        if reply.code == 354:
            if txn.mail_ok and txn.accepted:
                body = txn.wire
            else:
                # RFC 2920 §3.1: DATA accepted with no valid recipient — send an empty
                # message end and let its reply go; nobody is delivered by it.
                txn.discard = True
                body = b".\r\n"
            self._expected.append((Step.BODY, txn))
            self._send(body, Step.BODY, body=True)
            if txn.pipelined:  # §3.1: the next group follows the dot
                self._start_queued()
            return
        if reply.is_positive:
            raise ProtocolError(f"DATA answered {reply}")
        for index in txn.accepted:
            txn.results[index] = reply
        self._end_transaction(txn, rset=txn.mail_ok)

    def _on_body(self, reply: Reply, txn: _Transaction) -> None:
        if reply.is_intermediate:
            raise ProtocolError(f"the final dot answered {reply}")
        if not txn.discard:
            for index in txn.accepted:
                txn.results[index] = reply
        # Whatever the dot's reply, the relay's transaction is over (RFC 5321 §4.1.1.4):
        # no RSET, and the next message's commands (if in flight) stand.
        self._end_transaction(txn, rset=False)

    def _end_transaction(self, txn: _Transaction, *, rset: bool) -> None:
        self._finish_transaction(txn, None)
        if rset:  # §4.1.1.5: abort the half-open transaction before the next one
            self._command(b"RSET\r\n", Step.RSET)
        elif not self._txns:
            self._idle()

    def _finish_transaction(
        self, txn: _Transaction, reply: Reply | None, *, unresolved_only: bool = False
    ) -> None:
        if not self._txns or self._txns[0] is not txn:  # replies come in command order
            raise AssertionError("a transaction ended out of order")
        self._txns.popleft()
        results = []
        for index, recipient in enumerate(txn.message.recipients):
            decided = txn.results.get(index)
            if decided is None or (unresolved_only and decided.is_success):
                decided = reply
            if decided is None:  # cannot happen: every path resolves every recipient
                raise AssertionError(f"recipient {index} unresolved")
            results.append((recipient, decided))
        self._pending.append(MessageDone(txn.message.ref, tuple(results)))

    def _on_rset(self, reply: Reply) -> None:
        if reply.is_success:
            self._idle()
        else:
            self._fail(Step.RSET, reply, "RSET refused")

    def _on_quit(self, reply: Reply) -> None:
        self._closed("quit")


def needs_smtputf8(message: OutgoingMessage) -> str:
    """The first address of the envelope that is not ASCII ("" if none): such a
    message needs SMTPUTF8 (RFC 6531), whatever its data holds."""
    for address in (message.sender, *message.recipients):
        if not address.isascii():
            return address
    return ""


def parse_extensions(reply: Reply) -> dict[str, str]:
    """EHLO reply -> {"SIZE": "10240000", "AUTH": "PLAIN LOGIN", "PIPELINING": ""}.

    The first line is the relay's greeting (RFC 5321 §4.1.1.1). `AUTH=PLAIN` is the
    pre-standard spelling some servers still send.
    """
    extensions: dict[str, str] = {}
    for line in reply.text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword.upper().startswith("AUTH="):
            keyword, params = "AUTH", keyword[5:] + " " + params
        if keyword:
            upper = keyword.upper()
            extensions[upper] = (extensions.get(upper, "") + " " + params).strip()
    return extensions
