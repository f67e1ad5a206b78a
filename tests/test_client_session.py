"""The sender's client state machine fed reply bytes: no sockets, exact output asserted."""

from __future__ import annotations

import base64

import pytest

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
    SessionUsageError,
    StartTLS,
    Step,
    parse_extensions,
)
from services.sender.downgrade import downgrade
from shared.smtp import Reply, to_wire_data

HOST = "mailbag.test"
EHLO_PLAIN = b"250-relay.test Hello\r\n250 HELP\r\n"
EHLO_PIPE = b"250-relay.test Hello\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n"
MESSAGE = OutgoingMessage(
    "q1", "alice@example.com", ("bob@example.org",), b"Subject: x\r\n\r\nhi\r\n"
)
TWO = OutgoingMessage("q2", "a@example.com", ("b@example.org", "c@example.net"), b"hello\r\n")


def drain(client: ClientSession) -> list:
    events = []
    while (event := client.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def feed(client: ClientSession, data: bytes) -> list:
    client.receive_data(data)
    return drain(client)


def sent(events: list) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def kinds(events: list) -> list[type]:
    return [type(e) for e in events]


def greeted(ehlo: bytes = EHLO_PLAIN, **policy) -> ClientSession:
    client = ClientSession(ClientPolicy(hostname=HOST, **policy))
    assert sent(feed(client, b"220 relay.test ESMTP\r\n")) == f"EHLO {HOST}\r\n".encode()
    assert kinds(feed(client, ehlo)) == [Ready]
    return client


def done(events: list) -> dict[str, int]:
    (message_done,) = [e for e in events if isinstance(e, MessageDone)]
    return {rcpt: reply.code for rcpt, reply in message_done.results}


# ---------------------------------------------------------------------------- handshake

@pytest.mark.parametrize(
    ("greeting", "then_sent", "closed"),
    [
        (b"220 relay ready\r\n", f"EHLO {HOST}\r\n".encode(), False),
        (b"220-multi\r\n220 line greeting\r\n", f"EHLO {HOST}\r\n".encode(), False),
        (b"554 no service here\r\n", b"QUIT\r\n", False),  # §3.1: still QUIT
        (b"450 busy\r\n", b"QUIT\r\n", False),
        (b"421 going away\r\n", b"", True),  # 421: close without QUIT
    ],
)
def test_greeting_each_reply_class(greeting: bytes, then_sent: bytes, closed: bool) -> None:
    client = ClientSession(ClientPolicy(hostname=HOST))
    events = feed(client, greeting)
    assert sent(events) == then_sent
    if then_sent != f"EHLO {HOST}\r\n".encode():
        assert isinstance(events[0], SessionError) and events[0].step is Step.GREETING
    assert (Closed in kinds(events)) is closed


def test_ehlo_5xx_falls_back_to_helo() -> None:
    for code in (500, 502, 550):
        client = ClientSession(ClientPolicy(hostname=HOST))
        feed(client, b"220 old server\r\n")
        assert sent(feed(client, f"{code} what?\r\n".encode())) == f"HELO {HOST}\r\n".encode()
        assert kinds(feed(client, b"250 old.server\r\n")) == [Ready]
        assert client.extensions == {}


@pytest.mark.parametrize(
    ("replies", "expect_quit"),
    [
        ([b"451 try later\r\n"], True),  # EHLO 4xx: no fallback, give up politely
        ([b"500 no EHLO\r\n", b"501 no HELO either\r\n"], True),
        ([b"500 no EHLO\r\n", b"421 bye\r\n"], False),
        ([b"421 bye\r\n"], False),
    ],
)
def test_hello_failures_end_with_quit_unless_421(replies: list[bytes], expect_quit: bool) -> None:
    client = ClientSession(ClientPolicy(hostname=HOST))
    feed(client, b"220 hi\r\n")
    events = []
    for reply in replies:
        events = feed(client, reply)
    assert any(isinstance(e, SessionError) for e in events)
    assert sent(events).endswith(b"QUIT\r\n") is expect_quit
    if expect_quit:
        assert kinds(feed(client, b"221 bye\r\n")) == [Closed]
    else:
        assert kinds(events)[-1] is Closed


def test_ehlo_extensions_are_parsed_from_a_multiline_reply() -> None:
    reply = Reply(
        250, "relay Hello\nPIPELINING\nSIZE 5000\nAUTH PLAIN LOGIN\nAUTH=CRAM-MD5\n8bitmime"
    )
    ext = parse_extensions(reply)
    assert ext["PIPELINING"] == "" and ext["SIZE"] == "5000" and "8BITMIME" in ext
    assert ext["AUTH"].split() == ["PLAIN", "LOGIN", "CRAM-MD5"]


# ---------------------------------------------------------------------------- one transaction

def test_plain_transaction_step_by_step() -> None:
    client = greeted()
    client.send_message(MESSAGE)
    assert sent(drain(client)) == b"MAIL FROM:<alice@example.com>\r\n"
    assert sent(feed(client, b"250 ok\r\n")) == b"RCPT TO:<bob@example.org>\r\n"
    assert sent(feed(client, b"250 ok\r\n")) == b"DATA\r\n"
    assert client.waiting_for == "data_init"
    events = feed(client, b"354 go ahead\r\n")
    assert events == [Send(to_wire_data(MESSAGE.data), body=True)]
    assert client.waiting_for == "data_end"
    events = feed(client, b"250 2.0.0 queued as X\r\n")
    assert done(events) == {"bob@example.org": 250}
    assert kinds(events) == [MessageDone, Ready]
    client.quit()
    assert sent(drain(client)) == b"QUIT\r\n"
    assert kinds(feed(client, b"221 bye\r\n")) == [Closed]


# Each reply class at each step of a transaction (no pipelining): what follows and
# what each recipient ends with. None = that step is never reached.
TRANSACTION_TABLE = [
    # MAIL, RCPT b, RCPT c, DATA, dot -> results, cleanup command
    ((451, None, None, None, None), {"b@example.org": 451, "c@example.net": 451}, b""),
    ((550, None, None, None, None), {"b@example.org": 550, "c@example.net": 550}, b""),
    ((250, 250, 250, 354, 250), {"b@example.org": 250, "c@example.net": 250}, b""),
    ((250, 550, 250, 354, 250), {"b@example.org": 550, "c@example.net": 250}, b""),
    ((250, 450, 551, None, None), {"b@example.org": 450, "c@example.net": 551}, b"RSET\r\n"),
    ((250, 250, 452, 354, 451), {"b@example.org": 451, "c@example.net": 452}, b""),
    ((250, 250, 250, 554, None), {"b@example.org": 554, "c@example.net": 554}, b"RSET\r\n"),
    ((250, 250, 250, 451, None), {"b@example.org": 451, "c@example.net": 451}, b"RSET\r\n"),
    ((250, 250, 250, 354, 552), {"b@example.org": 552, "c@example.net": 552}, b""),
]


@pytest.mark.parametrize(("codes", "results", "cleanup"), TRANSACTION_TABLE)
def test_each_reply_class_at_each_transaction_step(codes, results, cleanup) -> None:
    client = greeted()
    client.send_message(TWO)
    events = drain(client)
    expected_next = [b"RCPT TO:<b@example.org>\r\n", b"RCPT TO:<c@example.net>\r\n", b"DATA\r\n"]
    outputs = []
    for code in codes:
        if code is None:
            break
        events = feed(client, f"{code} reply\r\n".encode())
        outputs.append(sent(events))
    assert done(events) == results
    for index, output in enumerate(outputs[:3]):
        positive = codes[index] // 100 == 2
        if index == 0 and not positive:
            assert output == b""  # MAIL refused: nothing more for this message
        elif positive and index < 2:
            assert output == expected_next[index]
    if 354 in codes:
        assert outputs[3] == to_wire_data(TWO.data)
    # DATA only when a RCPT was accepted.
    data_sent = any(o == b"DATA\r\n" for o in outputs)
    assert data_sent == (codes[0] == 250 and any(c == 250 for c in codes[1:3]))
    assert sent(events).endswith(cleanup)
    if cleanup:
        assert kinds(feed(client, b"250 reset\r\n")) == [Ready]
    else:
        assert kinds(events)[-1] is Ready


def test_rset_refused_ends_the_session_with_quit() -> None:
    client = greeted()
    client.send_message(MESSAGE)
    drain(client)
    feed(client, b"250 ok\r\n")
    events = feed(client, b"550 no such user\r\n")
    assert sent(events) == b"RSET\r\n"
    events = feed(client, b"500 what\r\n")
    assert isinstance(events[0], SessionError) and sent(events) == b"QUIT\r\n"
    assert kinds(feed(client, b"221 bye\r\n")) == [Closed]


def test_421_in_a_transaction_defers_the_rest_and_closes_without_quit() -> None:
    client = greeted()
    client.send_message(TWO)
    drain(client)
    feed(client, b"250 ok\r\n")
    feed(client, b"550 no\r\n")
    events = feed(client, b"421 shutting down\r\n")
    assert done(events) == {"b@example.org": 550, "c@example.net": 421}
    assert kinds(events) == [MessageDone, SessionError, Closed]
    assert sent(events) == b""


def test_421_while_idle_closes() -> None:
    client = greeted()
    events = feed(client, b"421 idle timeout\r\n")
    assert kinds(events) == [SessionError, Closed]


def test_many_messages_on_one_session() -> None:
    client = greeted()
    for number in range(3):
        client.send_message(
            OutgoingMessage(f"q{number}", "a@x.example", ("b@y.example",), b"m\r\n")
        )
        drain(client)
        feed(client, b"250 ok\r\n")
        feed(client, b"250 ok\r\n")
        feed(client, b"354 go\r\n")
        assert kinds(feed(client, b"250 ok\r\n")) == [MessageDone, Ready]


# ---------------------------------------------------------------------------- pipelining

def test_pipelining_batches_mail_rcpts_and_data_with_size() -> None:
    client = greeted(EHLO_PIPE)
    client.send_message(TWO)
    events = drain(client)
    size = len(to_wire_data(TWO.data)) - 3
    assert events == [Send(  # 7-bit data: no BODY parameter, although 8BITMIME is offered
        f"MAIL FROM:<a@example.com> SIZE={size}\r\n".encode()
        + b"RCPT TO:<b@example.org>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n"
    )]
    # All replies in one read, even split across packets oddly.
    assert feed(client, b"250 ok\r\n250 ok\r\n55") == []
    events = feed(client, b"0 no\r\n354 go\r\n")
    assert events == [Send(to_wire_data(TWO.data), body=True)]
    events = feed(client, b"250 queued\r\n")
    assert done(events) == {"b@example.org": 250, "c@example.net": 550}


@pytest.mark.parametrize(
    ("replies", "results", "tail"),
    [
        # MAIL refused: every recipient shares it; the RCPT/DATA 503s are read and ignored.
        (b"550 bad sender\r\n503 a\r\n503 b\r\n503 c\r\n",
         {"b@example.org": 550, "c@example.net": 550}, b""),
        # No recipient accepted: DATA answered 554, RSET follows.
        (b"250 ok\r\n550 x\r\n450 y\r\n554 no valid recipients\r\n",
         {"b@example.org": 550, "c@example.net": 450}, b"RSET\r\n"),
        # A server that says 354 with no recipient: a lone dot, nobody delivered.
        (b"250 ok\r\n550 x\r\n550 y\r\n354 go\r\n",
         {"b@example.org": 550, "c@example.net": 550}, b".\r\n"),
    ],
)
def test_pipelined_failures(replies: bytes, results: dict, tail: bytes) -> None:
    client = greeted(EHLO_PIPE)
    client.send_message(TWO)
    drain(client)
    events = feed(client, replies)
    if tail == b".\r\n":
        assert sent(events) == b".\r\n"
        events = feed(client, b"250 ok, empty\r\n")
    assert done(events) == results
    if tail == b"RSET\r\n":
        assert sent(events) == b"RSET\r\n"
        events = feed(client, b"250 ok\r\n")
    assert kinds(events)[-1] is Ready


def test_pipelining_not_used_when_not_offered_or_disabled() -> None:
    client = greeted(EHLO_PIPE, use_pipelining=False)
    client.send_message(MESSAGE)
    assert sent(drain(client)).count(b"\r\n") == 1


# ---------------------------------------------------------------------------- STARTTLS / AUTH

EHLO_TLS = b"250-relay\r\n250-STARTTLS\r\n250 PIPELINING\r\n"
EHLO_AUTH = b"250-relay\r\n250-AUTH LOGIN PLAIN\r\n250 PIPELINING\r\n"


def test_starttls_then_ehlo_again() -> None:
    client = ClientSession(ClientPolicy(hostname=HOST, require_starttls=True))
    feed(client, b"220 hi\r\n")
    assert sent(feed(client, EHLO_TLS)) == b"STARTTLS\r\n"
    assert kinds(feed(client, b"220 go ahead\r\n")) == [StartTLS]
    client.tls_started()
    assert sent(drain(client)) == f"EHLO {HOST}\r\n".encode()
    assert client.extensions == {}
    assert kinds(feed(client, b"250-relay\r\n250 PIPELINING\r\n")) == [Ready]


@pytest.mark.parametrize(
    "ehlo", [b"250-relay\r\n250 PIPELINING\r\n", None],  # not offered; EHLO refused -> HELO
)
def test_required_starttls_never_falls_back(ehlo: bytes | None) -> None:
    client = ClientSession(ClientPolicy(hostname=HOST, require_starttls=True))
    feed(client, b"220 hi\r\n")
    if ehlo is None:
        feed(client, b"502 no\r\n")
        events = feed(client, b"250 ok\r\n")
    else:
        events = feed(client, ehlo)
    assert isinstance(events[0], SessionError) and "STARTTLS" in events[0].detail
    assert sent(events) == b"QUIT\r\n"
    assert Ready not in kinds(events)


def test_starttls_refused_quits() -> None:
    client = ClientSession(ClientPolicy(hostname=HOST, require_starttls=True))
    feed(client, b"220 hi\r\n")
    feed(client, EHLO_TLS)
    events = feed(client, b"454 TLS not available\r\n")
    assert kinds(events) == [SessionError, Send] and sent(events) == b"QUIT\r\n"


def test_auth_plain() -> None:
    client = ClientSession(ClientPolicy(hostname=HOST, username="u", password="p w"),
                           tls_active=True)
    feed(client, b"220 hi\r\n")
    token = base64.b64encode(b"\0u\0p w")
    assert sent(feed(client, EHLO_AUTH)) == b"AUTH PLAIN " + token + b"\r\n"
    assert kinds(feed(client, b"235 2.7.0 ok\r\n")) == [Ready]
    assert client.authenticated


def test_auth_login() -> None:
    client = ClientSession(ClientPolicy(hostname=HOST, username="user", password="secret"),
                           tls_active=True)
    feed(client, b"220 hi\r\n")
    assert sent(feed(client, b"250-relay\r\n250 AUTH LOGIN\r\n")) == b"AUTH LOGIN\r\n"
    assert sent(feed(client, b"334 VXNlcm5hbWU6\r\n")) == base64.b64encode(b"user") + b"\r\n"
    assert sent(feed(client, b"334 UGFzc3dvcmQ6\r\n")) == base64.b64encode(b"secret") + b"\r\n"
    assert kinds(feed(client, b"235 ok\r\n")) == [Ready]


@pytest.mark.parametrize("ehlo", [EHLO_AUTH, b"250-relay\r\n250 AUTH CRAM-MD5\r\n"])
def test_auth_failure_or_no_mechanism_quits(ehlo: bytes) -> None:
    client = ClientSession(ClientPolicy(hostname=HOST, username="u", password="bad"),
                           tls_active=True)
    feed(client, b"220 hi\r\n")
    events = feed(client, ehlo)
    if ehlo == EHLO_AUTH:
        events = feed(client, b"535 5.7.8 bad credentials\r\n")
        assert events[0].reply.code == 535
    assert isinstance(events[0], SessionError)
    assert sent(events) == b"QUIT\r\n"
    assert kinds(feed(client, b"221 bye\r\n")) == [Closed]


def test_no_password_in_clear_text_unless_allowed() -> None:
    client = ClientSession(ClientPolicy(hostname=HOST, username="u", password="pw"))
    feed(client, b"220 hi\r\n")
    events = feed(client, EHLO_AUTH)
    assert kinds(events) == [SessionError, Send] and sent(events) == b"QUIT\r\n"
    assert "without TLS" in events[0].detail
    allowed = ClientSession(
        ClientPolicy(hostname=HOST, username="u", password="pw", auth_without_tls=True)
    )
    feed(allowed, b"220 hi\r\n")
    assert sent(feed(allowed, EHLO_AUTH)).startswith(b"AUTH PLAIN ")


# ---------------------------------------------------------------------------- robustness

def test_one_byte_at_a_time_gives_the_same_events() -> None:
    script = [b"220 hi\r\n", EHLO_PIPE, b"250 a\r\n250 b\r\n354 c\r\n", b"250 done\r\n"]
    whole = ClientSession(ClientPolicy(hostname=HOST))
    split = ClientSession(ClientPolicy(hostname=HOST))
    out_whole, out_split = [], []
    for chunk in script:
        if chunk is script[2]:
            whole.send_message(MESSAGE)
            split.send_message(MESSAGE)
            out_whole += drain(whole)
            out_split += drain(split)
        out_whole += feed(whole, chunk)
        for byte in chunk:
            out_split += feed(split, bytes([byte]))
    assert out_whole == out_split
    assert done(out_whole) == {"bob@example.org": 250}


@pytest.mark.parametrize(
    "body",
    [b"a\n.\nb\r\n", b"a\r.\r\nb\r\n", b"a\n.\r\nb\r\n", b"a\r\n.\nb\r\n", b"a\r\n.\0\r\nb\r\n",
     b"a\r\n\0.\r\nb", b".\r\n", b"a\r\n.\r\n", b"a\r\n.\rb"],
)
def test_smuggling_bodies_leave_exactly_one_end_of_data(body: bytes) -> None:
    client = greeted()
    client.send_message(OutgoingMessage("q", "a@x.example", ("b@y.example",), body))
    drain(client)
    feed(client, b"250 ok\r\n")
    feed(client, b"250 ok\r\n")
    (event,) = feed(client, b"354 go\r\n")
    wire = b"\r\n" + event.data  # as the relay sees it: data starts at a line start
    assert wire.count(b"\r\n.\r\n") == 1 and wire.endswith(b"\r\n.\r\n")
    assert b"\0" not in wire
    assert wire.count(b"\r") == wire.count(b"\r\n") == wire.count(b"\n")


def test_garbage_reply_is_a_protocol_error() -> None:
    client = ClientSession(ClientPolicy(hostname=HOST))
    with pytest.raises(ProtocolError):
        client.receive_data(b"hello there\r\n")


def test_unsolicited_reply_is_a_protocol_error() -> None:
    client = greeted()
    client.receive_data(b"250 surprise\r\n")
    with pytest.raises(ProtocolError):
        client.next_event()


def test_positive_but_wrong_reply_to_data_is_a_protocol_error() -> None:
    client = greeted()
    client.send_message(MESSAGE)
    drain(client)
    feed(client, b"250 ok\r\n")
    feed(client, b"250 ok\r\n")
    client.receive_data(b"250 not 354\r\n")
    with pytest.raises(ProtocolError):
        client.next_event()


def test_usage_errors() -> None:
    client = ClientSession(ClientPolicy(hostname=HOST))
    with pytest.raises(SessionUsageError):
        client.send_message(MESSAGE)
    client = greeted()
    client.send_message(MESSAGE)
    with pytest.raises(SessionUsageError):
        client.quit()
    client.send_message(TWO)  # queued behind the first, not an error
    assert client.unsent == 1
    with pytest.raises(SessionUsageError):
        client.quit()
    with pytest.raises(SessionUsageError):
        client.send_message(OutgoingMessage("q3", "a@x.example", (), b"no recipient\r\n"))
    feed(client, b"421 bye\r\n")
    with pytest.raises(SessionUsageError):
        client.send_message(MESSAGE)  # closed


# ------------------------------------------------------------- pipelining across messages
# RFC 2920 §3.1: the next message's MAIL/RCPT/DATA follow the final dot in the same
# write; the replies come in command order (§3.2) and belong to the message whose
# command they answer.

THIRD = OutgoingMessage("q3", "z@example.com", ("y@example.org",), b"third\r\n")


def group(message: OutgoingMessage) -> bytes:
    """The pipelined command group of one message, as the relay must receive it."""
    size = len(to_wire_data(message.data)) - 3
    rcpts = b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in message.recipients)
    return (f"MAIL FROM:<{message.sender}> SIZE={size}\r\n".encode()
            + rcpts + b"DATA\r\n")


