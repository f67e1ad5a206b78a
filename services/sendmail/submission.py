"""A locally submitted message made ready for the queue: pure, no I/O.

What `mailbag-sendmail` does to what a program hands it (SPEC §7):

- the input ends at EOF, or at a line holding only "." unless -i/-oi (`InputCollector`);
  mbox `From ` lines at its start are dropped (`without_from_lines`);
- line ends become CRLF: the queue holds SMTP data (SPEC §3), whatever the caller
  wrote; every other byte (8-bit text, NUL) is stored as is;
- a line longer than SMTP allows (998 octets and CRLF, RFC 5321 §4.5.3.1.6) is
  broken by inserting CRLF and a space, as Postfix's smtp_line_length_limit does:
  a cron job's long output line must not cost the whole mail; a header line is
  folded before whitespace where it has some (RFC 5322 §2.2.3: nothing changes),
  after -t has read the recipients (`fold_long_lines`); the size limit applies to
  the caller's message in SMTP's form (CRLF, long lines broken), not counting the
  header fields added here;
- recipients come from the command line (each argument an address list, as
  Postfix reads it) and, with -t, from To:, Cc: and Bcc: (read with the `email`
  package); a bare name (`root`) gets the first local domain, so
  that the sender's aliases apply; every address passes the receiver's check
  (`shared.smtp.check_mailbox`);
- `Bcc:` fields are removed whether or not -t was given: they must never reach a
  recipient (what Postfix's cleanup does);
- `Received:` goes on top, a missing `From:`, `Date:`, `Message-ID:` at the end of
  the header section (shared/headers.py, the same fields the receiver adds).

Errors are `SubmissionError` carrying the sysexits code and one line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from email import policy
from email.parser import BytesHeaderParser
from email.utils import getaddresses

from shared.headers import (
    body_separator,
    from_field,
    local_received,
    missing_fields,
    scan_headers,
    without_fields,
)
from shared.smtp import CRLF, MAX_TEXT_LINE, PathSyntaxError, check_mailbox, crlf_lines

RECIPIENT_FIELDS = ("to", "cc", "bcc")  # -t reads these (RFC 5322 §3.6.3)
REMOVED_FIELDS = frozenset({"bcc"})
_DOT_LINES = frozenset({b".", b".\n", b".\r\n"})
LINE_OCTETS = MAX_TEXT_LINE - 2  # a line's octets before its CRLF
_LONG_LINE = re.compile(rb"(?m)^[^\r\n]{%d,}" % (LINE_OCTETS + 1))
_LIST_SYNTAX = re.compile(r"[,<>()]")  # an argument holding these is an address list
# Leading mbox separator lines (`From sender date`, also UUCP's `>From ...`): what
# `git format-patch`, `formail` and saved mailboxes start a message with.
_FROM_LINES = re.compile(rb"(?:>*From [^\r\n]*(?:\r\n|\r|\n|\Z))+")


class SubmissionError(Exception):
    """The message cannot be queued; `exit_code` is its sysexits.h code."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class InputCollector:
    """The message as it arrives on stdin, in pieces of at most one line each.

    Bounded: more than `limit` bytes raise SubmissionError (EX_DATAERR) at once,
    so an endless input is never held in memory. The pieces go into one buffer, not
    a list: a message of many short lines would otherwise cost a Python object per
    line, tens of times its size.
    """

    def __init__(self, *, dot_ends_input: bool, limit: int) -> None:
        self.dot_ends_input = dot_ends_input
        self.limit = limit
        self._data = bytearray()
        self._at_line_start = True

    def feed(self, piece: bytes) -> bool:
        """Take the next piece (a line, or part of a long one); True once the input
        is complete (a lone "." line without -i). The dot line is not data."""
        if self.dot_ends_input and self._at_line_start and piece in _DOT_LINES:
            return True
        if len(self._data) + len(piece) > self.limit:
            raise SubmissionError(os.EX_DATAERR,
                                  f"message larger than max_message_bytes ({self.limit})")
        self._data += piece
        self._at_line_start = piece.endswith(b"\n")
        return False

    def data(self) -> bytes:
        return bytes(self._data)


