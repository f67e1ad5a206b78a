"""What supervisord knows: the programs' states, and the config they were started with.

supervisord serves XML-RPC on the unix socket named in `supervisord.conf`
(`[supervisorctl] serverurl`, else `[unix_http_server] file`); supervisor's own
`SupervisorTransport` speaks it. Paths there are written with `%(here)s`, the
folder of the file as given (symlinks not resolved, as supervisord does).

Which mailbag config the programs use: supervisord's children inherit its
environment, so it is the `MAILBAG_CONFIG` in supervisord's own environment
(`/proc/<pid>/environ`, pid from its pidfile), else the repository's default.
"""

from __future__ import annotations

import configparser
import http.client
import os
import socket
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path

from supervisor.xmlrpc import SupervisorTransport

from shared.config import DEFAULT_CONFIG_PATH, ENV_VAR

PROGRAMS = ("receiver", "sender")
RPC_TIMEOUT = 5.0


class SupervisorUnavailable(Exception):
    """supervisord cannot be asked (not running, no socket, no permission); one line."""


@dataclass(frozen=True)
class ProgramState:
    name: str
    state: str  # RUNNING, STOPPED, FATAL, BACKOFF, EXITED, ...
    description: str  # supervisord's: "pid 1234, uptime 0:10:02", "Exited too quickly"


@dataclass(frozen=True)
class SupervisorConf:
    """The parts of supervisord.conf the command needs."""

    path: Path
    socket: Path
    pidfile: Path

    @classmethod
    def read(cls, path: Path) -> SupervisorConf:
        """SupervisorUnavailable if the file cannot be read or names no unix socket."""
        parser = configparser.RawConfigParser()
        try:
            with open(path, encoding="utf-8") as handle:
                parser.read_file(handle)
        except (OSError, configparser.Error, UnicodeDecodeError) as err:
            raise SupervisorUnavailable(f"cannot read {path}: {err}") from None
        here = str(Path(path).absolute().parent)

        def value(section: str, key: str) -> str | None:
            if not parser.has_option(section, key):
                return None
            return parser.get(section, key).split(";")[0].strip().replace("%(here)s", here)

        url = value("supervisorctl", "serverurl") or ""
        socket_path = url[len("unix://"):] if url.startswith("unix://") else None
        socket_path = socket_path or value("unix_http_server", "file")
        if not socket_path:
            raise SupervisorUnavailable(f"{path} names no unix socket for supervisord")
        pidfile = value("supervisord", "pidfile") or str(Path(here) / "supervisord.pid")
        return cls(Path(path), Path(socket_path), Path(pidfile))


def program_states(conf: SupervisorConf) -> list[ProgramState]:
    """Both programs' states as supervisord reports them; SupervisorUnavailable."""
    transport = SupervisorTransport(None, None, f"unix://{conf.socket}")
    proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(RPC_TIMEOUT)  # the transport's socket takes the default
    try:
        infos = proxy.supervisor.getAllProcessInfo()
    except OSError as err:
        raise SupervisorUnavailable(
            f"not running (its socket {conf.socket}: "
            f"{err.strerror or err})") from None
    except (xmlrpc.client.Error, http.client.HTTPException) as err:
        # HTTPException: whatever listens there does not speak HTTP (not supervisord).
        raise SupervisorUnavailable(f"supervisord did not answer: "
                                    f"{err or type(err).__name__}") from None
    finally:
        socket.setdefaulttimeout(previous)
    known = {info["name"]: info for info in infos}
    return [ProgramState(name, known[name]["statename"], known[name]["description"])
            if name in known else ProgramState(name, "UNKNOWN", "not in supervisord.conf")
            for name in PROGRAMS]


def supervisord_pid(conf: SupervisorConf) -> int | None:
    """The pid in supervisord's pidfile if that process still lives."""
    try:
        pid = int(conf.pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def config_in_use(pid: int) -> Path | None:
    """The mailbag config supervisord (and so both programs) was started with; None
    when its environment cannot be read (another user's process)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = f"{ENV_VAR}=".encode()
    for entry in raw.split(b"\0"):
        if entry.startswith(prefix):
            value = entry[len(prefix):].decode(errors="surrogateescape")
            if value:
                return _resolve_as_program(value, pid)
    return DEFAULT_CONFIG_PATH.resolve()


def _resolve_as_program(value: str, pid: int) -> Path:
    """A relative MAILBAG_CONFIG is relative to the process's working folder."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        try:
            path = Path(os.readlink(f"/proc/{pid}/cwd")) / path
        except OSError:
            pass
    return path.resolve()