def results(events: list) -> dict[str, dict[str, tuple[int, str]]]:
    """Each MessageDone: ref -> recipient -> (code, text), to check attribution."""
    return {e.ref: {r: (reply.code, reply.text) for r, reply in e.results}
            for e in events if isinstance(e, MessageDone)}


def pipelined_pair() -> ClientSession:
    """MESSAGE in flight with its body sent, TWO's commands right behind its dot."""
    client = greeted(EHLO_PIPE)
    client.send_message(MESSAGE)
    client.send_message(TWO)
    assert drain(client) == [Send(group(MESSAGE))]
    assert client.unsent == 1
    events = feed(client, b"250 sender ok\r\n250 rcpt ok\r\n354 go\r\n")
    assert events == [Send(to_wire_data(MESSAGE.data), body=True), Send(group(TWO))]
    assert client.unsent == 0 and client.waiting_for == "data_end"
    return client


def test_next_message_follows_the_final_dot_one_round_trip_each() -> None:
    client = pipelined_pair()
    client.send_message(THIRD)
    events = feed(client, b"250 q1 queued\r\n250 ok\r\n250 ok\r\n550 no c\r\n354 go\r\n")
    assert events == [
        MessageDone("q1", (("bob@example.org", Reply(250, "q1 queued")),)),
        Send(to_wire_data(TWO.data), body=True),
        Send(group(THIRD)),
    ]
    events = feed(client, b"250 q2 queued\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert results(events) == {"q2": {"b@example.org": (250, "q2 queued"),
                                      "c@example.net": (550, "no c")}}
    assert sent(events) == to_wire_data(THIRD.data)
    events = feed(client, b"250 q3 queued\r\n")
    assert results(events) == {"q3": {"y@example.org": (250, "q3 queued")}}
    assert kinds(events) == [MessageDone, Ready]


