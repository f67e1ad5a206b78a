"""Limits a hostile client cannot get around (issue 5 §3), against a real receiver.

Each test configures a small limit, drives a real process over loopback past it,
and checks both the reply (imported from the code) and that the server goes on
serving legitimate clients.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time

import pytest

from services.receiver import replies as R
from shared.smtp import MAX_LOCAL_PART, MAX_PATH
from tests.hardening_support import (
    RawClient,
    connect,
    connect_when_free,
    find_queued,
    peak_rss_kib,
    send_message,
    start_receiver,
    wait_for,
)
from tests.support import TestCA, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def default_receiver(tmp_path_factory):
    config, proc = start_receiver(tmp_path_factory.mktemp("limits"))
    yield config
    proc.stop()


def test_max_recipients_452_and_message_goes_to_the_accepted_ones(receiver_factory):
    config, _ = receiver_factory(receiver={"max_recipients": 3})
    with connect(config) as client:
        assert client.command("EHLO client.example").code == 250
        assert client.command("MAIL FROM:<a@localhost>").code == 250
        for n in range(3):
            assert client.command(f"RCPT TO:<r{n}@localhost>").code == 250
        for n in range(3, 6):
            reply = client.command(f"RCPT TO:<r{n}@localhost>")
            assert (reply.code, reply.enhanced) == (452, "4.5.3")
            assert reply == R.S452_TOO_MANY_RECIPIENTS
        assert client.command("DATA").code == 354
        client.send(b"Subject: many\r\n\r\nmax-recipients-marker\r\n.\r\n")
        assert client.read_reply().code == 250
    [message] = find_queued(config, b"max-recipients-marker")
    assert message.recipients == ("r0@localhost", "r1@localhost", "r2@localhost")


def test_max_connections_per_ip(receiver_factory):
    config, _ = receiver_factory(receiver={"max_connections": 5, "max_connections_per_ip": 2})
    first = connect_when_free(config)
    second = connect_when_free(config)
    try:
        listen = config.receiver.listen
        with RawClient(listen.host, listen.port) as third:
            reply = third.read_reply()
            assert reply.code == R.S421_UNAVAILABLE.code
            assert third.sock.recv(100) == b""  # closed at once
        with connect(config, source="127.0.0.2") as other_ip:  # another client is not hurt
            assert other_ip.command("NOOP").code == 250
        assert first.command("QUIT").code == 221
        first.close()

        def slot_is_free():
            with RawClient(listen.host, listen.port) as again:
                return again.read_reply().code == 220

        wait_for(slot_is_free, what="the per-IP slot to come back")
    finally:
        first.close()
        second.close()


def test_bad_command_budget_ends_in_421_and_close(receiver_factory):
    config, _ = receiver_factory(receiver={"max_bad_commands": 3})
    with connect(config) as client:
        client.send(b"".join(b"XYZZY %d\r\n" % n for n in range(10)))
        replies = client.read_until_closed()
    codes = [reply.code for reply in replies]
    assert codes == [500, 500, 500, 500, 421], replies
    assert replies[-1].text == R.S421_TOO_MANY_ERRORS.format(hostname=config.hostname).text


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("l" * MAX_LOCAL_PART + "@localhost", 250),
        ("l" * (MAX_LOCAL_PART + 1) + "@localhost", 501),
        # <local@domain> exactly MAX_PATH octets with the brackets, then one more.
        ("l@" + "d" * (MAX_PATH - 4), 250),
        ("l@" + "d" * (MAX_PATH - 3), 501),
        ("l@" + "d" * 256, 501),  # domain over 255 (RFC 5321 §4.5.3.1.2)
        ("l@" + ".".join(["d" * 60] * 5), 501),
    ],
    ids=["local-64", "local-65", "path-256", "path-257", "domain-256", "domain-304"],
)
def test_address_length_limits(default_receiver, address, expected):
    config = default_receiver
    with connect(config) as client:
        assert client.command("EHLO client.example").code == 250
        assert client.command(f"MAIL FROM:<{address}>").code == expected
        assert client.command("RSET").code == 250
        assert client.command("MAIL FROM:<a@localhost>").code == 250
        assert client.command(f"RCPT TO:<{address}>").code == expected
        assert client.command(f"RCPT TO: {address}").code == expected  # without brackets


def test_idle_timeout_421(receiver_factory):
    config, _ = receiver_factory(receiver={"idle_timeout": 1.0})
    with connect(config) as client:
        started = time.monotonic()
        replies = client.read_until_closed()
    assert [r.code for r in replies] == [421]
    assert 1.0 <= time.monotonic() - started < 3.0


def test_one_megabyte_line_gets_500_and_the_session_goes_on(receiver_factory):
    config, _ = receiver_factory()
    with connect(config) as client:
        client.send(b"NOOP " + b"x" * (1024 * 1024) + b"\r\n")
        reply = client.read_reply()
        assert reply.code == R.S500_LINE_TOO_LONG.code
        assert client.command("NOOP").code == 250
        assert client.command("EHLO client.example").code == 250


def test_endless_line_keeps_memory_bounded(receiver_factory):
    """64 MiB without a line end: the receiver's peak RSS must not follow."""
    config, proc = receiver_factory()
    pid = proc.proc.pid
    with connect(config) as client:
        assert client.command("NOOP").code == 250
        before = peak_rss_kib(pid, reset=True)
        chunk = b"A" * (1024 * 1024)
        for _ in range(64):
            client.send(chunk)
        client.send(b"\r\n")
        assert client.read_reply().code == R.S500_LINE_TOO_LONG.code
        grown = peak_rss_kib(pid) - before
        assert client.command("NOOP").code == 250
    assert grown < 16 * 1024, f"peak RSS grew by {grown} KiB"


