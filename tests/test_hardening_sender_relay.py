"""The sender against what a hostile review found (each test failed before its fix),
with real relays on 127.0.0.1 and a real queue."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from services.sender.decision import Backoff, Outcome, RetryPolicy, Status, decide
from services.sender.relay import RelayConnection, RelayError, RelaySettings
from shared.config import HostPort
from shared.log import EventLog
from shared.queue import BLANK, DeliveryState
from tests.sender_support import Relay

DATA = b"Subject: hardening\r\n\r\nbody\r\n"


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


def _block_mailbox(env, name: str) -> object:
    """A file where the Maildir `name` would be: its delivery fails with 451."""
    env.config.local.maildir.mkdir(parents=True, exist_ok=True)
    blocker = env.config.local.maildir / name
    blocker.write_bytes(b"")
    return blocker


def _delivered(env, name: str) -> int:
    new = env.config.local.maildir / name / "new"
    return len(list(new.iterdir())) if new.is_dir() else 0


def test_an_alias_target_deferred_locally_is_not_expanded_again(setup, relay) -> None:
    """`backup = ["backup", "ops@example.org"]`: ops gets its copy at once; the
    mailbox backup, deferred (451), gets its copy on the retry - and ops no second."""
    env = setup(relay.address, {"aliases": {"backup": ["backup", "ops@example.org"]}})
    env.writer.store("a@example.com", ["backup@localhost"], DATA)
    blocker = _block_mailbox(env, "backup")
    env.pass_at(1e9)
    assert [m.rcpt_tos for m in relay.handler.wait_for(1)] == [["ops@example.org"]]
    blocker.unlink()
    env.pass_at(1e9 + 100)
    assert _delivered(env, "backup") == 1
    assert env.queued() == []
    time.sleep(0.3)  # a second copy would be on its way by now
    assert len(relay.handler.messages) == 1, "ops@example.org got the message twice"


def test_a_mailbox_reached_through_an_alias_stays_that_mailbox_on_the_retry(
    setup, relay
) -> None:
    """`webmaster = ["alice", "bob@example.org"]` with a catch-all: alice's mailbox,
    deferred once, still gets the message - not the catch-all's target."""
    aliases = {"webmaster": ["alice", "bob@example.org"], '"*"': "catchall"}
    env = setup(relay.address, {"aliases": aliases})
    env.writer.store("a@example.com", ["webmaster@localhost"], DATA)
    blocker = _block_mailbox(env, "alice")
    env.pass_at(1e9)
    relay.handler.wait_for(1)
    blocker.unlink()
    env.pass_at(1e9 + 100)
    assert env.queued() == []
    assert (_delivered(env, "alice"), _delivered(env, "catchall")) == (1, 0)


S, D = Status.SENT, Status.DEFERRED


@pytest.mark.parametrize(("statuses", "state", "expanded", "marked"), [
    ((S, D), BLANK, True, True),  # a rewrite of alias targets: final from now on
    ((S, D), BLANK, False, False),  # no alias applied: the file holds what was queued
    ((D, D), BLANK, True, False),  # nothing done: the file is left as queued
    ((D,), DeliveryState(attempts=1, expanded=True), False, True),  # kept once set
])
def test_the_decision_marks_a_rewrite_of_alias_targets(statuses, state, expanded,
                                                       marked) -> None:
    outcomes = [Outcome(f"r{n}@example.org", status, "x", "relay")
                for n, status in enumerate(statuses)]
    decision = decide(outcomes, sender="a@example.com", state=state, at=100.0, arrival=0.0,
                      policy=RetryPolicy(Backoff(60, 3600), 1000.0), waiting_until=0.0,
                      expanded=expanded)
    assert decision.state.expanded is marked


def reset_every_connection(listener: socket.socket, stop: threading.Event) -> None:
    """Accept each connection and reset it at once (SO_LINGER 0), as an overloaded
    smarthost or a firewall may: the reset can land between the client's connect and
    anything it does next."""
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


def test_a_relay_that_resets_every_connection_is_only_ever_a_relay_error() -> None:
    """The runner relies on it (relay.py: every failure to talk to the relay is a
    RelayError); anything else ends the sender. The reset lands at a random point,
    so many connections are tried."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=100)
    stop = threading.Event()
    relay = threading.Thread(target=reset_every_connection, args=(listener, stop))
    relay.start()
    settings = RelaySettings(HostPort("127.0.0.1", listener.getsockname()[1]), "mailbag.test")
    log = EventLog("S-SMTP", "-")
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            conn = RelayConnection(settings, log)
            try:
                conn.open()
            except RelayError:
                pass
            finally:
                conn.close()
    finally:
        stop.set()
        relay.join(5)
        listener.close()


def test_a_rate_limit_slower_than_the_relays_idle_timeout_defers_nothing(setup) -> None:
    """"20/min": a token every 3 s; the relay closes a session idle for 0.5 s (421,
    as RFC 5321 §4.5.3.2.7 lets it). The session is not kept idle across the wait
    for a token, so no message meets the relay's goodbye and is deferred for it."""
    relay = Relay(timeout=0.5).start()
    try:
        env = setup(relay.address, max_rate="20/min")
        for n in range(2):
            env.writer.store("a@example.com", [f"b{n}@example.org"], DATA)
        env.use_real_clock()
        started = time.monotonic()
        while env.queued() and time.monotonic() - started < 15:
            env.runner.run_pass()
            if env.runner.settler.states:
                break
        env.runner.close_relay()
        assert env.runner.settler.states == {}, "a message was deferred"
        assert len(relay.handler.wait_for(2)) == 2
    finally:
        relay.stop()
