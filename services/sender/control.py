"""The running sender's control socket: how `mailbag hold|release|delete|flush` reach it.

`queue.dir/.control` is a unix stream socket (a dot name: never a message, the
watch ignores it) that one thread of the sender serves while the sender owns the
queue lock - a standby sender does not serve, so whoever answers is the one process
that may change the queue. Mode 0660: root and the user (and group) running
mailbag may use it. The socket is bound under a temporary name, given its mode and
renamed into place, so it never exists with the wrong mode, and a stale one left by
a killed sender is replaced; a clean stop removes it.

The protocol is one JSON line each way:

    {"action": "hold", "ids": ["18ec54825f00078d31547c", ...]}
    {"ok": true, "results": {"18ec54825f00078d31547c": "held", ...}}
    {"ok": false, "error": "unknown action 'frobnicate'"}

`hold`, `release`, `delete` and `flush` are applied by the queue runner between two
messages (`QueueRunner.request`; `flush` with no ids = every deferred message);
`ping` is answered here, with the sender's pid. Bad input gets an error response,
never a crash: a request line is at most MAX_REQUEST bytes (MAX_IDS ids, each at
most MAX_ID_LENGTH characters, which `ask_sender` sends in batches), a connection
gets CONNECTION_TIMEOUT seconds to send it, and connections are served one after
another. Nothing is logged here but errors: the `mailbag` command logs the
changes (`ADMIN` lines).

`ask_sender` is the client side, for the command: None when no sender listens.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from shared.queue.operations import ACTIONS

if TYPE_CHECKING:  # the command's side (ask_sender) needs no logging
    from shared.log import EventLog

CONTROL_NAME = ".control"
PING = "ping"
MAX_REQUEST = 256 * 1024  # bytes of one request line
MAX_IDS = 1000  # ids in one request
MAX_ID_LENGTH = 200  # a queue id is 22 characters; a failed record's name a few more
MAX_RESPONSE = 4 * 1024 * 1024  # what the client reads at most
CONNECTION_TIMEOUT = 5.0  # seconds a client has to send its request line
RUNNER_TIMEOUT = 10.0  # seconds the runner has to apply a request
CLIENT_TIMEOUT = RUNNER_TIMEOUT + 5.0  # seconds the command waits for the answer
ACCEPT_SLICE = 0.5  # seconds between looks at the closing flag
SUN_PATH_MAX = 107  # bytes of a path a unix socket address holds (108 with its NUL)

# The runner's side (QueueRunner.request): apply `action` to `ids`; the result per id,
# or None on timeout; RunnerEnded once the runner has ended.
Apply = Callable[[str, Sequence[str], float], "dict[str, str] | None"]


class ControlError(Exception):
    """The sender refused the request, or the socket did not behave; one line."""


class RunnerEnded(RuntimeError):
    """Raised by the runner's side for a request that comes after its end: nobody
    will apply it (the sender is stopping)."""


class RequestError(ValueError):
    """A request that is not one (bad JSON, unknown action, too many ids)."""


# The results' key for a request the runner failed on as a whole (the error is its
# value), where the others are message ids.
WHOLE_REQUEST = "*"


def control_path(queue_dir: Path) -> Path:
    """The socket's place: in the queue folder, so that whoever may change the queue
    (its owner and group) may ask the sender, and nobody else."""
    return Path(queue_dir) / CONTROL_NAME


@contextmanager
def _socket_address(path: Path) -> Iterator[str]:
    """The name under which bind/connect reach the socket file `path`: the path
    itself, or - when it is longer than a unix socket address holds (a deep
    queue.dir) - the same file through a descriptor of its folder,
    `/proc/self/fd/N/<name>`, which Linux resolves like any path. OSError if the
    folder cannot be opened."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield str(path)
        return
    # O_PATH: like the path itself, it needs only search permission on the folder.
    folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{folder}/{path.name}"
    finally:
        os.close(folder)


# ---------------------------------------------------------------------------- requests

