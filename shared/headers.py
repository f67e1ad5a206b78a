"""The header fields mailbag adds to a message it accepts, and the reading they need.

Shared by the receiver (SMTP) and `mailbag-sendmail` (local submission), so that
both write the same trace and add missing fields the same way (SPEC §3, §7, §8):

- one `Received:` field at the very start (RFC 5321 §4.4; RFC 3848 for the
  ESMTPS / ESMTPA protocol names), folded as Postfix folds it;
- a missing `Date:` or `Message-ID:` (and, for `mailbag-sendmail`, `From:`) at the
  END of the header section (RFC 6409 §8: a submission server may add them), never
  anywhere else; `body_separator` supplies the empty line when the data has none;
- `without_fields` drops fields (the `Bcc:` of a local submission) with their
  continuation lines, touching nothing else;
- `scan_headers` reads only the header section, line by line, and reports where it
  ends, its line ending, which fields it has and how many `Received:` fields
  (the hop count against mail loops). The body is never looked at or copied:
  callers write `[trace, data[:end], added, data[end:]]` as chunks.

Pure functions: the time, the names and the ids are passed in.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime, formataddr

_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")  # RFC 5322 §3.6.8 field name, ':'
_UNSAFE_TEXT = re.compile(r"[^\x21-\x27\x2a-\x7e]")  # no controls, spaces or ( ) in comments


@dataclass(frozen=True)
class HeaderSection:
    """What `scan_headers` found in a message's header section."""

    end: int  # offset after the last header line: where fields are added
    eol: bytes  # the line ending the message uses (b"\r\n", or b"\n")
    names: frozenset[str]  # field names present, lower-cased
    received: int  # how many Received: fields (hops)

    def has(self, name: str) -> bool:
        return name.lower() in self.names


def _field_lines(raw: bytes | bytearray) -> Iterator[tuple[int, int, str | None]]:
    """Walk the header section (RFC 5322 §2.1): `(start, end, name)` per line, `name`
    lower-cased for a field's first line and None for a continuation of it.

    The section ends at the first empty line, or at the first line that is neither a
    field nor a continuation of one (a message without headers starts with its body).
    Only the header section's lines are visited; no copy of the data is made.
    """
    size = len(raw)
    position = 0
    in_field = False
    while position < size:
        newline = raw.find(b"\n", position)
        line_end = size if newline < 0 else newline + 1
        line = raw[position:min(line_end, position + 1000)]
        if line[:1] in (b" ", b"\t") and in_field:
            yield position, line_end, None  # a continuation of the field before
            position = line_end
            continue
        match = _FIELD.match(line)
        if match is None:
            return  # an empty line or body text: the header section is over
        in_field = True
        yield position, line_end, line[: match.end() - 1].rstrip(b" \t").decode("ascii").lower()
        position = line_end


def scan_headers(raw: bytes | bytearray) -> HeaderSection:
    """Read the header section of `data`: where it ends, its line ending, its fields."""
    first_newline = raw.find(b"\n")
    eol = b"\r\n" if first_newline > 0 and raw[first_newline - 1] == 0x0D else b"\n"
    names: set[str] = set()
    received = 0
    section_end = 0
    for _start, line_end, name in _field_lines(raw):
        section_end = line_end
        if name is not None:
            names.add(name)
            received += name == "received"
    return HeaderSection(section_end, eol, frozenset(names), received)


def without_fields(raw: bytes, names: Collection[str]) -> bytes:
    """The header section of `raw` (up to its end) without the fields named (lower
    case), continuation lines included: `Bcc:` must never reach a recipient."""
    kept: list[bytes] = []
    dropping = False
    for start, end, name in _field_lines(raw):
        if name is not None:
            dropping = name in names
        if not dropping:
            kept.append(raw[start:end])
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


def from_field(address: str, full_name: str | None, eol: bytes = b"\r\n") -> bytes:
    """A `From:` field for a message that has none: `Full Name <address>` (RFC 5322
    §3.4; a name outside ASCII encoded as RFC 2047 words), or the bare address."""
    # formataddr refuses an address outside ASCII (RFC 6532): then the address alone.
    named = full_name and address.isascii()
    text = formataddr((full_name, address), charset="utf-8") if named else address
    return f"From: {text}".encode("utf-8", "surrogateescape") + eol


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
