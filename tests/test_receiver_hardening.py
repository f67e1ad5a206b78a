"""What production throws at the receiver, against a real process over loopback:
clients that reconnect at once, clients that trickle, messages of short lines, floods.

Each test drives the receiver past the point where it used to fail and checks what
a client and the operator see: the replies (imported from the code), the log, the
process's memory from /proc.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.config import Config
from tests.hardening_support import (
    RawClient,
    connect_when_free,
    peak_rss_kib,
    send_message,
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
