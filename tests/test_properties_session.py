"""Property tests of the receiver's sans-I/O session (issue 5 §6), driven by hypothesis.

Whatever bytes a client sends, in whatever pieces, `ServerSession`:
- never raises and always comes back to NEED_DATA (no event loop without end);
- answers every complete command line with exactly one reply (a 421 may follow when
  the error budget is spent, a StartTLS/CloseConnection event after 220/221); inside
  DATA it answers nothing until `<CRLF>.<CRLF>`, then exactly once;
- reports MessageReady only on the line that completes `<CRLF>.<CRLF>`, with the
  dot-unstuffed data and no bare CR, LF or NUL in it;
- leaves its state alone on every 4xx/5xx reply;
- gives the same output whether the bytes come at once, in random pieces, or one
  byte at a time (up to a STARTTLS, after which the wire changes).

Bounded: a fixed number of examples, no deadline, so the suite stays fast.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

from services.receiver import replies as R
from services.receiver.session import (
    NEED_DATA,
    AuthRequest,
    CloseConnection,
    Event,
    MessageReady,
    SendReply,
    ServerSession,
    SessionPolicy,
    SessionState,
    StartTLS,
)
from shared.smtp import ReplyParser
from tests.support import PROPERTY_SETTINGS, chunked

SETTINGS = PROPERTY_SETTINGS
MAX_EVENTS = 10_000  # per pump: far above anything a few hundred bytes can cause

POLICY = SessionPolicy(
    hostname="mx.test",
    max_message_bytes=600,
    max_recipients=3,
    max_bad_commands=6,
    local_domains=frozenset({"localhost"}),
    tls_available=True,
    auth_available=True,
)
GOOD_PLAIN = base64.b64encode(b"\0alice\0good").decode()


def new_session(may_relay: bool = True) -> ServerSession:
    return ServerSession(POLICY, "192.0.2.7", may_relay=may_relay)


def pump(session: ServerSession) -> list[Event]:
    """Take every event out, carrying out the shell's duties; bounded."""
    events: list[Event] = []
    for _ in range(MAX_EVENTS):
        event = session.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, MessageReady):
            session.message_stored("Q1")
        elif isinstance(event, AuthRequest):
            session.auth_result(event.password == "good", event.username)
        elif isinstance(event, StartTLS):
            session.tls_started()
    raise AssertionError("the session produced events without end")


def wire(events: list[Event]) -> list[object]:
    """Comparable form of the events (bytes for replies, envelope and data for messages)."""
    return [e.data if isinstance(e, SendReply)
            else (e.envelope, b"".join(e.chunks)) if isinstance(e, MessageReady)
            else e for e in events]


# ------------------------------------------------------------------ strategies

COMMANDS = [
    b"HELO client.test", b"EHLO client.test", b"EHLO", b"HELO",
    b"MAIL FROM:<a@example.com>", b"MAIL FROM:<>", b"MAIL FROM:<a@example.com> SIZE=99999",
    b"MAIL FROM:<a@example.com> BODY=8BITMIME", b"MAIL FROM:a@example.com", b"MAIL TO:<x@y>",
    b"RCPT TO:<b@localhost>", b"RCPT TO:<c@example.org>", b"RCPT TO:<postmaster>",
    b"RCPT TO:<@r.example:d@localhost>", b"RCPT TO:<a@b@c>", b"RCPT TO:<" + b"l" * 70 + b"@x>",
    b"DATA", b"DATA x", b"RSET", b"RSET x", b"NOOP", b"HELP", b"QUIT", b"QUIT now",
    b"VRFY a", b"EXPN list", b"TURN", b"STARTTLS", b"STARTTLS x",
    b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH PLAIN " + GOOD_PLAIN.encode(), b"AUTH CRAM-MD5",
    GOOD_PLAIN.encode(), base64.b64encode(b"alice"), base64.b64encode(b"good"),
    base64.b64encode(b"\0alice\0bad"), b"*", b"=", b"!!notbase64",
    b".", b"..", b".x", b"", b"Subject: hi", b"body line", b"x" * 520, b"y" * 1100,
    b"MAIL FROM:<a@b.example>\rRCPT TO:<x@y>", b"NOOP\x00", b"\xff\xfe garbage",
]
ENDINGS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r\r\n"]

line_content = st.one_of(
    st.sampled_from(COMMANDS),
    st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")),
)
lines = st.lists(st.tuples(line_content, st.sampled_from(ENDINGS)).map(b"".join), max_size=40)
fragments = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([c + b"\r\n" for c in COMMANDS] + [b"\r\n.\r\n", b"\n.\n", b"\r.\r",
                                                         b".\r\n", b"\x00", b"\r", b"\n"]),
)
streams = st.lists(fragments, max_size=40).map(b"".join)


# ------------------------------------------------------------------ arbitrary bytes


@SETTINGS
@given(stream=streams, cuts=st.lists(st.integers(min_value=0), max_size=20),
       may_relay=st.booleans())
def test_arbitrary_bytes_never_raise_and_replies_are_well_formed(stream, cuts, may_relay):
    session = new_session(may_relay)
    parser = ReplyParser()
    events: list[Event] = [session.greeting()]
    for piece in chunked(stream, cuts):
        session.receive_data(piece)
        events.extend(pump(session))
    for event in events:
        if isinstance(event, SendReply):
            [reply] = parser.feed(event.data)  # exactly one complete, valid reply
            assert 200 <= reply.code <= 599
            body = event.data.replace(b"\r\n", b"")
            assert b"\r" not in body and b"\n" not in body
        if isinstance(event, MessageReady):
            _assert_clean_message(event)


