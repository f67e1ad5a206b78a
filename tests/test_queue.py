"""shared/queue.py: the queue file format (SPEC §3), durable stores, the sender lock, recovery."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.queue import (
    FINISH_BACKLOG,
    LOCK_NAME,
    REWRITE_SUFFIX,
    TMP_DIRNAME,
    QueueFile,
    QueueFormatError,
    QueueReader,
    QueueWriteError,
    QueueWriter,
)
from shared.queue.files import IOV_MAX
from shared.queue.writer import LEFTOVER_AGE
from tests.support import PROPERTY_SETTINGS, tiny_tmpfs

# ---------------------------------------------------------------------------- format


def test_format_is_exactly_the_spec() -> None:
    message = QueueFile("alice@example.com", ("bob@example.org", "carol@example.net"),
                        b"Subject: hi\r\n\r\nbody\r\n")
    assert message.to_bytes() == (
        b"From: <alice@example.com>\nTo: <bob@example.org>\nTo: <carol@example.net>\n\n"
        b"Subject: hi\r\n\r\nbody\r\n"
    )
    assert QueueFile.from_bytes(message.to_bytes()) == message


@pytest.mark.parametrize(
    "message",
    [
        QueueFile("", ("bob@example.org",), b"bounce\r\n"),
        QueueFile("a@b.example", ("postmaster",), b""),
        QueueFile("a@b.example", tuple(f"u{n}@example.org" for n in range(100)), b"x\r\n"),
        # Data that looks like an envelope stays data: the first blank line ends it.
        QueueFile("a@b.example", ("c@d.example",), b"\n\nFrom: <evil@x>\nTo: <v@y>\n\n"),
        QueueFile("a@b.example", ("c@d.example",), bytes(range(256)) * 4),
        QueueFile('"john doe"@example.com', ("b\u00fcb@example.org",), b"8bit \xff\r\n"),
    ],
    ids=["null-sender", "postmaster-empty-data", "100-recipients", "envelope-lookalike",
         "binary", "quoted-and-utf8"],
)
def test_round_trip(message: QueueFile) -> None:
    raw = message.to_bytes()
    assert raw.startswith(f"From: <{message.sender}>\n".encode())
    assert QueueFile.from_bytes(raw) == message


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"From: <a@b>\nTo: <c@d>\n",  # no blank line
        b"From: a@b\nTo: <c@d>\n\nx",  # no brackets
        b"From: <a@b>\r\nTo: <c@d>\r\n\r\nx",  # CRLF envelope
        b"To: <c@d>\nFrom: <a@b>\n\nx",  # To before From
        b"From: <a@b>\n\nx",  # no recipient
        b"From: <a@b>\nTo: <>\n\nx",  # empty recipient
        b"From: <a@b>\nFrom: <e@f>\nTo: <c@d>\n\nx",  # two senders
        b"From: <a@b>\nCc: <c@d>\n\nx",  # unknown line
        b"From: <a@b>\nTo: <c@d> \n\nx",  # trailing space
        b"From: <a<b>\nTo: <c@d>\n\nx",  # bracket inside
        b"\nFrom: <a@b>\nTo: <c@d>\n\nx",  # leading blank line
    ],
)
def test_format_errors(raw: bytes) -> None:
    with pytest.raises(QueueFormatError):
        QueueFile.from_bytes(raw)


@pytest.mark.parametrize("address", ["a\n@b", "a>@b", "<a@b", "a\r@b", "a\x00@b",
                                     "bad\x01box@localhost", "a\x7f@b", "\ud800@b"])
def test_unqueueable_address_is_refused_not_written(address: str) -> None:
    with pytest.raises(QueueFormatError):
        QueueFile(address, ("c@d",), b"").to_bytes()
    with pytest.raises(QueueFormatError):
        QueueFile("c@d", (address,), b"").to_bytes()


def test_the_parser_refuses_what_the_writer_refuses() -> None:
    """A control byte in an address used to parse, and then crash the sender when it
    had to write the message again (fail, rewrite)."""
    with pytest.raises(QueueFormatError):
        QueueFile.from_bytes(b"From: <a@b>\nTo: <bad\x01box@localhost>\n\nx")
    with pytest.raises(QueueFormatError):
        QueueFile("a@b", (), b"x").to_bytes()  # no recipient: the parser refuses it too


_ENVELOPE_BYTES = st.binary(max_size=12) | st.sampled_from(
    [b"a@b", b"", b"\x01", b"<", b">", b"\xff\xfe", "j\u00f6s\u00e9@b".encode(), b"\x7f"])


@given(
    lines=st.lists(
        st.tuples(st.sampled_from([b"From", b"To", b"Cc", b"from"]), _ENVELOPE_BYTES),
        min_size=1, max_size=5),
    data=st.binary(max_size=40),
)
@PROPERTY_SETTINGS
def test_every_file_the_parser_accepts_round_trips_through_the_writer(
    lines: list[tuple[bytes, bytes]], data: bytes
) -> None:
    raw = b"".join(kind + b": <" + address + b">\n" for kind, address in lines) + b"\n" + data
    try:
        message = QueueFile.from_bytes(raw)
    except QueueFormatError:
        return
    assert message.to_bytes() == raw


# ---------------------------------------------------------------------------- writer


def ready_files(folder: Path) -> list[str]:
    """What the sender would see: the non-dot files directly in the queue folder."""
    return sorted(e.name for e in os.scandir(folder) if not e.name.startswith(".") and e.is_file())


def test_store_writes_the_spec_format_and_leaves_nothing_in_tmp(tmp_path: Path) -> None:
    writer = QueueWriter(tmp_path / "queue")
    data = b"Subject: x\r\n\r\n.leading dot kept\r\n"
    queue_id = writer.store("alice@example.com", ["bob@example.org", "carol@example.net"], data)
    assert ready_files(writer.dir) == [queue_id]
    assert (writer.dir / queue_id).read_bytes() == (
        b"From: <alice@example.com>\nTo: <bob@example.org>\nTo: <carol@example.net>\n\n" + data
    )
    assert os.listdir(writer.dir / TMP_DIRNAME) == []


def test_store_order_is_write_fsync_rename_then_folder_fsync(tmp_path: Path, monkeypatch) -> None:
    """SPEC §3: written elsewhere, fsynced, renamed into queue.dir, the folder fsynced.

    os.fsync and os.rename are observed (each call goes through to the real one):
    at the file's fsync, nothing is visible in queue.dir yet.
    """
    writer = QueueWriter(tmp_path / "queue")
    steps: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        steps.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        assert ready_files(writer.dir) == [] or steps[-1][1] == str(writer.dir)
        real_fsync(fd)

    def rename(src: object, dst: object) -> None:
        steps.append(("rename", f"{src} -> {dst}"))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    queue_id = writer.store("a@b", ["c@d"], b"x\r\n")
    monkeypatch.undo()
    tmp_file = str(writer.tmp_dir / queue_id)
    assert steps == [
        ("fsync", tmp_file),
        ("rename", f"{tmp_file} -> {writer.dir / queue_id}"),
        ("fsync", str(writer.dir)),
    ]


def test_queue_ids_are_unique_and_sortable_by_arrival(tmp_path: Path) -> None:
    writer = QueueWriter(tmp_path / "queue")
    ids = [writer.store("", ["b@c"], b"%d\r\n" % n) for n in range(20)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 20


def test_concurrent_stores_never_collide(tmp_path: Path) -> None:
    writer = QueueWriter(tmp_path / "queue")
    ids: list[str] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        for k in range(10):
            queue_id = writer.store(f"t{n}@x", [f"r{k}@y"], b"%d %d\r\n" % (n, k))
            with lock:
                ids.append(queue_id)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(set(ids)) == 80
    assert ready_files(writer.dir) == sorted(ids)
    for queue_id in ids:
        message = QueueFile.from_bytes((writer.dir / queue_id).read_bytes())
        n, k = message.data.split()
        assert message.sender == f"t{int(n)}@x" and message.recipients == (f"r{int(k)}@y",)


def test_clean_leftovers_removes_only_temporary_files(tmp_path: Path) -> None:
    writer = QueueWriter(tmp_path / "queue")
    kept = writer.store("a@b", ["c@d"], b"x")
    (writer.tmp_dir / "half-written").write_bytes(b"From: <a@b>\n")
    (writer.tmp_dir / "being-written").write_bytes(b"From: <a@b>\n")
    os.utime(writer.tmp_dir / "half-written", (0, time.time() - LEFTOVER_AGE - 1))
    assert writer.clean_leftovers() == ["half-written"]  # the young one may be in use
    assert os.listdir(writer.tmp_dir) == ["being-written"]
    assert ready_files(writer.dir) == [kept]


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a full disk that even root cannot write past."""
    with tiny_tmpfs(tmp_path / "tiny", "64k") as mount_point:
        yield mount_point


