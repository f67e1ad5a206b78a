"""The receiver's SMTP session (sans-I/O): fed bytes, no sockets, exact replies.

Every case is a script of client bytes and the events the session must produce,
in order. `run()` feeds each script twice, all at once and ONE BYTE AT A TIME
(h11's habit), and requires both runs to give exactly the same events and end in
the same state. Replies are compared with the catalogue (`services.receiver.replies`)
via `tests.reply_match`; no reply text is retyped here.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.receiver import replies as R
from services.receiver.session import (
    NEED_DATA,
    TRANSITIONS,
    CloseConnection,
    MessageReady,
    SendReply,
    ServerSession,
    SessionPolicy,
    SessionState,
)
from shared.smtp import MAX_COMMAND_LINE, MAX_TEXT_LINE, Reply, to_wire_data
from tests.reply_match import fields, matches

HOST = "mx.test.example"
QUEUE_ID = "18ec5415231bcd4c755070"
CLIENT_IP = "192.0.2.7"


@dataclass(frozen=True)
class Msg:
    """Expected MessageReady: envelope and data."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes


CLOSE = "CLOSE"  # expected CloseConnection

Store = Callable[[MessageReady], "str | Reply"]


def _store_ok(_event: MessageReady) -> str:
    return QUEUE_ID


def drive(
    script: bytes,
    *,
    bytewise: bool,
    chunk: int = 0,
    may_relay: bool = True,
    store: Store = _store_ok,
    **policy: object,
) -> tuple[list, ServerSession]:
    """Run a script through a fresh session; return (events after the greeting, session).

    The shell's part is played faithfully: after MessageReady the store result is
    reported back before the next event is asked for.
    """
    policy.setdefault("max_bad_commands", 1000)
    session = ServerSession(SessionPolicy(hostname=HOST, **policy), CLIENT_IP, may_relay=may_relay)
    greeting = session.greeting()
    assert matches(greeting.reply, R.S220_GREETING)
    size = 1 if bytewise else (chunk or max(1, len(script)))
    events: list = []
    for start in range(0, len(script), size):
        session.receive_data(script[start : start + size])
        _drain(session, events, store)
    return events, session


def _drain(session: ServerSession, events: list, store: Store) -> None:
    for _ in range(100_000):  # bounded: a session never produces endless events
        event = session.next_event()
        if event is NEED_DATA:
            return
        events.append(event)
        if isinstance(event, MessageReady):
            result = store(event)
            if isinstance(result, Reply):
                session.message_not_stored(result)
            else:
                session.message_stored(result)
    raise AssertionError("the session produced events without end")


def run(script: bytes, **kwargs: object) -> tuple[list, ServerSession]:
    """Feed the script whole and one byte at a time; both must give the same result."""
    whole, whole_session = drive(script, bytewise=False, **kwargs)
    bytewise, byte_session = drive(script, bytewise=True, **kwargs)
    assert comparable(whole) == comparable(bytewise), (
        "feeding one byte at a time changed the session's answers")
    assert whole_session.state is byte_session.state
    return whole, whole_session


def check(events: list, expected: list) -> None:
    """Compare events with a list of catalogue replies, Msg(...) and CLOSE."""
    got = [_describe(e) for e in events]
    assert len(events) == len(expected), f"got {got}"
    for index, (event, want) in enumerate(zip(events, expected, strict=True)):
        if isinstance(want, Reply):
            assert isinstance(event, SendReply) and matches(event.reply, want), (
                f"event {index}: expected {want}, got {got}"
            )
        elif isinstance(want, Msg):
            assert isinstance(event, MessageReady), f"event {index}: got {got}"
            envelope = event.envelope
            assert (envelope.mail_from, tuple(envelope.rcpt_tos), message_data(event)) == (
                want.sender, want.recipients, want.data)
        elif want == EHLO:
            assert ehlo_reply_ok(event), f"event {index}: got {got}"
        else:
            assert want == CLOSE and isinstance(event, CloseConnection), f"got {got}"


def message_data(event: MessageReady) -> bytes:
    """The message as the queue gets it: its chunks, in order."""
    return b"".join(event.chunks)


def comparable(events: list) -> list:
    """Events with each message as its envelope and data (however it was chunked)."""
    return [(e.envelope, message_data(e)) if isinstance(e, MessageReady) else e
            for e in events]


def _describe(event: object) -> str:
    if isinstance(event, SendReply):
        return str(event.reply)
    if isinstance(event, MessageReady):
        return f"MessageReady({event.envelope.mail_from!r}, {event.envelope.rcpt_tos!r})"
    return repr(event)


def lines(*commands: str) -> bytes:
    return b"".join(c.encode() + b"\r\n" for c in commands)


EHLO = "EHLO"  # expected: the multi-line 250 answering EHLO (checked in detail elsewhere)


def ehlo_reply_ok(event: object) -> bool:
    return isinstance(event, SendReply) and event.reply.code == 250 and event.command == "EHLO"


SEQ = R.S503_BAD_SEQUENCE
OPEN = ("HELO client.example", "MAIL FROM:<alice@example.com>")
TXN = (*OPEN, "RCPT TO:<bob@example.org>")
ALICE_BOB = ("alice@example.com", ("bob@example.org",))

