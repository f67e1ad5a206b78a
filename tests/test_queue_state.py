"""shared/queue/state.py: each message's delivery state next to it (SPEC §7)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.queue import BLANK, STATE_DIRNAME, DeliveryState, StateStore


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
