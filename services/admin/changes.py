"""What `mailbag hold|release|delete|flush|requeue` change, and through whom (SPEC §7).

Queued messages are changed only by the queue's owner, never behind its back:

- the running sender, over its control socket (services/sender/control.py): its
  runner applies the change between two messages, also to a message it has read or
  has in flight, so a `delete` or `hold` takes effect in the middle of a pass, and
  a `flush` wakes it at once;
- when no sender serves the queue, this command becomes the owner: it takes the
  queue lock itself (non-blocking) and applies shared/queue/operations.py to the
  messages at rest. When the lock is held but nobody answers on the socket (a
  sender starting up, or another `mailbag` command at work), it tries both again
  for LOCK_WAIT seconds, then gives up with a clear error.

The failed folder is not the sender's to change (it only ever adds files there,
each one renamed in whole), so `delete --failed` and `requeue` work on it directly.
`requeue` stores a failed message into the queue AS NEW (a new id, its lifetime
starting again) through the queue's writer - durable, across filesystems - and
only then removes it and its reason: a crash in between leaves a copy in both
places, never none.

Every id acted upon is logged as one `ADMIN` line (peer `uid=N`) with what became
of it, so `grep ID var/log/mailbag.log*` shows the operator's part of its story.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.admin.errors import AdminError
from services.admin.listing import ListingError, failed_names, failed_path
from services.sender.control import ControlError, ask_sender
from shared.config import Config
from shared.log import user_command_log
from shared.queue import (
    REASON_SUFFIX,
    QueueFile,
    QueueFormatError,
    QueueReader,
    QueueWriteError,
    QueueWriter,
    StateStore,
    fsync_dir,
    operations,
)

LOG_IDENTIFIER = "ADMIN"  # SPEC §7: the program field of its log lines
LOCK_WAIT = 5.0  # seconds to wait for a queue lock nobody answers for
LOCK_RETRY = 0.2
VIA_SENDER = "sender"
VIA_LOCK = "queue lock"


@dataclass(frozen=True)
class Result:
    """What became of one id."""

    queue_id: str
    text: str  # for the operator: "held", "not in the queue", "requeued as ..."
    found: bool = True  # False: no such message, or its change failed (exit 1)
    new_id: str | None = None  # a requeued message's id in the queue


class AdminLog:
    """The `ADMIN` lines in the shared logfile; a user who may not write it is told
    so once on stderr, and the change is still made."""

    def __init__(self, config: Config, warn: Callable[[str], None]) -> None:
        self.log, problem = user_command_log(config.log, LOG_IDENTIFIER, os.getuid())
        if self.log is None:
            warn(f"cannot write the log {config.log.file} ({problem}); "
                 "the change is not logged")

    def record(self, action: str, result: Result, **details: object) -> None:
        """One line for one id (a requeued message's new id on it too)."""
        if self.log is None:
            return
        if result.new_id:
            details["new_id"] = result.new_id
        outcome = self.log.ok if result.found else self.log.fail
        outcome(action, id=result.queue_id, result=result.text, **details)

    def note(self, action: str, **details: object) -> None:
        """A line about no message in particular (a flush of every deferred one)."""
        if self.log is not None:
            self.log.ok(action, **details)


# ---------------------------------------------------------------------------- the queue

def change_queued(config: Config, action: str, ids: Sequence[str], *,
                  wait: float = LOCK_WAIT) -> tuple[list[Result], str]:
    """Apply hold / release / delete / flush to queued messages; the results and who
    applied them (VIA_SENDER or VIA_LOCK). `flush` with no ids: every deferred one.
    AdminError if neither the sender nor the queue lock can be had."""
    deadline = time.monotonic() + wait
    while True:
        try:
            answers = ask_sender(config.queue.dir, action, ids)
        except ControlError as err:
            raise AdminError(str(err)) from None
        if answers is not None:
            return _results(answers), VIA_SENDER
        answers = _at_rest(config, action, ids)
        if answers is not None:
            return _results(answers), VIA_LOCK
        if time.monotonic() >= deadline:
            raise AdminError(
                f"the queue {config.queue.dir} is locked, but no sender answers on its "
                "control socket (a sender starting up, or another mailbag command); "
                "try again")
        time.sleep(LOCK_RETRY)


def _results(answers: dict[str, str]) -> list[Result]:
    return [Result(queue_id, text, operations.succeeded(text))
            for queue_id, text in answers.items()]


def _at_rest(config: Config, action: str, ids: Sequence[str]) -> dict[str, str] | None:
    """As the queue's owner (no sender runs); None if the lock is taken."""
    queue = config.queue
    try:
        reader = QueueReader(queue.dir, queue.failed, queue.quarantine)
    except OSError as err:
        raise AdminError(f"cannot use the queue {queue.dir}: {err.strerror or err} "
                         "(run as root or as the user mailbag runs as)") from None
    try:
        if not reader.try_lock():
            return None
        store = StateStore(queue.dir)
        states, _unreadable = store.load_all()  # an unreadable state counts as none
        now = time.time()
        if action == "flush" and not ids:
            ids = operations.deferred_ids(states, now)
        answers = {}
        for queue_id in ids:
            answers[queue_id] = operations.apply(action, queue.dir, store, states, queue_id, now)
        return answers
    except OSError as err:
        raise AdminError(f"cannot change the queue {queue.dir}: {err.strerror or err}") from None
    finally:
        reader.close()


def queued_ids(config: Config) -> list[str]:
    """Every message in the queue now, oldest first (for `delete --all`)."""
    queue = config.queue
    try:
        reader = QueueReader(queue.dir, queue.failed, queue.quarantine)
    except OSError as err:
        raise AdminError(f"cannot use the queue {queue.dir}: {err.strerror or err}") from None
    try:
        return [entry.name for entry in reader.scan().ready]
    except OSError as err:
        raise AdminError(f"cannot list the queue {queue.dir}: {err.strerror or err}") from None
    finally:
        reader.close()


# ---------------------------------------------------------------------------- failed

def failed_ids(config: Config) -> list[str]:
    """Every message in the failed folder (`<id>` or `<id>.<n>`), as listed."""
    try:
        return failed_names(config.queue.failed)
    except ListingError as err:
        raise AdminError(str(err)) from None


def delete_failed(config: Config, name: str) -> Result:
    path = failed_path(config, name)
    if path is None:
        return Result(name, "not in the failed folder", found=False)
    try:
        os.unlink(path)
        _remove_reason(path)
    except OSError as err:
        raise AdminError(f"cannot delete {path}: {err.strerror or err}") from None
    return Result(name, "deleted from the failed folder")


def requeue(config: Config, name: str) -> Result:
    """Store the failed message `name` into the queue as a new message, then remove
    it from the failed folder. The failed file is flock'ed meanwhile: two commands
    requeueing it at once give one copy, and the second says so."""
    path = failed_path(config, name)
    if path is None:
        return Result(name, "not in the failed folder", found=False)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return Result(name, "not in the failed folder", found=False)
    except OSError as err:
        raise AdminError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AdminError(f"{name} is being requeued by another command") from None
        if os.fstat(fd).st_nlink == 0:  # the other command requeued it meanwhile
            return Result(name, "not in the failed folder", found=False)
        return _requeue_locked(config, name, path, fd)
    finally:
        os.close(fd)


def _requeue_locked(config: Config, name: str, path: Path, fd: int) -> Result:
    try:
        message = QueueFile.from_bytes(read_fd(fd))
    except QueueFormatError as err:
        raise AdminError(f"{name} cannot be requeued: {err}") from None
    except OSError as err:
        raise AdminError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        with QueueWriter(config.queue.dir) as writer:
            new_id = writer.store(message.sender, message.recipients, message.data)
    except (QueueWriteError, OSError) as err:
        raise AdminError(f"cannot store {name} into the queue: {err.strerror or err}") from None
    try:
        os.unlink(path)
        _remove_reason(path)
    except OSError as err:
        raise AdminError(f"{name} was requeued as {new_id}, but cannot be removed from "
                         f"{path.parent}: {err.strerror or err}") from None
    return Result(name, f"requeued as {new_id}", new_id=new_id)


def read_fd(fd: int) -> bytes:
    """All of an open file, from its start."""
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _remove_reason(path: Path) -> None:
    """The message is gone: its reason goes too, and a power cut must not bring the
    message back."""
    try:
        os.unlink(path.with_name(path.name + REASON_SUFFIX))
    except FileNotFoundError:
        pass
    fsync_dir(path.parent)