# (id, commands, expected replies/events, state at the end)
COMMAND_CASES = [
    # -- greeting, HELO/EHLO -------------------------------------------------------
    ("helo", ["HELO client.example"], [R.S250_HELO], SessionState.GREETED),
    ("helo-no-domain", ["HELO", "HELO   "], [R.S501_HELO_SYNTAX] * 2, SessionState.INITIAL),
    ("ehlo-no-domain", ["EHLO"], [R.S501_HELO_SYNTAX], SessionState.INITIAL),
    ("helo-after-501-helo", ["HELO", "HELO c"], [R.S501_HELO_SYNTAX, R.S250_HELO],
     SessionState.GREETED),
    ("helo-twice", ["HELO a", "HELO b"], [R.S250_HELO, SEQ], SessionState.GREETED),
    ("ehlo-after-helo", ["HELO a", "EHLO b"], [R.S250_HELO, SEQ], SessionState.GREETED),
    ("helo-in-mail", [*OPEN, "HELO b"], [R.S250_HELO, R.S250_SENDER_OK, SEQ],
     SessionState.MAIL),
    ("ehlo-in-rcpt", [*TXN, "EHLO b"], [R.S250_HELO, R.S250_SENDER_OK, R.S250_RECIPIENT_OK, SEQ],
     SessionState.RCPT),
    ("helo-after-rset", ["HELO a", "RSET", "HELO b"], [R.S250_HELO, R.S250_RESET, SEQ],
     SessionState.GREETED),
    # -- 503: out of sequence ----------------------------------------------------------
    ("mail-before-helo", ["MAIL FROM:<a@b.example>"], [SEQ], SessionState.INITIAL),
    ("rcpt-before-helo", ["RCPT TO:<a@b.example>"], [SEQ], SessionState.INITIAL),
    ("data-before-helo", ["DATA"], [SEQ], SessionState.INITIAL),
    ("rcpt-before-mail", ["HELO a", "RCPT TO:<a@b.example>"], [R.S250_HELO, SEQ],
     SessionState.GREETED),
    ("data-before-mail", ["HELO a", "DATA"], [R.S250_HELO, SEQ], SessionState.GREETED),
    ("data-before-rcpt", [*OPEN, "DATA"], [R.S250_HELO, R.S250_SENDER_OK, SEQ],
     SessionState.MAIL),
    ("mail-in-mail", [*OPEN, "MAIL FROM:<c@d.example>"], [R.S250_HELO, R.S250_SENDER_OK, SEQ],
     SessionState.MAIL),
    ("mail-in-rcpt", [*TXN, "MAIL FROM:<c@d.example>"],
     [R.S250_HELO, R.S250_SENDER_OK, R.S250_RECIPIENT_OK, SEQ], SessionState.RCPT),
    # -- 501: syntax errors in parameters --------------------------------------------
    ("mail-no-at", ["HELO a", "MAIL FROM:<alice>"], [R.S250_HELO, R.S501_BAD_SENDER],
     SessionState.GREETED),
    ("mail-no-at-no-brackets", ["HELO a", "MAIL FROM: alice"],
     [R.S250_HELO, R.S501_BAD_SENDER], SessionState.GREETED),
    ("mail-missing-address", ["HELO a", "MAIL FROM:", "MAIL"],
     [R.S250_HELO, R.S501_BAD_SENDER, R.S501_SYNTAX], SessionState.GREETED),
    ("mail-missing-from", ["HELO a", "MAIL <a@b.example>", "MAIL TO:<a@b.example>"],
     [R.S250_HELO, R.S501_SYNTAX, R.S501_SYNTAX], SessionState.GREETED),
    ("mail-two-ats", ["HELO a", "MAIL FROM:<a@b@c.example>"],
     [R.S250_HELO, R.S501_BAD_SENDER], SessionState.GREETED),
    ("mail-unbalanced", ["HELO a", "MAIL FROM:<a@b.example", "MAIL FROM:a@b.example>"],
     [R.S250_HELO, R.S501_BAD_SENDER, R.S501_BAD_SENDER], SessionState.GREETED),
    ("mail-empty-domain", ["HELO a", "MAIL FROM:<a@>", "MAIL FROM:<@b.example>"],
     [R.S250_HELO, R.S501_BAD_SENDER, R.S501_BAD_SENDER], SessionState.GREETED),
    ("mail-bracket-in-quotes", ["HELO a", 'MAIL FROM:<"x<y"@b.example>', "NOOP"],
     [R.S250_HELO, R.S501_BAD_SENDER, R.S250_OK], SessionState.GREETED),
    ("rcpt-bracket-in-quotes", [*OPEN, 'RCPT TO:<"a>b"@example.org>', "NOOP"],
     [R.S250_HELO, R.S250_SENDER_OK, R.S501_BAD_ADDRESS, R.S250_OK], SessionState.MAIL),
    ("null-sender", ["HELO a", "MAIL FROM:<>"], [R.S250_HELO, R.S250_SENDER_OK],
     SessionState.MAIL),
    ("rcpt-no-at", [*OPEN, "RCPT TO:<bob>"], [R.S250_HELO, R.S250_SENDER_OK, R.S501_BAD_ADDRESS],
     SessionState.MAIL),
    ("rcpt-null", [*OPEN, "RCPT TO:<>"], [R.S250_HELO, R.S250_SENDER_OK, R.S501_BAD_ADDRESS],
     SessionState.MAIL),
    ("rcpt-missing", [*OPEN, "RCPT TO:", "RCPT"],
     [R.S250_HELO, R.S250_SENDER_OK, R.S501_BAD_ADDRESS, R.S501_SYNTAX], SessionState.MAIL),
    ("rcpt-postmaster", [*OPEN, "RCPT TO:<postmaster>", "RCPT TO:<PostMaster>"],
     [R.S250_HELO, R.S250_SENDER_OK, R.S250_RECIPIENT_OK, R.S250_RECIPIENT_OK], SessionState.RCPT),
    ("data-with-argument", [*TXN, "DATA now"],
     [R.S250_HELO, R.S250_SENDER_OK, R.S250_RECIPIENT_OK, R.S501_NO_ARGUMENTS], SessionState.RCPT),
    ("rset-with-argument", [*TXN, "RSET all"],
     [R.S250_HELO, R.S250_SENDER_OK, R.S250_RECIPIENT_OK, R.S501_NO_ARGUMENTS], SessionState.RCPT),
    ("quit-with-argument", ["HELO a", "QUIT now", "NOOP"],
     [R.S250_HELO, R.S501_NO_ARGUMENTS, R.S250_OK], SessionState.GREETED),
    # -- 502 / 500 ----------------------------------------------------------------------
    *[
        (f"not-implemented-{verb.lower()}", [verb + " bob", "HELO a", verb, "NOOP"],
         [R.S502_NOT_IMPLEMENTED, R.S250_HELO, R.S502_NOT_IMPLEMENTED, R.S250_OK],
         SessionState.GREETED)
        for verb in ("VRFY", "EXPN", "SOML", "SAML", "TURN", "SEND")
    ],
    ("unknown", ["XYZZY", "HELO a", "MAILFROM:<a@b.example>", "", "   ", "NOOP"],
     [R.S500_UNRECOGNISED, R.S250_HELO, R.S500_UNRECOGNISED, R.S500_UNRECOGNISED,
      R.S500_UNRECOGNISED, R.S250_OK], SessionState.GREETED),
    ("line-512-ok", ["NOOP " + "x" * (MAX_COMMAND_LINE - 7)], [R.S250_OK], SessionState.INITIAL),
    ("line-513-too-long", ["NOOP " + "x" * (MAX_COMMAND_LINE - 6), "HELO a"],
     [R.S500_LINE_TOO_LONG, R.S250_HELO], SessionState.GREETED),
    ("long-line-in-mail", [*OPEN, "RCPT TO:<" + "b" * 600 + "@c.example>", "RCPT TO:<b@c.example>"],
     [R.S250_HELO, R.S250_SENDER_OK, R.S500_LINE_TOO_LONG, R.S250_RECIPIENT_OK],
     SessionState.RCPT),
    ("bare-cr-in-command", ["HELO a\rMAIL FROM:<x@y.example>", "HELO a"],
     [R.S500_BARE_CR, R.S250_HELO], SessionState.GREETED),
    # -- HELP and NOOP never change state ---------------------------------------------
    ("help-initial", ["HELP", "MAIL FROM:<a@b.example>"], [R.S214_HELP, SEQ],
     SessionState.INITIAL),
    ("help-greeted", ["HELO a", "HELP", "HELP MAIL", "RCPT TO:<a@b.example>"],
     [R.S250_HELO, R.S214_HELP, R.S214_HELP, SEQ], SessionState.GREETED),
    ("help-mail", [*OPEN, "HELP", "DATA"], [R.S250_HELO, R.S250_SENDER_OK, R.S214_HELP, SEQ],
     SessionState.MAIL),
    ("help-rcpt", [*TXN, "HELP", "MAIL FROM:<a@b.example>"],
     [R.S250_HELO, R.S250_SENDER_OK, R.S250_RECIPIENT_OK, R.S214_HELP, SEQ], SessionState.RCPT),
    ("noop-each-state", ["NOOP", "HELO a", "NOOP", "MAIL FROM:<a@b.example>", "NOOP x",
                         "RCPT TO:<c@d.example>", "NOOP"],
     [R.S250_OK, R.S250_HELO, R.S250_OK, R.S250_SENDER_OK, R.S250_OK, R.S250_RECIPIENT_OK,
      R.S250_OK], SessionState.RCPT),
    # -- RSET from each state -------------------------------------------------------------
    ("rset-initial", ["RSET", "MAIL FROM:<a@b.example>"], [R.S250_RESET, SEQ],
     SessionState.INITIAL),
    ("rset-greeted", ["HELO a", "RSET"], [R.S250_HELO, R.S250_RESET], SessionState.GREETED),
    ("rset-mail", [*OPEN, "RSET", "RCPT TO:<c@d.example>"],
     [R.S250_HELO, R.S250_SENDER_OK, R.S250_RESET, SEQ], SessionState.GREETED),
    ("rset-rcpt", [*TXN, "RSET", "DATA", "MAIL FROM:<c@d.example>"],
     [R.S250_HELO, R.S250_SENDER_OK, R.S250_RECIPIENT_OK, R.S250_RESET, SEQ, R.S250_SENDER_OK],
     SessionState.MAIL),
    # -- QUIT from each state: 221, then close, nothing more is read ------------------
    ("quit-initial", ["QUIT", "HELO a"], [R.S221_CLOSING, CLOSE], SessionState.INITIAL),
    ("quit-greeted", ["HELO a", "QUIT"], [R.S250_HELO, R.S221_CLOSING, CLOSE],
     SessionState.GREETED),
    ("quit-mail", [*OPEN, "QUIT"], [R.S250_HELO, R.S250_SENDER_OK, R.S221_CLOSING, CLOSE],
     SessionState.MAIL),
    ("quit-rcpt", [*TXN, "quit"],
     [R.S250_HELO, R.S250_SENDER_OK, R.S250_RECIPIENT_OK, R.S221_CLOSING, CLOSE],
     SessionState.RCPT),
    # -- only a positive reply moves the state ------------------------------------------
    ("rejected-mail-stays-greeted", ["HELO a", "MAIL FROM:<bad>", "RCPT TO:<c@d.example>"],
     [R.S250_HELO, R.S501_BAD_SENDER, SEQ], SessionState.GREETED),
    ("rejected-rcpt-stays-mail", [*OPEN, "RCPT TO:<bad>", "DATA"],
     [R.S250_HELO, R.S250_SENDER_OK, R.S501_BAD_ADDRESS, SEQ], SessionState.MAIL),
    ("rcpt-in-rcpt-adds", [*TXN, "RCPT TO:<carol@example.net>", "RCPT TO:<bad>",
                           "RCPT TO:<dave@example.net>"],
     [R.S250_HELO, R.S250_SENDER_OK, R.S250_RECIPIENT_OK, R.S250_RECIPIENT_OK,
      R.S501_BAD_ADDRESS, R.S250_RECIPIENT_OK], SessionState.RCPT),
    # -- liberal parsing ------------------------------------------------------------------
    ("mail-space-no-brackets", ["HELO a", "MAIL FROM: alice@example.com"],
     [R.S250_HELO, R.S250_SENDER_OK], SessionState.MAIL),
    ("mail-esmtp-params", ["EHLO a", "MAIL FROM:<a@b.example> SIZE=123 BODY=8BITMIME"],
     [EHLO, R.S250_SENDER_OK], SessionState.MAIL),
    ("mail-body-7bit", ["EHLO a", "MAIL FROM:<a@b.example> BODY=7BIT"],
     [EHLO, R.S250_SENDER_OK], SessionState.MAIL),
    ("mail-bad-params", ["EHLO a", "MAIL FROM:<a@b.example> SIZE=abc",
                         "MAIL FROM:<a@b.example> BODY=9BIT", "MAIL FROM:<a@b.example> FOO=1"],
     [EHLO, R.S501_SYNTAX, R.S501_SYNTAX, R.S555_BAD_PARAMETER], SessionState.GREETED),
    ("lower-and-mixed-case", ["helo a", "mail from:<a@b.example>", "RcPt To:<c@d.example>",
                              "NoOp", "hElP", "rset"],
     [R.S250_HELO, R.S250_SENDER_OK, R.S250_RECIPIENT_OK, R.S250_OK, R.S214_HELP, R.S250_RESET],
     SessionState.GREETED),
    ("extra-spaces", ["HELO   a  ", "MAIL   FROM : <a@b.example>  ", "RCPT TO:   <c@d.example>"],
     [R.S250_HELO, R.S250_SENDER_OK, R.S250_RECIPIENT_OK], SessionState.RCPT),
    ("source-route", ["HELO a", "MAIL FROM:<a@b.example>",
                      "RCPT TO:<@x.example,@y.example:c@d.example>"],
     [R.S250_HELO, R.S250_SENDER_OK, R.S250_RECIPIENT_OK], SessionState.RCPT),
]