@pytest.mark.parametrize("dot", [b"451 4.3.0 try later", b"554 5.6.0 rejected"])
def test_dot_of_n_fails_while_n_plus_1_is_in_flight(dot: bytes) -> None:
    client = pipelined_pair()
    events = feed(client, dot + b"\r\n250 ok\r\n250 b ok\r\n250 c ok\r\n354 go\r\n")
    code = int(dot[:3])
    assert results(events) == {"q1": {"bob@example.org": (code, dot[10:].decode())}}
    assert sent(events) == to_wire_data(TWO.data)  # N+1 goes on, no RSET in between
    events = feed(client, b"250 2.0.0 q2 queued\r\n")
    assert results(events) == {"q2": {"b@example.org": (250, "q2 queued"),
                                      "c@example.net": (250, "q2 queued")}}
    assert kinds(events) == [MessageDone, Ready]


def test_mail_of_n_plus_1_refused_after_n_delivered() -> None:
    client = pipelined_pair()
    events = feed(client, b"250 q1 queued\r\n550 bad sender\r\n503 a\r\n503 b\r\n503 c\r\n")
    assert results(events) == {
        "q1": {"bob@example.org": (250, "q1 queued")},
        "q2": {"b@example.org": (550, "bad sender"), "c@example.net": (550, "bad sender")},
    }
    assert sent(events) == b"" and kinds(events)[-1] is Ready


