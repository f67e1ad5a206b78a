"""The header section of a message: reading it, and the fields mailbag adds to it.

Shared by the receiver (SMTP), `mailbag-sendmail` (local submission) and the sender
(rewriting, DKIM, bounces), so that all of them read a header section the same way
and write the same trace (SPEC §3, §7, §8):

- one `Received:` field at the very start (RFC 5321 §4.4; RFC 3848 for the
  ESMTPS / ESMTPA protocol names), folded as Postfix folds it;
- a missing `Date:` or `Message-ID:` (and, for `mailbag-sendmail`, `From:`) at the
  END of the header section (RFC 6409 §8: a submission server may add them), never
  anywhere else; `body_separator` supplies the empty line when the data has none;
- `without_fields` drops fields (the `Bcc:` of a local submission) with their
  continuation lines, touching nothing else;
- `scan_headers` reads only the header section, line by line, and reports where it
  ends, its line ending, where each field is (byte offsets) and how many
  `Received:` fields (the hop count against mail loops). The body is never looked
  at or copied: callers write `[trace, data[:end], added, data[end:]]` as chunks,
  and the sender replaces one field by `data[:field.start]`, new bytes,
  `data[field.end:]`, every other byte as it was. `HeaderScanner` does the same for
  data that arrives in pieces (the receiver reads a message as runs of lines), so a
  header section of any size is read without ever being held in one piece;
- address fields (From:, Sender:, Reply-To:, ...) are parsed by the `email`
  package's header registry, never by a regex: folded lines, RFC 2047 display names,
  quoted commas and groups are its job.

Pure functions: the time, the names and the ids are passed in.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email import errors, policy
from email.headerregistry import Address, AddressHeader, Group
from email.utils import format_datetime, formataddr
from functools import cached_property, lru_cache
from typing import NamedTuple

_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")  # RFC 5322 §3.6.8 field name, ':'
_LINE_PREFIX = 1000  # bytes of a line looked at: its field name is at the start
_UNSAFE_TEXT = re.compile(r"[^\x21-\x27\x2a-\x7e]")  # no controls, spaces or ( ) in comments
_FOLD = re.compile(r"\r?\n(?=[ \t])")


class HeaderField(NamedTuple):
    """One header field: `data[start:end]` is the field with its line end(s)."""

    name: str  # as written; compare with .lower()
    start: int
    end: int
    value_start: int  # first byte after the colon

    def raw_value(self, data: bytes) -> bytes:
        """The field body as written: folded, with its final line end stripped."""
        return data[self.value_start:self.end].rstrip(b"\r\n")


@dataclass(frozen=True)
class HeaderSection:
    """What `scan_headers` found in a message's header section."""

    end: int  # offset after the last header line: where fields are added
    eol: bytes  # the line ending the message uses (b"\r\n", or b"\n")
    names: frozenset[str]  # field names present, lower-cased
    received: int  # how many Received: fields (hops)
    # (name as written, start, value start) of every field, in order: `fields` makes
    # HeaderField objects of them only for a caller that asks (the receiver does not)
    starts: tuple[tuple[str, int, int], ...] = ()

    def has(self, name: str) -> bool:
        return name.lower() in self.names

    @cached_property
    def fields(self) -> tuple[HeaderField, ...]:
        """Every field, in order; the last one ends where the header section ends."""
        ends = [start for _, start, _ in self.starts[1:]] + [self.end]
        return tuple(HeaderField(name, start, end, value)
                     for (name, start, value), end in zip(self.starts, ends, strict=False))

    def named(self, name: str) -> list[HeaderField]:
        """The fields called `name` (any case), in order."""
        lowered = name.lower()
        return [f for f in self.fields if f.name.lower() == lowered]


def scan_headers(raw: bytes | bytearray) -> HeaderSection:
    """Read the header section of `data` (RFC 5322 §2.1).

    It ends at the first empty line, or at the first line that is neither a field
    nor a continuation of one (a message without headers starts with its body).
    Only the header section's lines are visited; no copy of the data is made.
    """
    scanner = HeaderScanner()
    scanner.feed(raw)
    return scanner.finish()