@pytest.mark.parametrize(
    ("commands", "expected", "state"),
    [pytest.param(c, e, s, id=i) for i, c, e, s in COMMAND_CASES],
)
def test_commands(commands: list[str], expected: list, state: SessionState) -> None:
    events, session = run(lines(*commands))
    check(events, expected)
    assert session.state is state


def test_bare_lf_after_commands_whole_transaction() -> None:
    script = b"EHLO a\nMAIL FROM:<alice@example.com>\nRCPT TO:<bob@example.org>\nDATA\n"
    script += b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\n"
    events, _ = run(script)
    assert ehlo_reply_ok(events[0])
    check(events[1:], [R.S250_SENDER_OK, R.S250_RECIPIENT_OK, R.S354_START_DATA,
                       Msg(*ALICE_BOB, b"Subject: x\r\n\r\nbody\r\n"), R.S250_QUEUED,
                       R.S221_CLOSING, CLOSE])


def test_address_bytes_that_are_not_utf8_get_501_and_the_session_goes_on() -> None:
    script = (b"EHLO \xff\r\nMAIL FROM:<\xff@b.example> SMTPUTF8\r\n"
              b"MAIL FROM:<a@b.example> SMTPUTF8\r\n"
              b"RCPT TO:<c@\xfe.example>\r\nRCPT TO:<b\xc3\xbcb@example.org>\r\nDATA\r\nx\r\n.\r\n")
    events, _ = run(script)
    check(events, [EHLO, R.S501_BAD_SENDER, R.S250_SENDER_OK, R.S501_BAD_ADDRESS,
                   R.S250_RECIPIENT_OK, R.S354_START_DATA,
                   Msg("a@b.example", ("b\u00fcb@example.org",), b"x\r\n"), R.S250_QUEUED])


