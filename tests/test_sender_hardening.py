"""The sender against what a review found it could not take (each test failed before
its fix): a bounce to an odd address, a request while a relay greets, a relay that
never stops replying, a config that is not UTF-8, moves that stay stuck, several
relays hanging at TERM, kill -9 while the relay is slow, a state folder gone."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from services.sender.control import ask_sender
from shared.config import load_config
from shared.queue import QueueWriter
from tests.admin_support import lines_with, start_program
from tests.hardening_support import wait_for
from tests.sender_support import LoopbackRelay, PipeliningRelay
from tests.support import write_config

BODY = b"Subject: hardening\r\n\r\nhello\r\n"
SENDER_READY = "S-SMTP - start ok"


class SlowGreetingRelay(PipeliningRelay):
    """Accepts at once, greets after `delay` seconds, then takes every message."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.connected = threading.Event()
        super().__init__()

    def session(self, conn: socket.socket) -> None:
        self.connected.set()
        if not self.stop.wait(self.delay):
            super().session(conn)


@pytest.mark.e2e
@pytest.mark.parametrize(("action", "told"), [("delete", "deleted"), ("hold", "held")])
def test_a_message_deleted_or_held_while_the_relay_greets_is_not_sent(
        tmp_path: Path, action: str, told: str) -> None:
    """SPEC §7 / issue 11: "A deleted message is never sent afterwards". The runner
    serves operators' requests from the connection's on_idle hook, while the job it
    is connecting for sits in a local variable of _feed (neither _ready nor _flight)."""
    relay = SlowGreetingRelay(delay=2.0)
    path = write_config(tmp_path, sender={"relay": relay.address, "greeting_timeout": 10})
    config = load_config(path)
    sender = start_program("sender", path, SENDER_READY)
    try:
        queue_id = QueueWriter(config.queue.dir).store("ops@example.com",
                                                       ["b@example.org"], BODY)
        assert relay.connected.wait(10), "the sender never connected"
        answer = ask_sender(config.queue.dir, action, [queue_id])
        assert answer == {queue_id: told}, answer  # what the operator is told
        time.sleep(4.0)  # the greeting comes after 2 s
        assert relay.messages == [], (
            f"{told} message {queue_id} was relayed afterwards: {relay.messages}; log: "
            f"{lines_with(config, queue_id)}")
    finally:
        sender.stop()
        relay.close()



def test_a_failed_move_of_a_once_deferred_message_does_not_spin(tmp_path: Path, setup) -> None:
    """A message deferred once (state: next_attempt in the past) is then refused with
    550 while failed/ is full. The FAIL move is stuck, the old state stays in memory
    and next_due() stays in the past: run() sleeps MIN_SLEEP (10 ms) and passes again
    and again - a busy loop instead of "logged once, the move retried each pass"."""
    from shared.queue import DeliveryState
    from tests.sender_support import RecordingHandler, Relay
    from tests.support import fill_disk, tiny_tmpfs

    handler = RecordingHandler(rcpt_replies={"gone@example.org": "550 5.1.1 no such user"})
    relay = Relay(handler=handler).start()
    with tiny_tmpfs(tmp_path / "failed", "64k") as failed:
        env = setup(relay.address, {"queue": {"dir": "var/queue", "failed_dir": str(failed)}},
                    poll_interval=60)
        env.use_real_clock()
        queue_id = env.writer.store("", ["gone@example.org"], BODY)
        env.runner.settler.set_state(queue_id, DeliveryState(
            attempts=1, next_attempt=time.time() - 60, last_reply="451 4.3.0 later"))
        fill_disk(failed)
        passes = 0
        real_pass = env.runner.run_pass

        def counting_pass() -> bool:
            nonlocal passes
            passes += 1
            return real_pass()

        env.runner.run_pass = counting_pass  # counts; the pass itself is the real one
        wake = threading.Event()
        thread = threading.Thread(target=env.runner.run, args=(wake,), daemon=True)
        thread.start()
        try:
            time.sleep(2.0)
        finally:
            env.stop.set()
            wake.set()
            thread.join(10)
            relay.stop()
        assert queue_id in env.runner.settler.stuck
        assert passes < 10, f"{passes} passes in 2 s with nothing due (busy loop)"