def test_five_slow_clients_do_not_lock_out_a_legitimate_one(receiver_factory):
    """max_connections = 5 slow clients: a real client gets in once the deadline hits."""
    deadline = 1.5
    config, _ = receiver_factory(
        receiver={"max_connections": 5, "session_deadline": deadline, "idle_timeout": 1.0}
    )
    listen = config.receiver.listen
    stop = threading.Event()
    slow = [connect_when_free(config) for _ in range(5)]
    started = time.monotonic()

    def trickle(client: RawClient) -> None:
        for _ in range(100):  # bounded: at most ~20 s
            if stop.wait(0.2):
                return
            try:
                client.send(b"X")
            except OSError:
                return

    threads = [threading.Thread(target=trickle, args=(c,), daemon=True) for c in slow]
    for thread in threads:
        thread.start()
    try:
        with RawClient(listen.host, listen.port) as locked_out:
            assert locked_out.read_reply().code == 421  # all five slots are taken

        def legit_client_gets_in():
            client = RawClient(listen.host, listen.port)
            if client.read_reply().code == 220:
                return client
            client.close()
            return None

        client = wait_for(legit_client_gets_in, timeout=deadline + 3, what="a free slot")
        waited = time.monotonic() - started
        with client:
            assert client.command("EHLO legit.example").code == 250
            reply = send_message(client, "a@localhost", ["b@localhost"],
                                 b"Subject: legit\r\n\r\nlegit-after-slow-marker\r\n")
            assert reply.code == 250
        assert waited < deadline + 2.0
        assert find_queued(config, b"legit-after-slow-marker")
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
        for client in slow:
            client.close()


def test_silent_clients_holding_every_slot_do_not_block_the_421(receiver_factory):
    """Connections beyond max_connections get 421 at once, even if others never speak."""
    config, _ = receiver_factory(receiver={"max_connections": 2})
    listen = config.receiver.listen

    def greeted_silent_client():
        client = RawClient(listen.host, listen.port, timeout=5)
        if client.read_reply().code == 220:
            return client
        client.close()  # the start-up probe's session may still hold its slot
        return None

    silent = [wait_for(greeted_silent_client, what="a slot") for _ in range(2)]
    try:
        for _ in range(5):
            started = time.monotonic()
            with RawClient(listen.host, listen.port, timeout=2) as extra:
                assert extra.read_reply().code == 421
            assert time.monotonic() - started < 1.0
    finally:
        for client in silent:
            client.close()