def test_utf8_addresses_need_smtputf8_on_mail() -> None:
    """RFC 6531: SMTPUTF8 is offered; a UTF-8 address (local part or domain) is taken
    only in a transaction whose MAIL said SMTPUTF8 - else 553 5.6.7, never silently
    relayed to a smarthost that would refuse it. A-labels are ASCII: always fine."""
    script = lines("EHLO a", "MAIL FROM:<jos\u00e9@example.com>", "MAIL FROM:<a@b.example>",
                   "RCPT TO:<b@m\u00fcnchen.example>", "RCPT TO:<b@xn--mnchen-3ya.example>",
                   "RSET", "MAIL FROM:<jos\u00e9@example.com> SMTPUTF8",
                   "RCPT TO:<b\u00fcb@m\u00fcnchen.example>", "DATA")
    script += b"x\r\n.\r\n"
    events, _ = run(script)
    assert "SMTPUTF8" in events[0].reply.text.split("\n")
    check(events[1:], [R.S553_NEEDS_SMTPUTF8, R.S250_SENDER_OK, R.S553_NEEDS_SMTPUTF8,
                       R.S250_RECIPIENT_OK, R.S250_RESET, R.S250_SENDER_OK,
                       R.S250_RECIPIENT_OK, R.S354_START_DATA,
                       Msg("jos\u00e9@example.com", ("b\u00fcb@m\u00fcnchen.example",),
                           b"x\r\n"), R.S250_QUEUED])


