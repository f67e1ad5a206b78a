"""The socket shell in-process: what it does when the code behind it fails unexpectedly.

The queue here is a hand-written fake that raises a non-OSError (a bug, not a disk
problem): the real server must still answer what it owes and close with 421, never
drop the client silently. Everything else (session, sockets, slots) is real.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from services.receiver import replies as R
from services.receiver.pool import SlotPool
from services.receiver.server import ReceiverServer, ServerLimits
from services.receiver.session import SessionPolicy
from shared.config import ReceiverConfig
from shared.queue import QueueWriter


class ExplodingQueue:
    """Stands in for QueueWriter: every store is a bug."""

    def store(self, sender: str, recipients: list[str], data: object, *,
              queue_id: str | None = None) -> str:
        raise RuntimeError("boom")


@pytest.fixture
def server() -> Iterator[ReceiverServer]:
    srv = ReceiverServer(
        ("127.0.0.1", 0),
        policy=SessionPolicy(hostname="mailbag.test"),
        limits=ServerLimits(max_connections=2),
        queue=ExplodingQueue(),  # type: ignore[arg-type]
        relay_networks=ReceiverConfig().relay_networks,
    )
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    yield srv
    srv.begin_shutdown()
    srv.wait_for_sessions(5)
    thread.join(5)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def test_an_unexpected_error_is_answered_421_not_a_silent_drop(server: ReceiverServer) -> None:
    with socket.create_connection(server.server_address[:2], timeout=5) as sock:
        sock.recv(512)  # greeting
        sock.sendall(b"HELO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
        sock.sendall(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        replies = read_all(sock).decode()  # the server closes: recv returns b""
    codes = [line[:3] for line in replies.splitlines()]
    assert codes == ["250", "250", "250", "354", "421"]
    expected = R.S421_LOCAL_ERROR.format(hostname="mailbag.test").to_bytes(False).decode()
    assert replies.endswith(expected)
    # The slot came back: a new client is served.
    with socket.create_connection(server.server_address[:2], timeout=5) as sock:
        assert sock.recv(512).startswith(b"220 ")


def test_slot_pool_counts_all_clients_and_each_address() -> None:
    pool = SlotPool(max_connections=3, max_per_ip=2)
    assert pool.take("192.0.2.1") and pool.take("192.0.2.1")
    assert not pool.take("192.0.2.1")  # its two are taken
    assert pool.take("192.0.2.2")
    assert not pool.take("192.0.2.3")  # three in all
    pool.give_back("192.0.2.1")
    assert pool.take("192.0.2.3") and not pool.take("192.0.2.1")


def test_session_threads_outlive_their_sessions(tmp_path) -> None:
    """Twenty clients one after the other are served by the same thread or two."""
    srv = ReceiverServer(
        ("127.0.0.1", 0),
        policy=SessionPolicy(hostname="mailbag.test"),
        limits=ServerLimits(max_connections=2),
        queue=QueueWriter(tmp_path / "queue"),
        relay_networks=ReceiverConfig().relay_networks,
    )
    thread = threading.Thread(target=srv.serve_forever)
    thread.start()
    before = {t.ident for t in threading.enumerate()}
    try:
        for _ in range(20):
            with socket.create_connection(srv.server_address[:2], timeout=5) as sock:
                assert sock.recv(512).startswith(b"220 ")
                sock.sendall(b"QUIT\r\n")
                assert read_all(sock).startswith(b"221 ")
        started = {t.ident for t in threading.enumerate()} - before
        assert 1 <= len(started) <= 2 + 2  # max_connections + 2 at the most
    finally:
        srv.begin_shutdown()
        srv.wait_for_sessions(5)
        thread.join(5)


def test_a_reload_reaches_new_sessions_on_the_pooled_threads(tmp_path) -> None:
    """More connections after a reload are all served (the thread limit follows
    max_connections), and a new relay_networks applies to the next session."""
    limits = ServerLimits(max_connections=1)
    relay = ReceiverConfig().relay_networks
    srv = ReceiverServer(("127.0.0.1", 0), policy=SessionPolicy(hostname="mailbag.test"),
                         limits=limits, queue=QueueWriter(tmp_path / "queue"),
                         relay_networks=relay)
    thread = threading.Thread(target=srv.serve_forever)
    thread.start()
    clients = []
    try:
        with socket.create_connection(srv.server_address[:2], timeout=5) as sock:
            assert sock.recv(512).startswith(b"220 ")
            sock.sendall(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nQUIT\r\n")
            assert b"250 2.1.5" in read_all(sock)  # loopback may relay
        more = ServerLimits(max_connections=6)
        srv.slots.resize(6, 0)
        srv.reconfigure(policy=SessionPolicy(hostname="mailbag.test"), limits=more,
                        relay_networks=(), tls_context=None, check_password=None)
        for _ in range(6):
            clients.append(socket.create_connection(srv.server_address[:2], timeout=5))
        for sock in clients:  # each one greeted: a thread for every session
            assert sock.recv(512).startswith(b"220 ")
        clients[0].sendall(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
                           b"QUIT\r\n")
        assert b"554 5.7.1" in read_all(clients[0])  # no relay_networks any more
    finally:
        for sock in clients:
            sock.close()
        srv.begin_shutdown()
        srv.wait_for_sessions(5)
        thread.join(5)