def test_failed_write_leaves_nothing_behind(tiny_fs: Path) -> None:
    writer = QueueWriter(tiny_fs / "queue")
    with pytest.raises(QueueWriteError) as failure:
        writer.store("a@b", ["c@d"], b"x" * 200_000)
    assert failure.value.no_space
    assert ready_files(writer.dir) == []
    assert os.listdir(writer.tmp_dir) == []
    # The queue still works for a message that fits.
    queue_id = writer.store("a@b", ["c@d"], b"small\r\n")
    assert ready_files(writer.dir) == [queue_id]


# ---------------------------------------------------------------------------- reader


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[tuple[QueueWriter, QueueReader]]:
    writer = QueueWriter(tmp_path / "queue")
    reader = QueueReader(writer.dir, tmp_path / "failed", tmp_path / "quarantine")
    yield writer, reader
    reader.close()


def test_scan_is_oldest_first_and_ignores_dot_entries(queue) -> None:
    writer, reader = queue
    names = [writer.store("a@b", ["c@d"], b"%d" % n) for n in range(3)]
    for age, name in zip((100, 300, 200), names, strict=True):
        os.utime(writer.dir / name, ns=(0, 1_700_000_000_000_000_000 - age * 10**9))
    (writer.dir / ".hidden").write_bytes(b"x")
    (writer.tmp_dir / "partial").write_bytes(b"x")
    assert [e.name for e in reader.scan().ready] == [names[1], names[2], names[0]]