@pytest.mark.parametrize(("address", "reply"), [
    ("../etc@localhost", R.S501_BAD_ADDRESS), (".hidden@localhost", R.S501_BAD_ADDRESS),
    ('"../etc"@localhost', R.S550_BAD_MAILBOX), ('"a/b"@localhost', R.S550_BAD_MAILBOX),
    ('"a\\\\b"@localhost', R.S550_BAD_MAILBOX), ('"/x"@elsewhere.example', R.S250_RECIPIENT_OK),
])
def test_a_local_recipient_that_is_no_mailbox_name_is_refused_at_rcpt(address: str,
                                                                      reply: Reply) -> None:
    """A Maildir folder is named by the local part: no path tricks reach the sender."""
    events, _ = run(lines("EHLO a", "MAIL FROM:<a@b.example>", f"RCPT TO:<{address}>"))
    check(events[1:], [R.S250_SENDER_OK, reply])


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85", "\x9b"])
def test_line_separators_and_c1_controls_in_an_address_get_501(char: str) -> None:
    """The `email` package reads these as line ends: such a sender once made its
    bounce crash the sender (a header value may hold no line end)."""
    events, _ = run(lines("EHLO a", f"MAIL FROM:<a{char}b@example.com> SMTPUTF8"))
    check(events[1:], [R.S501_BAD_SENDER])


def test_addresses_keep_their_case_and_liberal_forms() -> None:
    script = lines("mail from:x", "HELO a", "MAIL FROM: Alice.Smith@Example.COM SIZE=10",
                   "rcpt to:<Bob@Example.ORG>", "RCPT TO: carol@example.net", "DATA")
    script += b"x\r\n.\r\n"
    events, _ = run(script)
    check(events, [SEQ, R.S250_HELO, R.S250_SENDER_OK, R.S250_RECIPIENT_OK, R.S250_RECIPIENT_OK,
                   R.S354_START_DATA,
                   Msg("Alice.Smith@Example.COM", ("Bob@Example.ORG", "carol@example.net"),
                       b"x\r\n"),
                   R.S250_QUEUED])
    assert fields(events[2].reply, R.S250_SENDER_OK) == {"address": "Alice.Smith@Example.COM"}


def test_greeting_names_the_host() -> None:
    session = ServerSession(SessionPolicy(hostname=HOST), CLIENT_IP, may_relay=True)
    greeting = session.greeting()
    assert greeting.reply == R.S220_GREETING.format(hostname=HOST)
    assert greeting.data == greeting.reply.to_bytes(False)
    assert greeting.data.startswith(f"220 {HOST} ".encode())


def test_help_lists_the_commands() -> None:
    events, _ = run(lines("HELP"))
    assert events[0].reply == R.S214_HELP
    words = events[0].reply.text.split()
    for verb in ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "HELP", "QUIT"):
        assert verb in words
    assert events[0].data.startswith(b"214-")  # multi-line, RFC 5321 §4.2.1


def test_quit_reply_names_the_host() -> None:
    events, _ = run(lines("QUIT"))
    assert events[0].reply == R.S221_CLOSING.format(hostname=HOST)


# ---------------------------------------------------------------------------- ESMTP

def test_ehlo_advertises_extensions_and_turns_on_enhanced_codes() -> None:
    events, _ = run(lines("EHLO client.example", "NOOP", "MAIL FROM:<bad>"),
                    max_message_bytes=12345)
    ehlo, noop, bad = events
    assert ehlo_reply_ok(ehlo)
    wire = ehlo.data.decode().split("\r\n")
    assert wire[-1] == ""
    assert all(line.startswith("250-") for line in wire[:-2])
    assert wire[-2].startswith("250 ")
    keywords = [line[4:] for line in wire[1:-1]]
    for extension in ("PIPELINING", "SIZE 12345", "8BITMIME", "ENHANCEDSTATUSCODES", "HELP"):
        assert extension in keywords
    assert HOST in wire[0]
    assert noop.data == R.S250_OK.to_bytes(True)
    assert noop.data.startswith(f"250 {R.S250_OK.enhanced} ".encode())
    assert bad.data.startswith(f"501 {R.S501_BAD_SENDER.enhanced} ".encode())


def test_helo_means_no_enhanced_codes() -> None:
    events, _ = run(lines("HELO client.example", "NOOP", "MAIL FROM:<bad>", "QUIT"))
    for event in events:
        if isinstance(event, SendReply):
            assert event.data == event.reply.to_bytes(False)
            code, _, text = event.data.decode().partition(" ")
            assert not text[:1].isdigit(), event.data
    assert events[1].data == R.S250_OK.to_bytes(False)