def parse_request(line: bytes) -> tuple[str, tuple[str, ...]]:
    """(action, ids) of a request line; RequestError naming what is wrong."""
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise RequestError("not a JSON request line") from None
    if not isinstance(value, dict):
        raise RequestError("a request is a JSON object")
    action = value.get("action")
    if action not in (*ACTIONS, PING):
        raise RequestError(f"unknown action {action!r}")
    ids = value.get("ids", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise RequestError("ids must be a list of strings")
    if len(ids) > MAX_IDS:
        raise RequestError(f"at most {MAX_IDS} ids per request")
    if any(not i or len(i) > MAX_ID_LENGTH or "\x00" in i for i in ids):
        raise RequestError("an id is empty, too long or holds a NUL")
    return action, tuple(ids)


def _response(**fields: object) -> bytes:
    return json.dumps(fields).encode() + b"\n"


# ---------------------------------------------------------------------------- server

class ControlServer:
    """Serves the control socket on a thread of its own until `close()`."""

    def __init__(self, queue_dir: Path, apply: Apply, log: EventLog, *,
                 connection_timeout: float = CONNECTION_TIMEOUT,
                 runner_timeout: float = RUNNER_TIMEOUT) -> None:
        self.path = control_path(queue_dir)
        self.apply = apply
        self.log = log
        self.connection_timeout = connection_timeout
        self.runner_timeout = runner_timeout
        self._closing = threading.Event()
        self._listener = self._bind()
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def _bind(self) -> socket.socket:
        """Listen on the socket path: bound under a temporary name, chmod, renamed in.
        OSError if it cannot (then the sender runs without it)."""
        temporary = self.path.with_name(f"{CONTROL_NAME}.{os.getpid()}")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _unlink_socket(temporary)
            with _socket_address(temporary) as address:
                listener.bind(address)
            os.chmod(temporary, 0o660)
            os.rename(temporary, self.path)
            listener.listen(8)
            listener.settimeout(ACCEPT_SLICE)
        except OSError:
            listener.close()
            _unlink_socket(temporary)
            raise
        return listener

    def close(self) -> None:
        """Stop serving (a connection being served ends within its timeouts) and
        remove the socket: nobody may think a sender still listens."""
        self._closing.set()
        try:  # a connection of our own wakes the accept at once
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wake:
                wake.settimeout(ACCEPT_SLICE)
                with _socket_address(self.path) as address:
                    wake.connect(address)
        except OSError:
            pass  # it notices the flag within ACCEPT_SLICE anyway
        self._thread.join(self.connection_timeout + self.runner_timeout)
        self._listener.close()
        _unlink_socket(self.path)

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as err:
                if self._closing.is_set():
                    return
                self.log.error("control", error=err.strerror or str(err))
                self._closing.wait(ACCEPT_SLICE)  # e.g. EMFILE: do not spin
                continue
            with conn:
                try:
                    self._serve_one(conn)
                except OSError:
                    pass  # the client went away or stalled: its problem
                except Exception as exc:  # noqa: BLE001 - a bug here must not end the sender
                    self.log.error("control", exc=exc)

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            line = _read_line(conn, MAX_REQUEST, self.connection_timeout)
        except RequestError as err:
            conn.settimeout(self.connection_timeout)
            conn.sendall(_response(ok=False, error=str(err)))
            return
        if line is None:
            return  # connected and closed (a probe), or no complete line in time
        answer = self._answer(line)
        conn.settimeout(self.connection_timeout)
        conn.sendall(answer)

    def _answer(self, line: bytes) -> bytes:
        try:
            action, ids = parse_request(line)
        except RequestError as err:
            return _response(ok=False, error=str(err))
        if action == PING:
            return _response(ok=True, pid=os.getpid())
        try:
            results = self.apply(action, ids, self.runner_timeout)
        except RunnerEnded as err:
            return _response(ok=False, error=str(err))
        if results is None:
            return _response(ok=False, error=(
                f"the sender did not get to it within {self.runner_timeout:g} s "
                "(it applies it when it does)"))
        if WHOLE_REQUEST in results:  # the runner failed on it (and logged why)
            return _response(ok=False, error=results[WHOLE_REQUEST])
        return _response(ok=True, results=results)


def _read_line(conn: socket.socket, limit: int, within: float) -> bytes | None:
    """One line (without its LF) of at most `limit` bytes, complete within `within`
    seconds in all - a peer that trickles a byte now and then must not hold the one
    connection served at a time; None if the peer closed or ran out of time first;
    RequestError if the line is longer."""
    deadline = time.monotonic() + within
    chunks: list[bytes] = []
    size = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        conn.settimeout(remaining)
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            return None
        if not chunk:
            return None
        end = chunk.find(b"\n")
        size += len(chunk) if end < 0 else end
        if size > limit:
            raise RequestError(f"a line longer than {limit} bytes")
        if end >= 0:
            chunks.append(chunk[:end])
            return b"".join(chunks)
        chunks.append(chunk)


def _unlink_socket(path: Path) -> None:
    """Remove a socket file (and nothing else that might have its name)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------- client

def ask_sender(queue_dir: Path, action: str, ids: Sequence[str] = (),
               timeout: float = CLIENT_TIMEOUT) -> dict[str, str] | None:
    """Have the running sender apply `action` to `ids`; the result per id.

    None when no sender listens (no socket, nobody accepting, a stale socket file).
    ControlError if the sender refused it or did not answer properly. More than
    MAX_IDS ids go in several requests."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    batches = [list(ids[i:i + MAX_IDS]) for i in range(0, len(ids), MAX_IDS)] or [[]]
    results: dict[str, str] = {}
    for number, batch in enumerate(batches):
        answer = _exchange(queue_dir, {"action": action, "ids": batch}, timeout)
        if answer is None:
            if number == 0:
                return None
            raise ControlError("the sender stopped answering in the middle of the request")
        results.update(answer.get("results") or {})
    return results


def ping_sender(queue_dir: Path, timeout: float = 2.0) -> int | None:
    """The pid of the sender serving the queue, or None when none listens."""
    answer = _exchange(queue_dir, {"action": PING}, timeout)
    return answer.get("pid") if answer is not None else None


def _exchange(queue_dir: Path, request: dict[str, object],
              timeout: float) -> dict[str, object] | None:
    path = control_path(queue_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            with _socket_address(path) as address:
                sock.connect(address)
        except OSError as err:  # none there, or none listening: no sender runs
            if err.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
                return None
            raise ControlError(f"cannot connect to {path}: {err.strerror or err}") from None
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
            line = _read_line(sock, MAX_RESPONSE, timeout)
        except RequestError as err:
            raise ControlError(f"not an answer from {path}: {err}") from None
        except OSError as err:
            raise ControlError(f"the sender did not answer on {path}: "
                               f"{err.strerror or err}") from None
    if line is None:
        raise ControlError(f"the sender did not answer on {path} within {timeout:.0f} s")
    try:
        answer = json.loads(line)
    except ValueError:
        raise ControlError(f"not an answer from {path}: {line[:80]!r}") from None
    if not isinstance(answer, dict):
        raise ControlError(f"not an answer from {path}: {line[:80]!r}")
    if not answer.get("ok"):
        raise ControlError(f"the sender refused: {answer.get('error', 'no reason given')}")
    return answer
