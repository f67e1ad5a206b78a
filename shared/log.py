"""The ONE logfile both programs write (SPEC §5), configured here and nowhere else.

Every line is::

    2026-11-28T21:50:01.123+00:00 R-SMTP 127.0.0.1:53422 queued ok id=... from=<a@b>

that is: ISO 8601 timestamp with zone, the program (`R-SMTP` / `S-SMTP`), the peer
(client IP:port for R-SMTP, relay host/IP or `local` for S-SMTP), the event, its
outcome (`ok`, `fail`, `defer`, `info`), then `key=value` details.

Invariants:
- no CR, LF, ESC or other control byte from the wire reaches a line unescaped
  (`escape`), so one record is always one line and nobody can forge a line;
- each record reaches the file as ONE `write(2)` on an `O_APPEND` descriptor, so lines
  from several threads and processes never tear or interleave; a record that does
  not fit on a full disk is not kept at all (`SharedFileSink`), and a log that cannot
  be written never stops a program: it is said once on stderr, and the count of lost
  records goes in the log when it can be written again;
- rotation is coordinated between the independent processes with an `flock` on a
  lock file next to the log: exactly one process renames, the others notice the new
  inode and reopen. loguru's own `rotation=` is only safe within one process tree.
- `enqueue=False`: a record is written by the thread that logs it (one O_APPEND
  write to the page cache), so a `kill -9` loses no record already logged. loguru's
  queue (`enqueue=True`) pickles every record through a pipe to a writer thread: a
  GIL hand-off per line, and the records in the pipe die with the process
  (bench/README.md has the profile).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from shared.config import LogConfig

# The line format for records that do not come through EventLog (none of ours do).
LOG_FORMAT = "{time:YYYY-MM-DDTHH:mm:ss.SSSZ} {extra[program]} {extra[peer]} {message}"

# C0 and C1 controls (ESC and CSI drive terminals), quote, backslash, the Unicode line
# and paragraph separators (str.splitlines() breaks on them); \udc80-\udcff are bytes
# that were not UTF-8 (decoded with surrogateescape), shown as the original \xNN.
_UNSAFE = re.compile(r'[\x00-\x1f\x7f-\x9f"\\\u2028\u2029\udc80-\udcff]')


def _escape_char(match: re.Match[str]) -> str:
    char = match.group(0)
    if char in '"\\':
        return "\\" + char
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape(value: object) -> str:
    """Render a value for a log line: control bytes escaped, quoted if it has spaces.

    Bytes are decoded as UTF-8 with invalid bytes shown as \\xNN escapes.
    """
    if type(value) is int:  # sizes, counts, reply codes: most details, nothing to escape
        return str(value)
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("utf-8", "surrogateescape")
    else:
        text = str(value)
    text = _UNSAFE.sub(_escape_char, text)
    if not text or " " in text:
        return f'"{text}"'
    return text


class EventLog:
    """The log of one program and peer: `log.ok("queued", id=qid, size=123)`.

    Details are escaped; the event name and outcome are ours, never from the wire.

    The line is rendered here and handed to loguru as a raw message (`opt(raw=True)`):
    loguru still decides by level and serialises the sink, but does not format the
    line again (its `{time:...}` pattern, a copy of the record and `format_map` cost
    a quarter of a log call, and the receiver pays for every call with the GIL held).
    """

    def __init__(self, program: str, peer: str) -> None:
        self.program = program
        self.peer = peer
        self._after_time = f" {program} {escape(peer)} "
        self._logger = logger.bind(program=program, peer=escape(peer)).opt(raw=True)

    def with_peer(self, peer: str) -> EventLog:
        return EventLog(self.program, peer)

    def render(self, event: str, outcome: str, **details: Any) -> str:
        """The whole line, with its newline, timestamped now."""
        parts = [event, outcome]
        parts.extend(f"{key}={escape(value)}" for key, value in details.items())
        return _TIMESTAMPS.now() + self._after_time + " ".join(parts) + "\n"

    def event(self, event: str, outcome: str, level: str = "INFO", **details: Any) -> None:
        self._logger.log(level, self.render(event, outcome, **details))

    def ok(self, event: str, **details: Any) -> None:
        self.event(event, "ok", **details)

    def info(self, event: str, **details: Any) -> None:
        self.event(event, "info", **details)

    def fail(self, event: str, **details: Any) -> None:
        self.event(event, "fail", level="WARNING", **details)

    def defer(self, event: str, **details: Any) -> None:
        self.event(event, "defer", level="WARNING", **details)

    def error(self, event: str, exc: BaseException | None = None, **details: Any) -> None:
        if exc is not None:
            details["error"] = describe_exception(exc)
        self.event(event, "fail", level="ERROR", **details)


class Timestamps:
    """The time now as ISO 8601 with milliseconds and zone: `2026-11-28T21:50:01.123+00:00`.

    Everything but the milliseconds is rendered once per second and reused.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # (second, "YYYY-MM-DDTHH:MM:SS", "+HH:MM"): replaced whole, read once per call,
        # so a thread never mixes another second's date with its own milliseconds.
        self._cached: tuple[int, str, str] = (-1, "", "")

    def now(self) -> str:
        now = self._clock()
        second = int(now)
        cached = self._cached
        if cached[0] != second:
            local = time.localtime(second)
            zone = time.strftime("%z", local) or "+0000"
            cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", local), f"{zone[:3]}:{zone[3:5]}")
            self._cached = cached
        return f"{cached[1]}.{int((now - second) * 1000):03d}{cached[2]}"


