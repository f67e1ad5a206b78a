"""The queue and the log as `mailbag-sendmail` writes them (both modes: stdin, -bs).

`store` goes through `QueueWriter`, the receiver's durable path (`.tmp/<id>`,
fsync, rename into queue.dir, folder fsync), and returns only once the message is
durable; otherwise it raises SubmissionError with the sysexits code, nothing left
behind. `SubmitLog` writes the `SUBMIT uid=N` lines of the shared logfile.
"""

from __future__ import annotations

import errno
import os
import pwd
import sys
from pathlib import Path

from services.sendmail.submission import Submission, SubmissionError, Submitter
from shared.config import Config
from shared.log import user_command_log
from shared.queue import QueueFormatError, QueueWriteError, QueueWriter

PROGRAM = "mailbag-sendmail"  # the prefix of every line on stderr
LOG_IDENTIFIER = "SUBMIT"
# The queue refuses us until someone fixes it (permissions, a read-only filesystem, a
# file where a folder should be): 73. Anything else may pass by itself: 75.
_CANNOT_CREATE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                            errno.EEXIST})


def say(message: str) -> None:
    """One line on stderr: `mailbag-sendmail: ...`."""
    print(f"{PROGRAM}: {message}", file=sys.stderr)


def store(config: Config, submission: Submission, queue_id: str) -> None:
    """Write the message durably into the queue; SubmissionError (nothing left) if not."""
    folder = config.queue.dir
    try:
        with QueueWriter(folder) as writer:
            writer.store(submission.sender, submission.recipients, submission.chunks,
                         queue_id=queue_id)
    except QueueFormatError as err:
        raise SubmissionError(os.EX_DATAERR, f"cannot queue this envelope: {err}") from None
    except OSError as err:  # QueueWriteError, or the folders could not be opened
        raise _write_error(err, folder) from None


def _write_error(err: OSError, folder: Path) -> SubmissionError:
    why = os.strerror(err.errno) if err.errno else str(err)
    if isinstance(err, QueueWriteError) and err.no_space:
        return SubmissionError(os.EX_TEMPFAIL, f"queue {folder} is full ({why}); "
                                               f"nothing was queued, try again later")
    if err.errno in _CANNOT_CREATE:
        return SubmissionError(os.EX_CANTCREAT, f"cannot write the queue {folder}: {why} "
                                                f"(callers need write access to it and "
                                                f"its .tmp folder, e.g. the mailbag group)")
    return SubmissionError(os.EX_TEMPFAIL, f"cannot write the queue {folder}: {why}; "
                                           f"nothing was queued, try again later")


def current_submitter(config: Config) -> Submitter:
    uid = os.getuid()
    try:
        login = pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid without a passwd entry (containers)
        login = f"uid{uid}"
    domain = config.local.domains[0] if config.local.domains else config.hostname
    return Submitter(uid=uid, login=login, hostname=config.hostname, domain=domain)


class SubmitLog:
    """The `SUBMIT uid=N` lines in the shared logfile. A caller who may not write the
    logfile still gets the message queued: it is told on stderr instead."""

    def __init__(self, config: Config, uid: int) -> None:
        self.path = config.log.file
        self.log, self.problem = user_command_log(config.log, LOG_IDENTIFIER, uid)

    def queued(self, queue_id: str, submission: Submission) -> None:
        if self.log is None:
            say(f"queued as {queue_id}, but cannot write the log file {self.path}: "
                f"{self.problem}")
            return
        self.log.ok("queued", id=queue_id, sender=f"<{submission.sender}>",
                    rcpts=len(submission.recipients), size=submission.size)

    def failed(self, err: SubmissionError) -> None:
        if self.log is not None:
            self.log.fail("submit", exit=err.exit_code, error=str(err))
