"""services/monitoring/look.py: one look at a real queue folder, a real alive lock and a
real snapshot file, with the clock passed in (no HTTP here: see test_metrics_e2e.py)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from services.monitoring.look import Monitor
from shared.config import load_config
from shared.log import EventLog
from shared.metrics.alive import AliveMark
from shared.metrics.counting import CountingSenderFigures
from shared.metrics.share import SnapshotWriter, alive_path, snapshot_path
from shared.queue import DeliveryState, QueueWriter, StateStore, arrival_time
from tests.metrics_support import samples
from tests.support import write_config

HOUR = 3600.0


def monitor_at(tmp_path: Path, now: list[float]) -> Monitor:
    config = load_config(write_config(tmp_path, metrics={"listen": "127.0.0.1:9325"}))
    config.metrics_dir.mkdir(parents=True)
    config.queue.dir.mkdir(parents=True)  # as the receiver makes it at its start
    return Monitor(config, lambda: 7, EventLog("R-SMTP", "-"), clock=lambda: now[0])


def exposition(monitor: Monitor) -> dict:
    registry = CollectorRegistry()
    registry.register(monitor)
    return samples(generate_latest(registry).decode())


def test_without_a_sender_the_queue_is_still_counted(tmp_path: Path) -> None:
    now = [0.0]
    monitor = monitor_at(tmp_path, now)
    writer = QueueWriter(monitor.queue_dir)
    first = writer.store("a@x.org", ["b@y.org"], b"hi\r\n")
    held = writer.store("a@x.org", ["c@y.org"], b"hi\r\n")
    StateStore(monitor.queue_dir).save(held, DeliveryState(held=True))
    now[0] = arrival_time(first, 0.0) + 2 * HOUR
    seen = exposition(monitor)
    assert seen[("mailbag_program_up", (("program", "receiver"),))] == 1
    assert seen[("mailbag_program_up", (("program", "sender"),))] == 0
    assert seen[("mailbag_sessions_active", ())] == 7
    assert seen[("mailbag_queue_messages", (("state", "ready"),))] == 1
    assert seen[("mailbag_queue_messages", (("state", "held"),))] == 1
    assert seen[("mailbag_queue_oldest_seconds", ())] == 2 * HOUR
    assert not any(name.startswith("mailbag_relay") for name, _ in seen)
    assert monitor.health() == ["sender: not running",
                                "queue: the oldest waiting message is 2h00m old "
                                "(max_queue_age 1h00m)"]


def test_a_running_senders_figures_and_its_relay_down_past_the_threshold(
        tmp_path: Path) -> None:
    now = [0.0]
    monitor = monitor_at(tmp_path, now)
    registry = CollectorRegistry()
    figures = CountingSenderFigures(registry)
    queue_id = QueueWriter(monitor.queue_dir).store("a@x.org", ["b@y.org"], b"hi\r\n")
    arrival = arrival_time(queue_id, 0.0)
    figures.delivered("relay", 4)
    figures.relay_session(False, arrival - HOUR)
    SnapshotWriter(registry, monitor.folder).write()
    mark = AliveMark.hold(alive_path(monitor.folder))
    try:
        now[0] = arrival + 300  # relay down for long, but this mail waited 5 minutes
        assert monitor.health() == []
        now[0] = arrival + 700
        (reason,) = monitor.health()
        assert reason.startswith("relay: down for 1h11m") and "1 message waiting" in reason
        seen = exposition(monitor)
        assert seen[("mailbag_delivered_total", (("route", "relay"),))] == 4
        assert seen[("mailbag_relay_up", ())] == 0
        assert seen[("mailbag_program_up", (("program", "sender"),))] == 1
    finally:
        mark.release()
    assert monitor.health()[0] == "sender: not running"  # and its figures are gone:
    assert ("mailbag_delivered_total", (("route", "relay"),)) not in exposition(monitor)


def test_a_snapshot_that_cannot_be_parsed_is_left_out_and_said_once(
        tmp_path: Path, log_lines: list[str]) -> None:
    monitor = monitor_at(tmp_path, [1e9])
    mark = AliveMark.hold(alive_path(monitor.folder))
    try:
        snapshot_path(monitor.folder).write_text("not { the text format\n")
        for _ in range(3):
            assert ("mailbag_queue_oldest_seconds", ()) in exposition(monitor)
        snapshot_path(monitor.folder).write_text("")
        exposition(monitor)
    finally:
        mark.release()
    said = [line for line in log_lines if " metrics " in line]
    assert len(said) == 2
    assert "metrics fail source=snapshot" in said[0]
    assert "metrics ok source=snapshot" in said[1] and "readable again" in said[1]


def test_a_queue_that_cannot_be_read_is_unhealthy_and_has_no_gauges(tmp_path: Path) -> None:
    monitor = monitor_at(tmp_path, [1e9])
    monitor.queue_dir.rmdir()
    monitor.queue_dir.write_text("a file where the folder should be")
    seen = exposition(monitor)
    assert not any(name.startswith("mailbag_queue") for name, _ in seen)
    assert f"queue: cannot be read: cannot read {monitor.queue_dir}: Not a directory" in (
        monitor.health())
