"""The sender's figures on their way to the endpoint the receiver serves: one file.

The sender counts in its own process (plain prometheus_client objects: the
cheapest update there is) and a `SnapshotWriter` thread renders its registry in
the Prometheus text format at most once per `interval`, and writes it only when it
changed: `<metrics dir>/sender.prom`, a temporary dot-name renamed over the old
file, so a reader sees the old exposition or the new one, never half of one. No
fsync: after a crash the file is ignored anyway (the sender's alive lock is gone),
and the next sender writes its own before it takes that lock.

The endpoint parses the file back into metric families (`read_snapshot`, the
library's own parser) and serves them next to its own, only while the sender is
alive (`sender_is_alive`). So a figure of the sender is at most `interval` old
at a scrape, and a dead sender's figures are never served as if it ran.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from shared.log import EventLog
from shared.metrics.alive import AliveMark, is_alive
from shared.metrics.counting import CountingSenderFigures
from shared.metrics.figures import SenderFigures

SNAPSHOT_NAME = "sender.prom"
ALIVE_NAME = "sender.alive"
WRITE_INTERVAL = 1.0  # seconds: a sender figure is at most this old at a scrape


def snapshot_path(folder: Path) -> Path:
    return folder / SNAPSHOT_NAME


def alive_path(folder: Path) -> Path:
    return folder / ALIVE_NAME


def sender_is_alive(folder: Path) -> bool:
    return is_alive(alive_path(folder))


class SnapshotWriter:
    """Keeps `<folder>/sender.prom` up to date with `registry` (a daemon thread)."""

    def __init__(self, registry: CollectorRegistry, folder: Path, *,
                 interval: float = WRITE_INTERVAL,
                 on_error: Callable[[OSError | None], None] = lambda err: None) -> None:
        self.registry = registry
        self.path = snapshot_path(folder)
        self.interval = interval
        self.on_error = on_error  # told once when writes start failing, None when they work again
        self._last = b""
        self._failing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-snapshot", daemon=True)

    def write(self) -> None:
        """Write the exposition now if it changed since the last write; OSError."""
        data = generate_latest(self.registry)
        if data == self._last:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)
        self._last = data

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.write()
            except OSError as err:
                if not self._failing:
                    self._failing = True
                    self.on_error(err)
                continue
            if self._failing:
                self._failing = False
                self.on_error(None)


class Sharing:
    """The sender's side of the endpoint: its figures, the snapshot thread, its
    alive lock. `stop()` at the sender's exit (the process's end does it too)."""

    def __init__(self, figures: SenderFigures, writer: SnapshotWriter | None = None,
                 mark: AliveMark | None = None) -> None:
        self.figures = figures
        self._writer = writer
        self._mark = mark

    def stop(self) -> None:
        if self._writer is not None:
            self._writer.stop()
        if self._mark is not None:
            self._mark.release()


def start_sharing(folder: Path, log: EventLog) -> Sharing:
    """Count the sender's figures and share them through `folder` (created if
    needed). In this order: the first snapshot, then the alive lock, then the
    thread - so that the endpoint never takes an older sender's file for this
    one's. A folder that cannot be used is logged in one line, and the sender
    delivers on without figures (the endpoint then reports it as not running)."""
    registry = CollectorRegistry()
    figures = CountingSenderFigures(registry)
    path = snapshot_path(folder)

    def said(err: OSError | None) -> None:
        if err is None:
            log.ok("metrics", file=path, reason="written again")
        else:
            log.error("metrics", file=path, error=err.strerror or str(err))

    writer = SnapshotWriter(registry, folder, on_error=said)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writer.write()
        mark = AliveMark.hold(alive_path(folder))
    except OSError as err:
        log.error("metrics", folder=folder, error=err.strerror or str(err))
        return Sharing(SenderFigures())
    writer.start()
    return Sharing(figures, writer, mark)


def read_snapshot(folder: Path) -> list[Metric]:
    """The sender's metric families as last written; [] when there is no file.
    OSError if it cannot be read, ValueError if it is not the text format."""
    try:
        text = snapshot_path(folder).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return list(text_string_to_metric_families(text))
