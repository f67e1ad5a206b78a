"""Operators' changes while the sender drains a big queue: hold, release and flush in
loops, over the real control socket, against a real sender delivering 2,000 messages
into Postfix's smtp-sink. Every message arrives exactly once, none while it is held,
and nothing is left behind (no message, no state file).

When a message was delivered is read from the sender's `sent` line: the runner
writes it on the thread that also applies the holds and releases, so a message
answered "held" can have its line only after its release was applied.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from services.sender.control import ask_sender
from shared.config import Config, load_config
from shared.queue import QueueWriter, envelope_of, new_queue_id
from tests.admin_support import lines_with, start_program
from tests.hardening_support import wait_for
from tests.sender_support import SmtpSink
from tests.support import write_config

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not SmtpSink.available(), reason="needs Postfix's smtp-sink")]

MESSAGES = 2000
LOOP_SECONDS = 15.0  # the loops' bound, whatever happens
MARGIN = 0.002  # seconds: the log's timestamps have milliseconds
NUMBER = re.compile(rb"^X-Number: (\d+)\r?$", re.MULTILINE)


def arrived_numbers(sink: SmtpSink) -> list[int]:
    dump = sink.folder / "all"
    return [int(n) for n in NUMBER.findall(dump.read_bytes())] if dump.exists() else []


def sent_times(config: Config) -> dict[str, list[float]]:
    """When the sender logged each message as sent (epoch seconds), by id."""
    times: dict[str, list[float]] = {}
    for line in lines_with(config, " S-SMTP ", " sent ok "):
        queue_id = line.split(" id=")[1].split()[0]
        times.setdefault(queue_id, []).append(datetime.fromisoformat(line[:29]).timestamp())
    return times


def fill_queue(queue_dir: Path) -> dict[str, int]:
    """2,000 queued messages, each numbered; written without an fsync each (set-up)."""
    writer = QueueWriter(queue_dir)
    ids = {}
    for number in range(MESSAGES):
        queue_id = new_queue_id()
        data = f"X-Number: {number}\r\nSubject: load\r\n\r\nmessage {number}\r\n".encode()
        writer.write_tmp(queue_id, [envelope_of("load@example.com", ["sink@example.org"]),
                                    data], sync=False)
        writer.publish(queue_id)
        ids[queue_id] = number
    return ids


class Holder:
    """Holds a few queued messages, then releases them: the windows in which each
    was held (from the hold's answer to the release's request)."""

    def __init__(self, queue_dir: Path, stop: threading.Event) -> None:
        self.queue_dir = queue_dir
        self.stop = stop
        self.windows: list[tuple[str, float, float]] = []
        self.rounds = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            deadline = time.monotonic() + LOOP_SECONDS
            while not self.stop.is_set() and time.monotonic() < deadline:
                names = [n for n in os.listdir(self.queue_dir) if not n.startswith(".")]
                if not names:
                    return
                chosen = random.sample(names, min(3, len(names)))
                answers = ask_sender(self.queue_dir, "hold", chosen)
                held_at = time.time()
                held = [i for i, text in (answers or {}).items() if text == "held"]
                time.sleep(random.uniform(0.0, 0.05))
                released_at = time.time()
                assert ask_sender(self.queue_dir, "release", held) is not None
                self.windows += [(i, held_at, released_at) for i in held]
                self.rounds += 1
                time.sleep(0.02)  # each hold and release is fsynced: let the drain go on
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.errors.append(err)


def flusher(queue_dir: Path, stop: threading.Event, counts: list[int]) -> None:
    deadline = time.monotonic() + LOOP_SECONDS
    while not stop.is_set() and time.monotonic() < deadline:
        assert ask_sender(queue_dir, "flush") is not None
        counts.append(1)
        time.sleep(0.01)


def test_hold_release_flush_loops_while_the_sender_drains_2000_messages(tmp_path: Path) -> None:
    sink = SmtpSink(tmp_path / "sink", one_file=True).start()
    path = write_config(tmp_path, sender={"relay": sink.address, "retry_initial": 600,
                                          "retry_max": 3600})
    config = load_config(path)
    ids = fill_queue(config.queue.dir)
    stop = threading.Event()
    holder = Holder(config.queue.dir, stop)
    flushes: list[int] = []
    threads = [threading.Thread(target=holder.run),
               threading.Thread(target=flusher, args=(config.queue.dir, stop, flushes))]
    sender = start_program("sender", path, "S-SMTP - start ok")  # draining from now on
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: len(arrived_numbers(sink)) >= MESSAGES - 50, timeout=30,
                   what="the drain")
        stop.set()
        for thread in threads:
            thread.join(LOOP_SECONDS + 5)
        assert not holder.errors, holder.errors
        queued = [n for n in os.listdir(config.queue.dir) if not n.startswith(".")]
        ask_sender(config.queue.dir, "release", queued)  # whatever a hold kept, if any
        wait_for(lambda: len(arrived_numbers(sink)) >= MESSAGES, timeout=30,
                   what="every message")
        time.sleep(0.3)  # a duplicate would arrive now
    finally:
        stop.set()
        status = sender.stop()
        sink.stop()
    assert status == 0

    assert sorted(arrived_numbers(sink)) == list(range(MESSAGES))  # each exactly once
    sent = sent_times(config)
    assert sorted(sent) == sorted(ids) and all(len(t) == 1 for t in sent.values())
    assert holder.rounds >= 5 and len(flushes) >= 5 and holder.windows, (
        holder.rounds, len(flushes), len(holder.windows))
    for queue_id, held_at, released_at in holder.windows:
        (when,) = sent[queue_id]
        assert not held_at + MARGIN < when < released_at - MARGIN, (
            f"{queue_id} was sent while held")
    assert [n for n in os.listdir(config.queue.dir) if not n.startswith(".")] == []
    assert os.listdir(config.queue.dir / ".state") == []