def test_the_queue_lock_has_one_holder_and_is_kept_until_close(tmp_path: Path) -> None:
    writer = QueueWriter(tmp_path / "queue")
    first = QueueReader(writer.dir, tmp_path / "failed", tmp_path / "quarantine")
    second = QueueReader(writer.dir, tmp_path / "failed", tmp_path / "quarantine")
    try:
        assert first.try_lock() and first.locked
        # flock is per open file description: a second reader waits, even in-process.
        assert not second.try_lock() and not second.locked
        assert first.try_lock()  # holding it already
        first.close()
        assert (writer.dir / LOCK_NAME).exists()  # never unlinked (see QueueReader)
        assert second.try_lock()
    finally:
        first.close()
        second.close()


def test_a_message_is_read_where_it_lies_and_a_deferral_keeps_its_place(queue) -> None:
    """No claim rename: the sender's hot loop reads queue.dir/<id> as a plain string."""
    writer, reader = queue
    assert reader.try_lock()
    first, second = (writer.store("a@b", ["c@d"], b"%d\r\n" % n) for n in range(2))
    before = [(e.name, e.mtime_ns) for e in reader.scan().ready]
    path = reader.path_of(first)
    assert isinstance(path, str) and path == str(writer.dir / first)
    assert reader.read(path) == QueueFile("a@b", ("c@d",), b"0\r\n")
    assert [(e.name, e.mtime_ns) for e in reader.scan().ready] == before  # untouched
    for name in (first, second):
        reader.finish(reader.path_of(name))
    assert reader.flush() == []
    assert reader.scan().ready == [] and ready_files(writer.dir) == []


