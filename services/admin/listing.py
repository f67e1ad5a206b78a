"""The read-only queue listing: `mailbag queue`, `mailbag-sendmail -bp` and `mailq`.

One row per message (SPEC §7): id, age, size, sender, recipients, state, attempts,
next attempt, last reply. The state comes from the message's delivery state
(`.state/<id>`, shared/queue/state.py):

    held       `held` is set (by `mailbag hold`): not sent until released
    deferred   its next attempt is in the future (also when the relay was down)
    ready      due now: never tried, or its next attempt has come
    failed     in the failed folder (`<id>` or `<id>.<n>`), the reason as last reply

`--failed` lists the failed folder instead of the queue (as `mailbag delete
--failed` acts on it). Reading is strictly read-only and light: only the envelope
of each file is read (up to its blank line), never the message; nothing is
created, locked or moved, so any user who may read the folders can list them
while the sender runs. A file that vanishes meanwhile (delivered) is left out.

`queue_rows` / `failed_rows` read the disk; `format_text` / `format_json` are pure
(rows and `now` in, lines out); `list_queue` is both.

`Census` counts the same states again and again (the metrics endpoint, at every
scrape) without reading a single message: names from the folder listing (`d_type`,
no stat), listed again only when the folder changed (`FolderStamp`), the oldest
arrival from the queue ids (they sort by it), the states from a `StateCache`.
bench/README.md has what a scrape of 100,000 messages costs.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

from services.admin.errors import AdminError
from shared.config import Config
from shared.queue import (
    ARRIVAL_PREFIX,
    BLANK,
    REASON_SUFFIX,
    STATE_DIRNAME,
    DeliveryState,
    FolderStamp,
    QueueFile,
    QueueFormatError,
    StateCache,
    StateStore,
    arrival_time,
)

ENVELOPE_READ = 4096  # most envelopes come in one read
ENVELOPE_MAX = 1024 * 1024  # an envelope is lines of addresses: far below this
SHOWN_RECIPIENTS = 3  # in the text form; the JSON form has them all
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ListingError(Exception):
    """The queue cannot be listed; str() is one line, `exit_code` a sysexits code."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class QueueRow:
    """One message as listed."""

    id: str
    state: str  # ready / deferred / held / failed
    arrival: float  # epoch seconds (from the queue id)
    size: int  # bytes of the message (the file without its envelope)
    sender: str  # "" for the null sender <>
    recipients: tuple[str, ...]
    attempts: int = 0
    next_attempt: float | None = None  # only for a deferred message
    last_reply: str = ""


# ---------------------------------------------------------------------------- reading

def list_queue(config: Config, *, failed: bool, as_json: bool, now: float) -> Iterator[str]:
    """The listing's lines. Reads the folders at once: ListingError is raised here,
    not while the lines are iterated."""
    rows = failed_rows(config.queue.failed) if failed else queue_rows(config.queue.dir, now)
    return format_json(rows, now) if as_json else format_text(rows, now, failed=failed)


def queue_rows(queue_dir: Path, now: float) -> list[QueueRow]:
    """The messages in queue.dir with their delivery state, oldest first."""
    states = _load_states(queue_dir)
    rows = []
    for entry in _regular_files(queue_dir):
        state = states.get(entry.name, BLANK)
        kind, next_attempt = state_of(state, now)
        rows.append(_read_row(entry, kind, state, next_attempt, ""))
    return _oldest_first(rows)


def failed_rows(failed_dir: Path) -> list[QueueRow]:
    """The messages in the failed folder, each with the reason beside it."""
    rows = []
    for entry in _regular_files(failed_dir):
        if entry.name.endswith(REASON_SUFFIX):
            continue
        reason = _read_reason(Path(entry.path + REASON_SUFFIX))
        rows.append(_read_row(entry, "failed", BLANK, None, reason))
    return _oldest_first(rows)


