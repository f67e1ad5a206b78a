"""Helpers for end-to-end tests: free ports, temporary configs, real mailbag processes.

Every process is started with `python -m services.<name> --config FILE` exactly as
supervisord starts it, on a private port, with its own queue and logfile under the
test's tmp_path. Nothing here fakes the programs under test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parent.parent

# The property tests' budget: bounded so the suite stays fast, no per-example deadline
# (a loaded CI machine must not turn a slow example into a failure).
PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{_toml_value(k)} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(value)


def write_config(folder: Path, **sections: dict[str, Any]) -> Path:
    """Write a mailbag.toml into `folder`: private queue, mail and log under it.

    `write_config(tmp, receiver={"listen": "127.0.0.1:2600"}, sender={...})`;
    top-level keys go in `top={...}`.
    """
    base: dict[str, dict[str, Any]] = {
        "receiver": {"listen": f"127.0.0.1:{free_port()}"},
        "queue": {"dir": "var/queue"},
        "sender": {"poll_interval": 60},
        "local": {"domains": ["localhost"], "maildir": "var/mail"},
        "log": {"file": "var/log/mailbag.log"},
    }
    top = sections.pop("top", {})
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = [f"{key} = {_toml_value(value)}" for key, value in top.items()]
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
    path = Path(folder) / "mailbag.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_for_banner(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until something on host:port answers with a 220 greeting."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0) as sock:
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return
        except OSError as err:
            last_error = err
        time.sleep(0.05)
    raise TimeoutError(f"nothing answered 220 on {host}:{port}: {last_error}")


class MailbagProcess:
    """A real `python -m services.<program>` process with a given config."""

    def __init__(self, program: str, config: Path, env: dict[str, str] | None = None) -> None:
        self.program = program
        self.config = config
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: str | None = None

    def start(self) -> MailbagProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.program}", "--config", str(self.config)],
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        return self

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        """TERM, wait, return the exit status (KILL if it does not stop in time)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr_text()  # keep what it said before the pipes are closed
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        return self.proc.returncode

    def stderr_text(self) -> str:
        """Everything the process wrote to stderr (read once, after it has exited)."""
        assert self.proc is not None and self.proc.stderr is not None
        if self._stderr is None:
            self._stderr = self.proc.stderr.read().decode(errors="replace")
        return self._stderr


@contextlib.contextmanager
def tiny_tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of `size` (e.g. "64k") on a new folder: a full disk that even root
    cannot write past. Skips the test where mounting is not permitted."""
    import pytest  # only tests call this

    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): "
                    f"{result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, check=False)


class TestCA:
    """A throwaway CA (trustme) and one server certificate, written as PEM files.

    `cert_file`/`key_file` configure mailbag's receiver; `server_context()` a Python
    server (aiosmtpd as a relay); `ca_file`/`client_context()` the clients.
    """

    __test__ = False  # not a pytest class

    def __init__(
        self, folder: Path, names: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")
    ) -> None:
        import trustme

        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert(*names)
        self.ca_file = folder / "ca.pem"
        self.cert_file = folder / "server-cert.pem"
        self.key_file = folder / "server-key.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.cert.private_key_pem.write_to_path(str(self.key_file))
        with open(self.cert_file, "wb") as handle:
            for blob in self.cert.cert_chain_pems:
                handle.write(blob.bytes())

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(context)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (modulo its length): the same bytes, other reads."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return pieces


def fill_disk(mount_point: Path) -> Path:
    """Fill the file system at `mount_point` to the last page with one file; return it.

    tmpfs allocates whole pages, so a file that already has a page keeps the rest of
    it: a write that needs a further page then comes up short.
    """
    filler = mount_point / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            for _ in range(100_000):  # bounded: 400 MB
                handle.write(b"\0" * 4096)
        except OSError:
            pass
    return filler