def test_rewrite_goes_through_a_dot_name_and_keeps_the_place(queue) -> None:
    writer, reader = queue
    assert reader.try_lock()
    older = writer.store("a@b", ["c@d", "e@f"], b"old\r\n")
    newer = writer.store("a@b", ["c@d"], b"new\r\n")
    os.utime(writer.dir / older, ns=(0, 1_600_000_000_000_000_000))
    mtime = os.stat(writer.dir / older).st_mtime_ns
    reader.rewrite(writer.dir / older, QueueFile("a@b", ("e@f",), b"old\r\n"))
    assert reader.read(writer.dir / older) == QueueFile("a@b", ("e@f",), b"old\r\n")
    assert [(e.name, e.mtime_ns) for e in reader.scan().ready][0] == (older, mtime)
    assert sorted(os.listdir(writer.dir)) == sorted([older, newer, TMP_DIRNAME, LOCK_NAME])


def test_a_rewrite_left_by_a_crash_is_removed_by_the_next_owner(tmp_path: Path) -> None:
    writer = QueueWriter(tmp_path / "queue")
    name = writer.store("a@b", ["c@d", "e@f"], b"x\r\n")
    stale = writer.dir / f".{name}{REWRITE_SUFFIX}"
    stale.write_bytes(b"half")
    reader = QueueReader(writer.dir, tmp_path / "failed", tmp_path / "quarantine")
    try:
        assert [e.name for e in reader.scan().ready] == [name]  # never listed
        assert reader.try_lock()
        assert not stale.exists()
        assert reader.read(writer.dir / name).recipients == ("c@d", "e@f")  # the original
    finally:
        reader.close()


def test_close_leaves_what_was_not_finished_in_place(tmp_path: Path) -> None:
    writer = QueueWriter(tmp_path / "queue")
    reader = QueueReader(writer.dir, tmp_path / "failed", tmp_path / "quarantine")
    assert reader.try_lock()
    name = writer.store("a@b", ["c@d"], b"x")
    reader.read(reader.path_of(name))
    reader.close()
    assert ready_files(writer.dir) == [name]


def test_finished_files_are_gone_after_flush_and_close(tmp_path) -> None:
    writer = QueueWriter(tmp_path / "queue")
    reader = QueueReader(writer.dir, tmp_path / "failed", tmp_path / "quarantine")
    assert reader.try_lock()
    names = [writer.store("a@b", ["c@d"], b"%d\r\n" % n) for n in range(3 * FINISH_BACKLOG)]
    for done, name in enumerate(names, 1):
        reader.finish(reader.path_of(name))
        # Never more than the backlog waits for its unlink (the crash window).
        assert len(ready_files(writer.dir)) <= len(names) - done + FINISH_BACKLOG
    assert reader.flush() == []
    assert ready_files(writer.dir) == []
    kept = writer.store("a@b", ["c@d"], b"kept\r\n")
    for name in [writer.store("a@b", ["c@d"], b"late\r\n") for _ in range(3)]:
        reader.finish(reader.path_of(name))
    # A clean exit right after: the finished ones are gone, the other one stays queued.
    assert reader.close() == []
    assert ready_files(writer.dir) == [kept]


def test_a_finish_that_cannot_unlink_is_reported_and_stays_queued(tmp_path) -> None:
    writer = QueueWriter(tmp_path / "queue")
    reader = QueueReader(writer.dir, tmp_path / "failed", tmp_path / "quarantine")
    assert reader.try_lock()
    stuck = writer.dir / "18ec0000000000000000ab"
    stuck.mkdir()  # unlink(2) of a folder fails, even for root
    (stuck / "inside").write_bytes(b"x")
    reader.finish(reader.path_of(stuck.name))
    ((path, err),) = reader.flush()
    assert path == str(stuck) and isinstance(err, OSError)
    assert reader.flush() == []  # reported once
    reader.close()
    assert (writer.dir / stuck.name).is_dir()  # still there: tried again


def test_more_chunks_than_one_writev_takes_are_all_written(tmp_path: Path) -> None:
    """A big message arrives as many runs of lines: past IOV_MAX they still all land,
    in order (one writev would fail with EINVAL)."""
    chunks = [b"%06d\r\n" % n for n in range(IOV_MAX * 2 + 3)]
    writer = QueueWriter(tmp_path / "queue")
    queue_id = writer.store("a@example.com", ["b@example.org"], chunks)
    stored = QueueFile.from_bytes((tmp_path / "queue" / queue_id).read_bytes())
    assert stored.data == b"".join(chunks)
