"""The queue: the file format and every move of a file in, through and out of the queue.

This module is the ONLY place that reads or writes the queue file format (SPEC §3)::

    From: <alice@example.com>\\n
    To: <bob@example.org>\\n            (one line per recipient, in RCPT order)
    \\n
    <the message data exactly as received, after dot-unstuffing>

Folders (all on the queue's filesystem, so every move is an atomic rename):

    queue.dir/              ready messages, one file each: the only thing the sender pops
    queue.dir/.tmp/         files being written by the receiver; never seen by the sender
    queue.dir/.sender.lock  flock'd by the one sender process that owns the queue
    queue.dir/.<id>.new     a rewrite in progress (renamed over <id>); never listed
    queue.dir/.work/<pid>/  claims of an older sender version: moved back at start
    failed/, quarantine/    next to queue.dir (config): messages that will never be sent

Names starting with "." are never messages: the sender and the watch skip them.

Durability (SPEC §3, §6): a message is written to `.tmp`, flushed to disk, renamed
into queue.dir and the folder fsynced before `store` returns; only then may the
receiver say 250. Two ways to get there:

- `QueueWriter.store`: one message, one caller: fsync the file, rename, fsync the
  folder. Concurrent callers each pay two cache flushes (the kernel merges some).
- `GroupCommit.store` (the receiver's default): one writer thread commits the
  messages of all waiting sessions together - write them all, one `syncfs(2)` for
  their data and inodes, rename them all, one folder fsync - and then wakes each
  session. Two flushes per batch instead of two per message: about half the
  kernel CPU and half the context switches per message (bench/README.md).

Queue ids are `<16 hex digits of time_ns><6 random hex digits>`: unique without a
shared counter (safe across threads and processes) and sortable by arrival.

Finishing (the sender's unlink of a delivered message) runs behind, on a thread of
its own (`Remover`): an ext4 unlink of a fsynced file costs ~100-150 us, more than
everything else the sender does for a message. At most `FINISH_BACKLOG` files wait;
`QueueReader.flush()` and `close()` wait for them, so a clean exit never gives a
delivered message back. After a crash the waiting ones are still in the work
folder and are sent again (at-least-once, as for any MTA).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import queue
import random
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

TMP_DIRNAME = ".tmp"
FINISH_BACKLOG = 16  # finished files that may wait for their unlink (the crash window)
FINISH_BATCH = 8  # ... and how many the remover thread takes per wake-up
WORK_DIRNAME = ".work"  # claims of an older sender version (recover_abandoned)
LOCK_NAME = ".sender.lock"  # the queue's owner holds an exclusive flock on it
REWRITE_SUFFIX = ".new"  # `.<id>.new`: a rewrite in progress
REASON_SUFFIX = ".reason"

_ENVELOPE_LINE = re.compile(rb"(From|To): <([^<>\r\n]*)>")


# A message's data: one bytes object, or its chunks in order (written with writev,
# never joined: the receiver hands over a message as the runs of lines it read).
MessageData = bytes | Sequence[bytes | bytearray]
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class QueueFormatError(ValueError):
    """A queue file that does not follow the format; the sender quarantines it."""


class QueueWriteError(OSError):
    """Storing a message failed; nothing was left behind. `no_space` says why."""

    @property
    def no_space(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class QueueFile:
    """One queued message: the envelope and the data, as the format holds them."""

    sender: str  # "" for the null sender <>
    recipients: tuple[str, ...]
    data: bytes

    def envelope_bytes(self) -> bytes:
        lines = [b"From: <" + _encode_address(self.sender) + b">\n"]
        lines.extend(b"To: <" + _encode_address(r) + b">\n" for r in self.recipients)
        lines.append(b"\n")
        return b"".join(lines)

    def to_bytes(self) -> bytes:
        return self.envelope_bytes() + self.data

    @classmethod
    def from_bytes(cls, raw: bytes) -> QueueFile:
        """Parse a queue file; raise QueueFormatError naming what is wrong."""
        end = raw.find(b"\n\n")
        if end < 0:
            raise QueueFormatError("no blank line after the envelope")
        lines = raw[:end].split(b"\n")
        sender: str | None = None
        recipients: list[str] = []
        for number, line in enumerate(lines, 1):
            match = _ENVELOPE_LINE.fullmatch(line)
            if not match:
                raise QueueFormatError(f"envelope line {number} is malformed: {line[:80]!r}")
            address = match.group(2).decode("utf-8", "surrogateescape")
            if match.group(1) == b"From":
                if number != 1:
                    raise QueueFormatError(f"'From:' on line {number}, expected only on line 1")
                sender = address
            else:
                if sender is None:
                    raise QueueFormatError("'To:' before 'From:'")
                if not address:
                    raise QueueFormatError(f"empty recipient on line {number}")
                recipients.append(address)
        if sender is None:
            raise QueueFormatError("no 'From:' line")
        if not recipients:
            raise QueueFormatError("no 'To:' line")
        return cls(sender, tuple(recipients), raw[end + 2 :])


def _encode_address(address: str) -> bytes:
    raw = address.encode("utf-8", "surrogateescape")
    if re.search(rb"[\x00-\x1f<>\x7f]", raw):
        # The receiver never accepts such an address; refuse rather than corrupt the format.
        raise QueueFormatError(f"address {address!r} cannot be queued")
    return raw


def new_queue_id(now_ns: int | None = None) -> str:
    """A unique id, sortable by arrival time (16 hex digits of ns, 6 random)."""
    # random.getrandbits, not secrets: uniqueness needs no secrecy, and the receiver
    # calls this per message - secrets costs a getrandom(2) syscall each time.
    return f"{now_ns if now_ns is not None else time.time_ns():016x}{random.getrandbits(24):06x}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class QueueWriter:
    """The receiver's side: store a message durably, then it is the sender's."""

    def __init__(self, queue_dir: Path) -> None:
        self.dir = Path(queue_dir)
        self.tmp_dir = self.dir / TMP_DIRNAME
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(exist_ok=True)
        # One descriptor of the folder for every session's fsync (no open/close each).
        self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # Plain strings for the per-message paths: pathlib's joins cost more CPU than
        # the syscalls they name (py-spy, bench/README.md).
        self._dir_prefix = f"{self.dir}{os.sep}"
        self._tmp_prefix = f"{self.tmp_dir}{os.sep}"

    def clean_leftovers(self) -> list[str]:
        """Delete temporary files a crashed receiver left; they were never acknowledged."""
        removed = []
        for entry in os.scandir(self.tmp_dir):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(entry.name)
        return removed

    def store(self, sender: str, recipients: Sequence[str], data: MessageData) -> str:
        """Write the message durably into the queue and return its queue id.

        Raises QueueWriteError (nothing left behind) if any step fails.
        """
        queue_id = new_queue_id()
        self.write_tmp(queue_id, envelope_of(sender, recipients), data, sync=True)
        self.publish(queue_id)
        self.sync_folder([queue_id])
        return queue_id

    # The steps of a store, shared by `store` and `GroupCommit`. Each one raises
    # QueueWriteError after removing whatever it left behind.

    def write_tmp(self, queue_id: str, envelope: bytes, data: MessageData, *,
                  sync: bool) -> None:
        """Create `.tmp/<id>` with the envelope and data; fsync it if `sync`."""
        tmp_path = self._tmp_prefix + queue_id
        chunks = (envelope, data) if isinstance(data, bytes) else (envelope, *data)
        try:
            write_durably(tmp_path, chunks, sync=sync)
        except OSError as err:
            _unlink_quietly(tmp_path)
            raise QueueWriteError(err.errno, f"cannot queue message: {err.strerror}") from err

    def take_back(self, queue_id: str) -> None:
        """Remove a message that will not be acknowledged, wherever a step left it."""
        _unlink_quietly(self._tmp_prefix + queue_id)
        _unlink_quietly(self._dir_prefix + queue_id)

    def publish(self, queue_id: str) -> None:
        """Rename a durable `.tmp/<id>` into queue.dir (the sender may now see it)."""
        tmp_path = self._tmp_prefix + queue_id
        try:
            os.rename(tmp_path, self._dir_prefix + queue_id)
        except OSError as err:
            _unlink_quietly(tmp_path)
            raise QueueWriteError(err.errno, f"cannot queue message: {err.strerror}") from err

    def sync_folder(self, published: Sequence[str]) -> None:
        """fsync queue.dir: the renames of `published` are durable after this."""
        try:
            os.fsync(self._dir_fd)
        except OSError as err:
            # The renames may or may not be durable: take the files back rather than
            # leave unacknowledged messages that the sender might still deliver.
            for queue_id in published:
                _unlink_quietly(self._dir_prefix + queue_id)
            raise QueueWriteError(err.errno, f"cannot sync queue folder: {err.strerror}") from err

    def sync_filesystem(self) -> None:
        """syncfs(2) of the queue's filesystem: every file written so far is on disk."""
        if _syncfs(self._dir_fd) != 0:
            code = ctypes.get_errno()
            raise QueueWriteError(code, f"cannot sync queue filesystem: {os.strerror(code)}")