def test_pipelined_transaction_one_reply_per_command_in_order() -> None:
    script = lines("EHLO a", "MAIL FROM:<alice@example.com>", "RCPT TO:<bob@example.org>",
                   "RCPT TO:<carol@example.net>", "DATA")
    script += b"Subject: pipelined\r\n\r\nhello\r\n.\r\n" + lines("MAIL FROM:<>", "QUIT")
    events, _ = drive(script, bytewise=False)
    assert ehlo_reply_ok(events[0])
    check(events[1:], [
        R.S250_SENDER_OK, R.S250_RECIPIENT_OK, R.S250_RECIPIENT_OK, R.S354_START_DATA,
        Msg("alice@example.com", ("bob@example.org", "carol@example.net"),
            b"Subject: pipelined\r\n\r\nhello\r\n"),
        R.S250_QUEUED, R.S250_SENDER_OK, R.S221_CLOSING, CLOSE,
    ])
    assert run(script)[0] == events


def test_pipelining_without_ehlo_is_answered_in_order_with_errors_in_the_middle() -> None:
    script = lines("HELO a", "MAIL FROM:<a@b.example>", "RCPT TO:<nobody>", "RCPT TO:<c@d.example>",
                   "VRFY x", "DATA") + b"x\r\n.\r\n" + lines("NOOP")
    events, _ = run(script)
    check(events, [R.S250_HELO, R.S250_SENDER_OK, R.S501_BAD_ADDRESS, R.S250_RECIPIENT_OK,
                   R.S502_NOT_IMPLEMENTED, R.S354_START_DATA,
                   Msg("a@b.example", ("c@d.example",), b"x\r\n"), R.S250_QUEUED, R.S250_OK])


# ---------------------------------------------------------------------------- limits

def test_100_recipients_kept_101st_gets_452() -> None:
    rcpts = [f"user{n}@example.org" for n in range(101)]
    script = lines("HELO a", "MAIL FROM:<a@b.example>", *(f"RCPT TO:<{r}>" for r in rcpts),
                   "DATA") + b"hi\r\n.\r\n"
    events, _ = run(script)
    check(events, [R.S250_HELO, R.S250_SENDER_OK, *[R.S250_RECIPIENT_OK] * 100,
                   R.S452_TOO_MANY_RECIPIENTS, R.S354_START_DATA,
                   Msg("a@b.example", tuple(rcpts[:100]), b"hi\r\n"), R.S250_QUEUED])


def test_recipients_past_twice_the_limit_count_as_bad_commands() -> None:
    """max_recipients more 452s are free (a client may send a few too many and still
    deliver to the first ones); each one after that is a bad command. A new
    transaction starts the count again."""
    rcpts = [f"RCPT TO:<user{n}@example.org>" for n in range(7)]
    script = lines("HELO a", "MAIL FROM:<a@b.example>", *rcpts, "RSET",
                   "MAIL FROM:<a@b.example>", *rcpts[:5])
    events, session = run(script, max_recipients=2)
    check(events, [R.S250_HELO, R.S250_SENDER_OK, *[R.S250_RECIPIENT_OK] * 2,
                   *[R.S452_TOO_MANY_RECIPIENTS] * 5, R.S250_RESET, R.S250_SENDER_OK,
                   *[R.S250_RECIPIENT_OK] * 2, *[R.S452_TOO_MANY_RECIPIENTS] * 3])
    assert session.bad_commands == 3 + 1


def test_the_bad_command_budget_ends_a_recipient_flood() -> None:
    rcpts = [f"RCPT TO:<user{n}@example.org>" for n in range(20)]
    events, _ = run(lines("HELO a", "MAIL FROM:<a@b.example>", *rcpts, "NOOP"),
                    max_recipients=2, max_bad_commands=3)
    check(events, [R.S250_HELO, R.S250_SENDER_OK, *[R.S250_RECIPIENT_OK] * 2,
                   *[R.S452_TOO_MANY_RECIPIENTS] * 6, R.S421_TOO_MANY_ERRORS, CLOSE])


def test_size_parameter_over_the_limit_gets_552_at_mail() -> None:
    script = lines("EHLO a", "MAIL FROM:<a@b.example> SIZE=1001", "RCPT TO:<c@d.example>",
                   "MAIL FROM:<a@b.example> SIZE=1000")
    events, session = run(script, max_message_bytes=1000)
    check(events[1:], [R.S552_TOO_BIG, SEQ, R.S250_SENDER_OK])
    assert fields(events[1].reply, R.S552_TOO_BIG) == {"limit": "1000"}
    assert session.state is SessionState.MAIL


# ---------------------------------------------------------------------------- DATA

DATA_OPEN = lines(*TXN, "DATA")
DATA_PREFIX = [R.S250_HELO, R.S250_SENDER_OK, R.S250_RECIPIENT_OK, R.S354_START_DATA]


def data_case(body: bytes, **kwargs: object) -> list:
    """Send `body` (which must end the data itself), then NOOP; return the events after 354."""
    events, session = run(DATA_OPEN + body + lines("NOOP"), **kwargs)
    check(events[:4], DATA_PREFIX)
    assert session.state is SessionState.GREETED
    return events[4:]


@pytest.mark.parametrize(
    ("wire", "data"),
    [
        pytest.param(b".\r\n", b"", id="empty-message"),
        pytest.param(b"..first\r\n.\r\n", b".first\r\n", id="stuffed-first-line"),
        pytest.param(b"a\r\n..b\r\n...\r\n.\r\n", b"a\r\n.b\r\n..\r\n", id="stuffed-lines"),
        pytest.param(b"a\r\n.b\r\n.\r\n", b"a\r\nb\r\n", id="lone-leading-dot-removed"),
        pytest.param(b"QUIT\r\nRSET\r\n.\r\n", b"QUIT\r\nRSET\r\n", id="commands-are-data"),
        pytest.param(b"\r\n\r\n.\r\n", b"\r\n\r\n", id="blank-lines"),
        pytest.param(b"8bit \xff\xfe\r\n.\r\n", b"8bit \xff\xfe\r\n", id="8bit"),
        pytest.param(b"x" * (MAX_TEXT_LINE - 2) + b"\r\n.\r\n",
                     b"x" * (MAX_TEXT_LINE - 2) + b"\r\n", id="line-of-1000-octets"),
        pytest.param(b"." * (MAX_TEXT_LINE - 1) + b"\r\n.\r\n",
                     b"." * (MAX_TEXT_LINE - 2) + b"\r\n", id="stuffed-line-of-1000-octets"),
    ],
)
def test_data_accepted(wire: bytes, data: bytes) -> None:
    check(data_case(wire), [Msg(*ALICE_BOB, data), R.S250_QUEUED, R.S250_OK])


