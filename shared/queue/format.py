"""The queue file format (SPEC §3): the ONE place that reads and writes it.

    From: <alice@example.com>\\n
    To: <bob@example.org>\\n            (one line per recipient, in RCPT order)
    \\n
    <the message data as stored, after dot-unstuffing>

The parser and the writer share one definition of what an envelope address may
hold (`_ADDRESS`): any byte but a control character, DEL or an angle bracket. So
every file the parser accepts is written back byte for byte by the writer, and an
address the writer refuses is one no parser would accept - a message read from the
queue can always be failed, rewritten or set aside (tests/test_queue_format.py
checks the round trip as a property).

Queue ids are `<16 hex digits of time_ns><6 random hex digits>`: unique without a
shared counter (safe across threads and processes) and sortable by arrival.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

_ADDRESS = rb"[^\x00-\x1f<>\x7f]*"
_ENVELOPE_LINE = re.compile(rb"(From|To): <(" + _ADDRESS + rb")>")
_VALID_ADDRESS = re.compile(_ADDRESS)


class QueueFormatError(ValueError):
    """A queue file (or an envelope to be written) that does not follow the format."""


@dataclass(frozen=True)
class QueueFile:
    """One queued message: the envelope and the data, as the format holds them."""

    sender: str  # "" for the null sender <>
    recipients: tuple[str, ...]
    data: bytes

    def envelope_bytes(self) -> bytes:
        """The envelope lines and the blank line; QueueFormatError if not writable."""
        return envelope_of(self.sender, self.recipients)

    def to_bytes(self) -> bytes:
        return self.envelope_bytes() + self.data

    @classmethod
    def from_bytes(cls, raw: bytes) -> QueueFile:
        """Parse a queue file; raise QueueFormatError naming what is wrong."""
        end = raw.find(b"\n\n")
        if end < 0:
            raise QueueFormatError("no blank line after the envelope")
        lines = raw[:end].split(b"\n")
        sender: str | None = None
        recipients: list[str] = []
        for number, line in enumerate(lines, 1):
            match = _ENVELOPE_LINE.fullmatch(line)
            if not match:
                raise QueueFormatError(f"envelope line {number} is malformed: {line[:80]!r}")
            address = match.group(2).decode("utf-8", "surrogateescape")
            if match.group(1) == b"From":
                if number != 1:
                    raise QueueFormatError(f"'From:' on line {number}, expected only on line 1")
                sender = address
            else:
                if sender is None:
                    raise QueueFormatError("'To:' before 'From:'")
                if not address:
                    raise QueueFormatError(f"empty recipient on line {number}")
                recipients.append(address)
        if sender is None:
            raise QueueFormatError("no 'From:' line")
        if not recipients:
            raise QueueFormatError("no 'To:' line")
        return cls(sender, tuple(recipients), raw[end + 2 :])


def envelope_of(sender: str, recipients: Sequence[str]) -> bytes:
    """The envelope of a message; QueueFormatError for what the parser would refuse."""
    if not recipients:
        raise QueueFormatError("a message needs at least one recipient")
    lines = [b"From: <" + encode_address(sender) + b">\n"]
    for recipient in recipients:
        if not recipient:
            raise QueueFormatError("empty recipient")
        lines.append(b"To: <" + encode_address(recipient) + b">\n")
    lines.append(b"\n")
    return b"".join(lines)


def encode_address(address: str) -> bytes:
    """An address as the envelope holds it; QueueFormatError if it cannot be queued."""
    try:
        raw = address.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise QueueFormatError(f"address {address!r} is not UTF-8") from None
    if not _VALID_ADDRESS.fullmatch(raw):
        raise QueueFormatError(f"address {address!r} cannot be queued")
    return raw


def new_queue_id(now_ns: int | None = None) -> str:
    """A unique id, sortable by arrival time (16 hex digits of ns, 6 random)."""
    # random.getrandbits, not secrets: uniqueness needs no secrecy, and the receiver
    # calls this per message - secrets costs a getrandom(2) syscall each time.
    return f"{now_ns if now_ns is not None else time.time_ns():016x}{random.getrandbits(24):06x}"


# What new_queue_id writes first: names that start so sort by arrival as strings.
ARRIVAL_PREFIX = re.compile(r"[0-9a-f]{16}")


def arrival_time(queue_id: str, fallback: float) -> float:
    """The arrival time encoded in a queue id (16 hex digits of time_ns), else `fallback`
    (a file named by hand)."""
    try:
        return int(queue_id[:16], 16) / 1e9 if len(queue_id) >= 16 else fallback
    except ValueError:
        return fallback