class EndlessGreetingRelay(LoopbackRelay):
    """Greets with a multi-line 220 that never ends: `220-` lines as fast as it can."""

    def session(self, conn: socket.socket) -> None:
        line = b"220-" + b"x" * 1000 + b"\r\n"
        chunk = line * 64
        deadline = time.monotonic() + 8  # bounded
        while not self.stop.is_set() and time.monotonic() < deadline:
            conn.sendall(chunk)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.e2e
def test_an_endless_multiline_reply_neither_grows_memory_nor_outlives_its_timeout(
        tmp_path: Path) -> None:
    """ReplyParser bounds one line (MAX_LINE) but not the lines of one reply, and the
    relay shell restarts the reply's deadline on every recv: a relay that never ends
    its 220- greeting makes the sender buffer it all, past greeting_timeout."""
    relay = EndlessGreetingRelay()
    path = write_config(tmp_path, sender={"relay": relay.address, "greeting_timeout": 2,
                                          "command_timeout": 2})
    config = load_config(path)
    sender = start_program("sender", path, SENDER_READY)
    try:
        QueueWriter(config.queue.dir).store("ops@example.com", ["b@example.org"], BODY)
        start_rss = _rss_mb(sender.proc.pid)
        time.sleep(5.0)
        grown = _rss_mb(sender.proc.pid) - start_rss
        timed_out = lines_with(config, " S-SMTP ", "session fail") + lines_with(
            config, " S-SMTP ", "deferred") + lines_with(config, " S-SMTP ", "waiting")
        assert grown < 50, f"the sender's RSS grew by {grown:.0f} MB on one greeting"
        assert timed_out, "greeting_timeout = 2 s, yet no failure after 5 s"
    finally:
        relay.close()
        sender.stop()


def _maildir_count(config, user: str) -> int:
    folder = config.local.maildir / user / "new"
    return len(list(folder.iterdir())) if folder.exists() else 0


@pytest.mark.e2e
def test_kill_9_while_the_relay_is_slow_redelivers_at_most_the_messages_in_flight(
        tmp_path: Path) -> None:
    """runner.py: "after a crash only the messages in flight (at most two) and those
    whose unlink still waits behind (FINISH_BACKLOG) are sent again". While the relay
    keeps the runner waiting, _local_work delivers the local recipients of up to
    READY_MAX (16) further messages and keeps them in memory (_ready) without
    recording it in the queue: a kill -9 then gives every one of them again."""
    import signal

    relay = SlowGreetingRelay(delay=15.0)
    path = write_config(tmp_path, sender={"relay": relay.address, "greeting_timeout": 60})
    config = load_config(path)
    writer = QueueWriter(config.queue.dir)
    count = 20
    for _ in range(count):
        writer.store("ops@example.com", ["alice@localhost", "bob@example.org"], BODY)
    sender = start_program("sender", path, SENDER_READY)
    wait_for(lambda: _maildir_count(config, "alice") >= 17, what="local deliveries")
    time.sleep(0.3)
    first = _maildir_count(config, "alice")
    sender.signal(signal.SIGKILL)
    sender.stop()
    sender = start_program("sender", path, SENDER_READY)
    try:
        time.sleep(2.0)
        total = _maildir_count(config, "alice")
    finally:
        sender.signal(signal.SIGKILL)
        sender.stop()
        relay.stop.set()
    again = total - first
    assert again <= 2, (f"{first} local deliveries before the kill -9, {again} of them "
                        f"delivered again after the restart ({count} messages)")