def test_data_250_names_the_queue_id() -> None:
    events = data_case(b"x\r\n.\r\n")
    assert fields(events[1].reply, R.S250_QUEUED) == {"queue_id": QUEUE_ID}


def test_line_over_1000_octets_is_refused_after_the_dot() -> None:
    body = b"ok\r\n" + b"x" * (MAX_TEXT_LINE - 1) + b"\r\nmore\r\n.\r\n"
    check(data_case(body), [R.S554_LINE_TOO_LONG, R.S250_OK])


def test_message_at_the_size_limit_is_accepted_one_over_is_552() -> None:
    body = b"y" * 98 + b"\r\n"
    check(data_case(body * 10 + b".\r\n", max_message_bytes=1000),
          [Msg(*ALICE_BOB, body * 10), R.S250_QUEUED, R.S250_OK])
    check(data_case(b"z" + body * 10 + b".\r\n", max_message_bytes=1000),
          [R.S552_TOO_BIG, R.S250_OK])


def test_oversize_body_is_read_to_its_end_then_552_and_nothing_queued() -> None:
    # Commands inside the big body must stay data: they prove it is read to its end.
    body = (b"MAIL FROM:<evil@example.com>\r\n" + b"w" * 200 + b"\r\n") * 40 + b".\r\n"
    events = data_case(body, max_message_bytes=1000)
    check(events, [R.S552_TOO_BIG, R.S250_OK])
    assert fields(events[0].reply, R.S552_TOO_BIG) == {"limit": "1000"}


@pytest.mark.parametrize(
    "smuggle",
    [
        pytest.param(b"\n.\n", id="LF.LF"),
        pytest.param(b"\r.\r", id="CR.CR"),
        pytest.param(b"\n.\r\n", id="LF.CRLF"),
        pytest.param(b"\r\n.\n", id="CRLF.LF"),
        pytest.param(b"\r.\r\n", id="CR.CRLF"),
        pytest.param(b"\r\n.\r", id="CRLF.CR"),
        pytest.param(b"\r\n\x00.\r\n", id="NUL-before-dot"),
        pytest.param(b"\r\n.\x00\r\n", id="NUL-after-dot"),
    ],
)
def test_smuggled_end_of_data_never_ends_the_message(smuggle: bytes) -> None:
    """SMTP smuggling: what follows a fake end must stay data; the whole message is refused."""
    hidden = lines("MAIL FROM:<evil@example.com>", "RCPT TO:<victim@example.org>", "DATA")
    body = b"Subject: x\r\n\r\nhello" + smuggle + hidden + b"evil\r\n.\r\n"
    check(data_case(body), [R.S554_BARE_NEWLINE, R.S250_OK])


@pytest.mark.parametrize("stray", [b"a\nb", b"a\rb", b"a\x00b"])
def test_bare_cr_lf_nul_anywhere_in_data_is_refused(stray: bytes) -> None:
    check(data_case(b"x\r\n" + stray + b"\r\n.\r\n"), [R.S554_BARE_NEWLINE, R.S250_OK])


def test_transaction_is_cleared_after_each_message() -> None:
    script = DATA_OPEN + b"one\r\n.\r\n" + lines("MAIL FROM:<>", "RCPT TO:<carol@example.net>",
                                                 "DATA") + b"two\r\n.\r\n"
    events, _ = run(script)
    check(events[4:], [Msg(*ALICE_BOB, b"one\r\n"), R.S250_QUEUED, R.S250_SENDER_OK,
                       R.S250_RECIPIENT_OK, R.S354_START_DATA,
                       Msg("", ("carol@example.net",), b"two\r\n"), R.S250_QUEUED])


@pytest.mark.parametrize("failure", [R.S452_NO_SPACE, R.S451_LOCAL_ERROR])
def test_store_failure_is_answered_and_the_session_goes_on(failure: Reply) -> None:
    script = DATA_OPEN + b"one\r\n.\r\n" + lines("MAIL FROM:<a@b.example>", "QUIT")
    events, session = run(script, store=lambda _event: failure)
    check(events[4:], [Msg(*ALICE_BOB, b"one\r\n"), failure, R.S250_SENDER_OK, R.S221_CLOSING,
                       CLOSE])


# ---------------------------------------------------------------------------- relay

