"""Wake the queue runner when a message arrives in queue.dir (watchdog / inotify).

Only arrivals matter: a file created in, or renamed into, queue.dir (the receiver's
rename from `.tmp`). The sender's own work must cost nothing: with watchdog's
default mask every move and unlink wakes its threads, which parse the event in
Python and take the GIL from the runner (bench/README.md). So the kernel is asked
for IN_CREATE and IN_MOVED_TO only (inotify(7)): the sender's unlinks (IN_DELETE)
and its moves out to failed/ or quarantine/ never reach Python. Dot names (`.sender.lock`,
`.tmp`, a rewrite's `.<id>.new`) never wake the runner; a rewrite's rename over
`<id>` (IN_MOVED_TO) is still reported, and the runner's `ignore(name)` (its own
moves) filters it out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

try:  # Linux: inotify
    from watchdog.observers.inotify import InotifyEmitter, InotifyObserver
    from watchdog.observers.inotify_c import InotifyConstants
except ImportError:  # pragma: no cover - other systems keep watchdog's default observer
    InotifyObserver = None  # type: ignore[assignment,misc]


class _QueueWatch(FileSystemEventHandler):
    """Sets `wake` when a file appears directly in queue.dir (created or renamed in)."""

    def __init__(
        self, folder: Path, wake: threading.Event, ignore: Callable[[str], bool] | None = None
    ) -> None:
        self.folder = str(folder)
        self.wake = wake
        self.ignore = ignore or (lambda _name: False)

    def on_created(self, event: FileSystemEvent) -> None:
        self._maybe_wake(event.src_path)

    def on_moved(self, event: FileSystemEvent) -> None:
        self._maybe_wake(event.dest_path)

    def _maybe_wake(self, path: str | bytes) -> None:
        text = path.decode(errors="replace") if isinstance(path, bytes) else path
        folder, _, name = text.rpartition("/")
        if folder == self.folder and name and not name.startswith(".") and not self.ignore(name):
            self.wake.set()


if InotifyObserver is not None:

    class _ArrivalEmitter(InotifyEmitter):
        """An inotify emitter whose kernel mask holds arrivals only (see the module doc)."""

        def get_event_mask_from_filter(self):  # noqa: ANN201 - watchdog's Mask type
            return (
                InotifyConstants.IN_CREATE
                | InotifyConstants.IN_MOVED_TO
                | InotifyConstants.IN_DELETE_SELF  # watchdog stops the watch on it
            )

    class _ArrivalObserver(InotifyObserver):
        """InotifyObserver with `_ArrivalEmitter`. BaseObserver keeps the class it makes
        emitters of in `_emitter_class` (watchdog 4 to 7); tests/test_sender_watch.py
        fails if a finish ever wakes the runner again."""

        def __init__(self) -> None:
            super().__init__()
            self._emitter_class = _ArrivalEmitter


def _new_observer() -> BaseObserver:
    return _ArrivalObserver() if InotifyObserver is not None else Observer()


def watch_queue(
    folder: Path, wake: threading.Event, ignore: Callable[[str], bool] | None = None
) -> BaseObserver:
    """Start a watchdog observer on `folder` (not recursive) that sets `wake`.

    `ignore(name)` filters out files the runner itself renamed in (a rewrite).
    """
    _no_move_pairing_delay()
    observer = _new_observer()
    observer.schedule(_QueueWatch(Path(folder), wake, ignore), str(folder), recursive=False)
    observer.daemon = True
    observer.start()
    return observer


def _no_move_pairing_delay() -> None:
    """Deliver inotify events at once, not after a pairing delay (bench/README.md).

    watchdog holds each IN_MOVED_FROM for 0.5 s to pair it with an IN_MOVED_TO, in a
    FIFO, holding back the events behind it. With the arrivals-only mask no
    IN_MOVED_FROM comes; this stays for a watchdog where the mask cannot be set.
    """
    try:
        from watchdog.observers.inotify_move_event_grouper import (
            InotifyMoveEventGrouper as Grouper,
        )
    except ImportError:  # older watchdog: the same delay lives on InotifyBuffer
        from watchdog.observers.inotify_buffer import InotifyBuffer as Grouper
    Grouper.delay = 0.0