_TIMESTAMPS = Timestamps()


def describe_exception(exc: BaseException) -> str:
    """One line: the type, the message and where it was raised (no multi-line traceback)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


class SharedFileSink:
    """A loguru sink that many processes may append to and rotate safely.

    Rotation protocol: after a write, if the file has reached `rotate_bytes`, take an
    exclusive `flock` on `<file>.lock`; under the lock, re-check that the file at the
    path is still big (another process may have rotated it meanwhile), then shift
    `.N-1 -> .N ... file -> .1`, and reopen. Before each write, a process whose
    descriptor no longer names the file at the path (someone else rotated) reopens.
    A line written just between another process's rename and our reopen lands at
    the end of `.1`: it is never lost nor written twice.

    A record is written whole or not at all. On a full disk `write(2)` comes up short
    (tmpfs, ext4: at the last free page or block). The bytes that did land are then
    overwritten IN PLACE with spaces and a newline: a blank line. Truncating them
    away instead could cut another process's line - with O_APPEND and no lock per
    record, a line from the other program may already follow ours, and nothing but a
    lock around every write could rule that out. Writing the rest later could glue
    such a line into ours. An overwrite of bytes already allocated needs no space on
    these file systems, and touches only our own bytes.

    While the log cannot be written the sink never raises (mail must keep flowing):
    it says so once on stderr (supervisord's `*.out`), counts the records it drops,
    and puts one `log fail lost=N` line in front of the first record it can write
    again.
    """

    def __init__(self, path: Path, rotate_bytes: int | None, retention: int,
                 program: str = "-") -> None:
        self.path = Path(path)
        self.rotate_bytes = rotate_bytes
        self.retention = retention
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._mutex = threading.Lock()
        self._events = EventLog(program, "-")
        self._outage: _Outage | None = None  # records are being dropped since ...
        self._rotation_failed = False  # said on stderr, once until a rotation works
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = -1
        self._ino = -1
        self._open()

    def _open(self) -> None:
        """(Re)open the file at the path. The old descriptor is closed first - a removed
        log's space is freed even if the new open fails - and forgotten at once, so a
        failed open never leaves a number that the process may reuse for another file."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o640)
        self._ino = os.fstat(self._fd).st_ino

    def _size_if_still_ours(self) -> int | None:
        """The size of the file at the path if it is still the one we write, else None
        (also when it cannot be looked at: reopening says why)."""
        if self._fd < 0:
            return None
        try:
            current = os.stat(self.path)
        except OSError:
            return None
        return current.st_size if current.st_ino == self._ino else None

    def write(self, message: str) -> None:
        data = message.encode("utf-8", "backslashreplace")
        with self._mutex:
            # Two syscalls per record, stat + write: the stat both notices a rotation
            # by another process and gives the size for our own rotation decision.
            try:
                size = self._size_if_still_ours()
                if size is None:
                    self._open()
                    size = 0
                if self._outage is not None:
                    data = self._outage.notice(self._events) + data
                self._append(data)
            except OSError as err:
                self._drop(err)
                return
            self._outage = None
            if self.rotate_bytes and size + len(data) >= self.rotate_bytes:
                try:
                    self._rotate()
                    self._rotation_failed = False
                except OSError as err:  # the log grows past its size; records still go in
                    if not self._rotation_failed:
                        self._rotation_failed = True
                        _say(f"{self._events.program}: cannot rotate the log {self.path}: "
                             f"{err.strerror or err}")

    def _append(self, data: bytes) -> None:
        """One O_APPEND write of whole lines; OSError (nothing of them kept) if it fails."""
        written = os.write(self._fd, data)
        if written < len(data):
            if written:
                self._blank_out(written)
            raise OSError(errno.ENOSPC, f"No space left on device (wrote {written} of "
                          f"{len(data)} bytes)")

    def _blank_out(self, written: int) -> None:
        """Turn the `written` bytes our short write left at the end into a blank line.

        With O_APPEND the file offset is just past our own bytes, wherever other
        writers' lines are. pwrite(2) ignores its offset on an O_APPEND descriptor
        (Linux), so the flag is off for this one overwrite (only this process shares
        the descriptor, and it holds the mutex).
        """
        start = os.lseek(self._fd, 0, os.SEEK_CUR) - written
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_APPEND)
        try:
            os.pwrite(self._fd, b" " * (written - 1) + b"\n", start)
        finally:
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags)

    def _drop(self, err: OSError) -> None:
        """A record could not be written: count it; the first of an outage is told."""
        if self._outage is None:
            self._outage = _Outage(since=_TIMESTAMPS.now(), error=err.strerror or str(err))
            _say(f"{self._events.program}: cannot write the log {self.path}: "
                 f"{self._outage.error}; dropping log lines until it can be written again")
        self._outage.lost += 1

    def _rotate(self) -> None:
        lock_fd = os.open(self._lock_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is not None and current.st_size >= (self.rotate_bytes or 0):
                self._shift_old_files()
            self._open()
        finally:
            os.close(lock_fd)  # closing releases the flock

    def _shift_old_files(self) -> None:
        def numbered(n: int) -> Path:
            return self.path.with_name(f"{self.path.name}.{n}")

        if self.retention == 0:
            os.unlink(self.path)
            return
        numbered(self.retention).unlink(missing_ok=True)
        for n in range(self.retention - 1, 0, -1):
            if numbered(n).exists():
                os.rename(numbered(n), numbered(n + 1))
        os.rename(self.path, numbered(1))

    def close(self) -> None:
        with self._mutex:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


@dataclass
class _Outage:
    """Records dropped because the log could not be written, since the first one."""

    since: str
    error: str
    lost: int = 0

    def notice(self, events: EventLog) -> bytes:
        """The line that goes in front of the first record written again."""
        line = events.render("log", "fail", lost=self.lost, since=self.since, error=self.error)
        return line.encode("utf-8", "backslashreplace")


def _say(line: str) -> None:
    """One line on stderr (supervisord's `*.out`); nothing if even that fails."""
    try:
        os.write(2, (line + "\n").encode("utf-8", "backslashreplace"))
    except OSError:
        pass


def setup_logging(config: LogConfig, program: str, *, enqueue: bool = False) -> EventLog:
    """Send every loguru record of this process to the shared logfile.

    Returns the program's EventLog for events with no peer yet (start-up, shutdown).
    Nothing is mirrored to stderr: the logfile is the one place to look (SPEC §5), and
    a stderr pipe nobody drains must never be able to block a session thread.
    """
    logger.remove()
    logger.configure(extra={"program": program, "peer": "-"})
    sink = SharedFileSink(config.file, config.rotation_bytes, config.retention, program)
    logger.add(
        sink.write,
        format=LOG_FORMAT,
        level=config.level.upper(),
        enqueue=enqueue,
        backtrace=False,
        diagnose=False,
        catch=True,
    )
    return EventLog(program, "-")


def user_command_log(config: LogConfig, program: str, uid: int) -> tuple[EventLog | None, str]:
    """The log of a command a user runs (`mailbag-sendmail`, `mailbag`): its lines
    name the user (`uid=N`). A user who may not write the logfile gets (None, why):
    the command still does its work, and says so on stderr."""
    try:
        return setup_logging(config, program).with_peer(f"uid={uid}"), ""
    except OSError as err:
        return None, err.strerror or str(err)


def shutdown_logging() -> None:
    """Flush queued records and close the sinks (call before the process exits)."""
    logger.complete()
    logger.remove()
