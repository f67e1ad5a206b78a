"""The header section of queued message data: where each field is, and its addresses.

Queued data is the message exactly as received (SPEC §3): bytes, normally CRLF line
ends, LF-only from some local programs. The sender's rewriting, DKIM signing and
bounces read a few header fields from it and must leave every other byte alone, so
this module finds fields by their byte offsets instead of re-serialising a parsed
message. No I/O; nothing here copies the body.

The header section (RFC 5322 §2.2) is the lines up to the first empty line. A line
that is neither a field (`name:` with RFC 5322 ftext in the name) nor a continuation
(leading space or tab) also ends it, as the stdlib parser does; such a line belongs
to the body.

Address fields are parsed by the `email` package's header registry, never by a
regex: folded lines, RFC 2047 display names, quoted commas and groups are its job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email import errors, policy
from email.headerregistry import Address, AddressHeader, Group

_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
_FOLD = re.compile(r"\r?\n(?=[ \t])")


@dataclass(frozen=True)
class HeaderField:
    """One header field of `data`: `data[start:end]` is the field with its line end(s)."""

    name: str  # as written; compare with .lower()
    start: int
    end: int
    value_start: int  # first byte after the colon

    def raw_value(self, data: bytes) -> bytes:
        """The field body as written: folded, with its final line end stripped."""
        return data[self.value_start:self.end].rstrip(b"\r\n")


@dataclass(frozen=True)
class HeaderSection:
    """Where the fields are, and where the body starts."""

    fields: tuple[HeaderField, ...]
    end: int  # offset just after the last field (before the empty line, if any)
    body_start: int  # offset of the body's first byte
    linesep: bytes  # b"\r\n" or b"\n": the data's own line end

    def named(self, name: str) -> list[HeaderField]:
        lowered = name.lower()
        return [f for f in self.fields if f.name.lower() == lowered]


def line_ending(data: bytes) -> bytes:
    """The line end the data uses (its first line's); CRLF if it has no line end."""
    newline = data.find(b"\n")
    if newline > 0 and data[newline - 1:newline] == b"\r":
        return b"\r\n"
    return b"\n" if newline >= 0 else b"\r\n"


def header_section(data: bytes) -> HeaderSection:
    """Find every header field of `data` by offset, in one pass over the lines."""
    fields: list[HeaderField] = []
    pos, size = 0, len(data)
    name: str | None = None
    start = value_start = 0
    while pos < size:
        newline = data.find(b"\n", pos)
        line_end = size if newline < 0 else newline + 1
        first = data[pos:pos + 1]
        if first in (b" ", b"\t") and name is not None:
            pos = line_end  # a continuation of the current field
            continue
        if name is not None:
            fields.append(HeaderField(name, start, pos, value_start))
            name = None
        if data.startswith(b"\n", pos) or data.startswith(b"\r\n", pos):
            return HeaderSection(tuple(fields), pos, line_end, line_ending(data))
        match = _FIELD_NAME.match(data, pos, line_end)
        if not match:
            break  # not a field: the body starts here, without an empty line
        name = data[pos:match.end() - 1].decode("ascii")
        start, value_start = pos, match.end()
        pos = line_end
    if name is not None:
        fields.append(HeaderField(name, start, pos, value_start))
    return HeaderSection(tuple(fields), pos, pos, line_ending(data))


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


def format_address_field(name: str, groups: tuple[Group, ...], linesep: bytes) -> bytes:
    """A complete field line (folded, ending in `linesep`) holding `groups`.

    Non-ASCII display names become RFC 2047 encoded words; a non-ASCII address can
    only be written as UTF-8 (RFC 6532), so then the whole field is UTF-8.
    """
    utf8 = any(not a.addr_spec.isascii() for g in groups for a in g.addresses)
    fold_policy = (policy.SMTPUTF8 if utf8 else policy.SMTP).clone(linesep=linesep.decode())
    header = fold_policy.header_factory(name, list(groups))
    return header.fold(policy=fold_policy).encode("utf-8")