def envelope_of(sender: str, recipients: Sequence[str]) -> bytes:
    return QueueFile(sender, tuple(recipients), b"").envelope_bytes()


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

    __slots__ = ("queue_id", "envelope", "data", "error", "done")

    def __init__(self, envelope: bytes, data: MessageData) -> None:
        self.queue_id = new_queue_id()
        self.envelope = envelope
        self.data = data
        self.error: QueueWriteError | None = None
        self.done = threading.Lock()  # held until the writer has settled this ticket
        self.done.acquire()


class GroupCommit:
    """Group commit (issue 6): one writer thread makes every waiting message durable.

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

    def store(self, sender: str, recipients: Sequence[str], data: MessageData) -> str:
        """Queue the message durably and return its id, as `QueueWriter.store`."""
        ticket = _Ticket(envelope_of(sender, recipients), data)
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
                    ticket.data = b""  # written: the batch must not keep the messages alive
                    ticket.done.release()
            if closing:
                return

    def _commit(self, batch: list[_Ticket]) -> None:
        writer = self.writer
        written = [t for t in batch if self._settle(t, writer.write_tmp, t.queue_id,
                                                    t.envelope, t.data, sync=_syncfs is None)]
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


def write_durably(path: str | Path, chunks: Sequence[bytes | bytearray], *,
                  sync: bool = True) -> None:
    """Create `path` exclusively, write all chunks, fsync (unless the caller syncs
    later, e.g. a whole batch with syncfs). No rename here."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        for start in range(0, len(chunks), IOV_MAX):  # writev takes at most IOV_MAX
            group = chunks[start : start + IOV_MAX]
            written = os.writev(fd, group)
            if written != sum(map(len, group)):
                _write_rest(fd, group, written)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_rest(fd: int, chunks: Sequence[bytes | bytearray], written: int) -> None:
    """Finish a short writev: the chunks after the first `written` bytes, one by one."""
    for chunk in chunks:
        if written >= len(chunk):
            written -= len(chunk)
            continue
        rest = memoryview(chunk)[written:]
        written = 0
        while rest:
            rest = rest[os.write(fd, rest) :]


