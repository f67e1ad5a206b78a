"""services/admin/listing.py: the queue listing (mailbag queue, -bp, mailq)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from services.admin.listing import (
    Census,
    ListingError,
    QueueRow,
    duration,
    failed_rows,
    format_json,
    format_text,
    list_queue,
    queue_rows,
    read_envelope,
    state_of,
)
from shared.config import load_config
from shared.queue import (
    STATE_DIRNAME,
    DeliveryState,
    FolderStamp,
    QueueWriter,
    StateCache,
    StateStore,
    new_queue_id,
)
from tests.support import write_config

NOW = 1_764_600_000.0  # 2025-12-01T14:40:00Z

READY = QueueRow(id="18ec54825f00078d31547c", state="ready", arrival=NOW - 45, size=248,
                 sender="me@example.com", recipients=("you@localhost",))
DEFERRED = QueueRow(id="18ec548260000000000001", state="deferred", arrival=NOW - 7380,
                    size=10240, sender="root@localhost",
                    recipients=("a@example.com", "b@example.com", "c@example.com",
                                "d@example.com", "e@example.com"),
                    attempts=3, next_attempt=NOW + 840, last_reply="451 4.3.0 try\nlater")
HELD = QueueRow(id="18ec548270000000000002", state="held", arrival=NOW - 3 * 86400 - 4 * 3600,
                size=7, sender="", recipients=("x@example.org",), attempts=1,
                last_reply="421 4.4.2 timeout")
FAILED = QueueRow(id="18ec548280000000000003.1", state="failed", arrival=NOW - 600, size=99,
                  sender="a@b.example", recipients=("gone@example.net",),
                  last_reply="550 5.1.1 no such user")


@pytest.mark.parametrize(("rows", "failed", "lines"), [
    ([], False, ["Mail queue is empty"]),
    ([], True, ["No failed messages"]),
    ([READY], False, [
        "ID                      STATE  AGE  SIZE  TRIES  NEXT  SENDER            "
        "RECIPIENTS (LAST REPLY)",
        "18ec54825f00078d31547c  ready  45s   248      0  now   <me@example.com>  "
        "<you@localhost>",
        "-- 1 message, 248 bytes (1 ready)",
    ]),
    ([READY, DEFERRED, HELD], False, [
        "ID                      STATE     AGE     SIZE  TRIES  NEXT    SENDER            "
        "RECIPIENTS (LAST REPLY)",
        "18ec54825f00078d31547c  ready     45s      248      0  now     <me@example.com>  "
        "<you@localhost>",
        "18ec548260000000000001  deferred  2h03m  10240      3  in 14m  <root@localhost>  "
        "<a@example.com>, <b@example.com>, <c@example.com> +2 more (451 4.3.0 try / later)",
        "18ec548270000000000002  held      3d04h      7      1  -       <>                "
        "<x@example.org> (421 4.4.2 timeout)",
        "-- 3 messages, 10495 bytes (1 ready, 1 deferred, 1 held)",
    ]),
    ([FAILED], True, [
        "ID                        STATE   AGE  SIZE  TRIES  NEXT  SENDER         "
        "RECIPIENTS (LAST REPLY)",
        "18ec548280000000000003.1  failed  10m    99      0  -     <a@b.example>  "
        "<gone@example.net> (550 5.1.1 no such user)",
        "-- 1 failed message, 99 bytes",
    ]),
], ids=["empty", "empty-failed", "one", "states", "failed"])
def test_format_text(rows: list[QueueRow], failed: bool, lines: list[str]) -> None:
    assert list(format_text(rows, NOW, failed=failed)) == lines


def test_format_json_has_the_same_fields_one_object_per_line() -> None:
    lines = list(format_json([READY, DEFERRED, FAILED], NOW))
    assert len(lines) == 3
    assert json.loads(lines[1]) == {
        "id": "18ec548260000000000001", "state": "deferred", "arrival_time": NOW - 7380,
        "age": 7380, "size": 10240, "sender": "root@localhost",
        "recipients": ["a@example.com", "b@example.com", "c@example.com", "d@example.com",
                       "e@example.com"],
        "attempts": 3, "next_attempt": NOW + 840, "last_reply": "451 4.3.0 try\nlater"}
    assert json.loads(lines[0])["next_attempt"] is None
    assert json.loads(lines[2])["state"] == "failed"


def test_text_lines_hold_no_control_characters() -> None:
    hostile = QueueRow(id="1", state="ready", arrival=NOW, size=1, sender="a@b",
                       recipients=("c@d",), last_reply="550 x\x1b[2J\r\nforged line")
    for line in format_text([hostile], NOW):
        assert line.isprintable(), line


@pytest.mark.parametrize(("seconds", "text"), [
    (-5, "0s"), (0, "0s"), (59.9, "59s"), (60, "1m"), (3599, "59m"), (3600, "1h00m"),
    (7380, "2h03m"), (86399, "23h59m"), (86400, "1d00h"), (10 * 86400 + 3600, "10d01h"),
])
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


@pytest.mark.parametrize(("state", "listed"), [
    (DeliveryState(), ("ready", None)),
    (DeliveryState(attempts=2, next_attempt=NOW - 1), ("ready", None)),
    (DeliveryState(attempts=2, next_attempt=NOW + 60), ("deferred", NOW + 60)),
    (DeliveryState(held=True, next_attempt=NOW + 60), ("held", None)),
    (DeliveryState(held=True), ("held", None)),
])
def test_state_of(state: DeliveryState, listed: tuple[str, float | None]) -> None:
    assert state_of(state, NOW) == listed


# ---------------------------------------------------------------------------- on disk

def _queue(tmp_path: Path):
    config = load_config(write_config(tmp_path))
    return config, QueueWriter(config.queue.dir)


def test_queue_rows_read_the_envelope_and_the_state(tmp_path: Path) -> None:
    config, writer = _queue(tmp_path)
    now = 1_900_000_000.0
    first = writer.store("a@x.org", ["b@y.org", "c@z.org"], b"Subject: 1\r\n\r\nhi\r\n",
                         queue_id=new_queue_id(int((now - 100) * 1e9)))
    second = writer.store("", ["d@y.org"], b"x" * 1000, queue_id=new_queue_id(int(now * 1e9)))
    held = writer.store("e@x.org", ["f@y.org"], b"held\r\n",
                        queue_id=new_queue_id(int((now - 50) * 1e9)))
    StateStore(config.queue.dir).save(first, DeliveryState(attempts=2, next_attempt=now + 90,
                                                           last_reply="451 busy"))
    StateStore(config.queue.dir).save(held, DeliveryState(held=True))
    (config.queue.dir / ".hidden").write_text("not a message")
    (config.queue.dir / "a-link").symlink_to(config.queue.dir / first)
    rows = queue_rows(config.queue.dir, now)
    assert [(r.id, r.state, r.sender, r.recipients, r.size, r.attempts, r.next_attempt,
             r.last_reply) for r in rows] == [
        (first, "deferred", "a@x.org", ("b@y.org", "c@z.org"), 18, 2, now + 90, "451 busy"),
        (held, "held", "e@x.org", ("f@y.org",), 6, 0, None, ""),
        (second, "ready", "", ("d@y.org",), 1000, 0, None, ""),
    ]
    assert rows[0].arrival == pytest.approx(now - 100)


def test_an_unreadable_queue_file_is_listed_with_why(tmp_path: Path) -> None:
    config, _ = _queue(tmp_path)
    (config.queue.dir / "by-hand").write_bytes(b"not an envelope\n\nbody\n")
    (row,) = queue_rows(config.queue.dir, NOW)
    assert (row.id, row.state, row.sender, row.recipients) == ("by-hand", "ready", "", ())
    assert row.last_reply.startswith("unreadable queue file: envelope line 1 is malformed")


def test_only_the_envelope_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, writer = _queue(tmp_path)
    queue_id = writer.store("a@x.org", ["b@y.org"], b"x" * 5_000_000)
    read_sizes: list[int] = []
    real_read = os.read

    def counting_read(fd: int, size: int) -> bytes:
        data = real_read(fd, size)
        read_sizes.append(len(data))
        return data

    monkeypatch.setattr(os, "read", counting_read)
    envelope, size = read_envelope(str(config.queue.dir / queue_id))
    assert (envelope.sender, envelope.recipients, size) == ("a@x.org", ("b@y.org",), 5_000_000)
    assert sum(read_sizes) <= 4096


def test_the_listing_creates_nothing(tmp_path: Path) -> None:
    config, writer = _queue(tmp_path)
    writer.store("a@x.org", ["b@y.org"], b"hi\r\n")
    before = sorted(p.name for p in config.queue.dir.iterdir())
    assert len(list(list_queue(config, failed=False, as_json=False, now=NOW))) == 3
    assert sorted(p.name for p in config.queue.dir.iterdir()) == before
    assert not (config.queue.dir / STATE_DIRNAME).exists()
    assert list(list_queue(config, failed=True, as_json=False, now=NOW)) == [
        "No failed messages"]
    assert not config.queue.failed.exists()


def test_failed_rows_carry_the_reason(tmp_path: Path) -> None:
    config, _ = _queue(tmp_path)
    failed = config.queue.failed
    failed.mkdir(parents=True)
    queue_id = new_queue_id(int(NOW * 1e9))
    (failed / queue_id).write_bytes(b"From: <a@x.org>\nTo: <b@y.org>\n\nbody\n")
    (failed / f"{queue_id}.reason").write_text("b@y.org: 550 5.1.1 unknown\n")
    (failed / f"{queue_id}.1").write_bytes(b"From: <a@x.org>\nTo: <c@y.org>\n\nbody\n")
    lines = [json.loads(line) for line in
             list_queue(config, failed=True, as_json=True, now=NOW + 60)]
    assert [(x["id"], x["state"], x["recipients"], x["last_reply"], x["age"]) for x in lines] == [
        (queue_id, "failed", ["b@y.org"], "b@y.org: 550 5.1.1 unknown", 60),
        (f"{queue_id}.1", "failed", ["c@y.org"], "(no reason recorded)", 60),
    ]
    assert failed_rows(failed)[0].size == 5


def test_an_unreadable_queue_folder_is_one_error(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    config.queue.dir.parent.mkdir(parents=True)
    config.queue.dir.write_text("a file where the folder should be")
    with pytest.raises(ListingError) as caught:
        list_queue(config, failed=False, as_json=False, now=NOW)
    assert caught.value.exit_code == os.EX_IOERR
    assert str(caught.value) == f"cannot read {config.queue.dir}: Not a directory"


# ---------------------------------------------------------------------------- census

def test_census_counts_the_states_of_the_listing_and_the_oldest_waiting(tmp_path: Path) -> None:
    config, writer = _queue(tmp_path)
    now = 1_900_000_000.0

    def store(age: float) -> str:
        return writer.store("a@x.org", ["b@y.org"], b"hi\r\n",
                            queue_id=new_queue_id(int((now - age) * 1e9)))

    held, deferred, ready, fresh = store(9000), store(500), store(300), store(1)
    states = StateStore(config.queue.dir)
    states.save(held, DeliveryState(held=True))
    states.save(deferred, DeliveryState(attempts=1, next_attempt=now + 60))
    states.save(ready, DeliveryState(attempts=1, next_attempt=now - 1))  # due again
    by_hand = config.queue.dir / "by-hand"
    by_hand.write_bytes(b"From: <a@x.org>\nTo: <b@y.org>\n\nhi\n")
    os.utime(by_hand, (now - 700, now - 700))  # no id: its mtime is its arrival
    (config.queue.dir / "a-link").symlink_to(by_hand)  # no message
    failed = config.queue.failed
    failed.mkdir(parents=True)
    for name in ("f1", "f1.reason", "f2.1", "f2.1.reason", ".tmp-thing"):
        (failed / name).write_text("x")
    found = Census(config.queue.dir, failed).count(now)
    assert dict(found.counts) == {"ready": 3, "deferred": 1, "held": 1, "failed": 2}
    assert found.oldest_waiting == pytest.approx(now - 700)  # the held one waits for nobody
    # The listing says the same, message by message.
    rows = queue_rows(config.queue.dir, now)
    assert {state: sum(r.state == state for r in rows) for state in ("ready", "deferred", "held")
            } == {"ready": 3, "deferred": 1, "held": 1}
    assert fresh in {r.id for r in rows}


def test_census_of_an_empty_queue_and_of_one_that_cannot_be_read(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    empty = Census(config.queue.dir, config.queue.failed).count(NOW)
    assert (dict(empty.counts), empty.oldest_waiting) == (
        {"ready": 0, "deferred": 0, "held": 0, "failed": 0}, None)
    config.queue.dir.parent.mkdir(parents=True)
    config.queue.dir.write_text("a file where the folder should be")
    with pytest.raises(ListingError):
        Census(config.queue.dir, config.queue.failed).count(NOW)


def test_the_state_cache_reads_a_state_again_only_when_it_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(tmp_path)
    cache = StateCache(tmp_path)
    store.save("a", DeliveryState(attempts=1, next_attempt=10.0))
    store.save("b", DeliveryState(held=True))
    assert cache.load() == {"a": DeliveryState(attempts=1, next_attempt=10.0),
                            "b": DeliveryState(held=True)}
    opened: list[str] = []
    real_open = os.open

    def counting_open(path, *args, **kwargs):  # noqa: ANN001, ANN202
        opened.append(os.path.basename(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    assert cache.load()["b"] == DeliveryState(held=True)
    assert opened == []  # nothing changed: nothing read
    # Three writes of "a": a rename each, and ext4 hands the first inode back to the
    # third, so the inode alone would hide the change (the stat does not).
    for attempts in (2, 3):
        store.save("a", DeliveryState(attempts=attempts, next_attempt=100.0 * attempts))
    store.remove("b")
    assert cache.load() == {"a": DeliveryState(attempts=3, next_attempt=300.0)}
    assert [name for name in opened if not name.startswith(".")] == ["a"]


def test_the_state_cache_creates_nothing_and_skips_what_it_cannot_read(tmp_path: Path) -> None:
    cache = StateCache(tmp_path)
    assert cache.load() == {}
    assert not (tmp_path / STATE_DIRNAME).exists()
    StateStore(tmp_path).save("ok", DeliveryState(held=True))
    (tmp_path / STATE_DIRNAME / "bad").write_bytes(b"{not json")
    assert cache.load() == {"ok": DeliveryState(held=True)}


def test_a_census_follows_the_queue_and_lists_a_settled_folder_only_when_it_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, writer = _queue(tmp_path)
    now = 1_900_000_000.0
    first = writer.store("a@x.org", ["b@y.org"], b"hi\r\n",
                         queue_id=new_queue_id(int((now - 60) * 1e9)))
    counter = Census(config.queue.dir, config.queue.failed)
    assert counter.count(now).counts["ready"] == 1
    StateStore(config.queue.dir).save(first, DeliveryState(attempts=1, next_attempt=now + 9))
    assert counter.count(now).counts["deferred"] == 1  # its state changed: seen at once
    assert counter.count(now + 10).counts["ready"] == 1  # and its next attempt came
    time.sleep(FolderStamp.SETTLE_NS / 1e9 + 0.02)  # the last changes are a tick old now
    assert counter.count(now).counts == {"ready": 0, "deferred": 1, "held": 0, "failed": 0}
    listed: list[str] = []
    real_scandir = os.scandir

    def counting_scandir(path):  # noqa: ANN001, ANN202
        listed.append(str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    assert counter.count(now).counts["deferred"] == 1
    assert listed == []  # nothing changed: no folder listed, no state read
    second = writer.store("a@x.org", ["c@y.org"], b"hi\r\n",
                          queue_id=new_queue_id(int((now - 90) * 1e9)))
    found = counter.count(now)
    assert (found.counts["ready"], found.oldest_waiting) == (1, pytest.approx(now - 90))
    assert listed == [str(config.queue.dir)]  # only the folder that changed
    (config.queue.dir / second).unlink()
    assert counter.count(now).counts["ready"] == 0


def test_a_folder_stamp_is_trusted_only_once_its_last_change_is_a_tick_old(
        tmp_path: Path) -> None:
    stamp = FolderStamp(tmp_path / "f")
    assert stamp.changed()  # the first look
    assert not stamp.changed()  # still no folder
    (tmp_path / "f").mkdir()
    assert stamp.changed() and stamp.changed()  # just changed: not trusted yet
    time.sleep(FolderStamp.SETTLE_NS / 1e9 + 0.02)
    assert stamp.changed()  # the first settled look
    assert not stamp.changed()
    (tmp_path / "f" / "x").write_text("")
    assert stamp.changed()
    time.sleep(FolderStamp.SETTLE_NS / 1e9 + 0.02)
    assert stamp.changed() and not stamp.changed()
    os.rename(tmp_path / "f" / "x", tmp_path / "f" / "y")
    assert stamp.changed()
