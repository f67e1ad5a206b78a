"""The header fields mailbag adds to a message it accepts, and the reading they need.

Shared by the receiver (SMTP) and `mailbag-sendmail` (local submission), so that
both write the same trace and add missing fields the same way (SPEC §3, §7, §8):

- one `Received:` field at the very start (RFC 5321 §4.4; RFC 3848 for the
  ESMTPS / ESMTPA protocol names), folded as Postfix folds it;
- a missing `Date:` or `Message-ID:` at the END of the header section (RFC 6409 §8:
  a submission server may add them), never anywhere else;
- `scan_headers` reads only the header section, line by line, and reports where it
  ends, its line ending, which fields it has and how many `Received:` fields
  (the hop count against mail loops). The body is never looked at or copied:
  callers write `[trace, data[:end], added, data[end:]]` as chunks.

Pure functions: the time, the names and the ids are passed in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime

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
        name = line[: match.end() - 1].rstrip(b" \t").decode("ascii").lower()
        names.add(name)
        received += name == "received"
        in_field = True
        position = line_end
    return HeaderSection(position, eol, frozenset(names), received)


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
