"""Smarthost failover and the outbound rate limit, with real aiosmtpd relays.

The runner uses the real clock here: failover and the limit are about seconds that
really pass (each test is bounded to a few of them).
"""

from __future__ import annotations

import time

import pytest

from services.sender.rate import RATE_FILE, TokenBucket
from shared.config import Rate
from tests.sender_support import Relay

DATA = b"Subject: hello\r\n\r\nbody\r\n"


@pytest.fixture
def relays():
    made: list[Relay] = []

    def make(count: int) -> list[Relay]:
        made.extend(Relay() for _ in range(count))
        return made[-count:]

    yield make
    for relay in made:
        relay.stop()


def test_failover_to_the_second_relay_and_back_to_the_first_after_relay_retry(
    setup, relays
) -> None:
    first, second = relays(2)
    second.start()  # the first is down: nothing listens on its port
    env = setup([first.address, second.address], relay_retry=1.0, retry_initial=0.5)
    env.use_real_clock()
    for n in range(3):
        env.writer.store("a@example.com", [f"b{n}@example.org"], DATA)
    started = time.monotonic()
    assert env.runner.run_pass()
    env.runner.close_relay()
    assert len(second.handler.wait_for(3)) == 3
    assert time.monotonic() - started < 3  # within seconds
    first.start()
    env.writer.store("a@example.com", ["soon@example.org"], DATA)
    env.runner.run_pass()  # the first is still left alone (relay_retry)
    env.runner.close_relay()
    assert second.handler.wait_for(4)[-1].rcpt_tos == ["soon@example.org"]
    time.sleep(1.1)
    env.writer.store("a@example.com", ["back@example.org"], DATA)
    env.runner.run_pass()
    env.runner.close_relay()
    assert first.handler.wait_for(1)[0].rcpt_tos == ["back@example.org"]


def test_every_relay_down_defers_each_message_naming_each_relay(
    setup, relays, log_lines
) -> None:
    first, second = relays(2)  # neither started
    env = setup([first.address, second.address], relay_retry=30)
    queue_id = env.writer.store("a@example.com", ["b@example.org"], DATA)
    env.pass_at(5000.0)
    (line,) = [x for x in log_lines if f"id={queue_id}" in x]
    assert " waiting defer " in line and "until=" in line
    connects = [x for x in log_lines if " connect fail " in x]
    assert [str(first.port) in x for x in connects] == [True, False]
    assert [str(second.port) in x for x in connects] == [False, True]
    # When the first relay is due again: retry_initial after its failure.
    assert env.runner.settler.states[queue_id].next_attempt == 5010.0


def test_a_5xx_from_the_first_relay_is_final(setup, relays) -> None:
    first, second = relays(2)
    first.handler.rcpt_replies["gone@example.org"] = "550 5.1.1 no such user"
    first.start()
    second.start()
    env = setup([first.address, second.address])
    queue_id = env.writer.store("a@example.com", ["gone@example.org"], DATA)
    env.pass_at(5000.0)
    env.runner.close_relay()
    assert queue_id in env.failed() and second.handler.messages == []


def test_the_rate_limit_spaces_messages_and_holds_across_a_restart(setup, relays) -> None:
    (relay,) = relays(1)
    relay.start()
    env = setup(relay.address, max_rate="20/s")
    for n in range(30):
        env.writer.store("a@example.com", [f"b{n}@example.org"], DATA)
    started = time.monotonic()
    env.use_real_clock()  # a new runner: its bucket starts empty now
    while env.queued() and time.monotonic() - started < 10:
        env.runner.run_pass()  # as the runner's loop does: pass after pass
    elapsed = time.monotonic() - started
    env.runner.close_relay()
    assert len(relay.handler.wait_for(30)) == 30
    # The bucket starts empty: 30 tokens at 20/s take 1.5 s; without it, ~0.1 s.
    assert elapsed >= 1.4
    assert env.runner.settler.states == {}  # held back is not deferred: no state, no backoff
    assert (env.config.queue.dir / RATE_FILE).exists()
    restarted = TokenBucket.load(Rate(20, 1.0), env.config.queue.dir, time.time())
    assert restarted.tokens < 2  # the restart does not hand out a fresh bucket