class HeaderScanner:
    """`scan_headers` over data that arrives in pieces: `feed` each piece in order,
    then `finish()`; the offsets are the whole data's. Pieces may be cut anywhere.

    Of a line not yet ended it keeps at most its first 1000 bytes (the field name is
    at its start); once the header section is over, pieces are only counted.
    """

    def __init__(self) -> None:
        self._size = 0  # bytes fed so far
        self._line_start = 0  # where the line being read began
        self._line = b""  # its first bytes, when it began in an earlier piece
        self._last_byte = -1  # the byte before the current piece
        self._eol: bytes | None = None  # decided by the first line end
        self._in_field = False
        self._end: int | None = None
        self._names: set[str] = set()
        self._received = 0
        self._starts: list[tuple[str, int, int]] = []

    @property
    def done(self) -> bool:
        """The header section is over: what follows is not looked at."""
        return self._end is not None

    def feed(self, piece: bytes | bytearray) -> None:
        base = self._size
        self._size += len(piece)
        position = 0
        while self._end is None:
            newline = piece.find(b"\n", position)
            if newline < 0:
                room = _LINE_PREFIX - len(self._line)
                if room > 0:
                    self._line += piece[position:position + room]
                break
            if self._eol is None:
                before = piece[newline - 1] if newline > 0 else self._last_byte
                self._eol = b"\r\n" if before == 0x0D else b"\n"
            room = _LINE_PREFIX - len(self._line)
            line = piece[position:min(newline + 1, position + room)]
            self._read_line(self._line + line if self._line else line)
            self._line = b""
            self._line_start = base + newline + 1
            position = newline + 1
        if piece:
            self._last_byte = piece[-1]

    def finish(self) -> HeaderSection:
        """The header section of all the data fed."""
        if self._end is None and self._size > self._line_start:
            self._read_line(self._line)  # a last line without a line end
        end = self._size if self._end is None else self._end
        return HeaderSection(end, self._eol or b"\n", frozenset(self._names), self._received,
                             tuple(self._starts))

    def _read_line(self, line: bytes | bytearray) -> None:
        """One line (its first bytes): a field, a continuation, or the end."""
        if line[:1] in (b" ", b"\t") and self._in_field:
            return  # a continuation of the field before
        match = _FIELD.match(line)
        if match is None:
            self._end = self._line_start  # an empty line or body text
            return
        written = bytes(line[: match.end() - 1]).rstrip(b" \t").decode("ascii")
        name = written.lower()
        self._names.add(name)
        self._received += name == "received"
        self._starts.append((written, self._line_start, self._line_start + match.end()))
        self._in_field = True


def without_fields(raw: bytes, names: Collection[str]) -> bytes:
    """The header section of `raw` (up to its end) without the fields named (lower
    case), continuation lines included: `Bcc:` must never reach a recipient."""
    section = scan_headers(raw)
    kept: list[bytes] = []
    position = 0
    for field in section.fields:
        if field.name.lower() in names:
            kept.append(raw[position:field.start])
            position = field.end
    kept.append(raw[position:section.end])
    return b"".join(kept)


def body_separator(raw: bytes | bytearray, section: HeaderSection) -> bytes:
    """The empty line to write after fields added at `section.end` when the data has
    none there: a message that starts with body text (no header section, or a line
    that is no field) would otherwise have its first line read as a header."""
    return separator_before(raw[section.end:section.end + 2], section.eol)


def separator_before(following: bytes | bytearray, eol: bytes) -> bytes:
    """`body_separator` given the (up to) two bytes that follow the header section."""
    if not following or following[:1] == b"\n" or following == b"\r\n":
        return b""
    return eol


def rfc5322_date(now: datetime) -> str:
    """`Tue, 01 Dec 2026 14:50:33 +0000` (RFC 5322 §3.3); `now` must be aware."""
    return _rfc5322_second(int(now.timestamp()), now.utcoffset())


@lru_cache(maxsize=8)
def _rfc5322_second(second: int, offset: timedelta | None) -> str:
    """Rendered once per second: the receiver dates every message it stores twice
    (Received:, and a missing Date:), and format_datetime is slow."""
    return format_datetime(datetime.fromtimestamp(second, timezone(offset or timedelta())))


def message_id(queue_id: str, hostname: str) -> str:
    return f"<{queue_id}@{hostname}>"


def missing_fields(section: HeaderSection, *, queue_id: str, hostname: str,
                   now: datetime) -> bytes:
    """`Date:` and `Message-ID:` lines for those the header section lacks (RFC 6409 §8),
    to be written at `section.end`; b"" when nothing is missing."""
    lines = []
    if not section.has("date"):
        lines.append(f"Date: {rfc5322_date(now)}")
    if not section.has("message-id"):
        lines.append(f"Message-ID: {message_id(queue_id, hostname)}")
    eol = section.eol.decode()
    return "".join(line + eol for line in lines).encode()


def smtp_received(*, helo: str, client_ip: str, hostname: str, protocol: str,
                  queue_id: str, recipient: str | None, now: datetime,
                  eol: bytes = b"\r\n") -> bytes:
    """The receiver's trace field (RFC 5321 §4.4), as Postfix writes it::

        Received: from HELO ([IP])
                by HOSTNAME (mailbag) with ESMTPS id ID
                for <RCPT>; DATE

    No reverse DNS is looked up, so TCP-info is the address literal alone.
    `protocol` is SMTP, ESMTP, ESMTPS, ESMTPA or ESMTPSA (RFC 3848); `recipient`
    only when the message has exactly one (naming several would disclose Bcc's).
    """
    literal = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    fold = eol.decode() + "\t"
    text = f"Received: from {_comment_safe(helo) or 'unknown'} ([{literal}])"
    text += f"{fold}by {hostname} (mailbag) with {protocol} id {queue_id}"
    if recipient is not None:
        text += f"{fold}for <{_address_safe(recipient)}>"
    text += f"; {rfc5322_date(now)}{eol.decode()}"
    return text.encode("utf-8")


