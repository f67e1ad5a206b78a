"""Property tests of the sender's sans-I/O client session (issue 5 §6), with hypothesis.

Whatever a relay answers — valid replies in any order, garbage, in any pieces —
`ClientSession`:
- raises nothing but its documented `ProtocolError` (the shell closes on it);
- always comes back to NEED_DATA, and sends at most one write per reply it read
  (a write: the Sends a shell gets before it must read, e.g. a body and the next
  message's pipelined commands);
- never sends MAIL before a positive greeting/EHLO (and STARTTLS/AUTH when required),
  never sends the message data before a 354, never anything after Closed;
- reports a recipient delivered only with the 2xx that answered the final dot;
- reports every message it was given exactly once and in order, unless the session
  breaks — also when the shell gives them all at once (pipelined one after another);
- puts exactly one end-of-data on the wire per message: CRLF only, dot-stuffed,
  no NUL (no SMTP smuggling, whatever the queued bytes are).
"""

from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st

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
from shared.smtp import ReplyParser
from tests.support import PROPERTY_SETTINGS, chunked

SETTINGS = PROPERTY_SETTINGS
MAX_EVENTS = 10_000

REPLIES = [
    b"220 relay.test ESMTP\r\n", b"220 Ready to start TLS\r\n", b"221 bye\r\n",
    b"235 2.7.0 ok\r\n", b"250 ok\r\n", b"250 2.0.0 queued as X\r\n",
    b"250-relay.test\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250-8BITMIME\r\n"
    b"250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n",
    b"250-relay.test\r\n250 AUTH=LOGIN\r\n", b"250-relay.test\r\n250 PIPELINING\r\n",
    b"334 \r\n", b"334 VXNlcm5hbWU6\r\n", b"354 go ahead\r\n",
    b"421 4.3.2 shutting down\r\n", b"450 busy\r\n", b"451 local error\r\n",
    b"452 4.5.3 too many\r\n", b"500 what\r\n", b"501 syntax\r\n", b"502 no\r\n",
    b"503 sequence\r\n", b"504 mech\r\n", b"530 auth\r\n", b"535 bad\r\n",
    b"550 5.1.1 no such user\r\n", b"552 too big\r\n", b"554 no\r\n",
    b"250-multi\r\n", b"250", b"\r\n", b"999 nonsense\r\n", b"hello\r\n",
]
replies_stream = st.lists(
    st.one_of(st.sampled_from(REPLIES), st.binary(max_size=12)), max_size=40
).map(b"".join)
positive_heavy = st.lists(st.sampled_from(REPLIES), max_size=40).map(b"".join)
datas = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from([b"line\r\n", b".\r\n", b"\n.\n", b"\r.\r", b".", b"\x00",
                              b"..\r\n", b"\r", b"\n", b"text"]), max_size=20).map(b"".join),
)
messages = st.lists(
    st.builds(
        OutgoingMessage,
        ref=st.sampled_from(["q1", "q2", "q3"]),
        sender=st.sampled_from(["", "a@example.com"]),
        recipients=st.lists(st.sampled_from(["b@example.org", "c@example.net", "d@x.test"]),
                            min_size=1, max_size=3).map(tuple),
        data=datas,
    ),
    min_size=1, max_size=3,
)
policies = st.builds(
    ClientPolicy,
    hostname=st.just("mailbag.test"),
    require_starttls=st.booleans(),
    username=st.sampled_from(["", "alice"]),
    password=st.just("pw"),
    use_pipelining=st.booleans(),
    auth_without_tls=st.booleans(),
)


