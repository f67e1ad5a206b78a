"""Each message's delivery state, kept next to it on disk (SPEC §7 "Delivery state").

`queue.dir/.state/<id>` holds one JSON object, and only while the message has a
state worth keeping (it was deferred, is held, or was warned about); a message
delivered at its first attempt never gets one::

    {"attempts": 2, "next_attempt": 1764601234.5, "last_reply": "451 4.3.0 busy",
     "held": false, "warned": false, "expanded": false}

Never inside the queue file, whose format SPEC §3 fixes. Written atomically (a
temporary dot-name, fsync, rename), so a crash leaves the old state or the new one,
never half of one. The sender is its only writer while it runs; the `mailbag`
command writes it only while it holds the queue lock (no sender runs) or through
the running sender (services/sender/control.py). Every state file whose message
is gone is removed (`prune`): a finished or deleted message's state never lingers.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import MappingProxyType

from shared.queue.files import (
    FolderStamp,
    fsync_dir,
    read_file,
    unlink_quietly,
    write_durably,
    write_durably_replacing,
)

STATE_DIRNAME = ".state"


@dataclass(frozen=True)
class DeliveryState:
    """What the queue remembers of a message between attempts."""

    attempts: int = 0  # delivery attempts that ended in a temporary failure
    next_attempt: float = 0.0  # epoch seconds; not tried before (0: due now)
    last_reply: str = ""  # the reply (or why nothing was tried) of the last attempt
    held: bool = False  # by `mailbag hold`: not sent until released
    warned: bool = False  # the delay warning (SPEC §8) has been sent
    # The file's recipients are alias targets already (a partial delivery rewrote
    # it with what was left): delivered as they are, never expanded again - else a
    # target that names its alias, or one the catch-all would catch, changes.
    expanded: bool = False

    @property
    def is_blank(self) -> bool:
        """Nothing worth a file: the state of a message never tried."""
        return self == BLANK

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> DeliveryState:
        """Parse a state file; ValueError if it is not one."""
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        known = {f.name: f.type for f in fields(cls)}
        kwargs = {}
        for key, item in value.items():
            if key not in known:
                continue  # written by a newer version: ignore what we do not know
            expected = {"int": int, "float": (int, float), "str": str, "bool": bool}[known[key]]
            if isinstance(item, bool) and known[key] != "bool" or not isinstance(item, expected):
                raise ValueError(f"{key}: unexpected value {item!r}")
            kwargs[key] = float(item) if known[key] == "float" else item
        state = cls(**kwargs)
        if state.attempts < 0 or not math.isfinite(state.next_attempt):
            raise ValueError("attempts or next_attempt out of range")
        return state


BLANK = DeliveryState()


class StateStore:
    """The `.state/` folder of one queue."""

    def __init__(self, queue_dir: Path) -> None:
        self.dir = Path(queue_dir) / STATE_DIRNAME
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, queue_id: str) -> Path:
        return self.dir / queue_id

    def load(self, queue_id: str) -> DeliveryState:
        """The message's state (BLANK if it has none); ValueError if the file is bad."""
        try:
            return DeliveryState.from_json(read_file(self.path(queue_id)))
        except FileNotFoundError:
            return BLANK

    def _entries(self) -> list[os.DirEntry[str]]:
        """The folder's entries; a folder removed by hand is made again (empty) - but
        never the queue folder around it: one that is gone must stay visibly gone
        (every arrival gets 451, /healthz says so), not come back empty."""
        try:
            return list(os.scandir(self.dir))
        except FileNotFoundError:
            try:
                self.dir.mkdir(exist_ok=True)
            except FileNotFoundError:
                pass
            return []

    def load_all(self) -> tuple[dict[str, DeliveryState], list[tuple[str, str]]]:
        """Every state on disk, and the files that could not be read (name, why)."""
        states: dict[str, DeliveryState] = {}
        problems: list[tuple[str, str]] = []
        for entry in self._entries():
            if entry.name.startswith("."):
                continue  # a write in progress (or its leftover)
            try:
                states[entry.name] = DeliveryState.from_json(read_file(entry.path))
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as err:
                problems.append((entry.name, getattr(err, "strerror", None) or str(err)))
        return states, problems

    def save(self, queue_id: str, state: DeliveryState, *, durable: bool = False) -> None:
        """Replace the message's state atomically (a blank state removes the file).

        `durable`: fsync the file and the folder, so that the change survives a
        power cut (an operator's hold). Otherwise the rename alone makes it atomic:
        a power cut may lose a deferral's next attempt, and the message is then
        simply tried once more (a file it leaves unreadable counts as no state)."""
        if state.is_blank:
            self.remove(queue_id, durable=durable)
            return
        if not self.dir.is_dir():  # removed by hand: make it again (not the queue's)
            self.dir.mkdir(exist_ok=True)
        path = self.path(queue_id)
        if durable:
            write_durably_replacing(path, state.to_json())
            fsync_dir(self.dir)
            return
        tmp = self.dir / f".{queue_id}.{secrets.token_hex(4)}"
        try:
            write_durably(tmp, (state.to_json(),), sync=False)
            os.rename(tmp, path)
        except OSError:
            unlink_quietly(tmp)
            raise

    def remove(self, queue_id: str, *, durable: bool = False) -> None:
        unlink_quietly(self.path(queue_id))
        if durable:
            fsync_dir(self.dir)

    def prune(self, present: Iterable[str]) -> list[str]:
        """Remove the states (and leftover temporary files) of messages no longer
        queued; returns the ids removed."""
        keep = set(present)
        removed = []
        for entry in self._entries():
            if entry.name not in keep:
                unlink_quietly(entry.path)
                if not entry.name.startswith("."):
                    removed.append(entry.name)
        return removed


class StateCache:
    """Every message's state as on disk, for a reader that asks again and again (the
    metrics endpoint, at each scrape). While nothing was renamed in or out of
    `.state` (every write renames a new file in: `FolderStamp`) the last answer
    stands without a look at any file; else a state file is parsed again only when
    its inode, mtime or size changed - the inode alone is not enough, ext4 hands a
    freed one to the next new file, so a name can go back to an inode it had.
    Read-only and light: creates nothing; no `.state` folder yet means no states; a
    file that cannot be read counts as none (as for the sender). Not thread-safe:
    one caller at a time."""

    def __init__(self, queue_dir: Path) -> None:
        self.dir = Path(queue_dir) / STATE_DIRNAME
        self._stamp = FolderStamp(self.dir)
        self._known: dict[str, tuple[tuple[int, int, int], DeliveryState]] = {}
        self._states: Mapping[str, DeliveryState] = MappingProxyType({})

    def load(self) -> Mapping[str, DeliveryState]:
        """The states now (read-only); OSError if the folder exists but cannot be listed."""
        if not self._stamp.changed():
            return self._states
        known: dict[str, tuple[tuple[int, int, int], DeliveryState]] = {}
        try:
            entries = os.scandir(self.dir)
        except FileNotFoundError:
            entries = None
        if entries is not None:
            with entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue  # a write in progress (or its leftover)
                    try:
                        info = entry.stat(follow_symlinks=False)
                        key = (info.st_ino, info.st_mtime_ns, info.st_size)
                        cached = self._known.get(entry.name)
                        if cached is None or cached[0] != key:
                            cached = (key, DeliveryState.from_json(read_file(entry.path)))
                    except (OSError, ValueError):
                        continue  # gone meanwhile, or unreadable: no state
                    known[entry.name] = cached
        self._known = known
        self._states = MappingProxyType({name: state for name, (_, state) in known.items()})
        return self._states