@pytest.mark.parametrize(("text", "count", "seconds"), [
    ("14/s", 14, 1.0), ("100/min", 100, 60.0), ("500/h", 500, 3600.0), (" 7 / d ", 7, 86400.0)])
def test_rates_parse(text: str, count: int, seconds: float) -> None:
    assert Rate.parse(text) == Rate(count, seconds)


@pytest.mark.parametrize("text", ["14", "0/s", "14/week", "-1/s", "fast"])
def test_bad_rates_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Rate.parse(text)


def test_the_token_bucket() -> None:
    bucket = TokenBucket(Rate(2, 1.0), tokens=0.0, at=100.0)
    assert bucket.wait(100.0) == pytest.approx(0.5)
    assert bucket.wait(100.5) == 0.0
    bucket.take(100.5)
    assert bucket.wait(100.5) == pytest.approx(0.5)
    assert bucket.wait(110.0) == 0.0 and bucket.tokens == 2.0  # never above its size


def test_a_session_broken_by_a_421_moves_the_pass_to_the_next_relay(
    setup, relays, log_lines
) -> None:
    """A relay that greets well and then answers a message with 421 is going away:
    that message is deferred, and the relay backs off like one that cannot be
    reached - the next message goes to the second relay, not to the first again."""
    first, second = relays(2)
    first.handler.rcpt_replies["b0@example.org"] = "421 4.3.2 going away"
    first.start()
    second.start()
    env = setup([first.address, second.address], relay_retry=30)
    env.use_real_clock()
    broken = env.writer.store("a@example.com", ["b0@example.org"], DATA)
    env.runner.run_pass()
    env.runner.close_relay()
    assert env.queued() == [broken]
    assert "421" in env.runner.settler.states[broken].last_reply
    env.writer.store("a@example.com", ["c1@example.org"], DATA)
    env.runner.run_pass()
    env.runner.close_relay()
    assert second.handler.wait_for(1)[0].rcpt_tos == ["c1@example.org"]
    assert first.handler.messages == []
    (line,) = [x for x in log_lines if " session fail " in x]
    assert str(first.port) in line and "retry=" in line


def test_a_session_the_relay_ends_between_messages_is_no_failure(setup, relays) -> None:
    """aiosmtpd's idle timeout (421, then close) while the session waits between two
    messages: the next message opens a new session with the same, first relay."""
    first, second = Relay(timeout=0.5), Relay()
    first.start()
    second.start()
    try:
        env = setup([first.address, second.address], relay_retry=30)
        env.use_real_clock()
        env.writer.store("a@example.com", ["one@example.org"], DATA)
        env.runner.run_pass()  # the session stays open after the pass
        time.sleep(1.0)  # the relay's idle timeout: 421 and close
        env.writer.store("a@example.com", ["two@example.org"], DATA)
        env.runner.run_pass()
        env.runner.close_relay()
        assert [m.rcpt_tos for m in first.handler.wait_for(2)] == [
            ["one@example.org"], ["two@example.org"]]
        assert second.handler.messages == []
        assert env.queued() == []
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize("saved", [b'{"tokens": NaN, "at": 1}', b'{"tokens": 5, "at": NaN}',
                                   b'{"tokens": Infinity, "at": 1}', b"not json"])
def test_a_damaged_rate_file_gives_an_empty_bucket(tmp_path, saved: bytes) -> None:
    (tmp_path / RATE_FILE).write_bytes(saved)
    bucket = TokenBucket.load(Rate.parse("5/s"), tmp_path, now=100.0)
    assert bucket.wait(100.0) > 0  # nothing to spend at once: never above the limit
