"""The sendmail command line, parsed the way Postfix's `sendmail` parses it.

Programs call `/usr/sbin/sendmail` with getopt-style flags whose values are often
attached (cron: `-FCronDaemon -i -B8BITMIME -oem root`; mutt: `-oem -oi --`), which
argparse cannot read: `-oem` is option `o` with the value `em`, `-ti` is `-t -i`.
This module is that parser, pure (no I/O), table-driven like its tests.

Rules (Postfix's, on Linux):
- options come first; the first argument that is no option, or `--`, starts the
  recipients. An argument starting with `-` AFTER a recipient is refused (a
  misplaced option must not become an address); after `--` anything is a recipient
  (RFC 5321 local parts may start with `-`);
- a letter in `_WITH_VALUE` takes the rest of its argument, else the next argument;
- `-t` with recipients on the command line: both are used (Postfix 2.1 and later);
- the program's name picks the default mode: `mailq` lists the queue, `newaliases`
  has nothing to do (aliases live in the config);
- flags that make sense only to a full MTA are accepted and ignored (the table).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from enum import Enum


class Mode(Enum):
    ENQUEUE = "enqueue"  # -bm (default): read a message on stdin and queue it
    LIST_QUEUE = "list"  # -bp, or invoked as `mailq`
    SMTP = "smtp"  # -bs: SMTP on stdin/stdout
    NEWALIASES = "newaliases"  # -bi, -I, or invoked as `newaliases`: nothing to do


class UsageError(Exception):
    """A bad command line; str() is one line for stderr (exit 64, EX_USAGE)."""


@dataclass(frozen=True)
class Options:
    mode: Mode = Mode.ENQUEUE
    recipients: tuple[str, ...] = ()
    extract_recipients: bool = False  # -t: also To:, Cc:, Bcc: of the message
    sender: str | None = None  # -f / -r: the envelope sender (None: the invoking user)
    full_name: str | None = None  # -F: the name in a From: we add
    dot_ends_input: bool = True  # cleared by -i / -oi: a lone "." line is data
    config: str | None = None  # --config FILE


# Letters that take a value, and what each does; None: accepted and ignored.
_WITH_VALUE: dict[str, str | None] = {
    "b": "mode",  # -bm -bp -bs -bi
    "B": "body_type",  # -B7BIT / -B8BITMIME: the data is stored as is either way
    "F": "full_name",
    "f": "sender",
    "r": "sender",  # the obsolete spelling of -f
    "o": "option",  # -oi (= -i); -oem, -odb, -om, -o7 ... ignored
    "q": "queue_run",  # -q alone: run the queue (the sender's job); -q30m ignored
    "A": None, "C": None, "e": None, "h": None, "L": None, "N": None, "O": None,
    "p": None, "R": None, "V": None, "X": None,
}
# Letters without a value; None: accepted and ignored.
_FLAGS: dict[str, str | None] = {
    "t": "extract_recipients",
    "i": "keep_dots",
    "I": "newaliases",
    "G": None, "U": None, "c": None, "m": None, "n": None, "v": None, "x": None,
}
_MODES = {"m": Mode.ENQUEUE, "p": Mode.LIST_QUEUE, "s": Mode.SMTP, "i": Mode.NEWALIASES}
_PROGRAM_MODES = {"mailq": Mode.LIST_QUEUE, "newaliases": Mode.NEWALIASES}
_BODY_TYPES = ("7BIT", "8BITMIME")  # RFC 6152


def parse_command_line(args: list[str], program: str = "sendmail") -> Options:
    """Parse `args` (without the program name); `program` is argv[0], whose base
    name may pick the mode. Raises UsageError."""
    options = Options(mode=_PROGRAM_MODES.get(os.path.basename(program), Mode.ENQUEUE))
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            return _finish(options, args[index:], checked=False)
        if arg.startswith("--"):
            options, index = _long_option(options, arg, args, index)
        elif arg.startswith("-") and arg != "-":
            options, index = _short_options(options, arg, args, index)
        else:
            return _finish(options, args[index - 1:], checked=True)
    return _finish(options, [], checked=True)


def _long_option(options: Options, arg: str, args: list[str], index: int) -> tuple[Options, int]:
    name, has_value, value = arg[2:].partition("=")
    if name != "config":
        raise UsageError(f"unknown option {arg}")
    if not has_value:
        if index >= len(args):
            raise UsageError("--config needs a file name")
        value, index = args[index], index + 1
    if not value:
        raise UsageError("--config needs a file name")
    return replace(options, config=value), index


def _short_options(options: Options, arg: str, args: list[str], index: int
                   ) -> tuple[Options, int]:
    """One argument of clustered letters (`-ti`), the last of which may take a value
    attached (`-FCronDaemon`) or from the next argument (`-F 'Cron Daemon'`)."""
    position = 1
    while position < len(arg):
        letter = arg[position]
        position += 1
        if letter in _FLAGS:
            options = _apply(options, _FLAGS[letter], letter, "")
        elif letter in _WITH_VALUE:
            value = arg[position:]
            if not value and letter != "q":
                if index >= len(args):
                    raise UsageError(f"option -{letter} needs a value")
                value, index = args[index], index + 1
            return _apply(options, _WITH_VALUE[letter], letter, value), index
        else:
            raise UsageError(f"unknown option -{letter}")
    return options, index


def _apply(options: Options, action: str | None, letter: str, value: str) -> Options:
    if action is None:
        return options
    if action == "mode":
        mode = _MODES.get(value[:1])
        if mode is None or len(value) > 1:
            raise UsageError(f"-b{value} is not supported (only -bm, -bp, -bs, -bi)")
        return replace(options, mode=mode)
    if action == "body_type":
        if value.upper() not in _BODY_TYPES:
            raise UsageError(f"-B takes 7BIT or 8BITMIME, not {value!r}")
        return options
    if action == "option":  # like Postfix: only the first letter counts
        return replace(options, dot_ends_input=False) if value[:1] == "i" else options
    if action == "queue_run":
        if not value:
            raise UsageError("-q: the sender runs the queue by itself "
                             "(`mailbag flush` makes deferred mail due now)")
        return options  # -q30m: an interval for a daemon; none here
    if action == "keep_dots":
        return replace(options, dot_ends_input=False)
    if action == "newaliases":
        return replace(options, mode=Mode.NEWALIASES)
    if action in ("sender", "full_name"):
        return replace(options, **{action: value})
    if action == "extract_recipients":
        return replace(options, extract_recipients=True)
    raise AssertionError(f"no action {action!r} for -{letter}")  # a bug in the tables


def _finish(options: Options, recipients: list[str], *, checked: bool) -> Options:
    """Check the recipients against the mode; `checked`: no `--` came before them."""
    if checked:
        for arg in recipients:
            if arg.startswith("-") and arg != "-":
                raise UsageError(f"option {arg} after the recipients: options come first "
                                 f"(put -- before an address that starts with -)")
    if options.mode is not Mode.ENQUEUE:
        if recipients:
            raise UsageError(f"-b{_mode_letter(options.mode)} takes no recipients")
        if options.extract_recipients:
            raise UsageError("-t can be used only when a message is sent")
    return replace(options, recipients=tuple(recipients))


def _mode_letter(mode: Mode) -> str:
    return next(letter for letter, value in _MODES.items() if value is mode)