def _upto_starttls(events: list[Event]) -> list[object]:
    for index, event in enumerate(events):
        if isinstance(event, StartTLS):
            return wire(events[: index + 1])
    return wire(events)


@SETTINGS
@given(stream=streams, cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_output_does_not_depend_on_how_the_bytes_are_cut(stream, cuts):
    results = []
    for pieces in ([stream], chunked(stream, cuts), [bytes([b]) for b in stream]):
        session = new_session()
        events: list[Event] = []
        for piece in pieces:
            session.receive_data(piece)
            events.extend(pump(session))
        results.append(_upto_starttls(events))
    assert results[0] == results[1] == results[2]


# ------------------------------------------------------------------ line by line


@dataclass
class Model:
    """What the test knows of the session from the outside (the replies it saw)."""

    data_sofar: bytes = b""
    rcpt_accepted: int = 0
    messages: list[MessageReady] = field(default_factory=list)


def _assert_clean_message(event: MessageReady) -> None:
    data = b"".join(event.chunks)
    assert data.count(b"\r\n") == data.count(b"\n") == data.count(b"\r")
    assert b"\0" not in data
    assert event.envelope.rcpt_tos


def _unstuff(data: bytes) -> bytes:
    return b"".join(line[1:] if line.startswith(b".") else line
                    for line in data.splitlines(keepends=True))


def feed_line(session: ServerSession, model: Model, line: bytes) -> None:
    """Feed one LF-terminated line and check the replies it earned."""
    state_before = session.state
    closed_before = session._closed  # noqa: SLF001 - the model needs to know
    session.receive_data(line)
    events = pump(session)
    replies = [e for e in events if isinstance(e, SendReply)]
    ready = [e for e in events if isinstance(e, MessageReady)]
    if closed_before:
        assert events == []
        return
    if state_before is SessionState.DATA:
        ends = (b"\r\n" + model.data_sofar + line).endswith(b"\r\n.\r\n")
        if not ends:
            assert events == []  # nothing is answered inside DATA
            model.data_sofar += line
            return
        assert len(replies) == 1, events  # exactly one answer at the end of data
        assert len(ready) <= 1
        if ready:
            assert replies[0].reply.code == 250
            _assert_clean_message(ready[0])
            assert b"".join(ready[0].chunks) == _unstuff(model.data_sofar)
            assert len(ready[0].envelope.rcpt_tos) == model.rcpt_accepted
            model.messages.append(ready[0])
        else:
            assert replies[0].reply.code in (R.S552_TOO_BIG.code, R.S554_BARE_NEWLINE.code)
        assert session.state is SessionState.GREETED
        model.data_sofar, model.rcpt_accepted = b"", 0
        return
    # A command line (or an AUTH response line): one reply, maybe a 421 after it.
    assert ready == [], "a message without a complete DATA"
    assert 1 <= len(replies) <= 2, events
    first = replies[0].reply
    if len(replies) == 2:
        assert replies[1].reply.code == 421 and isinstance(events[-1], CloseConnection)
    if first.code >= 400:
        assert session.state is state_before  # only a positive reply moves the machine
    verb = line.split(b" ")[0].strip().upper()
    if first.code == 250 and verb == b"MAIL":
        model.rcpt_accepted = 0
    elif first.code == 250 and verb == b"RCPT":
        model.rcpt_accepted += 1
    elif first.code == 250 and verb == b"RSET":
        model.rcpt_accepted = 0
    elif first.code == 220 and verb == b"STARTTLS":
        model.rcpt_accepted = 0
    if session.state is SessionState.DATA:
        assert first.code == R.S354_START_DATA.code
        model.data_sofar = b""


@SETTINGS
@given(script=lines, may_relay=st.booleans())
def test_one_reply_per_command_line_and_messages_only_after_complete_data(script, may_relay):
    session = new_session(may_relay)
    session.greeting()
    model = Model()
    for line in script:
        feed_line(session, model, line)


# A plausible client: greet, transact, with noise in between.
TRANSACTION = [b"EHLO client.test\r\n", b"MAIL FROM:<a@example.com>\r\n",
               b"RCPT TO:<b@localhost>\r\n", b"RCPT TO:<c@example.org>\r\n", b"DATA\r\n"]
body_lines = st.lists(
    st.one_of(
        st.sampled_from([b"Subject: x\r\n", b"\r\n", b"..dot\r\n", b".\r\n", b"text\r\n",
                         b"bare\n", b"cr\rx\r\n", b"nul\x00\r\n", b"." * 5 + b"\r\n"]),
        st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"") + b"\r\n"),
    ),
    max_size=12,
)
noise = st.lists(st.tuples(line_content, st.sampled_from(ENDINGS)).map(b"".join), max_size=3)


@SETTINGS
@given(
    parts=st.lists(st.tuples(noise, body_lines), min_size=1, max_size=4),
    may_relay=st.booleans(),
)
def test_transactions_with_noise(parts, may_relay):
    session = new_session(may_relay)
    session.greeting()
    model = Model()
    for noisy, body in parts:
        for line in [*TRANSACTION, *noisy, *body, b".\r\n"]:
            feed_line(session, model, line)
    assert all(m.envelope.rcpt_tos for m in model.messages)


def test_a_clean_transaction_does_queue_exactly_one_message():
    """The line-by-line checker itself sees a message when there is one."""
    session = new_session()
    session.greeting()
    model = Model()
    for line in [*TRANSACTION, b"..stuffed\r\n", b"hello\r\n", b".\r\n", b"QUIT\r\n"]:
        feed_line(session, model, line)
    [message] = model.messages
    assert b"".join(message.chunks) == b".stuffed\r\nhello\r\n"
    assert message.envelope.rcpt_tos == ["b@localhost", "c@example.org"]