def test_data_of_n_plus_1_refused_resets_then_the_queue_goes_on() -> None:
    client = pipelined_pair()
    client.send_message(THIRD)
    events = feed(client, b"250 q1 queued\r\n250 ok\r\n250 ok\r\n250 ok\r\n554 no data\r\n")
    assert results(events)["q2"] == {"b@example.org": (554, "no data"),
                                     "c@example.net": (554, "no data")}
    assert sent(events) == b"RSET\r\n"  # RFC 5321 §4.1.1.5, before THIRD starts
    assert feed(client, b"250 reset\r\n") == [Send(group(THIRD))]


@pytest.mark.parametrize(
    ("replies", "q1"),
    [
        (b"421 4.3.2 going down\r\n", (421, "going down")),  # instead of the dot's reply
        (b"250 q1 queued\r\n421 4.3.2 going down\r\n", (250, "q1 queued")),  # after it
    ],
)
def test_421_mid_pipeline_ends_both_and_hands_back_the_queue(replies, q1) -> None:
    client = pipelined_pair()
    client.send_message(THIRD)
    events = feed(client, replies)
    assert results(events) == {
        "q1": {"bob@example.org": q1},
        "q2": {"b@example.org": (421, "going down"), "c@example.net": (421, "going down")},
    }
    assert kinds(events)[-2:] == [SessionError, Closed]
    assert sent(events) == b""  # RFC 5321 §3.8: no QUIT after 421
    assert client.take_unsent() == [THIRD]
    assert client.unsent == 0


def test_421_before_354_leaves_the_queued_message_unsent() -> None:
    client = greeted(EHLO_PIPE)
    client.send_message(MESSAGE)
    client.send_message(TWO)
    drain(client)
    events = feed(client, b"250 ok\r\n421 bye\r\n")
    assert results(events) == {"q1": {"bob@example.org": (421, "bye")}}
    assert client.take_unsent() == [TWO]


def test_without_pipelining_a_queued_message_waits_for_the_outcome() -> None:
    client = greeted()  # the relay does not offer PIPELINING
    client.send_message(MESSAGE)
    client.send_message(THIRD)
    assert sent(drain(client)) == b"MAIL FROM:<alice@example.com>\r\n"
    assert sent(feed(client, b"250 ok\r\n")) == b"RCPT TO:<bob@example.org>\r\n"
    assert sent(feed(client, b"250 ok\r\n")) == b"DATA\r\n"
    events = feed(client, b"354 go\r\n")
    assert events == [Send(to_wire_data(MESSAGE.data), body=True)]  # the dot alone
    events = feed(client, b"451 q1 later\r\n")
    assert results(events) == {"q1": {"bob@example.org": (451, "q1 later")}}
    assert kinds(events) == [MessageDone, Send]  # no Ready in between: THIRD starts
    assert sent(events) == b"MAIL FROM:<z@example.com>\r\n"
    feed(client, b"250 ok\r\n")
    feed(client, b"250 ok\r\n")
    feed(client, b"354 go\r\n")
    events = feed(client, b"250 q3 queued\r\n")
    assert results(events) == {"q3": {"y@example.org": (250, "q3 queued")}}
    assert kinds(events) == [MessageDone, Ready]


def test_pipelined_replies_one_byte_at_a_time_give_the_same_events() -> None:
    script = b"250 q1 queued\r\n250 ok\r\n250 ok\r\n550 no c\r\n354 go\r\n250 q2\r\n"
    whole, split = pipelined_pair(), pipelined_pair()
    out_split: list = []
    for byte in script:
        out_split += feed(split, bytes([byte]))
    assert feed(whole, script) == out_split


# ---------------------------------------------------------------------------- 8-bit data
# RFC 6152: BODY=8BITMIME only for 8-bit data and only to a relay that offers it; a
# relay without it gets the data converted to 7 bit, or nothing and a 554 5.6.3.

EIGHT_BIT = OutgoingMessage("e1", "a@example.com", ("b@example.org",),
                            "Subject: x\r\n\r\nGrüße\r\n".encode())
BAD_HEADER = OutgoingMessage("e2", "a@example.com", ("b@example.org", "c@example.net"),
                             "Subject: Grüße\r\n\r\nbody\r\n".encode())
EHLO_PIPE_7BIT = b"250-relay.test Hello\r\n250-PIPELINING\r\n250 SIZE 1000000\r\n"


def test_8bit_data_goes_with_body_8bitmime_to_a_relay_that_offers_it() -> None:
    client = greeted(EHLO_PIPE)
    client.send_message(EIGHT_BIT)
    wire = to_wire_data(EIGHT_BIT.data)
    assert sent(drain(client)).startswith(
        f"MAIL FROM:<a@example.com> SIZE={len(wire) - 3} BODY=8BITMIME\r\n".encode())
    events = feed(client, b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert sent(events) == wire  # unchanged


@pytest.mark.parametrize("ehlo", [EHLO_PIPE_7BIT, EHLO_PLAIN])
def test_8bit_data_is_converted_for_a_relay_without_8bitmime(ehlo: bytes) -> None:
    client = greeted(ehlo)
    client.send_message(EIGHT_BIT)
    wire = to_wire_data(downgrade(EIGHT_BIT.data))
    assert wire.isascii() and b"Gr=C3=BC=C3=9Fe\r\n" in wire
    events = drain(client)
    assert sent(events).startswith(b"MAIL FROM:<a@example.com>")
    assert b"BODY=" not in sent(events)
    if b"PIPELINING" not in ehlo:
        events = feed(client, b"250 ok\r\n")
        events = feed(client, b"250 ok\r\n")
    else:
        assert f"SIZE={len(wire) - 3}\r\n".encode() in sent(events)
        events = feed(client, b"250 ok\r\n250 ok\r\n")
    assert sent(feed(client, b"354 go\r\n")) == wire


def test_data_that_cannot_be_converted_fails_554_5_6_3_and_nothing_is_sent() -> None:
    client = greeted(EHLO_PIPE_7BIT)
    client.send_message(BAD_HEADER)
    events = drain(client)
    assert sent(events) == b"" and kinds(events) == [MessageDone, Ready]
    (message_done,) = [e for e in events if isinstance(e, MessageDone)]
    assert message_done.ref == "e2"
    for _, reply in message_done.results:
        assert (reply.code, reply.enhanced) == (554, "5.6.3") and reply.is_permanent
        assert "8-bit data in a header" in reply.text
    assert done(events) == {"b@example.org": 554, "c@example.net": 554}
    client.send_message(MESSAGE)  # the session goes on
    assert sent(drain(client)) == group(MESSAGE)


def test_a_message_that_cannot_be_converted_is_skipped_in_a_pipelined_run() -> None:
    client = greeted(EHLO_PIPE_7BIT)
    client.send_message(MESSAGE)
    client.send_message(BAD_HEADER)
    client.send_message(TWO)
    assert drain(client) == [Send(group(MESSAGE))]
    events = feed(client, b"250 ok\r\n250 ok\r\n354 go\r\n")
    # MESSAGE's body, BAD_HEADER decided at once, TWO's commands behind the dot.
    assert sent(events) == to_wire_data(MESSAGE.data) + group(TWO)
    assert results(events) == {"e2": {r: (554, results(events)["e2"][r][1])
                                      for r in BAD_HEADER.recipients}}
    assert client.unsent == 0
    events = feed(client, b"250 q1\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert results(events) == {"q1": {"bob@example.org": (250, "q1")}}
    assert sent(events) == to_wire_data(TWO.data)
    assert kinds(feed(client, b"250 q2\r\n")) == [MessageDone, Ready]
