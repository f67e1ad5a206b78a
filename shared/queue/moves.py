"""Every move of a message out of, or within, the queue after it was stored.

- finish: a delivered message is unlinked, behind, on a thread of its own
  (`Remover`): an ext4 unlink of a fsynced file costs more than everything else the
  sender does for a message. At most `FINISH_BACKLOG` files wait; `flush()` waits
  for them, so a clean exit never gives a delivered message back. After a crash
  the waiting ones are still queued and are sent again (at-least-once).
- rewrite: durably replace a message's content (fewer recipients left), keeping its
  mtime and so its place in the queue; via `.<id>.new`, renamed over the original.
- set aside: to the failed or quarantine folder, with the reasons in `<name>.reason`.

Every function either completes or raises OSError, leaving the queued file as it was.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from shared.queue.files import fsync_dir, unlink_quietly, write_durably, write_durably_replacing
from shared.queue.format import QueueFile

FINISH_BACKLOG = 16  # finished files that may wait for their unlink (the crash window)
FINISH_BATCH = 8  # ... and how many the remover thread takes per wake-up
REWRITE_SUFFIX = ".new"  # `.<id>.new`: a rewrite in progress
REASON_SUFFIX = ".reason"


def rewrite(path: Path, message: QueueFile) -> None:
    """Durably replace a queued file's content, keeping its mtime (its place).

    Written to `.<id>.new` (never listed), renamed over the file, folder fsynced.
    Raises QueueFormatError before touching anything if the envelope is not writable.
    """
    envelope = message.envelope_bytes()
    stat = os.stat(path)
    tmp = path.with_name(f".{path.name}{REWRITE_SUFFIX}")
    unlink_quietly(tmp)
    try:
        write_durably(tmp, (envelope, message.data))
        os.utime(tmp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.rename(tmp, path)
    except OSError:
        unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def remove_stale_rewrites(queue_dir: Path) -> None:
    """`.<id>.new` files a crashed owner left mid-rewrite: <id> still holds the
    message (old content), so they are garbage."""
    for entry in os.scandir(queue_dir):
        name = entry.name
        if name.startswith(".") and name.endswith(REWRITE_SUFFIX) and entry.is_file():
            unlink_quietly(entry.path)


def set_aside(path: Path, message: QueueFile | None, reasons: Sequence[str],
              folder: Path) -> Path:
    """Move a message out of the queue into `folder` with its reasons beside it.

    `message` None: the file is moved untouched (quarantine of what cannot be read,
    whatever kind of entry it is); else `message` is written there and the queued
    file removed. Raises QueueFormatError (nothing moved) if `message` cannot be
    written, OSError (e.g. EXDEV, ENOSPC) if a step fails: the queued file stays.
    """
    data = message.to_bytes() if message is not None else None
    target = folder / path.name
    reason_path = folder / (path.name + REASON_SUFFIX)
    write_durably_replacing(reason_path, _reason_text(reasons))
    copied = False
    try:
        if data is None:
            os.rename(path, target)
        else:
            write_durably_replacing(target, data)
            copied = True
            os.unlink(path)
        fsync_dir(folder)
    except OSError:
        unlink_quietly(reason_path)
        if copied and os.path.lexists(path):  # still queued: no second copy aside
            unlink_quietly(target)
        raise
    return target


def record_failed_part(path: Path, message: QueueFile, reasons: Sequence[str],
                       folder: Path) -> Path:
    """Record recipients that failed for good while others stay queued.

    A copy holding only those recipients goes to `folder` as `<id>.<n>` (never
    replacing an earlier record); the queued file is left alone - the caller
    rewrites it with the recipients still to do.
    """
    data = message.to_bytes()
    number = 1
    while (folder / f"{path.name}.{number}").exists():
        number += 1
    target = folder / f"{path.name}.{number}"
    write_durably_replacing(folder / (target.name + REASON_SUFFIX), _reason_text(reasons))
    write_durably_replacing(target, data)
    fsync_dir(folder)
    return target


def _reason_text(reasons: Sequence[str]) -> bytes:
    return "".join(r.replace("\r", " ").replace("\n", " ") + "\n" for r in reasons).encode(
        "utf-8", "surrogateescape")


class Remover:
    """Unlinks files on its own thread, at most `backlog` behind the caller.

    `remove()` blocks only while the backlog is full. The thread is woken once per
    `batch` files (or by flush/close), not per file: each wake-up hands it the GIL.
    """

    def __init__(self, backlog: int = FINISH_BACKLOG, batch: int = FINISH_BATCH) -> None:
        self.backlog = backlog
        self.batch = min(batch, backlog)
        self._cond = threading.Condition()
        self._waiting: deque[str] = deque()  # not yet unlinked (incl. the batch at work)
        self._failed: list[tuple[str, OSError]] = []
        self._flushes = 0  # callers waiting for an empty backlog
        self._closing = False
        self._thread: threading.Thread | None = None

    def remove(self, path: str) -> None:
        with self._cond:
            if self._closing:  # after close(): nobody would wait for it
                self._failed.extend(_unlink_collecting([path]))
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="queue-remover",
                                                daemon=True)
                self._thread.start()
            while len(self._waiting) >= self.backlog:
                self._cond.wait()
            self._waiting.append(path)
            if len(self._waiting) == self.batch:
                self._cond.notify_all()

    def flush(self) -> list[tuple[str, OSError]]:
        """Wait until every file handed over is gone; the ones that failed, and why."""
        with self._cond:
            self._flushes += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._waiting)
            self._flushes -= 1
            failed, self._failed = self._failed, []
        return failed

    def close(self) -> list[tuple[str, OSError]]:
        failed = self.flush()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        return failed

    def _due(self) -> bool:
        return bool(self._waiting) and (len(self._waiting) >= self.batch or self._flushes > 0)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due():
                    if self._closing and not self._waiting:
                        return
                    self._cond.wait()
                batch = list(self._waiting)
            failed = _unlink_collecting(batch)
            with self._cond:
                for _ in batch:
                    self._waiting.popleft()
                self._failed.extend(failed)
                self._cond.notify_all()


def _unlink_collecting(paths: Sequence[str]) -> list[tuple[str, OSError]]:
    """Unlink each path; the failures (a file already gone is not one)."""
    failed = []
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as err:  # stays in queue.dir: sent again after a restart
            failed.append((path, err))
    return failed
