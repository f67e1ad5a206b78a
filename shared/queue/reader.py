"""The owning side of the queue: one process at a time lists, reads and moves messages.

Only the process holding the queue lock - an exclusive `flock` on
`queue.dir/.sender.lock` (`try_lock`) - may deliver or move messages: the running
sender, or the `mailbag` command while no sender runs. It works on the files in
queue.dir directly: no claim rename per message, a deferred message keeps its name
and mtime, so its place. The kernel drops a dead process's lock, so a crashed
owner never blocks the next one.

`scan()` lists queue.dir once: the ready messages oldest first, and apart from them
whatever else lies there that no message should be (a symlink, a FIFO, a folder),
so that the owner can set it aside instead of ignoring it forever.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shared.queue.files import read_file
from shared.queue.format import QueueFile
from shared.queue.moves import (
    Remover,
    record_failed_part,
    remove_stale_rewrites,
    rewrite,
    set_aside,
)

LOCK_NAME = ".sender.lock"


@dataclass(frozen=True)
class QueueEntry:
    """A ready file in queue.dir, as listed."""

    name: str
    mtime_ns: int
    size: int | None = None  # as listed: a hint for read(), saves an fstat


@dataclass(frozen=True)
class QueueScan:
    """One listing of queue.dir."""

    ready: list[QueueEntry] = field(default_factory=list)  # oldest first
    strange: list[tuple[str, str]] = field(default_factory=list)  # (name, what it is)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "device"


class QueueReader:
    """The queue's owner: lock, list, read, finish, fail, quarantine, rewrite.

    Creating a reader takes no lock: a second sender can be built, and wait.
    """

    def __init__(self, queue_dir: Path, failed_dir: Path, quarantine_dir: Path) -> None:
        self.dir = Path(queue_dir)
        self.failed_dir = Path(failed_dir)
        self.quarantine_dir = Path(quarantine_dir)
        for folder in (self.dir, self.failed_dir, self.quarantine_dir):
            folder.mkdir(parents=True, exist_ok=True)
        # Never unlinked: a process could otherwise lock an inode nobody else sees.
        self._lock_fd: int | None = os.open(
            self.dir / LOCK_NAME, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640
        )
        self.locked = False
        self._remover = Remover()
        # Plain strings on the per-message path (pathlib joins cost more than the
        # syscalls they name, bench/README.md).
        self._dir_prefix = f"{self.dir}{os.sep}"

    def try_lock(self) -> bool:
        """Become the queue's owner if no other process is; True if we are.

        Non-blocking (flock LOCK_EX|LOCK_NB): the caller polls, and can stop while
        waiting. The lock lasts until close() or the process's end.
        """
        if self.locked:
            return True
        assert self._lock_fd is not None, "reader closed"
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.locked = True
        remove_stale_rewrites(self.dir)
        return True

    def close(self) -> list[tuple[str, OSError]]:
        """Finish what was finished, then drop the lock (clean exit). Returns the
        finished files whose unlink failed (still queued: sent again)."""
        failed = self._remover.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None
        self.locked = False
        return failed

    def scan(self) -> QueueScan:
        """The ready messages (oldest first: mtime, then name), and the entries that
        are no message. Dot names are the queue's own. OSError if the folder cannot
        be read."""
        ready: list[QueueEntry] = []
        strange: list[tuple[str, str]] = []
        for entry in os.scandir(self.dir):
            if entry.name.startswith("."):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed meanwhile (e.g. by hand)
            if stat.S_ISREG(info.st_mode):
                ready.append(QueueEntry(entry.name, info.st_mtime_ns, info.st_size))
            else:
                strange.append((entry.name, _kind(info.st_mode)))
        ready.sort(key=lambda e: (e.mtime_ns, e.name))
        return QueueScan(ready, strange)

    def path_of(self, name: str) -> str:
        """A queued message's path, as a plain string for the sender's hot loop."""
        return self._dir_prefix + name

    @staticmethod
    def read(path: str | Path, size: int | None = None) -> QueueFile:
        """Parse a queued file; QueueFormatError if it does not follow the format,
        OSError if it cannot be read (a symlink is never followed: ELOOP).

        `size`: the size listed (QueueEntry.size), if known."""
        return QueueFile.from_bytes(read_file(path, size))

    def finish(self, path: str | Path) -> None:
        """Every recipient is done: the message leaves the queue (unlinked behind,
        see moves.py; flush() or close() to be sure it is gone)."""
        self._remover.remove(os.fspath(path))

    def flush(self) -> list[tuple[str, OSError]]:
        """Wait until every finished file is gone; those whose unlink failed, and why
        (they stay queued and are sent again)."""
        return self._remover.flush()

    def rewrite(self, path: Path, message: QueueFile) -> None:
        """Durably replace a queued file's content, keeping its place (moves.rewrite)."""
        rewrite(path, message)

    def fail(self, path: Path, message: QueueFile, reasons: Sequence[str]) -> Path:
        """Move a message out of the queue for good, with the reasons beside it."""
        return set_aside(path, message, reasons, self.failed_dir)

    def fail_some(self, path: Path, message: QueueFile, reasons: Sequence[str]) -> Path:
        """Record recipients that failed for good while others stay queued."""
        return record_failed_part(path, message, reasons, self.failed_dir)

    def quarantine(self, path: Path, reason: str) -> Path:
        """Move an unreadable file (or a non-file) aside, untouched, with the reason."""
        return set_aside(path, None, [reason], self.quarantine_dir)