@dataclass(frozen=True)
class Submitter:
    """Who submits, and the names the configuration gives."""

    uid: int
    login: str  # the invoking user's name: the default envelope sender
    hostname: str  # our name, in Received: and Message-ID:
    domain: str  # the first local domain: qualifies bare names


@dataclass(frozen=True)
class Submission:
    """A message ready for `QueueWriter.store(sender, recipients, chunks)`."""

    sender: str
    recipients: tuple[str, ...]
    chunks: tuple[bytes, ...]  # Received:, headers, added fields, body

    @property
    def size(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)


def envelope_sender(given: str | None, submitter: Submitter) -> str:
    """The `-f` address (qualified and checked), `""` for `-f '<>'`, else the user."""
    if given is None:
        return qualify(submitter.login, submitter.domain, "sender")
    address = given.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    return qualify(address, submitter.domain, "sender") if address else ""


def qualify(address: str, domain: str, role: str) -> str:
    """`root` -> `root@<domain>`; any address checked as the receiver checks it.
    SubmissionError (EX_DATAERR) names the address and what is wrong."""
    full = address if "@" in address else f"{address}@{domain}"
    try:
        check_mailbox(full)
    except PathSyntaxError as err:
        raise SubmissionError(os.EX_DATAERR, f"bad {role} address {address!r}: {err}") from None
    return full


def header_recipients(header: bytes) -> list[tuple[str, str]]:
    """The addresses in the To:, Cc: and Bcc: fields of a header section, as
    (field, address) pairs: what -t sends to. 8-bit addresses (RFC 6532) come back
    as text; empty groups (`undisclosed-recipients:;`) give none."""
    message = BytesHeaderParser(policy=policy.default).parsebytes(header)
    found = []
    for name in RECIPIENT_FIELDS:
        field = name.capitalize()
        try:
            values = message.get_all(name, [])
            addresses = [a.addr_spec for value in values for a in value.addresses]
        except Exception as err:  # noqa: BLE001 - the parser raises IndexError and more
            raise SubmissionError(os.EX_DATAERR, f"cannot read the {field}: field of "
                                                 f"the message: {err or type(err).__name__}"
                                  ) from None
        found.extend((field, _as_text(address)) for address in addresses)
    return found


def _as_text(parsed: str) -> str:
    """The email parser keeps 8-bit header bytes as surrogates: UTF-8 back to text
    (anything else stays as surrogates, which `check_mailbox` refuses)."""
    try:
        return parsed.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeDecodeError:
        return parsed


def argument_addresses(argument: str) -> list[tuple[str, str]]:
    """The addresses one command-line argument names, as (role, address) pairs.

    Postfix's sendmail reads each argument as an RFC 822 address list: cron passes
    a comma-separated MAILTO (`a@example.com,b@example.com`) as ONE argument, and
    `<root>` or `Bob <bob@example.com>` are addresses too. An argument without a
    comma, angle bracket or parenthesis is taken as it is; a list's empty members
    (`a,,b`) are skipped, and an argument of nothing but those is checked whole
    (so that its error names it)."""
    if not _LIST_SYNTAX.search(argument):
        return [("recipient", argument)]
    addresses = [address for _, address in getaddresses([argument]) if address]
    if not addresses:
        return [("recipient", argument)]
    role = "recipient" if addresses == [argument] else f"recipient (in {argument!r})"
    return [(role, address) for address in addresses]


def recipients_of(arguments: Sequence[str], header: bytes, *, extract: bool,
                  domain: str) -> tuple[str, ...]:
    """Command-line recipients, then (with -t) those of the header; qualified, checked,
    each once in the order first named. SubmissionError: EX_USAGE if there are
    none, EX_DATAERR for a bad address."""
    named = [pair for arg in arguments for pair in argument_addresses(arg)]
    if extract:
        named.extend((f"{field}: recipient", address)
                     for field, address in header_recipients(header))
    recipients: dict[str, None] = {}
    for role, address in named:
        recipients.setdefault(qualify(address, domain, role))
    if not recipients:
        where = " (none on the command line, none in To:, Cc:, Bcc:)" if extract else ""
        raise SubmissionError(os.EX_USAGE, f"no recipients{where}")
    return tuple(recipients)


