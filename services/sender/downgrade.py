"""8-bit message data and a relay's 8BITMIME (RFC 6152): send as is, convert, or refuse.

Pure functions on bytes, no I/O; the client session calls `for_relay` once it knows
the relay's EHLO extensions.

- 7-bit data goes as it is, MAIL without a BODY parameter;
- 8-bit data to a relay that offers 8BITMIME goes as it is with `BODY=8BITMIME`;
- 8-bit data to a relay without it is converted to 7 bit, as Postfix does
  (`disable_mime_output_conversion = no`, RFC 6152 §3 option (a)): the body of every
  MIME leaf part that holds 8-bit bytes is re-encoded quoted-printable (RFC 2045
  §6.7) and its Content-Transfer-Encoding says so; a multipart or message/rfc822
  part labelled `8bit`/`binary` is relabelled `7bit` (RFC 2045 §6.4, its parts are
  7 bit now). A message without `MIME-Version` becomes a MIME message first
  (`MIME-Version: 1.0`, and `Content-Type: text/plain` with `charset=utf-8`, or
  `unknown-8bit` (RFC 1428) when the bytes are not UTF-8). Parts without 8-bit bytes
  are left exactly as they are.
- What cannot be converted raises `NotConvertible`; the session then fails the
  message for every recipient with 554 5.6.3 (RFC 3463: conversion required but
  not supported), so it is bounced rather than retried for days. That is:
  8-bit bytes in a header (encoded words, RFC 2047, need a charset nobody declared
  and are not allowed in addresses or most structured fields; guessing would corrupt
  them silently); in a multipart preamble or epilogue, or a multipart without its
  boundary (they have no header to carry an encoding); in a body already labelled
  base64 or quoted-printable (that body is broken: re-encoding it would hide that);
  in a message/* part other than message/rfc822 (RFC 2046 §5.2: those stay 7 bit);
  and MIME nested deeper than `MAX_NESTING`.

The output has CRLF line ends (the input may have CR, LF or CRLF), ready for
`to_wire_data`.
"""

from __future__ import annotations

import binascii
import re
from email.message import Message

# Postfix's mime_nesting_limit: deeper MIME is refused, never recursed into without end.
MAX_NESTING = 100

# RFC 5322 §2.2 / §3.6.8: a field name is printable US-ASCII except ":".
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_RELABEL = ("8bit", "binary")


class NotConvertible(ValueError):
    """8-bit data that cannot be turned into 7 bit; str() says what and where."""


def for_relay(data: bytes, relay_has_8bitmime: bool) -> tuple[bytes, bool]:
    """The data to send to a relay, and whether MAIL says `BODY=8BITMIME` (RFC 6152).

    Raises NotConvertible for 8-bit data that a relay without 8BITMIME cannot get.
    """
    if data.isascii():
        return data, False
    if relay_has_8bitmime:
        return data, True
    return downgrade(data), False


def downgrade(data: bytes) -> bytes:
    """8-bit message data -> the same message in 7 bit (see the module doc)."""
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join(line + b"\r\n" for line in _entity(lines, 0, "text/plain", top=True))


def _entity(lines: list[bytes], depth: int, default_type: str, *, top: bool = False
            ) -> list[bytes]:
    """One MIME entity (header lines, blank line, body) in 7 bit; unchanged if it is."""
    if all(line.isascii() for line in lines):
        return lines
    if depth > MAX_NESTING:
        raise NotConvertible(f"MIME parts nested deeper than {MAX_NESTING}")
    header, body = _split(lines)
    if not all(line.isascii() for line in header):
        raise NotConvertible("8-bit data in a header")
    fields = _Header(header)
    declared = fields.get("content-type")
    parsed = Message()
    parsed.set_default_type(default_type)
    if declared is not None:
        parsed["Content-Type"] = declared
    content_type = parsed.get_content_type()
    encoding = (fields.get("content-transfer-encoding") or "7bit").strip().lower()
    if top and fields.get("mime-version") is None:
        fields.append(b"MIME-Version: 1.0")
    if content_type.startswith("multipart/"):
        boundary = parsed.get_param("boundary")
        inner = "message/rfc822" if content_type == "multipart/digest" else "text/plain"
        body = _multipart(body, boundary if isinstance(boundary, str) else None, depth, inner)
        if encoding in _RELABEL:
            fields.set_encoding(b"7bit")
    elif content_type == "message/rfc822":
        body = _entity(body, depth + 1, "text/plain")
        if encoding in _RELABEL:
            fields.set_encoding(b"7bit")
    elif content_type.startswith("message/"):
        raise NotConvertible(f"8-bit data in a {content_type} part")
    elif encoding in ("base64", "quoted-printable"):
        raise NotConvertible(f"8-bit data in a body labelled {encoding}")
    else:
        if declared is None:
            fields.append(b"Content-Type: text/plain; charset=" + _charset(body))
        body = _quoted_printable(body)
        fields.set_encoding(b"quoted-printable")
    return [*fields.lines, b"", *body]


