"""What production throws at the receiver, against a real process over loopback:
clients that reconnect at once, clients that trickle, messages of short lines, floods.

Each test drives the receiver past the point where it used to fail and checks what
a client and the operator see: the replies (imported from the code), the log, the
process's memory from /proc.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from services.receiver import replies as R
from shared.config import Config
from tests.hardening_support import (
    RawClient,
    connect_when_free,
    find_queued,
    log_text,
    peak_rss_kib,
    send_message,
    wait_for,
)

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _greeted_clients(config: Config, count: int) -> list[RawClient]:
    """`count` sessions that got their 220 (every slot of the start-up probe is back)."""
    return [connect_when_free(config) for _ in range(count)]


def _run_together(*jobs: Callable[[], None], timeout: float = 60) -> None:
    """Run each job in its own thread; re-raise the first failure here."""
    failures: list[BaseException] = []

    def run(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a client is still running"
    if failures:
        raise failures[0]


# ------------------------------------------------------------------ slots come back first


def test_clients_reconnecting_right_after_221_never_get_421(receiver_factory):
    """A client that saw 221 and the close may reconnect at once (Postfix does): the
    slot of the session it quit is already free."""
    config, _ = receiver_factory(receiver={"max_connections": 5})
    listen = config.receiver.listen
    clients = _greeted_clients(config, 5)
    sessions, refused, lock = [0], [], threading.Lock()
    total = 300

    def reconnect_loop(client: RawClient) -> None:
        while True:
            assert client.command("QUIT").code == 221
            assert client.sock.recv(64) == b""  # the close
            client.close()
            with lock:
                if sessions[0] >= total:
                    return
                sessions[0] += 1
            while True:
                client = RawClient(listen.host, listen.port, timeout=5)
                greeting = client.read_reply()
                if greeting.code == 220:
                    break
                refused.append(greeting)
                client.close()

    _run_together(*(lambda c=c: reconnect_loop(c) for c in clients))
    assert sessions[0] == total
    assert refused == [], f"{len(refused)} reconnects of {total} were refused"


# ------------------------------------------------------------------ one line, one deadline


def _trickle_until_closed(client: RawClient, started: float, limit: float) -> tuple[float, bytes]:
    """Send one byte a second (never a line end) until the server closes; when it did
    (seconds after `started`) and what it said."""
    said = b""
    client.sock.setblocking(False)
    next_byte = time.monotonic()
    while time.monotonic() - started < limit:
        if time.monotonic() >= next_byte:
            try:
                client.sock.send(b"x")
            except OSError:
                break
            next_byte += 1.0
        if select.select([client.sock], [], [], 0.05)[0]:
            try:
                chunk = client.sock.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            said += chunk
    return time.monotonic() - started, said


def test_five_clients_trickling_a_byte_a_second_are_cut_at_idle_timeout(receiver_factory):
    """idle_timeout bounds one whole line, counted from when the server waits for it:
    a byte a second never completes one. Three trickle a command, two a DATA line."""
    idle_timeout = 3.0
    config, _ = receiver_factory(receiver={
        "max_connections": 5, "idle_timeout": idle_timeout, "session_deadline": 60})
    listen = config.receiver.listen
    clients = _greeted_clients(config, 5)
    for client in clients:
        assert client.command("EHLO slow.example").code == 250
    for client in clients[3:]:
        assert client.command("MAIL FROM:<a@localhost>").code == 250
        assert client.command("RCPT TO:<b@localhost>").code == 250
        assert client.command("DATA").code == 354
    started = time.monotonic()
    results: list[tuple[float, bytes]] = [(0.0, b"")] * 5

    def trickle(index: int) -> None:
        results[index] = _trickle_until_closed(clients[index], started, idle_timeout + 6)

    threads = [threading.Thread(target=trickle, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        with RawClient(listen.host, listen.port) as sixth:  # every slot is taken...
            assert sixth.read_reply().code == R.S421_UNAVAILABLE.code
        for thread in threads:
            thread.join(idle_timeout + 8)
        timeout_reply = R.S421_TIMEOUT.format(hostname=config.hostname).to_bytes()
        for closed_after, said in results:
            assert said == timeout_reply, said
            assert idle_timeout - 0.1 <= closed_after < idle_timeout + 1.5, closed_after
        with RawClient(listen.host, listen.port) as sixth:  # ...and now one is free
            assert sixth.read_reply().code == 220
    finally:
        for client in clients:
            client.close()
    assert find_queued(config, b"x") == []


def test_a_client_sending_whole_lines_slowly_is_cut_at_the_session_deadline(receiver_factory):
    """Each line within idle_timeout, the session past session_deadline: 421 then."""
    deadline = 1.5
    config, _ = receiver_factory(receiver={"session_deadline": deadline, "idle_timeout": 1.0})
    with connect_when_free(config) as client:
        assert client.command("EHLO slow.example").code == 250
        started = time.monotonic()
        replies = []
        while time.monotonic() - started < deadline + 3:
            try:
                replies.append(client.command("NOOP"))
            except (ConnectionError, TimeoutError):
                break
            if replies[-1].code != 250:
                break
            time.sleep(0.3)
        elapsed = time.monotonic() - started
    assert replies[-1] == R.S421_TIMEOUT.format(hostname=config.hostname)
    assert deadline <= elapsed < deadline + 1.5


# ------------------------------------------------------------------ memory


def _short_lines_message(size: int, marker: bytes) -> bytes:
    """`size` bytes of data: a header, then lines of 'ab' (the worst case per byte)."""
    head = b"Subject: short lines\r\nX-Marker: " + marker + b"\r\n\r\n"
    return head + b"ab\r\n" * ((size - len(head)) // 4)


def test_peak_memory_follows_the_messages_in_flight_not_their_line_count(receiver_factory):
    """Three 10 MiB messages of 2-octet lines at once: the receiver's peak RSS grows by
    less than twice the bytes in flight plus a fixed allowance (the lines are checked
    as they stream, not split into a list)."""
    config, proc = receiver_factory(receiver={"max_connections": 5})
    pid = proc.proc.pid
    size = config.receiver.max_message_bytes - 1024
    clients = _greeted_clients(config, 3)
    for client in clients:
        assert client.command("EHLO big.example").code == 250
    before = peak_rss_kib(pid, reset=True)
    replies = []

    def send(index: int) -> None:
        body = _short_lines_message(size, b"short-lines-%d" % index)
        replies.append(send_message(clients[index], "a@localhost", ["b@localhost"], body))

    _run_together(*(lambda n=n: send(n) for n in range(3)))
    grown_mib = (peak_rss_kib(pid) - before) / 1024
    for client in clients:
        client.close()
    assert [reply.code for reply in replies] == [250, 250, 250]
    in_flight_mib = 3 * size / MIB
    assert grown_mib < 2 * in_flight_mib + 8, f"peak RSS grew by {grown_mib:.0f} MiB"


def test_memory_returns_near_idle_after_a_hostile_burst(receiver_factory):
    """2 MB lines, 10k recipients, 200 connections at once, big messages: afterwards
    the resident size is back near what it was when idle."""
    config, proc = receiver_factory(receiver={"max_connections": 20})
    pid = proc.proc.pid
    listen = config.receiver.listen
    with connect_when_free(config) as warm:  # one ordinary session first: code paths paged in
        assert warm.command("EHLO warm.example").code == 250
        assert send_message(warm, "a@localhost", ["b@localhost"], b"warm\r\n").code == 250
        assert warm.command("QUIT").code == 221
    time.sleep(0.3)
    idle_kib = _rss_kib(pid)

    def long_lines() -> None:
        with connect_when_free(config) as client:
            assert client.command("EHLO long.example").code == 250
            client.send(b"NOOP " + b"y" * (2 * MIB) + b"\r\n")
            assert client.read_reply() == R.S500_LINE_TOO_LONG
            body = b"Subject: long\r\n\r\n" + b"z" * (2 * MIB) + b"\r\n"
            assert send_message(client, "a@localhost", ["b@localhost"], body) == (
                R.S554_LINE_TOO_LONG)

    def many_recipients() -> None:
        with connect_when_free(config) as client:
            try:  # the server closes (421, too many errors) while this is still sent
                client.send(b"EHLO many.example\r\nMAIL FROM:<a@localhost>\r\n" + b"".join(
                    b"RCPT TO:<r%d@localhost>\r\n" % n for n in range(10_000)))
            except OSError:
                pass
            replies = client.read_until_closed()
        assert replies[-1].code == 421, replies[-3:]

    def big_message(index: int) -> None:
        with connect_when_free(config) as client:
            assert client.command("EHLO big.example").code == 250
            body = _short_lines_message(4 * MIB, b"burst-%d" % index)
            assert send_message(client, "a@localhost", ["b@localhost"], body).code == 250

    def connection_storm() -> None:
        sockets = []
        for _ in range(200):
            try:
                sockets.append(socket.create_connection((listen.host, listen.port), timeout=5))
            except OSError:
                break
        for sock in sockets:
            sock.close()

    _run_together(long_lines, many_recipients, connection_storm,
                  *(lambda n=n: big_message(n) for n in range(3)))
    assert len(find_queued(config, b"burst-")) == 3

    def settled() -> int | None:
        rss = _rss_kib(pid)
        return rss if rss < idle_kib + 6 * 1024 else None

    wait_for(settled, timeout=5, what=f"RSS back near idle ({idle_kib} KiB): {_rss_kib(pid)}")


# ------------------------------------------------------------------ the log and the budget


def test_repeated_rejections_are_one_summary_line_and_count_toward_the_budget(
        receiver_factory):
    """452 too many recipients, over and over: a handful of log lines, not one per
    RCPT; past the recipient overshoot they count as bad commands and end in 421."""
    config, _ = receiver_factory(receiver={"max_recipients": 3, "max_bad_commands": 5})
    with connect_when_free(config) as client:
        client.send(b"EHLO flood.example\r\nMAIL FROM:<a@localhost>\r\n"
                    + b"".join(b"RCPT TO:<r%d@localhost>\r\n" % n for n in range(1000)))
        replies = client.read_until_closed()
    codes = [reply.code for reply in replies]
    # 3 accepted, 3 more 452s (the overshoot allowed), then each 452 is a bad command.
    assert codes == [250, 250] + [250] * 3 + [452] * 3 + [452] * 6 + [421], codes
    assert replies[-1] == R.S421_TOO_MANY_ERRORS.format(hostname=config.hostname)
    lines = [line for line in log_text(config).splitlines() if " reject " in line]
    # The first 452 as it happened, the 421, and at the close one summary of the rest.
    assert len(lines) == 3, lines
    assert [line for line in lines if "repeated=" in line and "452" in line] == [lines[-1]]
    assert "repeated=8" in lines[-1]
