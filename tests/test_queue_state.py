"""shared/queue/state.py: each message's delivery state next to it (SPEC §7)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.queue import BLANK, STATE_DIRNAME, DeliveryState, QueueWriter, StateStore, operations


def test_a_state_round_trips_and_a_blank_one_leaves_no_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    state = DeliveryState(attempts=2, next_attempt=1_800_000_000.5,
                          last_reply="451 4.3.0 try later", held=True, warned=True)
    store.save("q1", state, durable=True)
    assert store.load("q1") == state
    assert os.listdir(tmp_path / STATE_DIRNAME) == ["q1"]  # no temporary file left
    store.save("q1", BLANK)
    assert store.load("q1") == BLANK
    assert os.listdir(tmp_path / STATE_DIRNAME) == []


def test_load_all_reports_bad_files_and_prune_removes_orphans(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save("keep", DeliveryState(attempts=1, next_attempt=5.0))
    store.save("gone", DeliveryState(held=True))
    (tmp_path / STATE_DIRNAME / "bad").write_bytes(b"{not json")
    (tmp_path / STATE_DIRNAME / ".half.1234").write_bytes(b"{")  # a crashed write
    states, problems = store.load_all()
    assert states == {"keep": DeliveryState(attempts=1, next_attempt=5.0),
                      "gone": DeliveryState(held=True)}
    assert [name for name, _ in problems] == ["bad"]
    assert sorted(store.prune({"keep"})) == ["bad", "gone"]
    assert os.listdir(tmp_path / STATE_DIRNAME) == ["keep"]


@pytest.mark.parametrize("raw", [
    b"[]", b'{"attempts": "2"}', b'{"held": 1}', b'{"attempts": -1}',
    b'{"next_attempt": Infinity}', b'{"attempts": true}',
])
def test_a_malformed_state_is_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        DeliveryState.from_json(raw)


def test_unknown_keys_of_a_newer_version_are_ignored() -> None:
    assert DeliveryState.from_json(b'{"attempts": 3, "colour": "blue"}') == DeliveryState(
        attempts=3)


# -------------------------------------------------------------- operators' changes

def _one_queued(tmp_path: Path) -> tuple[Path, StateStore, str]:
    queue_dir = tmp_path / "queue"
    queue_id = QueueWriter(queue_dir).store("a@example.com", ["b@example.org"], b"x\r\n")
    return queue_dir, StateStore(queue_dir), queue_id


def test_an_unknown_change_is_a_programming_error_never_a_delete(tmp_path: Path) -> None:
    queue_dir, store, queue_id = _one_queued(tmp_path)
    with pytest.raises(ValueError):
        operations.apply("purge", queue_dir, store, {}, queue_id, 0.0)
    assert (queue_dir / queue_id).is_file()


def test_a_change_that_fails_is_its_ids_answer(tmp_path: Path) -> None:
    queue_dir, store, queue_id = _one_queued(tmp_path)
    (store.dir / queue_id).mkdir(parents=True)  # a folder where its state file goes
    (store.dir / queue_id / "x").write_text("")
    answer = operations.apply("hold", queue_dir, store, {}, queue_id, 0.0)
    assert answer.startswith(operations.ERROR_PREFIX) and not operations.succeeded(answer)
    assert operations.apply("hold", queue_dir, store, {}, "nosuchid", 0.0) == \
        operations.NOT_QUEUED


def test_a_delete_whose_folder_sync_fails_says_the_message_is_gone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    queue_dir, store, queue_id = _one_queued(tmp_path)

    def no_sync(folder: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(operations, "fsync_dir", no_sync)
    answer = operations.apply("delete", queue_dir, store, {}, queue_id, 0.0)
    assert answer == "deleted (not yet on disk: Input/output error)"
    assert operations.succeeded(answer) and not (queue_dir / queue_id).exists()
