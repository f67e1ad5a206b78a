"""What the receiver adds to a message before it is queued (SPEC §3, §8), and nothing else:

- one `Received:` field at its very start (RFC 5321 §4.4): from the client's
  HELO name and address, by our host name, with ESMTP / ESMTPS / ESMTPA (RFC 3848),
  the queue id, `for <recipient>` when there is exactly one (as Postfix: naming
  several would disclose Bcc's), and the date - written by `shared/headers.py`;
- for a client that may relay (relay_networks, or authenticated), a missing
  `Date:` or `Message-ID:` at the end of its header section (RFC 6409 §8), with an
  empty line after them when the message had none there;
- an empty line after the trace when nothing else is added in front of data whose
  first line begins with white space: that line would otherwise continue the
  Received: field (RFC 5322 §2.2.3), as Postfix's smtpd knows too.

The message stays in the chunks it was read in: a field added at the end of the
header section splits the chunk it falls in into two views of it; no copy of the
message is made. Pure: the queue id, the time and the host name are passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from services.receiver.session import MessageReady
from shared.headers import missing_fields, separator_before, smtp_received

Chunk = bytes | bytearray | memoryview


def stored_chunks(message: MessageReady, *, hostname: str, queue_id: str,
                  now: datetime) -> list[Chunk]:
    """The data to queue for `message`: the trace, then the client's data (with the
    missing fields added for a trusted client)."""
    origin = message.origin
    recipients = message.envelope.rcpt_tos
    trace = smtp_received(helo=origin.helo, client_ip=origin.client_ip, hostname=hostname,
                          protocol=origin.protocol, queue_id=queue_id,
                          recipient=recipients[0] if len(recipients) == 1 else None, now=now)
    chunks: list[Chunk] = [trace]
    added = b""
    if origin.trusted:
        added = missing_fields(message.headers, queue_id=queue_id, hostname=hostname, now=now)
    if not added:
        separator = separator_after_trace(message) if message.headers.end == 0 else b""
        if separator:
            chunks.append(separator)
        chunks.extend(message.chunks)
        return chunks
    end = message.headers.end
    before, after = split_at(message.chunks, end)
    added += separator_before(first_bytes(after, 2), message.headers.eol)
    chunks.extend(before)
    chunks.append(added)
    chunks.extend(after)
    return chunks


def separator_after_trace(message: MessageReady) -> bytes:
    """The empty line that keeps data starting with white space out of the trace
    field in front of it (it would read as a continuation line); b"" otherwise."""
    return message.headers.eol if first_bytes(message.chunks, 1) in (b" ", b"\t") else b""


def split_at(chunks: Sequence[Chunk], offset: int) -> tuple[list[Chunk], list[Chunk]]:
    """The chunks before `offset` of their data and from it on; the one it falls
    inside becomes two memoryviews of it."""
    before: list[Chunk] = []
    position = 0
    for index, chunk in enumerate(chunks):
        size = len(chunk)
        if position + size <= offset:
            before.append(chunk)
            position += size
            continue
        cut = offset - position
        if cut == 0:
            return before, list(chunks[index:])
        view = memoryview(chunk)
        before.append(view[:cut])
        return before, [view[cut:], *chunks[index + 1:]]
    return before, []


def first_bytes(chunks: Sequence[Chunk], count: int) -> bytes:
    """The first `count` bytes of the chunks' data (fewer if there are fewer)."""
    found = b""
    for chunk in chunks:
        found += bytes(chunk[:count - len(found)])
        if len(found) >= count:
            break
    return found
