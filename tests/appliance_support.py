"""A private, real instance of the appliance: supervisord from the repository's own file.

`supervisord.conf` names every path through `%(here)s` (the folder of the file as
given, symlinks not resolved). So a private instance is a folder that holds a
symlink to the repository's `supervisord.conf` (the very file `make run` uses, not a
copy), symlinks to `.venv`, `services` and `shared`, its own `var/`, and a test
`mailbag.toml` with private ports whose queue, mailboxes and logfile are under that
`var/`. supervisord is started exactly as `make run` starts it (it daemonizes), with
`MAILBAG_CONFIG` in its environment, which its children inherit.

Every wait is bounded; teardown shuts supervisord down and kills whatever survived.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from supervisor.xmlrpc import SupervisorTransport

from shared.config import Config, load_config
from tests.support import REPO, free_port, write_config

SUPERVISORD = REPO / ".venv" / "bin" / "supervisord"
SUPERVISORCTL = REPO / ".venv" / "bin" / "supervisorctl"
LINKED = (".venv", "services", "shared")


def wait_until(condition: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purpose (its parent has not reaped it yet).
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Appliance:
    """supervisord + receiver + sender in a private folder (short path: unix socket limit)."""

    def __init__(self, **sections: dict[str, Any]) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="mbsv-"))
        try:
            for name in LINKED:
                (self.home / name).symlink_to(REPO / name)
            self.conf = self.home / "supervisord.conf"
            self.conf.symlink_to(REPO / "supervisord.conf")
            (self.home / "var" / "log").mkdir(parents=True)
            self.config_path = write_config(self.home, **sections)
            self.config: Config = load_config(self.config_path)
        except BaseException:
            shutil.rmtree(self.home, ignore_errors=True)
            raise
        self.var = self.home / "var"
        self.pidfile = self.var / "supervisord.pid"
        self.socket_path = self.var / "supervisor.sock"
        self.supervisord_pid: int | None = None
        self.seen_pids: set[int] = set()

    # -- supervisord ---------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> Appliance:
        """`supervisord -c supervisord.conf` as make run does it; returns once it serves."""
        env = {**os.environ, "MAILBAG_CONFIG": str(self.config_path)}
        done = subprocess.run(
            [str(SUPERVISORD), "-c", str(self.conf)],
            env=env, cwd=self.home, capture_output=True, timeout=timeout,
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        self.supervisord_pid = int(
            wait_until(lambda: self._read_pidfile(), timeout, "supervisord's pidfile")
        )
        wait_until(lambda: self.ctl("pid").returncode == 0, timeout, "supervisord's socket")
        return self

    def _read_pidfile(self) -> str | None:
        try:
            text = self.pidfile.read_text().strip()
        except FileNotFoundError:
            return None
        return text or None

    def ctl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run `supervisorctl -c supervisord.conf ARGS...` against this instance."""
        return subprocess.run(
            [str(SUPERVISORCTL), "-c", str(self.conf), *args],
            cwd=self.home, capture_output=True, text=True, timeout=timeout,
        )

    def rpc(self) -> Any:
        """supervisord's XML-RPC interface over the instance's unix socket."""
        transport = SupervisorTransport(None, None, f"unix://{self.socket_path}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def info(self, program: str) -> dict[str, Any]:
        info = self.rpc().getProcessInfo(program)
        if info["pid"]:
            self.seen_pids.add(info["pid"])
        return info

    def wait_state(self, program: str, *states: str, timeout: float = 15.0) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            info = self.info(program)
            return info if info["statename"] in states else None

        return wait_until(reached, timeout, f"{program} in state {'/'.join(states)}")

    def wait_running(self, *programs: str, timeout: float = 15.0) -> None:
        """RUNNING is reported only after `startsecs`: from then on TERM is a normal exit."""
        for program in programs or ("receiver", "sender"):
            self.wait_state(program, "RUNNING", timeout=timeout)

    def shutdown(self, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        done = self.ctl("shutdown")
        if self.supervisord_pid:
            pid = self.supervisord_pid
            wait_until(lambda: not pid_alive(pid), timeout, "supervisord to exit")
        return done

    def cleanup(self) -> None:
        """Teardown: stop everything this instance started, whatever state it is in."""
        if self.supervisord_pid and pid_alive(self.supervisord_pid):
            try:
                self.shutdown()
            except (AssertionError, subprocess.SubprocessError, OSError):
                pass
        for pid in [self.supervisord_pid or 0, *self.seen_pids]:
            if pid and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.home, ignore_errors=True)

    # -- what the instance holds -----------------------------------------------------

    @property
    def listen(self) -> tuple[str, int]:
        return self.config.receiver.listen.host, self.config.receiver.listen.port

    @property
    def log_path(self) -> Path:
        return self.config.log.file

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def supervisord_log(self) -> str:
        try:
            return (self.var / "log" / "supervisord.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def queued_files(self) -> list[Path]:
        folder = self.config.queue.dir
        if not folder.exists():
            return []
        return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))

    def maildir_new(self, user: str) -> list[Path]:
        folder = self.config.local.maildir / user / "new"
        return sorted(folder.iterdir()) if folder.exists() else []

    def answers_220(self) -> bool:
        try:
            with socket.create_connection(self.listen, timeout=2.0) as sock:
                return sock.recv(512).startswith(b"220")
        except OSError:
            return False


MAKE_FILES = ("Makefile", "tools", "pyproject.toml")


def with_make(app: Appliance) -> Appliance:
    """Link what `make run|stop|status|reload` need into the instance's folder."""
    for name in MAKE_FILES:
        (app.home / name).symlink_to(REPO / name)
    return app


def make(app: Appliance, target: str,
         config: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`make TARGET` in the instance's folder, with `MAILBAG_CONFIG` = `config` (default:
    the instance's). `-o .venv/.installed-stamp`: the shared venv is not reinstalled."""
    env = {**os.environ, "MAILBAG_CONFIG": str(config or app.config_path)}
    return subprocess.run(
        ["make", "--no-print-directory", "-o", ".venv/.installed-stamp", target],
        cwd=app.home, env=env, capture_output=True, text=True, timeout=60,
    )


class Upstream:
    """A real upstream relay (aiosmtpd) on a private port that records what it got.

    `hold` makes the reply to the final dot wait until `release` is set (bounded), so
    a test can signal the sender while its transaction is in flight.
    """

    def __init__(self, hold: bool = False) -> None:
        self.messages: list[tuple[str, tuple[str, ...], bytes]] = []
        self.sessions = 0
        self.quits = 0
        self.hold = hold
        self.data_started = threading.Event()
        self.release = threading.Event()
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    def __enter__(self) -> Upstream:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.controller.stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # aiosmtpd handler hooks
    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # noqa: ANN001
        self.sessions += 1
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001
        self.data_started.set()
        if self.hold:
            deadline = time.monotonic() + 20
            while not self.release.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        self.messages.append(
            (envelope.mail_from, tuple(envelope.rcpt_tos), bytes(envelope.original_content))
        )
        return "250 2.0.0 Ok: accepted upstream"

    async def handle_QUIT(self, server, session, envelope):  # noqa: ANN001
        self.quits += 1
        return "221 2.0.0 Bye"
