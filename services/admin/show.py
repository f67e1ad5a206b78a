"""`mailbag show ID [--body]`: one message, queued or failed, as an operator reads it.

First what the queue knows of it - where it is, its state (from `.state/<id>`, as
`mailbag queue` shows it), arrival, size, attempts, next attempt, last reply (for
a failed message: the reason beside it), the envelope - then its header section
as stored, and with `--body` the rest of the message too.

Reading only: nothing is locked, created or moved. The message's own bytes are
shown with line ends as LF, and every other control character (an ESC, a CR alone)
as `\\xNN`, so that a hostile message cannot drive the operator's terminal.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from services.admin.listing import duration, failed_path, state_of
from shared.config import Config
from shared.headers import scan_headers
from shared.queue import (
    BLANK,
    REASON_SUFFIX,
    STATE_DIRNAME,
    DeliveryState,
    QueueFile,
    StateStore,
    arrival_time,
    operations,
    read_file,
)

_UNSAFE = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")


class NotFound(Exception):
    """No such message in the queue or the failed folder."""


def show(config: Config, queue_id: str, *, body: bool, now: float) -> Iterator[bytes]:
    """The lines to print (bytes, each ending in LF). NotFound; OSError or
    QueueFormatError if the file cannot be read."""
    queue_dir = config.queue.dir
    if operations.is_queued(queue_dir, queue_id):
        path = queue_dir / queue_id
        state = _state(queue_dir, queue_id)
        kind, next_attempt = state_of(state, now)
        facts = [("id", queue_id), ("where", f"queue ({path})"), ("state", kind)]
        if state.attempts:
            facts.append(("attempts", str(state.attempts)))
        if next_attempt is not None:
            when = f"{_time(next_attempt)} (in {duration(next_attempt - now)})"
            facts.append(("next attempt", when))
        if state.last_reply:
            facts.append(("last reply", state.last_reply))
    elif (failed := failed_path(config, queue_id)) is not None:
        path = failed
        facts = [("id", queue_id), ("where", f"failed folder ({path})"), ("state", "failed")]
        facts += [("reason", line) for line in _reasons(path)]
    else:
        raise NotFound(queue_id)
    raw = read_file(path)
    message = QueueFile.from_bytes(raw)
    arrival = arrival_time(queue_id, path.stat().st_mtime)
    facts[3:3] = [("arrived", f"{_time(arrival)} ({duration(now - arrival)} ago)"),
                  ("size", f"{len(message.data)} bytes")]
    facts.append(("sender", f"<{message.sender}>"))
    facts += [("recipient", f"<{recipient}>") for recipient in message.recipients]
    yield from (f"{label:<14}{_printable_text(text)}\n".encode() for label, text in facts)
    yield b"\n"
    end = len(message.data) if body else scan_headers(message.data).end
    lines = message.data[:end].split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the data's last line end
    for line in lines:
        yield _printable(line.removesuffix(b"\r")) + b"\n"


def _state(queue_dir: Path, queue_id: str) -> DeliveryState:
    if not (queue_dir / STATE_DIRNAME).is_dir():
        return BLANK  # nothing was ever deferred or held (and reading creates nothing)
    try:
        return StateStore(queue_dir).load(queue_id)
    except (OSError, ValueError):
        return BLANK  # as the sender takes it: tried as if it had no state


def _reasons(path: Path) -> list[str]:
    try:
        text = path.with_name(path.name + REASON_SUFFIX).read_text("utf-8", "replace")
    except OSError:
        return ["(no reason recorded)"]
    return [line for line in text.splitlines() if line.strip()] or ["(no reason recorded)"]


def _time(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds")


def _printable(line: bytes) -> bytes:
    return _UNSAFE.sub(lambda m: b"\\x%02x" % m.group(0)[0], line)


def _printable_text(text: str) -> str:
    return _printable(text.encode("utf-8", "surrogateescape")).decode("utf-8", "replace")

