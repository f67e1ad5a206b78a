"""Helpers for the hardening tests (issue 5): a raw SMTP line client, a test CA, the queue.

The raw client exists because smtplib refuses to send what an attacker sends (bare
CR/LF, NULs, pipelined STARTTLS); it speaks bytes and parses replies with the
product's own `ReplyParser`, and every wait is bounded by a socket timeout.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from shared.config import Config, load_config
from shared.queue import QueueFile
from shared.smtp import Reply, ReplyParser
from tests.support import REPO, MailbagProcess, wait_for_banner, write_config

TIMEOUT = 10.0  # seconds any single read may take before the test fails


class RawClient:
    """An SMTP client that writes exactly the bytes it is given."""

    def __init__(
        self, host: str, port: int, *, source: str | None = None, timeout: float = TIMEOUT
    ) -> None:
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.parser = ReplyParser()
        self.replies: list[Reply] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self) -> Reply:
        """The next complete reply; raises TimeoutError/ConnectionError if none comes."""
        while not self.replies:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.replies.extend(self.parser.feed(data))
        return self.replies.pop(0)

    def command(self, line: bytes | str) -> Reply:
        raw = line.encode() if isinstance(line, str) else line
        self.send(raw + b"\r\n")
        return self.read_reply()

    def read_until_closed(self) -> list[Reply]:
        """Every reply still to come, until the server closes (bounded by the timeout)."""
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            self.replies.extend(self.parser.feed(data))
        replies, self.replies = self.replies, []
        return replies

    def starttls(self, context: ssl.SSLContext, server_hostname: str = "127.0.0.1") -> None:
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        self.parser = ReplyParser()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(config: Config, **kwargs) -> RawClient:
    listen = config.receiver.listen
    client = RawClient(listen.host, listen.port, **kwargs)
    greeting = client.read_reply()
    assert greeting.code == 220, greeting
    return client


def connect_when_free(config: Config, **kwargs) -> RawClient:
    """Connect, retrying while the server answers 421 (e.g. the start-up probe's
    session has not given its slot back yet); bounded by wait_for."""

    def attempt() -> RawClient | None:
        listen = config.receiver.listen
        client = RawClient(listen.host, listen.port, **kwargs)
        if client.read_reply().code == 220:
            return client
        client.close()
        return None

    return wait_for(attempt, what="a free session slot")  # type: ignore[return-value]


def queued(config: Config) -> list[QueueFile]:
    """Every ready message in queue.dir, parsed (a partial file fails the test)."""
    return [QueueFile.from_bytes(path.read_bytes()) for path in ready_files(config.queue.dir)]


def ready_files(queue_dir: Path) -> list[Path]:
    return sorted(p for p in Path(queue_dir).iterdir() if not p.name.startswith("."))


def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "") -> object:
    """Poll `condition` until it is true (bounded); the value it returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or condition}")


def log_text(config: Config) -> str:
    path = config.log.file
    return path.read_text(errors="replace") if path.exists() else ""


def peak_rss_kib(pid: int, reset: bool = False) -> int:
    """The process's peak resident set size (VmHWM); `reset` starts a new peak first."""
    if reset:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak RSS
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


def add_user(users_file: Path, name: str, password: str) -> None:
    """Add a user with the product's own command, as an operator would."""
    result = subprocess.run(
        [sys.executable, "-m", "services.receiver.users", str(users_file), name],
        input=password + "\n", capture_output=True, text=True, cwd=REPO, timeout=30,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stderr


def start_receiver(folder: Path, **sections) -> tuple[Config, MailbagProcess]:
    """A real receiver with this config in `folder`; the caller stops it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = write_config(folder, **sections)
    config = load_config(path)
    proc = MailbagProcess("receiver", path).start()
    try:
        wait_for_banner(config.receiver.listen.host, config.receiver.listen.port)
    except TimeoutError:
        proc.stop()
        raise AssertionError(f"receiver did not start: {proc.stderr_text()}") from None
    return config, proc


def find_queued(config: Config, marker: bytes) -> list[QueueFile]:
    """The queued messages whose data holds `marker`."""
    return [message for message in queued(config) if marker in message.data]


def send_message(client: RawClient, sender: str, recipients: list[str], body: bytes) -> Reply:
    """MAIL, RCPT each, DATA, body (already CRLF, without the final dot): the last reply."""
    assert client.command(f"MAIL FROM:<{sender}>").code == 250
    for rcpt in recipients:
        reply = client.command(f"RCPT TO:<{rcpt}>")
        assert reply.code == 250, reply
    assert client.command("DATA").code == 354
    client.send(body + b".\r\n")
    return client.read_reply()
