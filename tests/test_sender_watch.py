"""The runner's wake-up: arrivals in queue.dir wake it, the sender's own moves never do.

A real watchdog observer on a real folder. Events come in order, so each test ends
with an arrival and waits (bounded) for it: whatever the moves before it had caused
would have been recorded first.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler

from services.sender.watch import watch_queue
from shared.queue import QueueFile, QueueReader, QueueWriter

WAIT = 10.0  # seconds: a bound, not a measured time


class Recorder(FileSystemEventHandler):
    """Every file event watchdog delivers (created, moved, deleted...), whatever its kind."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.seen = threading.Condition()

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:  # the folder's own "modified" that comes with each arrival
            return
        with self.seen:
            self.events.append((event.event_type, os.path.basename(str(event.src_path))))
            self.seen.notify_all()

    def wait_for(self, name: str) -> list[tuple[str, str]]:
        with self.seen:
            self.seen.wait_for(lambda: any(n == name for _, n in self.events), WAIT)
            return list(self.events)


def watched(queue_dir: Path, ignore=None):  # noqa: ANN001, ANN201
    wake = threading.Event()
    observer = watch_queue(queue_dir, wake, ignore)
    recorder = Recorder()
    (emitter,) = observer.emitters
    observer.add_handler_for_watch(recorder, emitter.watch)
    return observer, wake, recorder


def test_the_lock_and_finishes_cause_no_event_an_arrival_wakes(tmp_path: Path) -> None:
    queue_dir = tmp_path / "queue"
    writer = QueueWriter(queue_dir)
    ids = [writer.store("a@example.com", ["b@example.org"], b"x\r\n") for _ in range(20)]
    observer, wake, recorder = watched(queue_dir)
    reader = QueueReader(queue_dir, tmp_path / "failed", tmp_path / "quarantine")
    try:
        assert reader.try_lock()
        for queue_id in ids:  # the sender's hot path: read where it lies, then finish
            path = reader.path_of(queue_id)
            reader.read(path)
            reader.finish(path)
        assert reader.flush() == []
        assert not wake.is_set()
        arrival = writer.store("a@example.com", ["b@example.org"], b"y\r\n")
        events = recorder.wait_for(arrival)
        assert wake.wait(WAIT)
        # The lock file's creation is seen, but dot names never wake the runner.
        assert {name for _, name in events if not name.startswith(".")} == {arrival}, events
    finally:
        observer.stop()
        observer.join(WAIT)
        reader.close()


def test_a_rewrite_is_reported_to_ignore(tmp_path: Path) -> None:
    queue_dir = tmp_path / "queue"
    writer = QueueWriter(queue_dir)
    reader = QueueReader(queue_dir, tmp_path / "failed", tmp_path / "quarantine")
    queue_id = writer.store("a@example.com", ["b@example.org", "c@example.org"], b"x\r\n")
    asked: list[str] = []
    observer, wake, recorder = watched(queue_dir, lambda name: asked.append(name) or True)
    try:
        assert reader.try_lock()
        path = Path(reader.path_of(queue_id))
        message = reader.read(path)
        # A partial deferral: `.<id>.new` renamed over <id>, the runner's own move.
        reader.rewrite(path, QueueFile(message.sender, message.recipients[1:], message.data))
        recorder.wait_for(queue_id)
        assert asked == [queue_id] and not wake.is_set()
    finally:
        observer.stop()
        observer.join(WAIT)
        reader.close()
