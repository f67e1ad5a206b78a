"""shared/metrics/: what is counted, the alive lock, and the sender's shared snapshot."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from shared.log import EventLog
from shared.metrics.alive import AliveMark, is_alive
from shared.metrics.counting import CountingReceiverFigures, CountingSenderFigures, RelayStatus
from shared.metrics.figures import DELIVERY_SECONDS, RELAY_DOWN_SINCE, RELAY_UP
from shared.metrics.share import (
    SnapshotWriter,
    alive_path,
    read_snapshot,
    sender_is_alive,
    snapshot_path,
    start_sharing,
)
from tests.appliance_support import wait_until


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


# ---------------------------------------------------------------------------- figures

def test_the_receiver_counts_messages_and_refusals_by_code() -> None:
    registry = CollectorRegistry()
    figures = CountingReceiverFigures(registry)
    for _ in range(3):
        figures.received()
    figures.rejected(550)
    figures.rejected(550)
    figures.rejected(421)
    assert sample(registry, "mailbag_received_total") == 3
    assert sample(registry, "mailbag_rejected_total", code="550") == 2
    assert sample(registry, "mailbag_rejected_total", code="421") == 1
    assert b"_created" not in generate_latest(registry)  # no series nobody reads


def test_the_sender_counts_per_route_and_exports_both_routes_from_the_start() -> None:
    registry = CollectorRegistry()
    figures = CountingSenderFigures(registry)
    assert sample(registry, "mailbag_delivered_total", route="local") == 0
    figures.delivered("relay", 3)
    figures.delivered("local", 1)
    figures.failed(2)
    figures.deferred()
    figures.bounced()
    figures.delivery_time(0.004)
    figures.delivery_time(7200.0)
    assert sample(registry, "mailbag_delivered_total", route="relay") == 3
    assert sample(registry, "mailbag_delivered_total", route="local") == 1
    assert sample(registry, "mailbag_failed_total") == 2
    assert sample(registry, "mailbag_deferred_total") == 1
    assert sample(registry, "mailbag_bounces_total") == 1
    assert sample(registry, f"{DELIVERY_SECONDS}_count") == 2
    assert sample(registry, f"{DELIVERY_SECONDS}_bucket", le="0.005") == 1
    assert sample(registry, f"{DELIVERY_SECONDS}_bucket", le="3600.0") == 1
    assert sample(registry, f"{DELIVERY_SECONDS}_bucket", le="14400.0") == 2


def test_relay_up_is_absent_before_the_first_session_and_remembers_when_it_went_down() -> None:
    registry = CollectorRegistry()
    status = RelayStatus()
    registry.register(status)
    assert sample(registry, RELAY_UP) is None
    status.session(True, 100.0)
    assert (sample(registry, RELAY_UP), sample(registry, RELAY_DOWN_SINCE)) == (1, None)
    status.session(False, 200.0)
    status.session(False, 260.0)  # still down: since the first failure
    assert (sample(registry, RELAY_UP), sample(registry, RELAY_DOWN_SINCE)) == (0, 200.0)
    status.session(True, 300.0)
    assert (sample(registry, RELAY_UP), sample(registry, RELAY_DOWN_SINCE)) == (1, None)


# ---------------------------------------------------------------------------- alive

HOLDER = """
import sys, time
from pathlib import Path
from shared.metrics.alive import AliveMark
AliveMark.hold(Path(sys.argv[1]))
print("holding", flush=True)
time.sleep(30)
"""


def test_alive_while_a_process_holds_the_file_and_not_after_it_is_killed(
        tmp_path: Path) -> None:
    path = tmp_path / "sender.alive"
    assert not is_alive(path)  # never created
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE,
                              cwd=Path(__file__).resolve().parent.parent)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
        assert is_alive(path)
        assert is_alive(path)  # a probe leaves nothing behind
        os.kill(holder.pid, signal.SIGKILL)  # no clean-up: the kernel drops the lock
        holder.wait(10)
        assert not is_alive(path)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdout.close()


def test_a_program_starting_during_a_probe_waits_for_it_and_two_holders_coexist(
        tmp_path: Path) -> None:
    path = tmp_path / "x.alive"
    first = AliveMark.hold(path)
    second = AliveMark.hold(path)  # shared: a second copy started by hand is not refused
    assert is_alive(path)
    first.release()
    assert is_alive(path)
    second.release()
    assert not is_alive(path)


# ---------------------------------------------------------------------------- snapshot

def test_the_snapshot_round_trips_through_the_text_format(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    figures = CountingSenderFigures(registry)
    figures.delivered("relay", 5)
    figures.delivery_time(0.02)
    figures.relay_session(False, 1234.5)
    SnapshotWriter(registry, tmp_path).write()
    again = CollectorRegistry()

    class Replay:
        def collect(self):  # noqa: ANN202
            return read_snapshot(tmp_path)

    again.register(Replay())
    assert generate_latest(again) == generate_latest(registry)


def test_the_snapshot_is_rewritten_only_when_a_figure_changed(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    figures = CountingSenderFigures(registry)
    writer = SnapshotWriter(registry, tmp_path)
    writer.write()
    inode = snapshot_path(tmp_path).stat().st_ino
    writer.write()
    assert snapshot_path(tmp_path).stat().st_ino == inode  # nothing new: not written
    figures.bounced()
    writer.write()
    assert snapshot_path(tmp_path).stat().st_ino != inode  # a new file renamed over it
    assert [p.name for p in tmp_path.iterdir()] == ["sender.prom"]  # no temporary left


def test_no_snapshot_file_is_no_figures_and_garbage_is_an_error(tmp_path: Path) -> None:
    assert read_snapshot(tmp_path) == []
    snapshot_path(tmp_path).write_text("this is { not the text format\n")
    with pytest.raises(ValueError):
        read_snapshot(tmp_path)


def test_sharing_writes_first_then_holds_the_lock_then_follows_changes(
        tmp_path: Path) -> None:
    folder = tmp_path / "metrics"
    sharing = start_sharing(folder, EventLog("S-SMTP", "-"))
    try:
        assert sender_is_alive(folder)
        assert snapshot_path(folder).exists()
        sharing.figures.delivered("local", 2)
        wait_until(lambda: any(
            m.name == "mailbag_delivered" and
            any(s.labels == {"route": "local"} and s.value == 2 for s in m.samples)
            for m in read_snapshot(folder)), 5.0, "the snapshot to follow the counter")
    finally:
        sharing.stop()
    assert not sender_is_alive(folder)


def test_a_metrics_folder_that_cannot_be_made_costs_only_the_figures(
        tmp_path: Path, log_lines: list[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    sharing = start_sharing(blocker / "metrics", EventLog("S-SMTP", "-"))
    sharing.figures.delivered("relay", 1)  # counts nothing, raises nothing
    sharing.stop()
    assert any("metrics fail" in line and "Not a directory" in line for line in log_lines)
    assert not alive_path(blocker / "metrics").exists()


def test_a_sender_figure_is_at_most_one_interval_old(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    figures = CountingSenderFigures(registry)
    writer = SnapshotWriter(registry, tmp_path, interval=0.05)
    writer.start()
    try:
        figures.failed(1)
        started = time.monotonic()
        wait_until(lambda: b"mailbag_failed_total 1.0" in snapshot_path(tmp_path).read_bytes()
                   if snapshot_path(tmp_path).exists() else False, 5.0, "the snapshot")
        assert time.monotonic() - started < 2.0
    finally:
        writer.stop()
