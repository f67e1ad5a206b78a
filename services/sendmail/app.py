"""`mailbag-sendmail`: the shell around the pure parts (options.py, submission.py).

It writes straight into the queue through `QueueWriter` - the receiver's durable
path: `.tmp/<id>`, fsync, rename into queue.dir, folder fsync - so it works while
the receiver is down, and it exits 0 only once the message is durable (SPEC §7).
Exit codes are sysexits.h's (`os.EX_*`): 64 usage, 65 bad data or address, 73 the
queue cannot be written, 75 temporary (disk full, other write errors), 78 config.
Every error is one line on stderr, `mailbag-sendmail: ...`, and nothing is queued.

Who may write the queue: whoever can create files in queue.dir/.tmp and rename them
into queue.dir (README "Operating mailbag": a `mailbag` group owning setgid
folders). The umask is set so that the folders we create are group-writable and
the message file (mode 0640) is readable by the sender through that group.
"""

from __future__ import annotations

import os
import pwd
import sys
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial

from services.admin.listing import ListingError, list_queue
from services.sendmail.options import Mode, Options, UsageError, parse_command_line
from services.sendmail.spool import PROGRAM, SubmitLog, current_submitter, say, store
from services.sendmail.submission import (
    InputCollector,
    SubmissionError,
    collect,
    prepare,
    without_from_lines,
)
from shared.config import Config, ConfigError, load_config, resolve_config_path
from shared.queue import new_queue_id

READ_PIECE = 64 * 1024  # stdin is read a line at a time, at most this much at once
SUBMIT_UMASK = 0o007  # folders 0770 (the group writes too), files as created (0640)


def run() -> None:
    """The console script's entry point."""
    open_standard_streams()
    sys.exit(main(sys.argv))


def open_standard_streams() -> None:
    """A caller may start us with stdin, stdout or stderr closed (daemons do): such
    a descriptor is opened on /dev/null, as Postfix's sendmail does, so that reading
    an empty message or printing an error is a clear outcome, never a traceback -
    and no file we open later lands on descriptor 1 or 2."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))


def main(argv: list[str]) -> int:
    try:
        options = parse_command_line(argv[1:], argv[0] if argv else PROGRAM)
    except UsageError as err:
        return fail(os.EX_USAGE, str(err))
    try:
        config = load_config(resolve_config_path(options.config))
    except ConfigError as err:
        return fail(os.EX_CONFIG, str(err))
    try:
        return _MODES[options.mode](options, config)
    except KeyboardInterrupt:
        return fail(os.EX_TEMPFAIL, "interrupted")


def fail(code: int, message: str) -> int:
    say(message)
    return code


def enqueue(options: Options, config: Config) -> int:
    """Read the message on stdin and queue it (the default mode, -bm)."""
    os.umask(SUBMIT_UMASK)
    submitter = current_submitter(config)
    log = SubmitLog(config, submitter.uid)
    collector = InputCollector(dot_ends_input=options.dot_ends_input,
                               limit=config.receiver.max_message_bytes)
    try:
        raw = without_from_lines(read_stdin(collector))
        queue_id = new_queue_id()
        submission = prepare(
            raw, recipients=options.recipients, extract=options.extract_recipients,
            sender=options.sender, full_name=full_name(options.full_name, submitter.uid),
            submitter=submitter, queue_id=queue_id, now=datetime.now().astimezone(),
            limit=config.receiver.max_message_bytes)
        store(config, submission, queue_id)
    except SubmissionError as err:
        log.failed(err)
        return fail(err.exit_code, str(err))
    log.queued(queue_id, submission)
    return os.EX_OK


def read_stdin(collector: InputCollector) -> bytes:
    """The message on stdin, a line (at most READ_PIECE bytes) at a time: reading
    stops at the end of the message, so a caller who keeps its end of the pipe open
    after a lone "." is never waited for."""
    try:
        return collect(iter(partial(sys.stdin.buffer.readline, READ_PIECE), b""), collector)
    except OSError as err:
        raise SubmissionError(os.EX_IOERR, f"cannot read the message: {err.strerror}") from None


def full_name(given: str | None, uid: int) -> str | None:
    """-F, else $NAME, else the user's GECOS name - Postfix's order."""
    if given:
        return given
    if os.environ.get("NAME"):
        return os.environ["NAME"]
    try:
        gecos = pwd.getpwuid(uid).pw_gecos.split(",")[0].strip()
    except KeyError:
        return None
    return gecos or None


def list_mode(options: Options, config: Config) -> int:
    """-bp / mailq: the queue listing (services/admin/listing.py)."""
    try:
        for line in list_queue(config, failed=False, as_json=False, now=time.time()):
            print(line)
        sys.stdout.flush()
    except ListingError as err:
        return fail(err.exit_code, str(err))
    except BrokenPipeError:  # `mailq | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return os.EX_OK


def newaliases(options: Options, config: Config) -> int:
    """-bi / newaliases: there is no alias database to build."""
    say(f"aliases are read from the [aliases] table of {config.path}; nothing to rebuild")
    return os.EX_OK


def smtp_mode(options: Options, config: Config) -> int:
    """-bs: SMTP on stdin/stdout (services/sendmail/stdio.py)."""
    # Imported for -bs only: the receiver's session is not needed by a plain submission.
    from services.sendmail.stdio import serve_stdio

    os.umask(SUBMIT_UMASK)
    submitter = current_submitter(config)
    try:
        return serve_stdio(config, submitter, SubmitLog(config, submitter.uid))
    except OSError as err:  # the client's end of stdin/stdout went away
        return fail(os.EX_IOERR, f"-bs: {err.strerror or err}")


_MODES: dict[Mode, Callable[[Options, Config], int]] = {
    Mode.ENQUEUE: enqueue,
    Mode.LIST_QUEUE: list_mode,
    Mode.SMTP: smtp_mode,
    Mode.NEWALIASES: newaliases,
}
