"""Real relays for the sender's tests (aiosmtpd on a free loopback port, smtp-sink), and
a runner on a real queue with a fake clock (`Setup`, the `setup` fixture).

`RecordingHandler` records every envelope and the exact content aiosmtpd received,
and counts QUITs; replies for RCPT/DATA can be scripted per test (4xx, 5xx).
"""

from __future__ import annotations

import asyncio
import getpass
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from prometheus_client import CollectorRegistry

from services.sender.app import build_relays
from services.sender.runner import QueueRunner
from shared.config import load_config
from shared.dkim import DkimSigner
from shared.log import EventLog
from shared.metrics.counting import CountingSenderFigures
from shared.metrics.figures import SenderFigures
from shared.queue import QueueFile, QueueReader, QueueWriter
from tests.support import free_port, write_config

SMTP_SINK = "/usr/sbin/smtp-sink"


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]
    tls: bool = False


@dataclass
class RecordingHandler:
    """aiosmtpd handler: records messages; scripted replies per recipient or for DATA."""

    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    data_delay: float = 0.0  # seconds handle_DATA waits before answering
    in_data: threading.Event = field(default_factory=threading.Event)
    messages: list[Received] = field(default_factory=list)
    quits: int = 0
    sessions_with_mail: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.in_data.set()
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.data_reply:
            return self.data_reply
        with self.lock:
            self.messages.append(
                Received(envelope.mail_from, list(envelope.rcpt_tos),
                         bytes(envelope.original_content), list(envelope.mail_options),
                         tls=server.transport.get_extra_info("ssl_object") is not None)
            )
        return "250 2.0.0 Message accepted for delivery"

    async def handle_QUIT(self, server, session, envelope):  # noqa: N802
        with self.lock:
            self.quits += 1
        return "221 Bye"

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.02)
        raise AssertionError(f"relay got {len(self.messages)} messages, expected {count}")

    def wait_quits(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.quits < count:
            time.sleep(0.02)
        assert self.quits >= count, f"relay saw {self.quits} QUITs, expected {count}"


def authenticator(users: dict[str, str]) -> Callable:
    def check(server, session, envelope, mechanism, auth_data) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and users.get(
            auth_data.login.decode()
        ) == auth_data.password.decode()
        return AuthResult(success=ok, handled=False)

    return check


class Relay:
    """An aiosmtpd relay on 127.0.0.1:<free port>; `start()`/`stop()` may repeat."""

    def __init__(self, handler: RecordingHandler | None = None, **smtp_kwargs) -> None:
        self.handler = handler or RecordingHandler()
        self.port = free_port()
        self.smtp_kwargs = smtp_kwargs
        self.controller: Controller | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Relay:
        kwargs = dict(self.smtp_kwargs)
        self.controller = Controller(
            self.handler, hostname="127.0.0.1", port=self.port,
            server_hostname="relay.test", **kwargs
        )
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


class SmtpSink:
    """Postfix's smtp-sink on a free port, dumping every message to a folder."""

    def __init__(self, folder: Path, extra: tuple[str, ...] = (), *,
                 one_file: bool = False) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.extra = extra
        # one_file: every message appended to one dump file (`-D`), which keeps up
        # with a fast sender; else one file per message (`-d`).
        self.dump = ["-D", str(folder / "all")] if one_file else ["-d", str(folder) + "/%M."]
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which(SMTP_SINK) is not None or Path(SMTP_SINK).exists()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> SmtpSink:
        # -u (required as root): the user to run as.
        user = ["-u", getpass.getuser()] if os.geteuid() == 0 else []
        command = [SMTP_SINK, *user, *self.dump, *self.extra, f"127.0.0.1:{self.port}", "100"]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("smtp-sink did not start")

    def dumps(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)
            if self.proc.stderr:
                self.proc.stderr.close()


class LoopbackRelay:
    """A hand-written SMTP peer on 127.0.0.1: one session at a time on its own thread.

    Subclasses answer a session in `session(conn)`; an OSError there ends the session.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.listener.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    self.session(conn)
                except OSError:
                    pass

    def session(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def lines(self, conn: socket.socket) -> Iterator[bytes]:
        """The client's lines without their CRLF, as they arrive, until it closes."""
        buffer = b""
        while not self.stop.is_set():
            chunk = conn.recv(65536)
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                yield line.rstrip(b"\r")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


class PipeliningRelay(LoopbackRelay):
    """A small SMTP server that offers PIPELINING (RFC 2920) and answers each command
    as it reads it, however the client batched them; one session at a time.

    The reply to a message's final dot is chosen by its content: a line
    `X-Reply: 451 ...` makes the dot get that reply (421 also closes the session).
    Records every message's envelope and data, and each session's verbs.
    """

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes, bytes]] = []  # from, to, data, reply
        self.sessions: list[list[bytes]] = []
        self.lock = threading.Lock()
        super().__init__()

    def session(self, conn: socket.socket) -> None:
        verbs: list[bytes] = []
        with self.lock:
            self.sessions.append(verbs)
        self._session(conn, verbs)

    def _session(self, conn: socket.socket, verbs: list[bytes]) -> None:
        conn.sendall(b"220 pipe.test ESMTP\r\n")
        data: list[bytes] | None = None
        sender, rcpts = "", []
        for line in self.lines(conn):
            if data is not None:  # inside DATA
                if line != b".":
                    data.append(line[1:] if line.startswith(b".") else line)
                    continue
                body = b"".join(part + b"\r\n" for part in data)
                reply = b"250 2.0.0 queued\r\n"
                for header in data:
                    if header.startswith(b"X-Reply: "):
                        reply = header[len(b"X-Reply: "):] + b"\r\n"
                with self.lock:
                    self.messages.append((sender, rcpts, body, reply[:3]))
                conn.sendall(reply)
                data = None
                if reply.startswith(b"421"):  # RFC 5321 §3.8: close after it; drain
                    conn.shutdown(socket.SHUT_WR)  # what is in flight (no RST)
                    while conn.recv(65536):
                        pass
                    return
                continue
            verb = line.split(b" ")[0].split(b":")[0].upper()
            verbs.append(verb)
            if verb == b"EHLO":
                conn.sendall(b"250-pipe.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                sender, rcpts = line.decode().split("<", 1)[1].split(">")[0], []
                conn.sendall(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                rcpts.append(line.decode().split("<", 1)[1].split(">")[0])
                conn.sendall(b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                data = []
                conn.sendall(b"354 go ahead\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:
                conn.sendall(b"250 ok\r\n")


class FakeClock:
    """The runner's clock: moved by the test, or by a relay in the middle of an exchange."""

    def __init__(self, now: float = 1e9) -> None:
        self.now = now
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def set(self, now: float) -> None:
        with self.lock:
            self.now = now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


class Setup:
    """A config, a queue writer (the receiver's side) and a runner on it."""

    def __init__(self, folder: Path, relay_address: str | list[str] | None,
                 sections: dict | None = None, **sender) -> None:
        values = {"retry_initial": 10, "retry_max": 40, "max_queue_lifetime": 1000,
                  "poll_interval": 60, "relay": relay_address or "", **sender}
        self.config = load_config(write_config(folder, sender=values, **(sections or {})))
        self.writer = QueueWriter(self.config.queue.dir)
        self.reader = QueueReader(self.config.queue.dir, self.config.queue.failed,
                                  self.config.queue.quarantine)
        assert self.reader.try_lock()  # the runner delivers only as the queue's owner
        self.clock = FakeClock()
        self.stop = threading.Event()
        self.figures: SenderFigures | None = None
        self.runner = self.make_runner()
        self.runner.settler.load_states()

    def make_runner(self) -> QueueRunner:
        log = EventLog("S-SMTP", "-")
        return QueueRunner(self.config, self.reader, log, clock=self.clock, stop=self.stop,
                           relays=build_relays(self.config, log, self.stop),
                           signer=DkimSigner.from_config(self.config.dkim),
                           figures=self.figures)

    def count(self) -> CollectorRegistry:
        """From now on the runner counts its figures into the registry returned."""
        registry = CollectorRegistry()
        self.figures = CountingSenderFigures(registry)
        self.runner = self.make_runner()
        self.runner.settler.load_states()
        return registry

    def use_real_clock(self) -> None:
        """From now on the runner lives in real time (failover, rate limits)."""
        self.clock = time.time  # type: ignore[assignment]
        self.runner = self.make_runner()
        self.runner.settler.load_states()

    def pass_at(self, now: float) -> bool:
        """One pass that starts at `now` (the clock may move on during it)."""
        self.clock.set(now)
        return self.runner.run_pass()

    @property
    def relay_state(self):
        return self.runner.relays.routes[0].state

    def queued(self) -> list[str]:
        """The messages queued, but the notices the runner queued itself (from <>)."""
        return [name for name in self.all_queued() if name not in self.notices()]

    def all_queued(self) -> list[str]:
        return [e.name for e in self.reader.scan().ready]

    def notices(self) -> dict[str, QueueFile]:
        """The delivery status notices queued (null sender), by id."""
        found = {}
        for name in self.all_queued():
            try:
                message = QueueFile.from_bytes(self.queue_file(name))
            except (OSError, ValueError):
                continue
            if message.sender == "":
                found[name] = message
        return found

    def queue_file(self, name: str) -> bytes:
        return (self.config.queue.dir / name).read_bytes()

    def failed(self) -> list[str]:
        return sorted(p.name for p in self.config.queue.failed.iterdir())

    def close(self) -> None:
        self.runner.close_relay()
        self.reader.close()