def failed_names(failed_dir: Path) -> list[str]:
    """The names of the failed folder's messages, in `failed_rows`' order, from the
    listing alone (no file opened)."""
    entries = [entry for entry in _regular_files(failed_dir)
               if not entry.name.endswith(REASON_SUFFIX)]
    return [entry.name for entry in sorted(entries, key=lambda e: (_arrival(e), e.name))]


def failed_path(config: Config, name: str) -> Path | None:
    """The failed message of that name, or None (never a reason file or a dot name).
    AdminError when the failed folder cannot be looked at by this user."""
    if not name or "/" in name or name.startswith(".") or name.endswith(REASON_SUFFIX):
        return None
    path = config.queue.failed / name
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        raise AdminError(f"cannot use the failed folder {config.queue.failed}: "
                         f"{err.strerror or err}") from None
    return path if stat.S_ISREG(info.st_mode) else None


def oldest_message(queue_dir: Path) -> tuple[str, float] | None:
    """The queued message that arrived first, held ones included, with its arrival:
    from the names alone (a file named by hand: its mtime), no file opened."""
    first = min(((_arrival(entry), entry.name) for entry in _regular_files(queue_dir)),
                default=None)
    return None if first is None else (first[1], first[0])


@dataclass(frozen=True)
class QueueCensus:
    """How many messages are in each state, and when the oldest waiting one arrived."""

    counts: Mapping[str, int]  # every one of STATES, failed included
    oldest_waiting: float | None  # arrival (epoch seconds) of the oldest ready/deferred


STATES = ("ready", "deferred", "held", "failed")


class Census:
    """The queue counted by state (the rule of `state_of`, as the listing shows it),
    for a caller that counts again and again. While neither the folder nor the
    states changed, a count is a bisect: the deferred messages are those whose next
    attempt is still to come. Not thread-safe: one caller at a time."""

    def __init__(self, queue_dir: Path, failed_dir: Path) -> None:
        self._queued = FolderNames(queue_dir)
        self._failed = FolderNames(failed_dir)
        self._states = StateCache(queue_dir)
        self._seen: tuple[AbstractSet[str], Mapping[str, DeliveryState]] | None = None
        self._held: frozenset[str] = frozenset()
        self._next_attempts: list[float] = []  # of the others with a state, sorted
        self._oldest: float | None = None
        self._failed_seen: frozenset[str] | None = None
        self._failed_count = 0

    def count(self, now: float) -> QueueCensus:
        """ListingError if a folder cannot be read."""
        names = self._queued.names()
        failed_names = self._failed.names()
        if failed_names is not self._failed_seen:  # each with its `.reason` beside it
            self._failed_count = sum(not name.endswith(REASON_SUFFIX) for name in failed_names)
            self._failed_seen = failed_names
        try:
            states = self._states.load()
        except OSError as err:
            raise listing_error(err, self._states.dir) from None
        if self._seen is None or self._seen[0] is not names or self._seen[1] is not states:
            self._sort(names, states)
        deferred = len(self._next_attempts) - bisect.bisect_right(self._next_attempts, now)
        held = len(self._held)
        counts = {"ready": len(names) - held - deferred, "deferred": deferred, "held": held,
                  "failed": self._failed_count}
        return QueueCensus(counts, self._oldest)

    def _sort(self, names: frozenset[str], states: Mapping[str, DeliveryState]) -> None:
        """Sort the messages' states out once per change: held (never due), or a
        next attempt (deferred until then); only a message with a state can be
        other than ready."""
        held, next_attempts = set(), []
        for name, state in states.items():
            if name in names:
                if state.held:
                    held.add(name)
                else:
                    next_attempts.append(state.next_attempt)
        next_attempts.sort()
        self._held = frozenset(held)
        self._next_attempts = next_attempts
        self._oldest = self._queued.oldest(names - self._held if held else names)
        self._seen = (names, states)


