"""The sender against what the fourth review found (each test failed before its fix),
with real relays on 127.0.0.1 and a real queue."""

from __future__ import annotations

import threading
import time

import pytest

from tests.sender_support import Relay

DATA = b"Subject: review4\r\n\r\nbody\r\n"


@pytest.fixture
def relay():
    made = Relay().start()
    yield made
    made.stop()


def test_mail_that_arrives_while_the_rate_limit_holds_a_message_back_is_delivered(
    setup, relay
) -> None:
    """A pass held back by the rate limit ("1/h": an hour per token) ends when the
    runner is woken (a new file, a reload): local mail that arrives meanwhile is
    delivered at once, not after the token."""
    env = setup(relay.address, max_rate="1/h")
    env.use_real_clock()
    env.writer.store("a@example.com", ["far@example.org"], DATA)
    wake = threading.Event()
    worker = threading.Thread(target=env.runner.run, args=(wake,))
    worker.start()
    try:
        time.sleep(0.5)  # the remote message waits for its token
        env.writer.store("a@example.com", ["you@localhost"], DATA)
        wake.set()  # what the watchdog does for a new file
        new = env.config.local.maildir / "you" / "new"
        deadline = time.monotonic() + 5
        while not (new.exists() and any(new.iterdir())):
            assert time.monotonic() < deadline, "local mail waited for the rate limit"
            time.sleep(0.05)
    finally:
        env.stop.set()
        wake.set()
        worker.join(10)
    assert not worker.is_alive()
    assert relay.handler.messages == []  # the token never came
    assert len(env.queued()) == 1  # the remote message is still queued, untouched