def _split(lines: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """(header lines, body lines). The header ends at the blank line, or - as mail
    readers have it - at the first line that is neither a field nor a continuation."""
    for index, line in enumerate(lines):
        if not line:
            return lines[:index], lines[index + 1:]
        if not (_FIELD.match(line) or (index and line[:1] in (b" ", b"\t"))):
            return lines[:index], lines[index:]
    return lines, []


def _multipart(body: list[bytes], boundary: str | None, depth: int, inner: str
               ) -> list[bytes]:
    """A multipart body with each part in 7 bit; the delimiter lines kept as they are."""
    if not boundary:
        raise NotConvertible("8-bit data in a multipart without a boundary")
    delimiter = b"--" + boundary.encode("ascii", "replace")
    closing = delimiter + b"--"
    out: list[bytes] = []
    part: list[bytes] | None = None  # None: in the preamble or the epilogue
    for line in body:
        bare = line.rstrip(b" \t")  # RFC 2046 §5.1.1: transport padding
        if bare in (delimiter, closing):
            if part is not None:
                out.extend(_entity(part, depth + 1, inner))
            out.append(line)
            part = [] if bare == delimiter else None
        elif part is not None:
            part.append(line)
        elif line.isascii():
            out.append(line)
        else:
            raise NotConvertible("8-bit data outside the parts of a multipart")
    if part is not None:  # no closing delimiter: the last part runs to the end
        out.extend(_entity(part, depth + 1, inner))
    return out


def _charset(body: list[bytes]) -> bytes:
    try:
        b"\n".join(body).decode("utf-8")
    except UnicodeDecodeError:
        return b"unknown-8bit"
    return b"utf-8"


def _quoted_printable(body: list[bytes]) -> list[bytes]:
    """Body lines -> quoted-printable lines (RFC 2045 §6.7: at most 76 characters,
    soft line breaks, trailing white space encoded)."""
    if not body:
        return []
    # The CRLF after the last line makes binascii use CRLF for its soft breaks too.
    encoded = binascii.b2a_qp(b"\r\n".join(body) + b"\r\n", istext=True)
    return encoded[:-2].split(b"\r\n")


class _Header:
    """The header lines of one entity: look a field up, set the encoding, add a field."""

    def __init__(self, lines: list[bytes]) -> None:
        self.lines = list(lines)

    def _find(self, name: str) -> tuple[int, int] | None:
        """(first line, end) of the first field called `name` (case-insensitive)."""
        wanted = name.encode("ascii")
        for index, line in enumerate(self.lines):
            match = _FIELD.match(line)
            if match and match.group(0)[:-1].rstrip(b" \t").lower() == wanted:
                end = index + 1
                while end < len(self.lines) and self.lines[end][:1] in (b" ", b"\t"):
                    end += 1
                return index, end
        return None

    def get(self, name: str) -> str | None:
        """The unfolded value of a field, or None when there is none."""
        found = self._find(name)
        if found is None:
            return None
        first, end = found
        value = b" ".join(line.strip() for line in self.lines[first:end])
        return value.split(b":", 1)[1].strip().decode("ascii")

    def set_encoding(self, encoding: bytes) -> None:
        """Content-Transfer-Encoding: replaced where it stands, or added at the end."""
        line = b"Content-Transfer-Encoding: " + encoding
        found = self._find("content-transfer-encoding")
        if found is None:
            self.lines.append(line)
        else:
            self.lines[found[0]:found[1]] = [line]

    def append(self, line: bytes) -> None:
        self.lines.append(line)