class FolderNames:
    """The names of a folder's messages (`_regular_files`), listed again only when
    the folder changed, and when the oldest of some of them arrived."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._stamp = FolderStamp(folder)
        self._names: frozenset[str] = frozenset()
        self._by_hand: frozenset[str] = frozenset()  # names that are no queue id

    def names(self) -> frozenset[str]:
        if self._stamp.changed():
            self._names = frozenset(entry.name for entry in _regular_files(self.folder))
            self._by_hand = frozenset(name for name in self._names
                                      if not ARRIVAL_PREFIX.match(name))
        return self._names

    def oldest(self, names: AbstractSet[str]) -> float | None:
        """The earliest arrival among `names` (of the last listing): queue ids sort by
        arrival as strings, so one `min` finds it; a file named by hand has its mtime."""
        odd = self._by_hand & names if self._by_hand else frozenset()
        ids = names - odd if odd else names
        arrivals = [_mtime(self.folder / name) for name in odd]
        if ids:
            arrivals.append(arrival_time(min(ids), 0.0))
        return min(arrivals, default=None)


def state_of(state: DeliveryState, now: float) -> tuple[str, float | None]:
    """The listed state of a queued message, and its next attempt if deferred."""
    if state.held:
        return "held", None
    if state.next_attempt > now:
        return "deferred", state.next_attempt
    return "ready", None


def _load_states(queue_dir: Path) -> dict[str, DeliveryState]:
    """Every readable state file; none when there is no `.state` folder yet (a
    StateStore would create it, and the listing creates nothing). ListingError when
    the folder cannot be looked at: a user who may not enter queue.dir gets that
    (pathlib's is_dir raises PermissionError then, it does not answer False)."""
    try:
        if not (queue_dir / STATE_DIRNAME).is_dir():
            return {}
        states, _unreadable = StateStore(queue_dir).load_all()
    except OSError as err:
        raise listing_error(err, queue_dir) from None
    return states


def _regular_files(folder: Path) -> list[os.DirEntry[str]]:
    """The regular files of `folder` whose names do not start with "." (the queue's
    own). A folder that does not exist yet holds nothing."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    except OSError as err:
        raise listing_error(err, folder) from None
    # is_file(follow_symlinks=False): a regular file, told by the listing's d_type
    # without a stat (a file gone meanwhile is simply not one).
    return [entry for entry in entries
            if not entry.name.startswith(".") and entry.is_file(follow_symlinks=False)]


def listing_error(err: OSError, folder: Path) -> ListingError:
    """The one wording of a folder that cannot be read, for the listing and the
    endpoint alike."""
    code = os.EX_NOPERM if isinstance(err, PermissionError) else os.EX_IOERR
    return ListingError(code, f"cannot read {folder}: {err.strerror or err}")


def _read_row(entry: os.DirEntry[str], kind: str, state: DeliveryState,
              next_attempt: float | None, reason: str) -> QueueRow:
    try:
        envelope, size = read_envelope(entry.path)
        sender, recipients = envelope.sender, envelope.recipients
    except (OSError, QueueFormatError) as err:
        why = getattr(err, "strerror", None) or str(err)
        sender, recipients, size = "", (), 0
        reason = f"unreadable queue file: {why}"
    return QueueRow(
        id=entry.name, state=kind, arrival=_arrival(entry), size=size,
        sender=sender, recipients=recipients, attempts=state.attempts,
        next_attempt=next_attempt, last_reply=reason or state.last_reply)


def _arrival(entry: os.DirEntry[str]) -> float:
    """When the message arrived: the time in its queue id, or for a file named by
    hand its mtime."""
    arrival = arrival_time(entry.name, -1.0)
    return arrival if arrival >= 0 else _mtime(Path(entry.path))


def _mtime(path: Path) -> float:
    """A file's mtime, 0 when it is gone meanwhile."""
    try:
        return path.stat(follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def read_envelope(path: str) -> tuple[QueueFile, int]:
    """The envelope of a queue file (parsed by the queue format, data left empty)
    and the size of the message after it; reads only up to the blank line.
    OSError, QueueFormatError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        head = b""
        while (end := head.find(b"\n\n")) < 0:
            chunk = os.read(fd, ENVELOPE_READ)
            if not chunk or len(head) > ENVELOPE_MAX:
                raise QueueFormatError("no blank line after the envelope")
            head += chunk
    finally:
        os.close(fd)
    return QueueFile.from_bytes(head[:end + 2]), size - (end + 2)


def _read_reason(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no reason recorded)"
    return " / ".join(line for line in text.splitlines() if line.strip())


def _oldest_first(rows: list[QueueRow]) -> list[QueueRow]:
    return sorted(rows, key=lambda row: (row.arrival, row.id))


# ---------------------------------------------------------------------------- formatting

_COLUMNS = ("ID", "STATE", "AGE", "SIZE", "TRIES", "NEXT", "SENDER")
_RIGHT_ALIGNED = frozenset({"SIZE", "TRIES"})


def format_text(rows: Sequence[QueueRow], now: float, *, failed: bool = False) -> Iterator[str]:
    """A header line, one aligned line per message, and a summary line (like
    `postqueue -p`); the recipients and the last reply close each line."""
    if not rows:
        yield "No failed messages" if failed else "Mail queue is empty"
        return
    table = [_COLUMNS] + [_cells(row, now) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    for number, line in enumerate(table):
        cells = [cell.rjust(width) if _COLUMNS[i] in _RIGHT_ALIGNED else cell.ljust(width)
                 for i, (cell, width) in enumerate(zip(line, widths, strict=True))]
        tail = "RECIPIENTS (LAST REPLY)" if number == 0 else _tail(rows[number - 1])
        yield "  ".join(cells) + "  " + tail
    yield _summary(rows, failed)


def format_json(rows: Sequence[QueueRow], now: float) -> Iterator[str]:
    """One JSON object per message and line, the same fields as the text form."""
    for row in rows:
        yield json.dumps({
            "id": row.id,
            "state": row.state,
            "arrival_time": round(row.arrival, 3),
            "age": int(max(0.0, now - row.arrival)),
            "size": row.size,
            "sender": row.sender,
            "recipients": list(row.recipients),
            "attempts": row.attempts,
            "next_attempt": round(row.next_attempt, 3) if row.next_attempt else None,
            "last_reply": row.last_reply,
        })


def _cells(row: QueueRow, now: float) -> tuple[str, ...]:
    # The id is a file name: whoever may write the queue chose it, control characters too.
    return (printable(row.id), row.state, duration(now - row.arrival), str(row.size),
            str(row.attempts), _next(row, now), f"<{printable(row.sender)}>")


def _next(row: QueueRow, now: float) -> str:
    if row.state == "deferred" and row.next_attempt is not None:
        return "in " + duration(row.next_attempt - now)
    return "now" if row.state == "ready" else "-"


def _tail(row: QueueRow) -> str:
    shown = ", ".join(f"<{printable(r)}>" for r in row.recipients[:SHOWN_RECIPIENTS])
    more = len(row.recipients) - SHOWN_RECIPIENTS
    if more > 0:
        shown += f" +{more} more"
    reply = f" ({printable(row.last_reply)})" if row.last_reply else ""
    return (shown or "-") + reply


def _summary(rows: Sequence[QueueRow], failed: bool) -> str:
    total = sum(row.size for row in rows)
    noun = "failed message" if failed else "message"
    line = f"-- {len(rows)} {noun}{'' if len(rows) == 1 else 's'}, {total} bytes"
    if failed:
        return line
    counts = {state: sum(row.state == state for row in rows)
              for state in ("ready", "deferred", "held")}
    return line + " (" + ", ".join(f"{n} {state}" for state, n in counts.items() if n) + ")"


def duration(seconds: float) -> str:
    """A compact span: 45s, 12m, 2h03m, 3d04h (never negative)."""
    whole = int(max(0.0, seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def printable(text: str) -> str:
    """One line on a terminal: a multi-line reply joined with " / ", control
    characters shown as "?", bytes that are not UTF-8 (an envelope or a file name
    holds them as surrogates, which a strict UTF-8 stdout refuses) as U+FFFD."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return _CONTROL.sub("?", " / ".join(text.splitlines()))