@pytest.mark.e2e
def test_a_reload_of_a_config_that_is_not_utf8_keeps_the_old_config(tmp_path: Path) -> None:
    """SPEC §7 Reload: "a bad new config is logged ... and the old one kept". A config
    saved in Latin-1 (an accent in a comment) makes tomllib raise UnicodeDecodeError,
    which load_config does not turn into ConfigError and reload_config does not
    catch: the HUP ends the sender ("crash", exit 1)."""
    import signal

    path = write_config(tmp_path, sender={"poll_interval": 1})
    config = load_config(path)
    sender = start_program("sender", path, SENDER_READY)
    try:
        path.write_bytes(path.read_bytes() + "# relais de secours: désactivé\n".encode("latin-1"))
        sender.signal(signal.SIGHUP)
        wait_for(lambda: lines_with(config, " S-SMTP ", " reload ")
                 or lines_with(config, " S-SMTP ", " exit "), what="the reload's outcome")
        time.sleep(0.5)
        assert sender.proc.poll() is None, (
            f"the sender exited {sender.proc.returncode} on a HUP: "
            f"{lines_with(config, ' S-SMTP ')[-3:]}")
        assert lines_with(config, " S-SMTP ", " reload fail ")
    finally:
        sender.stop()


def test_an_unreadable_state_file_does_not_outlive_its_delivered_message(setup) -> None:
    """SPEC §7 / issue 11: "The state of a message that is finished or deleted never
    lingers". A state file that load_states() could not parse (e.g. left empty by a
    power cut: Settler saves it without fsync) is not in Settler.states, so neither
    finish_sent() nor forget_gone() (which prunes only when a *known* state goes)
    ever removes it."""
    from tests.sender_support import Relay

    relay = Relay().start()
    try:
        env = setup(relay.address)
        queue_id = env.writer.store("ops@example.com", ["b@example.org"], BODY)
        state_file = env.config.queue.dir / ".state" / queue_id
        state_file.write_bytes(b"")  # what a power cut leaves of a non-fsynced write
        env.runner.settler.load_states()  # as at the sender's start: logged, counts as none
        env.pass_at(time.time())
        relay.handler.wait_for(1)
        for _ in range(3):
            env.pass_at(time.time())
        assert env.queued() == []
        assert not state_file.exists(), "the state of a delivered message lingers"
    finally:
        relay.stop()


@pytest.mark.e2e
def test_term_while_every_relay_hangs_at_its_greeting_exits_within_5_s(tmp_path: Path) -> None:
    """Issue 10 item 8: "TERM always exits cleanly within 5 s". Each RelayConnection
    starts its own STOP_GRACE (2.5 s) at its first look at the stop flag, and
    _connection() goes on to the next candidate after a stop-abandoned one: with
    three relays that accept and never greet, a TERM takes about 3 x 2.5 s."""
    import signal

    silent = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]  # never accept
    relays = [f"127.0.0.1:{s.getsockname()[1]}" for s in silent]
    path = write_config(tmp_path, sender={"relay": relays, "greeting_timeout": 60})
    config = load_config(path)
    sender = start_program("sender", path, SENDER_READY)
    try:
        QueueWriter(config.queue.dir).store("ops@example.com", ["b@example.org"], BODY)
        time.sleep(1.0)  # connected to the first relay, waiting for its greeting
        started = time.monotonic()
        sender.signal(signal.SIGTERM)
        sender.proc.wait(20)
        took = time.monotonic() - started
        assert sender.proc.returncode == 0
        assert took < 5.0, (f"TERM took {took:.1f} s; "
                            f"{lines_with(config, ' S-SMTP ', 'session fail')}")
    finally:
        sender.stop()
        for each in silent:
            each.close()


def test_a_hold_given_while_a_move_is_stuck_survives_the_move(tmp_path: Path, setup) -> None:
    """A PARTIAL decision (one recipient 550, one 451) is stuck because failed/ is
    full; the operator holds the message ("held"); once failed/ has room the stuck
    move is carried out with the decision's state computed before the hold
    (held=False), which silently drops the hold: the message is relayed again."""
    from tests.sender_support import RecordingHandler, Relay
    from tests.support import fill_disk, tiny_tmpfs

    handler = RecordingHandler(rcpt_replies={"gone@example.org": "550 5.1.1 no such user",
                                             "later@example.org": "451 4.3.0 try later"})
    relay = Relay(handler=handler).start()
    try:
        with tiny_tmpfs(tmp_path / "failed", "64k") as failed:
            env = setup(relay.address, {"queue": {"dir": "var/queue",
                                                  "failed_dir": str(failed)}})
            queue_id = env.writer.store("ops@example.com",
                                        ["gone@example.org", "later@example.org"], BODY)
            filler = fill_disk(failed)
            now = time.time()
            env.pass_at(now)
            assert queue_id in env.runner.settler.stuck  # failed/ is full
            assert env.runner.request("hold", [queue_id], 0) is None  # served next pass
            env.pass_at(now + 1)
            assert env.runner.settler.states[queue_id].held  # the operator was told "held"
            filler.unlink()  # failed/ has room again
            env.pass_at(now + 2)
            assert queue_id not in env.runner.settler.stuck
            handler.rcpt_replies.pop("later@example.org")
            env.pass_at(now + 500)  # after its backoff, before its expiry
            sent = [m for m in handler.messages if "later@example.org" in m.rcpt_tos]
            state = env.runner.settler.states.get(queue_id)
            assert sent == [], f"a held message was relayed: {sent}; its state {state}"
    finally:
        relay.stop()