class Shell:
    """What relay.py does, minus the sockets: carries out events, records the wire."""

    def __init__(
        self, policy: ClientPolicy, outgoing: list[OutgoingMessage], lookahead: bool = False
    ) -> None:
        self.session = ClientSession(policy)
        self.lookahead = lookahead  # give every message at the first Ready
        self.policy = policy
        self.outgoing = list(outgoing)
        self.given: list[OutgoingMessage] = []
        self.sent: list[Send] = []
        self.writes = 0  # groups of Sends, one per pump
        self.done: list[MessageDone] = []
        self.closed = False
        self.broken = False  # a ProtocolError or a SessionError ended the session
        self.protocol_error = False
        self.replies_read = 0
        self.positive_read = 0
        self.ready = 0
        self.first_reply_code: int | None = None
        self.parser = ReplyParser()
        self.last_reply_code: int | None = None
        self.tls = False
        self.auth_ok = False

    def feed(self, data: bytes) -> None:
        """Feed the bytes one at a time, so that the test knows which reply the
        session has just read when it acts (the pump drains every reply it holds)."""
        for index in range(len(data)):
            if self.closed or self.protocol_error:
                return  # the shell has closed the connection: nothing more arrives
            byte = data[index:index + 1]
            try:
                self.session.receive_data(byte)
            except ProtocolError:
                self.broken = self.protocol_error = True
                return
            for reply in self.parser.feed(byte):  # same grammar: cannot fail here
                self.replies_read += 1
                self.positive_read += reply.code // 100 == 2
                if self.first_reply_code is None:
                    self.first_reply_code = reply.code
                self.last_reply_code = reply.code
            try:
                self.pump()
            except ProtocolError:
                self.broken = self.protocol_error = True

    def pump(self) -> None:
        wrote = False
        for _ in range(MAX_EVENTS):
            event = self.session.next_event()
            if event is NEED_DATA:
                self.writes += wrote
                return
            assert not self.closed, f"{event} after Closed"
            if isinstance(event, Send):
                self.check_send(event)
                self.sent.append(event)
                wrote = True
            elif isinstance(event, Ready):
                if self.ready == 0:  # the handshake is done: only on a 2xx to its last step
                    assert self.last_reply_code is not None and self.last_reply_code // 100 == 2
                self.ready += 1
                if not self.outgoing:
                    self.session.quit()
                for message in self.outgoing[: len(self.outgoing) if self.lookahead else 1]:
                    self.given.append(message)
                    self.session.send_message(message)
                    self.outgoing.remove(message)
            elif isinstance(event, StartTLS):
                self.tls = True
                self.session.tls_started()
            elif isinstance(event, MessageDone):
                self.done.append(event)
            elif isinstance(event, SessionError):
                self.broken = True
            elif isinstance(event, Closed):
                self.closed = True
        raise AssertionError("the client produced events without end")

    def check_send(self, event: Send) -> None:
        data = event.data
        if event.body:
            assert self.last_reply_code == 354, "message data sent without a 354"
            assert data.endswith(b".\r\n")
            body = data[:-3]
            assert body == b"" or body.endswith(b"\r\n")
            assert b"\r\n.\r\n" not in b"\r\n" + body, "a second end-of-data in the body"
            assert data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")
            assert b"\0" not in data
            return
        assert data.endswith(b"\r\n") and data.count(b"\r") == data.count(b"\n")
        assert data.count(b"\r\n") == data.count(b"\n")
        for line in data[:-2].split(b"\r\n"):
            verb = line.split(b" ")[0].upper()
            if self.first_reply_code is None or self.first_reply_code // 100 != 2:
                assert verb == b"QUIT", f"{line!r} after a refused greeting"
            if verb in (b"MAIL", b"RCPT", b"DATA"):
                if self.policy.require_starttls:
                    assert self.tls, "MAIL before STARTTLS succeeded"
            if verb == b"AUTH" and self.policy.require_starttls:
                assert self.tls, "credentials sent in clear text"


