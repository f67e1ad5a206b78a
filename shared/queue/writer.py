"""The writing side of the queue: a message becomes durable before anyone says 250.

A message is written to `queue.dir/.tmp/<id>`, flushed to disk, renamed into
queue.dir and the folder fsynced before `store` returns (SPEC §3, §6); only then may
the receiver (or `mailbag-sendmail`) report success. Two ways to get there:

- `QueueWriter.store`: one message, one caller: fsync the file, rename, fsync the
  folder. Concurrent callers each pay two cache flushes (the kernel merges some).
- `GroupCommit.store` (the receiver's default): one writer thread commits the
  messages of all waiting sessions together - write them all, one `syncfs(2)` for
  their data and inodes, rename them all, one folder fsync - and then wakes each
  session. Two flushes per batch instead of two per message (bench/README.md).

`store` takes the data as one bytes object or as a sequence of chunks (a trace
header, the client's data, headers added at the end of its header section): they
go to the file with one writev, never joined in memory.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from shared.queue.files import unlink_quietly, write_durably
from shared.queue.format import envelope_of, new_queue_id

TMP_DIRNAME = ".tmp"
LEFTOVER_AGE = 3600.0  # seconds: an older file in .tmp is a crash's leftover

Chunks = Sequence[bytes | bytearray | memoryview]


class QueueWriteError(OSError):
    """Storing a message failed; nothing was left behind. `no_space` says why."""

    @property
    def no_space(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT)


def _as_chunks(data: bytes | memoryview | Chunks) -> list[bytes | bytearray | memoryview]:
    if isinstance(data, bytes | bytearray | memoryview):
        return [data]
    return list(data)


class QueueWriter:
    """The writing side (the receiver, `mailbag-sendmail`): store a message durably."""

    def __init__(self, queue_dir: Path) -> None:
        self.dir = Path(queue_dir)
        self.tmp_dir = self.dir / TMP_DIRNAME
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(exist_ok=True)
        # One descriptor of the folder for every session's fsync (no open/close each).
        self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # Plain strings for the per-message paths: pathlib's joins cost more CPU than
        # the syscalls they name (bench/README.md).
        self._dir_prefix = f"{self.dir}{os.sep}"
        self._tmp_prefix = f"{self.tmp_dir}{os.sep}"

    def clean_leftovers(self) -> list[str]:
        """Delete temporary files a crash left; they were never acknowledged. Only
        those older than LEFTOVER_AGE: `mailbag-sendmail`, `mailbag requeue` and the
        sender's notices write into `.tmp` too, at any moment, and a file being
        written is seconds old."""
        limit = time.time() - LEFTOVER_AGE
        removed = []
        for entry in os.scandir(self.tmp_dir):
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # published or taken back meanwhile
            if stat.S_ISREG(info.st_mode) and info.st_mtime < limit:
                unlink_quietly(entry.path)
                removed.append(entry.name)
        return removed

    def close(self) -> None:
        """Close the folder's descriptor (a process that stores many messages through
        one writer after another would run out of them)."""
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def __enter__(self) -> QueueWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def store(self, sender: str, recipients: Sequence[str], data: bytes | Chunks, *,
              queue_id: str | None = None) -> str:
        """Write the message durably into the queue and return its queue id.

        `queue_id`: one made with `new_queue_id()` beforehand, when the data names it
        (a Received: header). Raises QueueWriteError (nothing left behind) if any step
        fails, QueueFormatError if the envelope cannot be queued.
        """
        queue_id = queue_id or new_queue_id()
        chunks = [envelope_of(sender, recipients), *_as_chunks(data)]
        self.write_tmp(queue_id, chunks, sync=True)
        self.publish(queue_id)
        self.sync_folder([queue_id])
        return queue_id

    # The steps of a store, shared by `store` and `GroupCommit`. Each one raises
    # QueueWriteError after removing whatever it left behind.

    def write_tmp(self, queue_id: str, chunks: Chunks, *, sync: bool) -> None:
        """Create `.tmp/<id>` with the envelope and data chunks; fsync it if `sync`."""
        tmp_path = self._tmp_prefix + queue_id
        try:
            write_durably(tmp_path, chunks, sync=sync)
        except OSError as err:
            unlink_quietly(tmp_path)
            raise QueueWriteError(err.errno, f"cannot queue message: {err.strerror}") from err

    def take_back(self, queue_id: str) -> None:
        """Remove a message that will not be acknowledged, wherever a step left it."""
        unlink_quietly(self._tmp_prefix + queue_id)
        unlink_quietly(self._dir_prefix + queue_id)

    def publish(self, queue_id: str) -> None:
        """Rename a durable `.tmp/<id>` into queue.dir (the sender may now see it)."""
        tmp_path = self._tmp_prefix + queue_id
        try:
            os.rename(tmp_path, self._dir_prefix + queue_id)
        except OSError as err:
            unlink_quietly(tmp_path)
            raise QueueWriteError(err.errno, f"cannot queue message: {err.strerror}") from err

    def sync_folder(self, published: Sequence[str]) -> None:
        """fsync queue.dir: the renames of `published` are durable after this."""
        try:
            os.fsync(self._dir_fd)
        except OSError as err:
            # The renames may or may not be durable: take the files back rather than
            # leave unacknowledged messages that the sender might still deliver.
            for queue_id in published:
                unlink_quietly(self._dir_prefix + queue_id)
            raise QueueWriteError(err.errno, f"cannot sync queue folder: {err.strerror}") from err

    def sync_filesystem(self) -> None:
        """syncfs(2) of the queue's filesystem: every file written so far is on disk."""
        if _syncfs(self._dir_fd) != 0:
            code = ctypes.get_errno()
            raise QueueWriteError(code, f"cannot sync queue filesystem: {os.strerror(code)}")


