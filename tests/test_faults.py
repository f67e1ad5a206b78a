"""No lost mail under faults (issue 5 §5, SPEC §6), with real processes.

- `kill -9` of the receiver while several smtplib clients send: every 250 is a
  complete, parseable file in queue.dir; nothing partial is visible; after a restart
  the `.tmp` leftovers are gone and mail is accepted again.
- A full disk (the queue on a 256 KiB tmpfs): 452 4.3.1, no partial file, the session
  and the server go on, and mail is accepted again once space is freed.
- Start-up faults (unusable queue folder, missing TLS key, unreadable users file):
  one clear line on stderr, exit status 2, no traceback.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from services.receiver import replies as R
from shared.config import load_config
from shared.queue import TMP_DIRNAME, QueueFile
from tests.hardening_support import connect, ready_files, send_message, wait_for
from tests.support import (
    REPO,
    MailbagProcess,
    TestCA,
    free_port,
    tiny_tmpfs,
    wait_for_banner,
    write_config,
)
from tests.trace_support import assert_as_sent, is_as_sent

pytestmark = pytest.mark.e2e

QUEUED_AS = re.compile(r"queued as (\S+)")


# ------------------------------------------------------------------ kill -9


def _body(client: int, number: int) -> bytes:
    """A message of varying size (up to ~200 KB) so that kills land inside writes."""
    filler = (b"%d-%d " % (client, number)) * (1 + (number * 7919) % 20000)
    lines = [filler[i:i + 900] for i in range(0, len(filler), 900)]
    return (b"Subject: kill test %d/%d\r\n\r\n" % (client, number)
            + b"\r\n".join(lines) + b"\r\n")


def test_kill_9_during_concurrent_sends_loses_nothing_acknowledged(receiver_factory):
    config, proc = receiver_factory(receiver={"max_connections": 10})
    listen = config.receiver.listen
    acked: dict[str, bytes] = {}  # queue id -> data, for every 250 a client saw
    lock = threading.Lock()
    stop = threading.Event()

    def client(number: int) -> None:
        try:
            with smtplib.SMTP(listen.host, listen.port, timeout=10) as smtp:
                smtp.ehlo(f"client{number}.example")
                for n in range(200):  # bounded; the kill ends it much earlier
                    if stop.is_set():
                        return
                    body = _body(number, n)
                    smtp.mail(f"c{number}@localhost")
                    smtp.rcpt(f"r{n}@localhost")
                    code, text = smtp.data(body)
                    if code == 250:
                        queue_id = QUEUED_AS.search(text.decode()).group(1)
                        with lock:
                            acked[queue_id] = body
        except (smtplib.SMTPException, OSError):
            return  # the server died under us: expected

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(acked) >= 24, timeout=20, what="24 acknowledged messages")
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(10)
    stop.set()
    for thread in threads:
        thread.join(15)
        assert not thread.is_alive()

    queue_dir = config.queue.dir
    with lock:
        snapshot = dict(acked)
    for queue_id, body in snapshot.items():
        message = QueueFile.from_bytes((queue_dir / queue_id).read_bytes())
        assert_as_sent(message.data, body, queue_id=queue_id)
        assert len(message.recipients) == 1
    # Nothing partial is visible: every ready file is complete (acked or not).
    sent_bodies = {(c, n): _body(c, n) for c in range(4) for n in range(200)}
    for path in ready_files(queue_dir):
        message = QueueFile.from_bytes(path.read_bytes())
        assert any(is_as_sent(message.data, body) for body in sent_bodies.values()), (
            f"partial file {path.name}")

    # A crash mid-write leaves .tmp files; a restart removes those an hour old (a
    # younger one may be a submission being written) and serves again.
    leftover = queue_dir / TMP_DIRNAME / "0000-leftover"
    leftover.write_bytes(b"From: <x@localhost>\n")
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    restarted = MailbagProcess("receiver", config.path).start()
    try:
        wait_for_banner(listen.host, listen.port)
        assert not leftover.exists()
        with connect(config) as again:
            assert again.command("EHLO back.example").code == 250
            reply = send_message(again, "a@localhost", ["b@localhost"],
                                 b"Subject: after restart\r\n\r\nafter-restart\r\n")
            assert reply.code == 250
    finally:
        assert restarted.stop() == 0


# ------------------------------------------------------------------ full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs; skipped where mounting is not permitted."""
    with tiny_tmpfs(tmp_path / "small", "256k") as mount_point:
        yield mount_point