def read_file(path: str | Path, size: int | None = None) -> bytes:
    """The whole file in as few syscalls as it takes (open, [fstat,] read, close).

    `Path.read_bytes` goes through a buffered file object: five more syscalls per
    message (ioctl, lseeks, a second fstat, a read to confirm the end) in the
    sender's hot loop (strace, bench/README.md). `size`, when the caller knows it
    (the queue listing's stat), saves the fstat; a wrong one only costs reads.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
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


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class Remover:
    """Unlinks files on its own thread, at most `backlog` behind the caller.

    `remove()` blocks only while the backlog is full. The thread is woken once per
    `batch` files (or by flush/close), not per file: each wake-up handed it the GIL
    and cost the sender's main thread a fifth of its Python time (py-spy --gil).
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
        except OSError as err:  # stays in queue.dir: sent again
            failed.append((path, err))
    return failed


@dataclass(frozen=True)
class QueueEntry:
    """A ready file in queue.dir, as listed."""

    name: str
    mtime_ns: int
    size: int | None = None  # as listed: a hint for read(), saves an fstat


class QueueReader:
    """The sender's side: own the queue, list, finish, fail and quarantine messages.

    Only the process holding the queue lock (`try_lock`) may deliver; it works on the
    files in queue.dir directly (see the module doc for what that guarantees).
    Creating a reader takes no lock: a second sender can be built, and wait.
    """

    def __init__(self, queue_dir: Path, failed_dir: Path, quarantine_dir: Path) -> None:
        self.dir = Path(queue_dir)
        self.failed_dir = Path(failed_dir)
        self.quarantine_dir = Path(quarantine_dir)
        self.work_root = self.dir / WORK_DIRNAME
        for folder in (self.dir, self.failed_dir, self.quarantine_dir):
            folder.mkdir(parents=True, exist_ok=True)
        # Never unlinked: a process could otherwise lock an inode nobody else sees.
        self._lock_fd: int | None = os.open(
            self.dir / LOCK_NAME, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640
        )
        self.locked = False
        self._remover = Remover()
        # Plain strings on the per-message path (pathlib joins cost more than the
        # syscalls they name, see QueueWriter).
        self._dir_prefix = f"{self.dir}{os.sep}"

    def try_lock(self) -> bool:
        """Become the queue's one sender if no other process is; True if we are.

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
        if self._older_sender_alive():
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            return False
        self.locked = True
        self._remove_stale_rewrites()
        return True

    def _older_sender_alive(self) -> bool:
        """A sender of the version that claimed into `.work/<pid>/` is still running
        (its `<pid>.lock` is held): it knows nothing of the queue lock, so this
        process must wait for it to end rather than deliver the same files."""
        if not self.work_root.is_dir():
            return False
        for entry in os.scandir(self.work_root):
            if not entry.name.endswith(".lock"):
                continue
            try:
                fd = os.open(entry.path, os.O_WRONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # that sender just ended
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            finally:
                os.close(fd)  # also drops the lock we may just have taken
        return False

    def _remove_stale_rewrites(self) -> None:
        """`.<id>.new` files a crashed owner left mid-rewrite: <id> still holds the
        message (old content), so they are garbage."""
        for entry in os.scandir(self.dir):
            name = entry.name
            if name.startswith(".") and name.endswith(REWRITE_SUFFIX) and entry.is_file():
                _unlink_quietly(entry.path)

    def close(self) -> list[tuple[str, OSError]]:
        """Finish what was finished, then drop the lock (clean exit). Returns the
        finished files whose unlink failed (still queued: sent again)."""
        failed = self._remover.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None
        self.locked = False
        return failed

    def recover_abandoned(self) -> list[str]:
        """Move files claimed by dead sender processes (an older version's
        `.work/<pid>/` folders) back into the queue; a live one's are left alone."""
        if not self.work_root.is_dir():
            return []
        recovered: list[str] = []
        for entry in os.scandir(self.work_root):
            if not entry.is_dir():
                continue
            lock_path = self.work_root / f"{entry.name}.lock"
            lock_fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock_fd)
                continue  # its owner is alive
            try:
                recovered.extend(self._return_all(Path(entry.path)))
                _rmdir_quietly(Path(entry.path))
                _unlink_quietly(lock_path)
            finally:
                os.close(lock_fd)
        return recovered

    def _return_all(self, work_dir: Path) -> list[str]:
        names = []
        for entry in os.scandir(work_dir):
            os.rename(entry.path, self.dir / entry.name)
            names.append(entry.name)
        if names:
            fsync_dir(self.dir)
        return names

    def list_ready(self) -> list[QueueEntry]:
        """Ready messages, oldest first (mtime, then name)."""
        entries = []
        for entry in os.scandir(self.dir):
            if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                continue
            try:
                stat = entry.stat(follow_symlinks=False)
                entries.append(QueueEntry(entry.name, stat.st_mtime_ns, stat.st_size))
            except FileNotFoundError:
                continue  # removed meanwhile (e.g. by hand)
        entries.sort(key=lambda e: (e.mtime_ns, e.name))
        return entries

    def path_of(self, name: str) -> str:
        """A queued message's path, as a plain string for the sender's hot loop (a
        Path built per message cost more Python time than a syscall)."""
        return self._dir_prefix + name

    @staticmethod
    def read(path: str | Path, size: int | None = None) -> QueueFile:
        """Parse a queued file; QueueFormatError if it does not follow the format.

        `size`: the size listed (QueueEntry.size), if known."""
        return QueueFile.from_bytes(read_file(path, size))

    def finish(self, path: str | Path) -> None:
        """Every recipient is done: the message leaves the queue (unlinked behind,
        see the module doc; flush() or close() to be sure it is gone)."""
        self._remover.remove(os.fspath(path))

    def flush(self) -> list[tuple[str, OSError]]:
        """Wait until every finished file is gone; those whose unlink failed, and why
        (they stay queued and are sent again)."""
        return self._remover.flush()

    def rewrite(self, path: Path, message: QueueFile) -> None:
        """Durably replace a queued file's content (e.g. fewer recipients left).

        Written to `.<id>.new` (never listed), renamed over the file, folder fsynced.
        The original mtime is kept so that the message keeps its place in the queue.
        """
        stat = os.stat(path)
        tmp = path.with_name(f".{path.name}{REWRITE_SUFFIX}")
        _unlink_quietly(tmp)
        write_durably(tmp, (message.envelope_bytes(), message.data))
        os.utime(tmp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.rename(tmp, path)
        fsync_dir(path.parent)

    def fail(self, path: Path, message: QueueFile, reasons: Sequence[str]) -> Path:
        """Move a message out of the queue for good, with the reasons beside it."""
        return self._set_aside(path, message, reasons, self.failed_dir)

    def fail_some(self, path: Path, message: QueueFile, reasons: Sequence[str]) -> Path:
        """Record recipients that failed for good while others stay queued.

        A copy holding only those recipients goes to the failed folder as
        `<id>.<n>` (never replacing an earlier record); the queued file is left
        alone — the caller rewrites it with the recipients still to do.
        """
        number = 1
        while (self.failed_dir / f"{path.name}.{number}").exists():
            number += 1
        part = path.with_name(f"{path.name}.{number}")
        target = self.failed_dir / part.name
        reason_text = "".join(r.replace("\r", " ").replace("\n", " ") + "\n" for r in reasons)
        write_durably_replacing(self.failed_dir / (part.name + REASON_SUFFIX), reason_text.encode())
        write_durably_replacing(target, message.to_bytes())
        fsync_dir(self.failed_dir)
        return target

    def quarantine(self, path: Path, reason: str) -> Path:
        """Move an unreadable file aside, untouched, with the reason beside it."""
        return self._set_aside(path, None, [reason], self.quarantine_dir)

    def _set_aside(
        self, path: Path, message: QueueFile | None, reasons: Sequence[str], folder: Path
    ) -> Path:
        target = folder / path.name
        reason_text = "".join(r.replace("\r", " ").replace("\n", " ") + "\n" for r in reasons)
        write_durably_replacing(folder / (path.name + REASON_SUFFIX), reason_text.encode())
        if message is None:
            os.rename(path, target)
        else:
            write_durably_replacing(target, message.to_bytes())
            os.unlink(path)
        fsync_dir(folder)
        return target


def write_durably_replacing(path: Path, data: bytes) -> None:
    """Write `path` via a temporary name + fsync + rename (replaces an older file)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    write_durably(tmp, (data,))
    os.rename(tmp, path)


def _rmdir_quietly(path: Path) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass
