"""The relay shell against REAL SMTP servers on loopback: aiosmtpd and Postfix's smtp-sink.

Byte-identical content, QUIT every time, per-recipient results, STARTTLS and implicit
TLS with a trustme CA (and a wrong host name that must be refused), AUTH PLAIN/LOGIN.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from services.sender.client import OutgoingMessage
from services.sender.relay import RelayConnection, RelayError, RelaySettings, Timeouts
from shared.config import HostPort
from shared.log import EventLog
from tests.sender_support import RecordingHandler, Relay, SmtpSink, authenticator
from tests.support import TestCA, free_port

LOG = EventLog("S-SMTP", "-")
DATA = b"From: a@example.com\r\nSubject: t\r\n\r\nline one\r\n.leading dot\r\n..two\r\nend\r\n"


def settings(address: str, **overrides) -> RelaySettings:
    values = dict(
        address=HostPort.parse(address),
        hostname="mailbag.test",
        timeouts=Timeouts(2.0, 2.0, 2.0, 2.0, 2.0, 2.0),
    )
    values.update(overrides)
    return RelaySettings(**values)


def message(ref: str = "q1", recipients=("bob@example.org",), data: bytes = DATA):
    return OutgoingMessage(ref, "alice@example.com", tuple(recipients), data)


@pytest.fixture
def relay():
    started: list[Relay] = []

    def start(**kwargs) -> Relay:
        server = Relay(**kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def codes(results) -> dict[str, int]:
    return {rcpt: reply.code for rcpt, reply in results}


def test_content_is_byte_identical_and_quit_is_sent(relay) -> None:
    server = relay()
    conn = RelayConnection(settings(server.address), LOG)
    conn.open()
    results = conn.deliver(message())
    conn.close()
    assert codes(results) == {"bob@example.org": 250}
    (got,) = server.handler.wait_for(1)
    assert got.content == DATA
    assert got.mail_from == "alice@example.com" and got.rcpt_tos == ["bob@example.org"]
    assert any(o.startswith("SIZE=") for o in got.mail_options)
    assert not any(o.startswith("BODY=") for o in got.mail_options)  # 7-bit data
    server.handler.wait_quits(1)


def test_many_messages_one_session_one_quit(relay) -> None:
    server = relay()
    conn = RelayConnection(settings(server.address), LOG)
    conn.open()
    for number in range(5):
        data = f"Subject: {number}\r\n\r\nbody {number}\r\n".encode()
        assert codes(conn.deliver(message(f"q{number}", data=data))) == {"bob@example.org": 250}
        assert conn.usable
    conn.close()
    got = server.handler.wait_for(5)
    assert [m.content for m in got] == [
        f"Subject: {n}\r\n\r\nbody {n}\r\n".encode() for n in range(5)
    ]
    server.handler.wait_quits(1)
    assert server.handler.quits == 1


def test_a_write_the_socket_takes_only_in_part_is_finished(relay) -> None:
    """A write of up to one block is tried with one send (issue 6); when the socket
    takes only part of it (a small send buffer here), the rest still goes out whole."""
    server = relay()
    conn = RelayConnection(settings(server.address), LOG)
    conn.open()
    assert conn.sock is not None
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    bodies = [b"Subject: %d\r\n\r\n" % n + (b"y" * 998 + b"\r\n") * 60 for n in range(3)]
    for number, data in enumerate(bodies):
        assert len(data) < 64 * 1024
        assert codes(conn.deliver(message(f"q{number}", data=data))) == {"bob@example.org": 250}
    conn.close()
    assert [m.content for m in server.handler.wait_for(3)] == bodies
    server.handler.wait_quits(1)


def test_per_recipient_mix_and_data_failure(relay) -> None:
    handler = RecordingHandler(rcpt_replies={
        "gone@example.org": "550 5.1.1 no such user",
        "later@example.org": "451 4.3.0 try later",
    })
    server = relay(handler=handler)
    conn = RelayConnection(settings(server.address), LOG)
    conn.open()
    results = conn.deliver(message(recipients=("ok@example.org", "gone@example.org",
                                               "later@example.org")))
    assert codes(results) == {"ok@example.org": 250, "gone@example.org": 550,
                              "later@example.org": 451}
    handler.data_reply = "452 4.3.1 disk full"
    assert codes(conn.deliver(message(recipients=("ok@example.org",)))) == {"ok@example.org": 452}
    # Nobody accepted: no DATA, the session goes on (RSET) and a later message still works.
    handler.data_reply = None
    assert codes(conn.deliver(message(recipients=("gone@example.org",)))) == {
        "gone@example.org": 550}
    assert conn.usable
    assert codes(conn.deliver(message(recipients=("ok@example.org",)))) == {"ok@example.org": 250}
    conn.close()
    assert len(handler.wait_for(2)) == 2
    handler.wait_quits(1)


def test_relay_down_is_a_connect_error() -> None:
    conn = RelayConnection(settings(f"127.0.0.1:{free_port()}"), LOG)
    with pytest.raises(RelayError) as err:
        conn.open()
    assert err.value.stage == "connect"


def test_silent_relay_times_out() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    thread.start()
    try:
        timeouts = Timeouts(2.0, 0.3, 0.3, 0.3, 0.3, 0.3)
        conn = RelayConnection(settings(f"127.0.0.1:{port}", timeouts=timeouts), LOG)
        with pytest.raises(RelayError) as err:
            conn.open()
        assert "timeout" in str(err.value)
    finally:
        listener.close()
        for sock in accepted:
            sock.close()


# ---------------------------------------------------------------------------- TLS

def test_starttls_verified(relay, tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    server = relay(tls_context=ca.server_context(), require_starttls=True)
    conn = RelayConnection(settings(server.address, tls="starttls", ca_file=ca.ca_file), LOG)
    conn.open()
    assert codes(conn.deliver(message())) == {"bob@example.org": 250}
    conn.close()
    (got,) = server.handler.wait_for(1)
    assert got.tls and got.content == DATA
    server.handler.wait_quits(1)


@pytest.mark.parametrize("mode", ["starttls", "tls"])
def test_wrong_host_name_is_refused(relay, tmp_path: Path, mode: str) -> None:
    ca = TestCA(tmp_path, names=("relay.invalid",))
    if mode == "tls":
        server = relay(ssl_context=ca.server_context())
    else:
        server = relay(tls_context=ca.server_context(), require_starttls=True)
    conn = RelayConnection(settings(server.address, tls=mode, ca_file=ca.ca_file), LOG)
    with pytest.raises(RelayError) as err:
        conn.open()
    assert err.value.stage == "tls"
    assert "certificate" in str(err.value)
    assert server.handler.messages == []
    # The explicit opt-out accepts it (and still encrypts).
    conn = RelayConnection(
        settings(server.address, tls=mode, ca_file=ca.ca_file, tls_verify=False), LOG
    )
    conn.open()
    assert codes(conn.deliver(message())) == {"bob@example.org": 250}
    conn.close()
    assert server.handler.wait_for(1)[0].tls


def test_unknown_ca_is_refused(relay, tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    server = relay(ssl_context=ca.server_context())
    conn = RelayConnection(settings(server.address, tls="tls"), LOG)  # system CAs only
    with pytest.raises(RelayError) as err:
        conn.open()
    assert err.value.stage == "tls"


def test_implicit_tls(relay, tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    server = relay(ssl_context=ca.server_context())
    conn = RelayConnection(settings(server.address, tls="tls", ca_file=ca.ca_file), LOG)
    conn.open()
    assert codes(conn.deliver(message())) == {"bob@example.org": 250}
    conn.close()
    (got,) = server.handler.wait_for(1)
    assert got.tls and got.content == DATA
    server.handler.wait_quits(1)


def test_required_starttls_missing_never_falls_back(relay) -> None:
    server = relay()  # no TLS at all
    conn = RelayConnection(settings(server.address, tls="starttls"), LOG)
    with pytest.raises(RelayError) as err:
        conn.open()
    assert "STARTTLS" in str(err.value)
    server.handler.wait_quits(1)  # it still said QUIT
    assert server.handler.messages == []


# ---------------------------------------------------------------------------- AUTH

@pytest.mark.parametrize("exclude", [[], ["PLAIN"]], ids=["PLAIN", "LOGIN"])
def test_auth_success(relay, tmp_path: Path, exclude: list[str]) -> None:
    ca = TestCA(tmp_path)
    server = relay(tls_context=ca.server_context(), require_starttls=True,
                   authenticator=authenticator({"user": "pa ss"}), auth_required=True,
                   auth_exclude_mechanism=exclude)
    conn = RelayConnection(
        settings(server.address, tls="starttls", ca_file=ca.ca_file,
                 username="user", password="pa ss"), LOG
    )
    conn.open()
    assert conn.client.authenticated
    assert codes(conn.deliver(message())) == {"bob@example.org": 250}
    conn.close()
    assert server.handler.wait_for(1)[0].content == DATA


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_auth_wrong_password_is_535_and_quit(relay) -> None:
    server = relay(authenticator=authenticator({"user": "right"}), auth_required=True,
                   auth_require_tls=False)
    conn = RelayConnection(settings(server.address, username="user", password="wrong",
                                    auth_without_tls=True), LOG)
    with pytest.raises(RelayError) as err:
        conn.open()
    assert err.value.reply is not None and err.value.reply.code == 535
    server.handler.wait_quits(1)


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_password_is_never_sent_in_clear_text_by_default(relay) -> None:
    server = relay(authenticator=authenticator({"user": "right"}), auth_required=True,
                   auth_require_tls=False)
    conn = RelayConnection(settings(server.address, username="user", password="right"), LOG)
    with pytest.raises(RelayError) as err:
        conn.open()
    assert "without TLS" in str(err.value)
    server.handler.wait_quits(1)  # it still ends the session with QUIT
    assert server.handler.messages == []


# ---------------------------------------------------------------------------- smtp-sink

SMUGGLING = [b"\n.\n", b"\r.\r\n", b"\n.\r\n", b"\r\n.\n", b"\r\n.\0\r\n", b"\r\n\0.\r\n",
             b"\r.\r", b"\n.\r"]


@pytest.mark.e2e
@pytest.mark.skipif(not SmtpSink.available(), reason="postfix smtp-sink not installed")
def test_smuggling_bodies_arrive_as_one_message_each_at_smtp_sink(tmp_path: Path) -> None:
    sink = SmtpSink(tmp_path / "sink").start()
    try:
        conn = RelayConnection(settings(sink.address), LOG)
        conn.open()
        for number, trick in enumerate(SMUGGLING):
            body = (b"Subject: smuggle %d\r\n\r\nbefore" % number + trick
                    + b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.org>\r\n"
                    + b"DATA\r\nafter\r\n")
            assert codes(conn.deliver(message(f"s{number}", data=body))) == {
                "bob@example.org": 250}
        conn.close()
        deadline = time.monotonic() + 5
        while len(sink.dumps()) < len(SMUGGLING) and time.monotonic() < deadline:
            time.sleep(0.02)
        dumps = sink.dumps()
        assert len(dumps) == len(SMUGGLING)  # exactly one message per body, none smuggled
        for dump in dumps:
            text = dump.read_bytes()
            assert b"X-Rcpt-Args: <bob@example.org>" in text
            assert b"victim" not in text.split(b"\n\n", 1)[0]  # no second envelope
            assert b"after" in text
    finally:
        sink.stop()
