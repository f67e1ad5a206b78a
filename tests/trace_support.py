"""Checks of what the receiver stores: the client's bytes plus exactly what SPEC §3/§8 add.

The stored data is one `Received:` field, then the data as the client sent it - with,
for a client that may relay, a `Date:` and a `Message-ID:` at the end of its header
section when it had none, and an empty line in front of data that starts with white
space when nothing else is (it would continue the Received: field). `assert_as_sent`
checks each of those, field by field, and that every other byte is the client's.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from services.receiver.session import (
    NEED_DATA,
    MessageReady,
    SendReply,
    ServerSession,
    SessionPolicy,
)
from services.receiver.trace import stored_chunks
from shared.headers import scan_headers

# RFC 5321 §4.4, folded as Postfix folds it (see shared/headers.smtp_received).
TRACE = re.compile(
    rb"Received: from (?P<helo>[^ \r\n]+) \(\[(?P<ip>[^\]\r\n]+)\]\)\r\n"
    rb"\tby (?P<host>[^ \r\n]+) \(mailbag\) with (?P<protocol>(?:E|UTF8)?SMTPS?A?) id (?P<id>\w+)"
    rb"(?:\r\n\tfor <(?P<rcpt>[^>\r\n]*)>)?; (?P<date>[^\r\n]+)\r\n"
)
ADDED_DATE = rb"Date: (?P<date>[^\r\n]+)\r\n"

# What `receive` and `stored` put in the trace: fixed, so tests can name them.
NOW = datetime(2026, 12, 1, 14, 50, 33, tzinfo=UTC)
HOST = "mx.trace.example"
QUEUE_ID = "18ed2cae52641ea8601849"


def receive(data: bytes, *, may_relay: bool = True, rcpts: tuple[str, ...] = ("b@localhost",),
            greet: bytes = b"EHLO client.example", max_hops: int = 50) -> MessageReady | SendReply:
    """One transaction through a `ServerSession` (no socket); the MessageReady, or the
    refusal. `data` is dot-stuffed for the wire and fed in the server's read size, so
    a big header section falls across chunks as it does for real."""
    session = ServerSession(SessionPolicy(hostname=HOST, max_hops=max_hops), "192.0.2.7",
                            may_relay=may_relay)
    wire = data.replace(b"\r\n.", b"\r\n..")
    if wire.startswith(b"."):
        wire = b"." + wire
    script = (greet + b"\r\nMAIL FROM:<a@example.com>\r\n"
              + b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts) + b"DATA\r\n"
              + wire + b".\r\n")
    last = None
    for start in range(0, len(script), 64 * 1024):  # as the server reads it
        session.receive_data(script[start:start + 64 * 1024])
        while (event := session.next_event()) is not NEED_DATA:
            if isinstance(event, MessageReady):
                return event
            last = event
    assert isinstance(last, SendReply)
    return last


def stored(message: MessageReady) -> bytes:
    """What the receiver writes after the envelope: `stored_chunks`, joined."""
    return b"".join(bytes(c) for c in stored_chunks(message, hostname=HOST, queue_id=QUEUE_ID,
                                                   now=NOW))


def split_trace(stored: bytes) -> tuple[re.Match[bytes], bytes]:
    """The receiver's Received: field (parsed) and the data after it."""
    match = TRACE.match(stored)
    assert match is not None, f"no Received: field of ours first: {stored[:300]!r}"
    assert parsedate_to_datetime(match["date"].decode()).tzinfo is not None
    return match, stored[match.end():]


def assert_as_sent(stored: bytes, sent: bytes, *, queue_id: str | None = None,
                   recipients: list[str] | None = None, trusted: bool = True) -> None:
    """`stored` is `sent` (the client's data, unstuffed) with our trace first and,
    for a `trusted` client, a missing Date:/Message-ID: at the end of its header
    section - and nothing else changed."""
    trace, rest = split_trace(stored)
    if queue_id is not None:
        assert trace["id"].decode() == queue_id
    if recipients is not None:
        expected_for = recipients[0].encode() if len(recipients) == 1 else None
        assert trace["rcpt"] == expected_for, trace.group(0)
    section = scan_headers(sent)
    head, tail = sent[:section.end], sent[section.end:]
    assert rest.startswith(head) and rest.endswith(tail) and len(rest) >= len(sent), (
        f"the client's bytes changed:\n{rest[:400]!r}\nsent:\n{sent[:400]!r}")
    added = rest[len(head):len(rest) - len(tail)]
    pattern = b""
    if trusted and not section.has("date"):
        pattern += ADDED_DATE
    if trusted and not section.has("message-id"):
        pattern += rb"Message-ID: <" + re.escape(trace["id"]) + rb"@[^>\r\n]+>\r\n"
    if pattern and tail[:2] not in (b"", b"\r\n") and tail[:1] != b"\n":
        pattern += rb"\r\n"  # an empty line, so that the body is not read as fields
    elif not pattern and not head and tail[:1] in (b" ", b"\t"):
        pattern = rb"\r\n"  # an empty line, so that the first line is not the trace's
    match = re.fullmatch(pattern, added)
    assert match is not None, f"added {added!r}, expected {pattern!r}"
    if "date" in match.groupdict():
        assert parsedate_to_datetime(match["date"].decode()).tzinfo is not None


def is_as_sent(stored: bytes, sent: bytes) -> bool:
    """`assert_as_sent` as a test: is this stored data that sent data?"""
    try:
        assert_as_sent(stored, sent)
    except AssertionError:
        return False
    return True


def assert_queue_file(raw: bytes, queue_id: str, sender: str, recipients: list[str],
                      sent: bytes, *, trusted: bool = True) -> None:
    """SPEC §3's queue file, literally: From line, one To line per recipient, blank
    line - then the data, as `assert_as_sent` checks it."""
    envelope = (f"From: <{sender}>\n" + "".join(f"To: <{r}>\n" for r in recipients)
                + "\n").encode()
    assert raw.startswith(envelope), raw[:300]
    assert_as_sent(raw[len(envelope):], sent, queue_id=queue_id, recipients=recipients,
                   trusted=trusted)