def _load_syncfs() -> Callable[[int], int] | None:
    """libc's syncfs(2), or None where it cannot be trusted (then GroupCommit fsyncs
    each file): not Linux, or Linux before 5.8, whose syncfs returned 0 even when
    writing the data back failed."""
    if not _linux_at_least(5, 8):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function  # ctypes releases the GIL for the call, like os.fsync


def _linux_at_least(major: int, minor: int) -> bool:
    system = os.uname()
    numbers = re.match(r"(\d+)\.(\d+)", system.release)
    return (system.sysname == "Linux" and numbers is not None
            and (int(numbers.group(1)), int(numbers.group(2))) >= (major, minor))


_syncfs = _load_syncfs()


class _Ticket:
    """One session's message waiting in a GroupCommit batch."""

    __slots__ = ("queue_id", "chunks", "error", "done")

    def __init__(self, queue_id: str, chunks: list[bytes | bytearray | memoryview]) -> None:
        self.queue_id = queue_id
        self.chunks = chunks
        self.error: QueueWriteError | None = None
        self.done = threading.Lock()  # held until the writer has settled this ticket
        self.done.acquire()


class GroupCommit:
    """Group commit: one writer thread makes every waiting message durable.

    A session calls `store()` and blocks. The writer takes all tickets waiting at that
    moment - a batch, at most `max_batch` - and for the whole batch:

      1. writes each message to `.tmp/<id>` (O_EXCL, one writev, no fsync yet);
      2. makes them durable with ONE `syncfs(2)` of the queue's filesystem (data and
         inodes of every file, behind one cache flush; fsync would flush per file);
      3. renames each into queue.dir;
      4. fsyncs queue.dir once;

    and only then releases each session, which may say 250: every 250 still follows
    its own message's file sync, rename and folder sync (the bench's `--strace` check
    verifies this order per message). A failed step fails just the messages it
    concerns (a full disk while writing one file) or the whole batch (syncfs, the
    folder fsync), with nothing left behind, as `QueueWriter.store` does.

    syncfs also flushes whatever else is dirty on that filesystem, so a busy
    neighbour on the same filesystem lengthens the wait (and a write error of another
    file there fails the batch: 451, and the clients try again): put the queue on its
    own filesystem, or set `queue.group_commit = false` for `QueueWriter.store`'s
    per-message fsyncs. Without a trustworthy syncfs (not Linux, or before 5.8) step 2
    fsyncs each file.
    """

    def __init__(self, writer: QueueWriter, max_batch: int = 64) -> None:
        self.writer = writer
        self.max_batch = max_batch
        self._waiting: queue.SimpleQueue[_Ticket | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    def store(self, sender: str, recipients: Sequence[str], data: bytes | Chunks, *,
              queue_id: str | None = None) -> str:
        """Queue the message durably and return its id, as `QueueWriter.store`."""
        chunks = [envelope_of(sender, recipients), *_as_chunks(data)]
        ticket = _Ticket(queue_id or new_queue_id(), chunks)
        self._waiting.put(ticket)
        ticket.done.acquire()  # released by the writer once the batch is settled
        if ticket.error is not None:
            raise ticket.error
        return ticket.queue_id

    def close(self) -> None:
        """Let the writer finish what is waiting, then end it."""
        self._waiting.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (first := self._waiting.get()) is not None:
            batch = [first]
            closing = False
            while len(batch) < self.max_batch:
                try:
                    ticket = self._waiting.get_nowait()
                except queue.Empty:
                    break
                if ticket is None:
                    closing = True
                    break
                batch.append(ticket)
            try:
                self._commit(batch)
            except Exception as exc:  # noqa: BLE001 - a bug here must not strand sessions
                for ticket in batch:  # they get 451: nothing of theirs may stay behind
                    ticket.error = ticket.error or QueueWriteError(errno.EIO, f"internal: {exc}")
                    self.writer.take_back(ticket.queue_id)
            finally:
                for ticket in batch:
                    ticket.chunks = []  # written: the batch must not keep the messages alive
                    ticket.done.release()
            if closing:
                return

    def _commit(self, batch: list[_Ticket]) -> None:
        writer = self.writer
        written = [t for t in batch if self._settle(t, writer.write_tmp, t.queue_id,
                                                    t.chunks, sync=_syncfs is None)]
        if not written:
            return
        if _syncfs is not None:
            try:
                writer.sync_filesystem()
            except QueueWriteError as err:
                for ticket in written:
                    writer.take_back(ticket.queue_id)
                    ticket.error = err
                return
        published = [t for t in written if self._settle(t, writer.publish, t.queue_id)]
        if not published:
            return
        try:
            writer.sync_folder([t.queue_id for t in published])
        except QueueWriteError as err:
            for ticket in published:
                ticket.error = err

    @staticmethod
    def _settle(ticket: _Ticket, step: Callable[..., None], *args: object, **kw: object) -> bool:
        """Run one step for one ticket; a QueueWriteError fails just that ticket."""
        try:
            step(*args, **kw)
        except QueueWriteError as err:
            ticket.error = err
            return False
        return True


# What the receiver stores messages through (both have `store(sender, rcpts, data)`).
MessageStore = QueueWriter | GroupCommit