def local_received(*, uid: int, hostname: str, queue_id: str, recipient: str | None,
                   now: datetime, eol: bytes = b"\r\n") -> bytes:
    """The trace field of a locally submitted message (no network hop), as Postfix's
    sendmail writes it: `Received: by HOSTNAME (mailbag, from userid UID) id ID; DATE`."""
    fold = eol.decode() + "\t"
    text = f"Received: by {hostname} (mailbag, from userid {uid}){fold}id {queue_id}"
    if recipient is not None:
        text += f"{fold}for <{_address_safe(recipient)}>"
    text += f"; {rfc5322_date(now)}{eol.decode()}"
    return text.encode("utf-8")


def _printable_name(text: str) -> str:
    """A display name from a command line or the environment, made safe for a
    header: no line ends or other controls (they would end the header section),
    and bytes that were not UTF-8 (surrogate escapes) shown as U+FFFD."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return " ".join(re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", " ", text).split())


def _comment_safe(text: str) -> str:
    """A client-chosen name, made harmless inside a Received: field (no spaces,
    controls or parentheses that would end the comment or the field)."""
    return _UNSAFE_TEXT.sub("?", text)[:255]


def _address_safe(address: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f<>]", "?", address)


def from_field(address: str, full_name: str | None, eol: bytes = b"\r\n") -> bytes:
    """A `From:` field for a message that has none: `Full Name <address>` (RFC 5322
    §3.4; a name outside ASCII encoded as RFC 2047 words), or the bare address."""
    # formataddr refuses an address outside ASCII (RFC 6532): then the address alone.
    name = _printable_name(full_name or "")
    named = name and address.isascii()
    text = formataddr((name, address), charset="utf-8") if named else address
    return f"From: {text}".encode("utf-8", "surrogateescape") + eol


# ---------------------------------------------------------------------------- addresses


def unfold(value: str) -> str:
    """RFC 5322 §2.2.3: a line end followed by white space is not part of the value."""
    return _FOLD.sub("", value)


@dataclass(frozen=True)
class ParsedAddresses:
    """An address field as the `email` package reads it; `error` set if it cannot."""

    groups: tuple[Group, ...] = ()
    error: str | None = None

    @property
    def addresses(self) -> tuple[Address, ...]:
        return tuple(a for g in self.groups for a in g.addresses)


def parse_address_field(name: str, raw_value: bytes) -> ParsedAddresses:
    """Parse the body of an address field (From, Sender, Reply-To, To, ...).

    UTF-8 in the raw bytes (RFC 6532) is accepted. An error is returned, never raised,
    when the bytes are not UTF-8, when the parser reports an invalid address (it
    would silently drop part of the field), or when an address lacks a local part or
    a domain (`From: root`): a caller cannot rewrite or sign such a field safely.
    """
    try:
        text = unfold(raw_value.decode("utf-8"))
    except UnicodeDecodeError:
        return ParsedAddresses(error=f"{name}: is not UTF-8")
    try:
        header = policy.SMTPUTF8.header_factory(name, text)
    except Exception as err:
        # Any exception: the stdlib parser crashes on some odd input (AttributeError,
        # IndexError); for us each of them means "cannot be parsed".
        return ParsedAddresses(error=f"{name}: cannot be parsed ({type(err).__name__})")
    if not isinstance(header, AddressHeader):
        return ParsedAddresses(error=f"{name}: is not an address field")
    invalid = [d for d in header.defects if isinstance(d, errors.InvalidHeaderDefect)]
    if invalid:
        return ParsedAddresses(error=f"{name}: cannot be parsed ({invalid[0]})")
    groups = tuple(header.groups)
    for address in (a for g in groups for a in g.addresses):
        if not address.username or not address.domain:
            return ParsedAddresses(error=f"{name}: {address.addr_spec!r} is not local@domain")
    return ParsedAddresses(groups=groups)


def format_address_field(name: str, groups: tuple[Group, ...], eol: bytes) -> bytes:
    """A complete field line (folded, ending in `eol`) holding `groups`.

    Non-ASCII display names become RFC 2047 encoded words; a non-ASCII address can
    only be written as UTF-8 (RFC 6532), so then the whole field is UTF-8.
    """
    utf8 = any(not a.addr_spec.isascii() for g in groups for a in g.addresses)
    fold_policy = (policy.SMTPUTF8 if utf8 else policy.SMTP).clone(linesep=eol.decode())
    header = fold_policy.header_factory(name, list(groups))
    return header.fold(policy=fold_policy).encode("utf-8")
