"""Durable file primitives the queue is built of: create-and-fsync, replace, read;
and `FolderStamp`, which tells a reader whether a folder changed since it last looked.

Nothing here knows the queue format; `format.py` does. Every function either
completes or raises OSError, and callers clean up (see writer.py and moves.py).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

IOV_MAX = os.sysconf("SC_IOV_MAX")  # the most chunks one writev takes


def write_durably(path: str | Path, chunks: Sequence[bytes | bytearray | memoryview], *,
                  sync: bool = True) -> None:
    """Create `path` exclusively, write all chunks (one writev per IOV_MAX of them),
    fsync unless the caller syncs later (e.g. a whole batch with syncfs). No rename
    here."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        for start in range(0, len(chunks), IOV_MAX):
            group = chunks[start : start + IOV_MAX]
            written = os.writev(fd, group)
            if written != sum(map(len, group)):
                _write_rest(fd, group, written)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_rest(fd: int, chunks: Sequence[bytes | bytearray | memoryview],
                written: int) -> None:
    """Finish a short writev: the chunks after its first `written` bytes, one by one
    (never joined: the chunks may be a whole message)."""
    for chunk in chunks:
        if written >= len(chunk):
            written -= len(chunk)
            continue
        rest = memoryview(chunk)[written:]
        written = 0
        while rest:
            rest = rest[os.write(fd, rest) :]


def write_durably_replacing(path: Path, data: bytes) -> None:
    """Write `path` via a temporary dot-name + fsync + rename (replaces an older file).
    The caller fsyncs the folder when the rename itself must be durable."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    try:
        write_durably(tmp, (data,))
        os.rename(tmp, path)
    except OSError:
        unlink_quietly(tmp)
        raise


def read_file(path: str | Path, size: int | None = None) -> bytes:
    """The whole file in as few syscalls as it takes (open, [fstat,] read, close).

    `Path.read_bytes` goes through a buffered file object: five more syscalls per
    message in the sender's hot loop (bench/README.md). `size`, when the caller knows
    it (the queue listing's stat), saves the fstat; a wrong one only costs reads.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        if size is None:
            size = os.fstat(fd).st_size
        data = os.read(fd, size + 1)  # one byte more shows a file that grew since
        if len(data) <= size:  # a regular file's read is short only at its end
            return data
        chunks = [data]
        while chunk := os.read(fd, 64 * 1024):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class FolderStamp:
    """Whether a folder's entries may have changed since the last look: for a reader
    that lists the same folder again and again (the metrics endpoint's census).

    Every create, rename in or out, and unlink in a folder sets its mtime and ctime.
    Those come from the kernel's coarse clock (one tick: a few milliseconds), so a
    change in the same tick as the last one could leave them equal: the stamp is
    trusted only once the folder's last change is older than SETTLE_NS. A file
    rewritten in place (no rename) does not show: the queue never does that.
    """

    SETTLE_NS = 50_000_000  # well over a clock tick (1-10 ms)
    ABSENT = (0, 0, 0)  # the stamp of a folder that does not exist (yet)

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None  # a settled stamp

    def changed(self) -> bool:
        """True if the folder must be listed again (also when it cannot be stat'ed:
        then its listing says why). Call it BEFORE listing: a change made while the
        caller lists shows at the next call."""
        now_ns = time.time_ns()
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            stamp, settled = self.ABSENT, True
        except OSError:
            self._seen = None
            return True
        else:
            stamp = (info.st_ino, info.st_mtime_ns, info.st_ctime_ns)
            settled = max(info.st_mtime_ns, info.st_ctime_ns) < now_ns - self.SETTLE_NS
        if stamp == self._seen:
            return False
        self._seen = stamp if settled else None
        return True