@pytest.mark.e2e
def test_the_receiver_refuses_a_sender_with_a_unicode_line_separator(tmp_path: Path) -> None:
    """`MAIL FROM:<a\u2028b@example.com>` was once answered 250; when the relay then
    refused the recipient, the bounce to that sender could not be built (a header
    value may hold no line end) and the sender crashed, again after each restart."""
    from tests.hardening_support import RawClient

    path = write_config(tmp_path)
    config = load_config(path)
    receiver = start_program("receiver", path, "R-SMTP - start ok")
    try:
        client = RawClient(config.receiver.listen.host, config.receiver.listen.port)
        assert client.read_reply().code == 220
        assert client.command("EHLO client.test").code == 250
        reply = client.command("MAIL FROM:<a\u2028b@example.com> SMTPUTF8".encode())
        assert reply.code == 501
        client.command("QUIT")
    finally:
        receiver.stop()


def test_a_notice_that_cannot_be_built_never_stops_the_sender(tmp_path: Path) -> None:
    """Whatever a queued sender address holds (here one a receiver would refuse, put in
    the queue by other means), a failed recipient's notice that cannot be built is
    logged with the id, the message still goes to failed/, and the sender lives on."""
    from tests.sender_support import RecordingHandler, Relay

    handler = RecordingHandler(rcpt_replies={"b@example.org": "550 5.1.1 no such user"})
    relay = Relay(handler=handler).start()
    path = write_config(tmp_path, sender={"relay": relay.address})
    config = load_config(path)
    writer = QueueWriter(config.queue.dir)
    odd = writer.store("a\u2028b@example.com", ["b@example.org"], BODY)
    sender = start_program("sender", path, SENDER_READY)
    try:
        wait_for(lambda: odd in {p.name for p in config.queue.failed.iterdir()},
                 timeout=10, what="the refused message in failed/")
        writer.store("c@example.com", ["ok@example.org"], BODY)  # behind it: delivered
        handler.wait_for(1)
        assert sender.proc.poll() is None
        assert lines_with(config, f"id={odd}") and lines_with(config, " bounce fail ")
    finally:
        sender.stop()
        relay.stop()


def test_a_missing_state_folder_does_not_stop_the_runner(setup) -> None:
    """Issue 10: "No single message, file or folder problem can stop the sender".
    run_pass() guards the queue's scan, but forget_gone() -> StateStore.prune()
    scans queue.dir/.state unguarded: with that folder gone (an operator's
    `rm -rf var/queue/.state` to reset backoffs) the next pass in which a known
    state's message has left raises FileNotFoundError out of run() (a crash)."""
    import shutil

    from tests.sender_support import RecordingHandler, Relay

    handler = RecordingHandler(rcpt_replies={"later@example.org": "451 4.3.0 try later"})
    relay = Relay(handler=handler).start()
    try:
        env = setup(relay.address)
        queue_id = env.writer.store("ops@example.com", ["later@example.org"], BODY)
        now = time.time()
        env.pass_at(now)
        assert env.runner.settler.states[queue_id].attempts == 1
        shutil.rmtree(env.config.queue.dir / ".state")
        (env.config.queue.dir / queue_id).unlink()  # removed by hand meanwhile
        env.pass_at(now + 1)  # raises FileNotFoundError on main
    finally:
        relay.stop()