@pytest.mark.parametrize(
    ("may_relay", "recipient", "expected"),
    [
        pytest.param(False, "bob@example.org", R.S554_RELAY_DENIED, id="foreign-denied"),
        pytest.param(False, "bob@localhost", R.S250_RECIPIENT_OK, id="local-ok"),
        pytest.param(False, "bob@LocalHost", R.S250_RECIPIENT_OK, id="local-any-case"),
        pytest.param(False, "postmaster", R.S250_RECIPIENT_OK, id="postmaster"),
        pytest.param(False, "bob@localhost.example.org", R.S554_RELAY_DENIED, id="lookalike"),
        pytest.param(True, "bob@example.org", R.S250_RECIPIENT_OK, id="relay-client"),
    ],
)
def test_relay_decision(may_relay: bool, recipient: str, expected: Reply) -> None:
    events, session = run(lines("EHLO a", "MAIL FROM:<bob@localhost>", f"RCPT TO:<{recipient}>"),
                          may_relay=may_relay)
    check(events[1:], [R.S250_SENDER_OK, expected])
    if expected is R.S554_RELAY_DENIED:
        assert events[2].data.startswith(b"554 5.7.1 ")
        assert session.state is SessionState.MAIL


# ---------------------------------------------------------------------------- timers, errors

def test_timed_out_and_shutting_down_give_421_and_stop_reading() -> None:
    for method, template in (("timed_out", R.S421_TIMEOUT), ("shutting_down", R.S421_SHUTDOWN)):
        session = ServerSession(SessionPolicy(hostname=HOST), CLIENT_IP, may_relay=True)
        session.greeting()
        reply = getattr(session, method)()
        assert reply.reply == template.format(hostname=HOST)
        assert reply.data.startswith(f"421 {HOST} ".encode())
        session.receive_data(b"NOOP\r\n")
        assert session.next_event() is NEED_DATA


def test_too_many_bad_commands_gets_421_and_close() -> None:
    events, _ = run(lines(*["XYZZY"] * 4, "NOOP"), max_bad_commands=3)
    check(events, [R.S500_UNRECOGNISED] * 4 + [R.S421_TOO_MANY_ERRORS, CLOSE])


def test_transitions_table_is_the_spec_state_machine() -> None:
    """SPEC §3's arrows, read from the one table the session uses."""
    INIT, G, M, RC, D = (SessionState.INITIAL, SessionState.GREETED, SessionState.MAIL,
                         SessionState.RCPT, SessionState.DATA)
    assert TRANSITIONS[INIT]["HELO"] is G and TRANSITIONS[INIT]["EHLO"] is G
    assert TRANSITIONS[G]["MAIL"] is M and TRANSITIONS[M]["RCPT"] is RC
    assert TRANSITIONS[RC]["RCPT"] is RC and TRANSITIONS[RC]["DATA"] is D
    assert all(TRANSITIONS[s]["RSET"] is G for s in (G, M, RC))


# ---------------------------------------------------------------------------- memory

def _peak_growth(feed: Callable[[], None]) -> int:
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        feed()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_one_megabyte_line_without_lf_is_held_in_bounded_memory() -> None:
    session = ServerSession(SessionPolicy(hostname=HOST), CLIENT_IP, may_relay=True)
    session.greeting()
    piece = b"A" * 4096
    events: list = []

    def feed() -> None:
        for _ in range(256):  # 1 MiB in all
            session.receive_data(piece)
            _drain(session, events, _store_ok)

    assert _peak_growth(feed) < 64 * 1024
    assert events == []
    session.receive_data(b"\r\nNOOP\r\n")
    _drain(session, events, _store_ok)
    check(events, [R.S500_LINE_TOO_LONG, R.S250_OK])


def test_one_megabyte_line_one_byte_at_a_time() -> None:
    script = b"B" * (1 << 20) + b"\r\nHELO a\r\n"
    events, _ = drive(script, bytewise=True)
    assert events == drive(script, bytewise=False)[0]
    check(events, [R.S500_LINE_TOO_LONG, R.S250_HELO])


def test_oversize_message_is_discarded_as_it_is_read() -> None:
    events, session = drive(DATA_OPEN, bytewise=False, max_message_bytes=1000)
    piece = b"C" * 4094 + b"\r\n"

    def feed() -> None:
        for _ in range(1024):  # 4 MiB of data for a 1000-octet limit
            session.receive_data(piece)
            _drain(session, events, _store_ok)

    assert _peak_growth(feed) < 64 * 1024
    session.receive_data(b".\r\n")
    _drain(session, events, _store_ok)
    check(events[4:], [R.S552_TOO_BIG])


# ---------------------------------------------------------------------------- property

@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_whatever_the_sender_wires_is_exactly_one_message(data: bytes) -> None:
    """The sender's to_wire_data output, fed to the receiver, is ONE message, never more."""
    script = DATA_OPEN + to_wire_data(data) + lines("QUIT")
    events, _ = drive(script, bytewise=False)
    check(events[:4], DATA_PREFIX)
    message = events[4]
    assert isinstance(message, MessageReady)
    check(events[5:], [R.S250_QUEUED, R.S221_CLOSING, CLOSE])
    # What arrives is the data with every line ending made CRLF and NULs dropped.
    normal = data.replace(b"\0", b"").replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    normal = normal.replace(b"\n", b"\r\n")
    if normal and not normal.endswith(b"\r\n"):
        normal += b"\r\n"
    assert message_data(message) == normal


@pytest.mark.parametrize("line", [b"STARTTLS\r\n", b"AUTH PLAIN\r\n"])
@pytest.mark.parametrize("greet", [b"", b"EHLO client.example\r\n"])
def test_unconfigured_extensions_are_not_implemented_in_every_state(line, greet) -> None:
    """STARTTLS/AUTH without TLS/users configured: 502 before and after EHLO alike."""
    session = ServerSession(SessionPolicy("mailbag.test"), "127.0.0.1", may_relay=True)
    session.receive_data(greet + line)
    replies = []
    while (event := session.next_event()) is not NEED_DATA:
        replies.append(event.reply)
    assert replies[-1] == R.S502_NOT_IMPLEMENTED
