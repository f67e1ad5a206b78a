"""shared/queue.py GroupCommit: concurrent sessions' messages made durable together.

The writer thread is real and so are the syscalls; the tests only observe them
(os.fsync, os.rename and the module's syncfs go through to the real ones) and, to
make a batch of a known size, hold the writer inside its first syncfs until the
other sessions are waiting.
"""

from __future__ import annotations

import ctypes
import errno
import os
import smtplib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import shared.queue.writer as queue_module
from shared.queue import GroupCommit, QueueFile, QueueWriteError, QueueWriter
from tests.support import tiny_tmpfs

WAIT = 10.0  # seconds any step of these tests may take


def ready_files(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_file())


class Recorder:
    """Records the durability steps in order; every call goes through to the real one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, writer: QueueWriter) -> None:
        self.writer = writer
        self.steps: list[tuple[str, str]] = []
        self.seen_at_syncfs: list[tuple[list[str], list[str]]] = []  # (.tmp, queue.dir)
        self.before_syncfs: Callable[[], None] = lambda: None
        real_fsync, real_rename, real_syncfs = os.fsync, os.rename, queue_module._syncfs

        def fsync(fd: int) -> None:
            self.steps.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def rename(src: object, dst: object) -> None:
            self.steps.append(("rename", f"{src} -> {dst}"))
            real_rename(src, dst)

        def syncfs(fd: int) -> int:
            self.before_syncfs()
            self.steps.append(("syncfs", os.readlink(f"/proc/self/fd/{fd}")))
            self.seen_at_syncfs.append((ready_files(writer.tmp_dir), ready_files(writer.dir)))
            return real_syncfs(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(queue_module, "_syncfs", syncfs)

    def count(self, kind: str) -> int:
        return sum(1 for step, _ in self.steps if step == kind)


@pytest.fixture
def writer(tmp_path: Path) -> QueueWriter:
    return QueueWriter(tmp_path / "queue")


@pytest.fixture
def group(writer: QueueWriter) -> Iterator[GroupCommit]:
    committer = GroupCommit(writer)
    yield committer
    committer.close()


class HeldWriter:
    """Holds the writer inside its first syncfs, so that a known batch forms meanwhile.

    `first()` stores one message from a thread and returns once the writer is inside
    that message's syncfs; `rest()` stores the others from threads, waits until all of
    them are queued, lets the writer go, and returns every result.
    """

    def __init__(self, recorder: Recorder, group: GroupCommit) -> None:
        self.group = group
        self.entered, self.release = threading.Event(), threading.Event()
        self.results: dict[int, object] = {}
        self.threads: list[threading.Thread] = []
        recorder.before_syncfs = self._before

    def _before(self) -> None:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(WAIT), "the test never let the writer go"

    def _store(self, index: int, sender: str, data: bytes) -> None:
        try:
            self.results[index] = self.group.store(sender, ["rcpt@example.org"], data)
        except QueueWriteError as err:
            self.results[index] = err

    def _start(self, index: int, sender: str, data: bytes) -> None:
        thread = threading.Thread(target=self._store, args=(index, sender, data))
        self.threads.append(thread)
        thread.start()

    def first(self, sender: str, data: bytes) -> None:
        self._start(0, sender, data)
        assert self.entered.wait(WAIT), "the writer never reached its syncfs"

    def rest(self, messages: list[tuple[str, bytes]]) -> dict[int, object]:
        for index, (sender, data) in enumerate(messages, 1):
            self._start(index, sender, data)
        deadline = time.monotonic() + WAIT
        while self.group._waiting.qsize() < len(messages) and time.monotonic() < deadline:
            time.sleep(0.005)
        self.release.set()
        for thread in self.threads:
            thread.join(WAIT)
        assert len(self.results) == len(messages) + 1, "a session was never released"
        return self.results


def test_one_message_is_written_synced_renamed_then_the_folder_synced(
    writer: QueueWriter, group: GroupCommit, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder(monkeypatch, writer)
    queue_id = group.store("a@b", ["c@d"], b"x\r\n")
    monkeypatch.undo()
    tmp_file, final = writer.tmp_dir / queue_id, writer.dir / queue_id
    assert recorder.steps == [
        ("syncfs", str(writer.dir)),
        ("rename", f"{tmp_file} -> {final}"),
        ("fsync", str(writer.dir)),
    ]
    # At the syncfs the whole file was written in .tmp and nothing was in queue.dir.
    assert recorder.seen_at_syncfs == [([queue_id], [])]
    assert final.read_bytes() == b"From: <a@b>\nTo: <c@d>\n\nx\r\n"


def test_waiting_sessions_share_one_syncfs_and_one_folder_fsync(
    writer: QueueWriter, group: GroupCommit, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder(monkeypatch, writer)
    held = HeldWriter(recorder, group)
    held.first("s0@x", b"0\r\n")
    results = held.rest([(f"s{n}@x", b"%d\r\n" % n) for n in range(1, 5)])
    monkeypatch.undo()

    ids = [results[n] for n in range(5)]
    assert all(isinstance(queue_id, str) for queue_id in ids)
    assert ready_files(writer.dir) == sorted(ids)  # type: ignore[type-var]
    for n, queue_id in enumerate(ids):
        message = QueueFile.from_bytes((writer.dir / str(queue_id)).read_bytes())
        assert (message.sender, message.data) == (f"s{n}@x", b"%d\r\n" % n)
    # The first message went alone (it held the writer); the other four together.
    assert recorder.count("syncfs") == 2
    assert [step for step, _ in recorder.steps] == (
        ["syncfs", "rename", "fsync"] + ["syncfs"] + ["rename"] * 4 + ["fsync"]
    )
    assert len(recorder.seen_at_syncfs[1][0]) == 4  # all four written before their sync


def test_a_full_disk_fails_only_the_message_that_does_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tiny_tmpfs(tmp_path / "tiny", "64k") as mount_point:
        writer = QueueWriter(mount_point / "queue")
        group = GroupCommit(writer)
        try:
            recorder = Recorder(monkeypatch, writer)
            held = HeldWriter(recorder, group)
            held.first("first@x", b"a\r\n")
            results = held.rest([("big@x", b"x" * 200_000), ("small@x", b"b\r\n"),
                                 ("other@x", b"c\r\n")])
            monkeypatch.undo()
        finally:
            group.close()
        failed = [r for r in results.values() if isinstance(r, QueueWriteError)]
        stored = sorted(str(r) for r in results.values() if isinstance(r, str))
        assert len(failed) == 1 and failed[0].no_space
        assert len(stored) == 3
        assert ready_files(writer.dir) == stored
        assert os.listdir(writer.tmp_dir) == []  # nothing half-written left behind


def test_a_failed_folder_fsync_fails_the_batch_and_takes_its_files_back(
    writer: QueueWriter, group: GroupCommit, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == str(writer.dir):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(QueueWriteError, match="cannot sync queue folder"):
        group.store("a@b", ["c@d"], b"x\r\n")
    monkeypatch.undo()
    assert ready_files(writer.dir) == []  # never acknowledged, so never delivered
    assert os.listdir(writer.tmp_dir) == []
    queue_id = group.store("a@b", ["c@d"], b"again\r\n")  # and the queue still works
    assert ready_files(writer.dir) == [queue_id]


def test_a_failed_syncfs_fails_the_batch_and_leaves_nothing(
    writer: QueueWriter, group: GroupCommit, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_syncfs(fd: int) -> int:
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(queue_module, "_syncfs", failing_syncfs)
    with pytest.raises(QueueWriteError, match="cannot sync queue filesystem") as failure:
        group.store("a@b", ["c@d"], b"x\r\n")
    assert failure.value.errno == errno.EIO
    monkeypatch.undo()
    assert ready_files(writer.dir) == []
    assert os.listdir(writer.tmp_dir) == []


def test_without_syncfs_each_file_is_fsynced_before_its_rename(
    writer: QueueWriter, group: GroupCommit, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder(monkeypatch, writer)
    monkeypatch.setattr(queue_module, "_syncfs", None)  # a libc without syncfs
    queue_id = group.store("a@b", ["c@d"], b"x\r\n")
    monkeypatch.undo()
    tmp_file = writer.tmp_dir / queue_id
    assert recorder.steps == [
        ("fsync", str(tmp_file)),
        ("rename", f"{tmp_file} -> {writer.dir / queue_id}"),
        ("fsync", str(writer.dir)),
    ]


def test_the_receiver_stores_per_session_when_group_commit_is_off(receiver_factory) -> None:
    config, _ = receiver_factory(queue={"group_commit": False})
    listen = config.receiver.listen
    with smtplib.SMTP(listen.host, listen.port, timeout=WAIT) as smtp:
        refused = smtp.sendmail("a@example.com", ["b@example.org"], b"Subject: x\r\n\r\nhi\r\n")
    assert refused == {}
    files = ready_files(config.queue.dir)
    assert len(files) == 1
    assert (config.queue.dir / files[0]).read_bytes().endswith(b"\r\n\r\nhi\r\n")


def test_an_unexpected_error_fails_the_batch_and_takes_its_files_back(
    writer: QueueWriter, group: GroupCommit, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(published: object) -> None:  # after the renames: files are in queue.dir
        raise ValueError("a bug")

    monkeypatch.setattr(writer, "sync_folder", broken)
    with pytest.raises(QueueWriteError, match="internal"):
        group.store("a@b", ["c@d"], b"x\r\n")
    monkeypatch.undo()
    assert ready_files(writer.dir) == []  # the client got 451: nothing may be delivered
    assert os.listdir(writer.tmp_dir) == []


def test_the_config_chooses_group_commit_or_per_session_stores(tmp_path: Path) -> None:
    from services.receiver.app import message_store
    from shared.config import load_config
    from tests.support import write_config

    for enabled, kind in ((True, GroupCommit), (False, QueueWriter)):
        (tmp_path / str(enabled)).mkdir()
        config = load_config(write_config(tmp_path / str(enabled),
                                          queue={"group_commit": enabled}))
        writer = QueueWriter(config.queue.dir)
        store = message_store(config, writer)
        assert type(store) is kind
        if isinstance(store, GroupCommit):
            store.close()