def _assert_outcomes(shell: Shell) -> None:
    # At most one write per reply read (plus none before the greeting).
    assert shell.writes <= shell.replies_read + 1
    # Only a 2xx moves the session forward: each Ready was earned by one, or is the
    # session staying where it was after a transaction that ended (e.g. MAIL got 4xx).
    assert shell.ready <= shell.positive_read + len(shell.done)
    reported = [done.ref for done in shell.done]
    assert len(reported) <= len(shell.given)
    if not shell.broken and shell.closed:
        assert reported == [m.ref for m in shell.given]  # each exactly once, in order
    bodies = [s for s in shell.sent if s.body]
    delivered_refs = {
        done.ref for done in shell.done if any(r.code // 100 == 2 for _, r in done.results)
    }
    # Delivered only after the data went out (the 2xx answers the final dot).
    assert len(delivered_refs) <= len(bodies)
    for done in shell.done:
        for _, reply in done.results:
            assert 200 <= reply.code <= 599 and reply.code // 100 != 3


@SETTINGS
@given(policy=policies, outgoing=messages, wire=replies_stream, lookahead=st.booleans())
def test_arbitrary_replies_never_raise_and_stay_bounded(policy, outgoing, wire, lookahead):
    shell = Shell(policy, outgoing, lookahead)
    shell.feed(wire)
    _assert_outcomes(shell)


@SETTINGS
@given(policy=policies, wire=replies_stream,
       cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_reply_bytes_in_any_pieces_give_the_same_writes(policy, wire, cuts):
    """How the relay's bytes are cut never changes what the client says."""
    outgoing = [OutgoingMessage("q1", "a@example.com", ("b@example.org",), b"hi\r\n")]
    results = []
    for pieces in ([wire], chunked(wire, cuts)):
        session = ClientSession(policy)
        writes: list[object] = []
        try:
            for piece in pieces:
                session.receive_data(piece)
                for _ in range(MAX_EVENTS):
                    event = session.next_event()
                    if event is NEED_DATA:
                        break
                    writes.append(event)
                    if isinstance(event, Ready):
                        if outgoing and not any(isinstance(w, MessageDone) for w in writes):
                            session.send_message(outgoing[0])
                        else:
                            session.quit()
                    elif isinstance(event, StartTLS):
                        # What follows the 220 would be TLS records, not these plain
                        # bytes (RFC 3207 §4.2 discards what came before): the
                        # plain-text conversation ends here, however it was cut.
                        raise _HandshakeBegins
                else:
                    raise AssertionError("the client produced events without end")
        except ProtocolError as err:
            writes.append(("ProtocolError", str(err)))
        except _HandshakeBegins:
            pass
        results.append(writes)
    whole, pieces_result = results
    if ("ProtocolError" in map(_first, whole)) or ("ProtocolError" in map(_first, pieces_result)):
        # Garbage is found when it is parsed: a whole buffer fails before the events
        # its valid start would have given. Both must fail, one a prefix of the other.
        assert _first(whole[-1]) == _first(pieces_result[-1]) == "ProtocolError"
        shorter, longer = sorted((whole[:-1], pieces_result[:-1]), key=len)
        assert longer[: len(shorter)] == shorter
    else:
        assert whole == pieces_result


class _HandshakeBegins(Exception):
    """The client asked for the TLS handshake: no more plain-text replies."""


def _first(item: object) -> object:
    return item[0] if isinstance(item, tuple) else None


@SETTINGS
@given(policy=policies, outgoing=messages, wire=positive_heavy, lookahead=st.booleans())
def test_valid_replies_in_any_order(policy, outgoing, wire, lookahead):
    shell = Shell(policy, outgoing, lookahead)
    shell.feed(wire)
    _assert_outcomes(shell)


def test_a_cooperative_relay_gets_every_message_once():
    """The checker itself: a relay that says yes to everything delivers all."""
    policy = ClientPolicy(hostname="mailbag.test", username="alice", password="pw",
                          auth_without_tls=True)
    outgoing = [OutgoingMessage("q1", "a@example.com", ("b@example.org",), b"x\n.\nsmuggle"),
                OutgoingMessage("q2", "", ("c@example.net", "d@x.test"), b".dot\r\n")]
    shell = Shell(policy, outgoing)
    shell.feed(b"220 relay\r\n")
    shell.feed(b"250-relay\r\n250 AUTH PLAIN\r\n")
    assert base64.b64decode(shell.sent[-1].data.split()[-1]) == b"\0alice\0pw"
    shell.feed(b"235 ok\r\n")
    shell.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert shell.sent[-1].data == b"x\r\n..\r\nsmuggle\r\n.\r\n"
    shell.feed(b"250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n221 bye\r\n")
    assert [d.ref for d in shell.done] == ["q1", "q2"]
    assert all(r.code == 250 for d in shell.done for _, r in d.results)
    assert shell.closed and not shell.broken