# ------------------------------------------------------------------ TLS and the slots


@pytest.fixture
def tls_files(tmp_path):
    return TestCA(tmp_path)


def test_plain_and_implicit_tls_listeners_share_max_connections(receiver_factory, tls_files):
    """SPEC §3: at most max_connections sessions in all, whatever the listener."""
    config, _ = receiver_factory(receiver={
        "max_connections": 1, "tls_cert": str(tls_files.cert_file),
        "tls_key": str(tls_files.key_file), "tls_listen": f"127.0.0.1:{free_port()}",
    })
    tls_listen = config.receiver.tls_listen

    def holder():
        client = RawClient(config.receiver.listen.host, config.receiver.listen.port)
        if client.read_reply().code == 220:
            return client
        client.close()  # the start-up probe's session may still hold the slot
        return None

    with wait_for(holder, what="the one slot"):
        with socket.create_connection((tls_listen.host, tls_listen.port), timeout=3) as sock:
            # Refused at once (421, then closed) instead of waiting for a ClientHello.
            assert sock.recv(100).startswith(b"421")


@pytest.mark.parametrize("where", ["implicit", "starttls"])
def test_a_stalled_tls_handshake_is_cut_at_the_session_deadline(
    receiver_factory, tls_files, where
):
    deadline = 1.5
    config, _ = receiver_factory(receiver={
        "max_connections": 1, "session_deadline": deadline, "idle_timeout": 10.0,
        "tls_cert": str(tls_files.cert_file), "tls_key": str(tls_files.key_file),
        "tls_listen": f"127.0.0.1:{free_port()}",
    })
    plain, implicit = config.receiver.listen, config.receiver.tls_listen
    context = tls_files.client_context()

    def staller():
        if where == "implicit":
            sock = socket.create_connection((implicit.host, implicit.port), timeout=5)
            sock.settimeout(0.3)
            try:  # refused (421) or silently waiting for our ClientHello?
                if sock.recv(100).startswith(b"421"):
                    sock.close()
                    return None
            except TimeoutError:
                return sock
            sock.close()
            return None
        client = RawClient(plain.host, plain.port)
        if client.read_reply().code != 220:
            client.close()
            return None
        assert client.command("EHLO client.example").code == 250
        assert client.command("STARTTLS").code == 220
        return client.sock  # ...and never start the handshake

    stalled = wait_for(staller, what="a stalled handshake holding the only slot")
    started = time.monotonic()
    try:
        def legit_gets_in():
            try:
                with socket.create_connection((implicit.host, implicit.port), timeout=5) as raw:
                    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                        return tls.recv(100).startswith(b"220")
            except (ssl.SSLError, OSError):
                return False

        wait_for(legit_gets_in, timeout=deadline + 5, what="the slot after the deadline")
        assert time.monotonic() - started < deadline + 2.0
    finally:
        stalled.close()


def _client_hello() -> bytes:
    """The first flight of a real TLS client, to be sent one byte at a time."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="x")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_a_trickled_client_hello_is_cut_at_the_session_deadline(receiver_factory, tls_files):
    deadline = 1.5
    config, _ = receiver_factory(receiver={
        "session_deadline": deadline, "idle_timeout": 10.0,
        "tls_cert": str(tls_files.cert_file), "tls_key": str(tls_files.key_file),
        "tls_listen": f"127.0.0.1:{free_port()}",
    })
    listen = config.receiver.tls_listen
    hello = _client_hello()
    assert len(hello) > 100  # at 0.1 s a byte: far longer than the deadline
    with socket.create_connection((listen.host, listen.port), timeout=5) as sock:
        started = time.monotonic()
        cut = False
        for byte in hello:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                cut = True
                break
            if time.monotonic() - started > deadline + 3:
                break
            readable = select.select([sock], [], [], 0.1)[0]
            if readable:
                try:
                    data = sock.recv(100)
                except ConnectionResetError:
                    data = b""
                if not data:
                    cut = True
                    break
        elapsed = time.monotonic() - started
    assert cut, "the server kept a trickled handshake past its deadline"
    assert elapsed < deadline + 2.0
