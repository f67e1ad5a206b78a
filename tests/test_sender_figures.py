"""The queue runner's figures (shared/metrics/figures.py), counted on a real queue with
a real relay (aiosmtpd) and a fake clock: what each outcome adds."""

from __future__ import annotations

import pytest

from shared.queue import arrival_time
from tests.sender_support import RecordingHandler, Relay

DATA = b"Subject: hello\r\n\r\nbody\r\n"


def test_deliveries_failures_deferrals_bounces_and_the_time_to_the_relay(setup) -> None:
    handler = RecordingHandler(rcpt_replies={"gone@example.org": "550 5.1.1 no such user",
                                             "later@example.org": "451 4.3.0 try later"})
    relay = Relay(handler=handler).start()
    try:
        env = setup(relay.address)
        registry = env.count()

        def value(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, labels)

        assert value("mailbag_relay_up") is None  # no session yet
        # All recipients relayed with one 250 (the runner's fast path).
        plain = env.writer.store("a@example.com", ["x@example.org", "y@example.org"], DATA)
        arrival = arrival_time(plain, 0.0)
        env.pass_at(arrival + 5.0)
        assert value("mailbag_delivered_total", route="relay") == 2
        assert value("mailbag_delivery_seconds_count") == 1
        assert value("mailbag_delivery_seconds_sum") == pytest.approx(5.0)
        assert value("mailbag_relay_up") == 1
        # Every outcome at once: relayed, local, failed for good, deferred; a bounce.
        env.writer.store("a@localhost", ["ok@example.org", "gone@example.org",
                                         "later@example.org", "me@localhost"], DATA)
        env.pass_at(arrival + 10.0)
        env.pass_at(arrival + 11.0)  # the bounce, to a local mailbox
        env.runner.close_relay()
    finally:
        relay.stop()
    assert value("mailbag_delivered_total", route="relay") == 3
    assert value("mailbag_delivered_total", route="local") == 2  # me@localhost, the bounce
    assert value("mailbag_failed_total") == 1
    assert value("mailbag_deferred_total") == 1  # one attempt of one message
    assert value("mailbag_bounces_total") == 1
    assert value("mailbag_delivery_seconds_count") == 2


def test_relay_up_goes_to_0_with_the_time_of_the_first_failure_and_back(setup) -> None:
    relay = Relay()
    env = setup(relay.address)  # nothing listens there yet
    registry = env.count()
    env.writer.store("a@example.com", ["b@example.org"], DATA)
    env.pass_at(2000.0)
    assert registry.get_sample_value("mailbag_relay_up") == 0
    assert registry.get_sample_value("mailbag_relay_down_since_timestamp_seconds") == 2000.0
    env.pass_at(2010.0)  # tried again, still down: down since the first failure
    assert registry.get_sample_value("mailbag_relay_down_since_timestamp_seconds") == 2000.0
    assert registry.get_sample_value("mailbag_deferred_total") == 0  # waiting is no attempt
    relay.start()
    try:
        env.pass_at(2030.0)
        env.runner.close_relay()
    finally:
        relay.stop()
    assert registry.get_sample_value("mailbag_relay_up") == 1
    assert registry.get_sample_value("mailbag_relay_down_since_timestamp_seconds") is None
    assert registry.get_sample_value("mailbag_delivered_total", {"route": "relay"}) == 1