def test_full_disk_452_no_partial_file_and_recovery(tmp_path, small_disk):
    path = write_config(tmp_path, queue={"dir": str(small_disk / "queue")})
    config = load_config(path)
    proc = MailbagProcess("receiver", path).start()
    try:
        wait_for_banner(config.receiver.listen.host, config.receiver.listen.port)
        big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 150  # ~150 KB
        with connect(config) as client:
            assert client.command("EHLO client.example").code == 250
            assert send_message(client, "a@localhost", ["b@localhost"], big).code == 250
            reply = send_message(client, "a@localhost", ["b@localhost"], big)
            assert (reply.code, reply.enhanced) == (R.S452_NO_SPACE.code, "4.3.1"), reply
            assert list((config.queue.dir / TMP_DIRNAME).iterdir()) == []  # no partial
            assert len(ready_files(config.queue.dir)) == 1
            # The session goes on: a small message still fits.
            assert client.command("NOOP").code == 250
            small = b"Subject: small\r\n\r\nsmall\r\n"
            assert send_message(client, "a@localhost", ["b@localhost"], small).code == 250
            # Free space (the sender took a message): the big one is accepted again.
            first = next(p for p in ready_files(config.queue.dir)
                         if is_as_sent(QueueFile.from_bytes(p.read_bytes()).data, big))
            first.unlink()
            assert send_message(client, "a@localhost", ["b@localhost"], big).code == 250
        for ready in ready_files(config.queue.dir):
            data = QueueFile.from_bytes(ready.read_bytes()).data
            assert is_as_sent(data, big) or is_as_sent(data, small)
        with connect(config) as other:  # and the server serves new sessions
            assert other.command("NOOP").code == 250
    finally:
        assert proc.stop() == 0


# ------------------------------------------------------------------ start-up faults


def _start_fails(tmp_path: Path, **sections) -> str:
    """Run the receiver with this config; it must exit 2 with ONE stderr line."""
    path = write_config(tmp_path, **sections)
    result = subprocess.run(
        [sys.executable, "-m", "services.receiver", "--config", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("receiver: error: ") or "error" in lines[0], lines[0]
    return lines[0]


def test_queue_dir_under_a_regular_file(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    line = _start_fails(tmp_path, queue={"dir": str(blocker / "queue")})
    assert "queue" in line and str(blocker) in line


def test_queue_dir_on_a_read_only_filesystem(tmp_path):
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs",
                             str(mount_point)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        line = _start_fails(tmp_path, queue={"dir": str(mount_point / "queue")})
        assert "queue" in line and "Read-only" in line
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_missing_tls_key(tmp_path):
    ca = TestCA(tmp_path)
    missing = tmp_path / "no-such-key.pem"
    line = _start_fails(tmp_path, receiver={"tls_cert": str(ca.cert_file),
                                            "tls_key": str(missing)})
    assert str(missing) in line


def test_tls_key_that_is_not_a_key(tmp_path):
    ca = TestCA(tmp_path)
    junk = tmp_path / "junk.pem"
    junk.write_text("this is not a key\n")
    line = _start_fails(tmp_path, receiver={"tls_cert": str(ca.cert_file), "tls_key": str(junk)})
    assert "TLS" in line


@pytest.mark.parametrize("kind", ["missing", "directory", "malformed", "bad-numbers"])
def test_unreadable_users_file(tmp_path, kind):
    users = tmp_path / "users"
    if kind == "directory":
        users.mkdir()
    elif kind == "malformed":
        users.write_text("alice:plaintext-password\n")
    elif kind == "bad-numbers":  # the right shape, but it would crash at the first AUTH
        users.write_text("alice:scrypt$lots$8$1$c2FsdA==$aGFzaA==\n")
    ca = TestCA(tmp_path)
    line = _start_fails(tmp_path, receiver={"tls_cert": str(ca.cert_file),
                                            "tls_key": str(ca.key_file),
                                            "users_file": str(users)})
    assert "users file" in line and str(users) in line


def test_listen_port_in_use(tmp_path):
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        line = _start_fails(tmp_path, receiver={"listen": f"127.0.0.1:{port}"})
    assert str(port) in line
