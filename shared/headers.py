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
  `data[field.end:]`, every other byte as it was;
- address fields (From:, Sender:, Reply-To:, ...) are parsed by the `email`
  package's header registry, never by a regex: folded lines, RFC 2047 display names,
  quoted commas and groups are its job.

Pure functions: the time, the names and the ids are passed in.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from email import errors, policy
from email.headerregistry import Address, AddressHeader, Group
from email.utils import format_datetime, formataddr
from functools import cached_property
from typing import NamedTuple

_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")  # RFC 5322 §3.6.8 field name, ':'
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
    size = len(raw)
    first_newline = raw.find(b"\n")
    eol = b"\r\n" if first_newline > 0 and raw[first_newline - 1] == 0x0D else b"\n"
    names: set[str] = set()
    starts: list[tuple[str, int, int]] = []  # (name as written, start, value start)
    received = 0
    position = 0
    in_field = False
    while position < size:
        newline = raw.find(b"\n", position)
        line_end = size if newline < 0 else newline + 1
        line = raw[position:min(line_end, position + 1000)]
        if line[:1] in (b" ", b"\t") and in_field:
            position = line_end  # a continuation of the field before
            continue
        match = _FIELD.match(line)
        if match is None:
            break  # an empty line or body text: the header section is over
        written = line[: match.end() - 1].rstrip(b" \t").decode("ascii")
        name = written.lower()
        names.add(name)
        received += name == "received"
        starts.append((written, position, position + match.end()))
        in_field = True
        position = line_end
    return HeaderSection(position, eol, frozenset(names), received, tuple(starts))


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
    rest = raw[section.end:section.end + 2]
    if not rest or rest[:1] == b"\n" or rest == b"\r\n":
        return b""
    return section.eol


def rfc5322_date(now: datetime) -> str:
    """`Tue, 01 Dec 2026 14:50:33 +0000` (RFC 5322 §3.3); `now` must be aware."""
    return format_datetime(now)


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
    named = full_name and address.isascii()
    text = formataddr((full_name, address), charset="utf-8") if named else address
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