def prepare(raw: bytes, *, recipients: Sequence[str], extract: bool, sender: str | None,
            full_name: str | None, submitter: Submitter, queue_id: str,
            now: datetime, limit: int | None = None) -> Submission:
    """The envelope and the data to store for the message `raw` read from stdin;
    SubmissionError (EX_DATAERR) if it is larger than `limit` once in SMTP's form."""
    data = crlf_lines(raw)
    section = replace(scan_headers(data), eol=CRLF)  # also for an empty message
    header = data[:section.end]
    envelope_to = recipients_of(recipients, header, extract=extract, domain=submitter.domain)
    envelope_from = envelope_sender(sender, submitter)
    added = b""
    if not section.has("from"):
        added += from_field(envelope_from or f"MAILER-DAEMON@{submitter.hostname}",
                            full_name)
    added += missing_fields(section, queue_id=queue_id, hostname=submitter.hostname, now=now)
    trace = local_received(uid=submitter.uid, hostname=submitter.hostname, queue_id=queue_id,
                           recipient=envelope_to[0] if len(envelope_to) == 1 else None, now=now)
    kept = without_fields(header, REMOVED_FIELDS) if "bcc" in section.names else header
    message = (fold_long_lines(kept, header=True), body_separator(data, section),
               fold_long_lines(data[section.end:]))
    if limit is not None and sum(map(len, message)) > limit:
        raise SubmissionError(os.EX_DATAERR, f"message larger than max_message_bytes ({limit})")
    chunks = (trace, message[0], added, *message[1:])
    return Submission(envelope_from, envelope_to, tuple(c for c in chunks if c))


def fold_long_lines(data: bytes, *, header: bool = False) -> bytes:
    """CRLF data with every line of more than LINE_OCTETS octets broken into lines
    that fit (see the module doc); data without such a line is returned as is.
    `header`: the lines are header fields, folded before whitespace where they can."""
    if _LONG_LINE.search(data) is None:
        return data
    breaker = _folded_field_line if header else _broken_line
    return _LONG_LINE.sub(lambda match: breaker(match.group()), data)


def _broken_line(line: bytes) -> bytes:
    """The first LINE_OCTETS octets, then CRLF, a space and the next LINE_OCTETS - 1,
    and so on (Postfix's way: a space is added, nothing is lost)."""
    step = LINE_OCTETS - 1
    return CRLF.join([line[:LINE_OCTETS]] + [b" " + line[at:at + step]
                                             for at in range(LINE_OCTETS, len(line), step)])


def _folded_field_line(line: bytes) -> bytes:
    """A header line folded before its last space or tab within reach, so that
    unfolding (removing the CRLFs) gives the field back unchanged; a stretch of more
    than LINE_OCTETS octets without one is broken as a body line is."""
    pieces = []
    while len(line) > LINE_OCTETS:
        cut = max(line.rfind(b" ", 1, LINE_OCTETS + 1), line.rfind(b"\t", 1, LINE_OCTETS + 1))
        if cut > 0:
            pieces.append(line[:cut])
            line = line[cut:]  # the continuation begins with the whitespace
        else:
            pieces.append(line[:LINE_OCTETS])
            line = b" " + line[LINE_OCTETS:]
    pieces.append(line)
    return CRLF.join(pieces)


def without_from_lines(raw: bytes) -> bytes:
    """The message without the mbox `From ` lines it starts with, as Postfix's
    sendmail strips them: such a line is no header field, so left in place it would
    end the header section at once - the real header (From:, To:, Subject:) would
    become body, and -t would find no recipients."""
    match = _FROM_LINES.match(raw)
    return raw[match.end():] if match else raw


def collect(pieces: Iterable[bytes], collector: InputCollector) -> bytes:
    """Feed `pieces` until the input is complete; the message data."""
    for piece in pieces:
        if collector.feed(piece):
            break
    return collector.data()
