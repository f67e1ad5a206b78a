"""The sender's control socket over a real unix socket: the protocol, bad input, the
client's view of a sender that is not there, and the socket file itself.

The runner's side is a hand-written fake (`Recorder`) here: what the runner does
with a request is tested in tests/test_sender_runner.py, and with the real sender
process in tests/test_admin_e2e.py.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from services.sender.control import (
    MAX_IDS,
    MAX_REQUEST,
    ControlError,
    ControlServer,
    RunnerEnded,
    ask_sender,
    control_path,
    parse_request,
    ping_sender,
)
from shared.log import EventLog


class Recorder:
    """The runner's side: records each request and answers from a script."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.answer: str | None = "done"  # None: as if the runner never got to it
        self.ended = False

    def __call__(self, action: str, ids: Sequence[str], timeout: float) -> dict[str, str] | None:
        if self.ended:
            raise RunnerEnded("the sender is stopping")
        self.calls.append((action, tuple(ids)))
        if self.answer is None:
            return None
        return {queue_id: self.answer for queue_id in ids}


@pytest.fixture
def served(tmp_path: Path):
    recorder = Recorder()
    server = ControlServer(tmp_path, recorder, EventLog("S-SMTP", "-"),
                           connection_timeout=0.5, runner_timeout=0.5)
    yield tmp_path, recorder, server
    server.close()


def raw_exchange(folder: Path, payload: bytes, timeout: float = 5.0) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(control_path(folder)))
        sock.sendall(payload)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def test_a_request_reaches_the_runner_and_its_results_come_back(served) -> None:
    folder, recorder, _ = served
    assert ask_sender(folder, "hold", ["a", "b"]) == {"a": "done", "b": "done"}
    assert ask_sender(folder, "flush") == {}
    assert recorder.calls == [("hold", ("a", "b")), ("flush", ())]
    assert ping_sender(folder) == os.getpid()


def test_many_ids_go_in_batches(served) -> None:
    folder, recorder, _ = served
    ids = [f"id{n}" for n in range(MAX_IDS * 2 + 5)]
    assert len(ask_sender(folder, "delete", ids)) == len(ids)
    assert [len(batch) for _, batch in recorder.calls] == [MAX_IDS, MAX_IDS, 5]


@pytest.mark.parametrize(("payload", "error"), [
    (b"not json\n", "not a JSON request line"),
    (b"[1, 2]\n", "a request is a JSON object"),
    (b'{"action": "frobnicate", "ids": []}\n', "unknown action 'frobnicate'"),
    (b'{"action": "hold", "ids": "abc"}\n', "ids must be a list of strings"),
    (b'{"action": "hold", "ids": [1]}\n', "ids must be a list of strings"),
    (b'{"action": "hold", "ids": [""]}\n', "an id is empty"),
    (b'{"action": "hold"' + b" " * MAX_REQUEST + b"}\n", "a line longer than"),
    (b"\xff\xfe\n", "not a JSON request line"),
])
def test_bad_requests_get_an_error_and_the_server_goes_on(served, payload, error) -> None:
    folder, recorder, _ = served
    answer = raw_exchange(folder, payload)
    assert answer["ok"] is False and error in answer["error"]
    assert recorder.calls == []
    assert ask_sender(folder, "release", ["x"]) == {"x": "done"}  # still serving


def test_too_many_ids_in_one_request_are_refused() -> None:
    line = json.dumps({"action": "hold", "ids": ["x"] * (MAX_IDS + 1)}).encode()
    with pytest.raises(ValueError, match=f"at most {MAX_IDS} ids"):
        parse_request(line)


def test_a_client_that_says_nothing_does_not_block_the_others(served) -> None:
    folder, _, _ = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(str(control_path(folder)))
        started = time.monotonic()
        assert ask_sender(folder, "hold", ["a"]) == {"a": "done"}
        assert time.monotonic() - started < 3  # after the silent one's 0.5 s at most


def test_a_runner_that_does_not_answer_in_time_or_has_ended_is_an_error(served) -> None:
    folder, recorder, _ = served
    recorder.answer = None
    with pytest.raises(ControlError, match="did not get to it within 0.5 s"):
        ask_sender(folder, "hold", ["a"])
    recorder.ended = True
    with pytest.raises(ControlError, match="the sender is stopping"):
        ask_sender(folder, "hold", ["a"])


def test_no_sender_means_none(tmp_path: Path) -> None:
    assert ask_sender(tmp_path, "hold", ["a"]) is None  # no socket file at all
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(control_path(tmp_path)))  # a killed sender's file: nobody accepts
    stale.close()
    assert ask_sender(tmp_path, "hold", ["a"]) is None
    assert ping_sender(tmp_path) is None


def test_the_socket_is_0660_replaces_a_stale_one_and_is_removed_at_close(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(control_path(tmp_path)))
    stale.close()
    old_umask = os.umask(0o077)  # the mode must not depend on the umask
    try:
        server = ControlServer(tmp_path, Recorder(), EventLog("S-SMTP", "-"))
    finally:
        os.umask(old_umask)
    try:
        mode = os.stat(control_path(tmp_path)).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
        assert ask_sender(tmp_path, "hold", ["a"]) == {"a": "done"}
        assert sorted(os.listdir(tmp_path)) == [".control"]
    finally:
        server.close()
    assert not control_path(tmp_path).exists()
    assert ask_sender(tmp_path, "hold", ["a"]) is None


def test_concurrent_clients_each_get_their_own_answer(served) -> None:
    folder, _, _ = served
    answers: dict[int, dict[str, str] | None] = {}

    def client(number: int) -> None:
        answers[number] = ask_sender(folder, "hold", [f"id{number}"])

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert answers == {n: {f"id{n}": "done"} for n in range(8)}
