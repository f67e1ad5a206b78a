"""The queue runner with a real queue folder, real Maildirs and a real aiosmtpd relay.

Time comes from a fake clock that the tests (and relays, inside an exchange) move
forward, so backoff, relay retry and max_queue_lifetime are tested without waiting
for them, with passes that take time.
"""

from __future__ import annotations

import asyncio
import mailbox
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from services.sender.app import build_relays
from services.sender.control import RunnerEnded
from services.sender.local import LocalDelivery, is_local
from services.sender.runner import QueueRunner
from shared.config import load_config
from shared.log import EventLog
from shared.queue import (
    BLANK,
    REASON_SUFFIX,
    QueueFile,
    QueueReader,
    QueueWriter,
    StateStore,
    arrival_time,
    new_queue_id,
)
from shared.smtp import mailbox_name
from tests.appliance_support import wait_until
from tests.sender_support import (
    FakeClock,
    LoopbackRelay,
    PipeliningRelay,
    RecordingHandler,
    Relay,
    Setup,
)
from tests.support import fill_disk, free_port, tiny_tmpfs, write_config

DATA = b"Subject: hello\r\n\r\nbody\r\n.dot line\r\n"


# ---------------------------------------------------------------------------- pure parts

def test_arrival_time_comes_from_the_queue_id() -> None:
    assert arrival_time(new_queue_id(1_700_000_000_123_000_000), 0) == pytest.approx(1.7e9 + 0.123)
    assert arrival_time("not-a-queue-id-at-all", 42.0) == 42.0


@pytest.mark.parametrize("rcpt", ["../etc@localhost", ".hidden@localhost", "a/b@localhost",
                                  "@localhost", "a\0b@localhost", '"../x"@localhost'])
def test_unsafe_local_parts_are_refused(rcpt: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        mailbox_name(rcpt)
    reply = LocalDelivery(tmp_path / "mail").deliver("a@b.example", rcpt, b"x\r\n")
    assert reply.code == 550
    assert not (tmp_path / "mail").exists() or not any((tmp_path / "mail").iterdir())


def test_failed_local_delivery_leaves_no_temporary_file(tmp_path: Path) -> None:
    """A failed Maildir write (here: new/ is not a folder) leaves nothing in tmp/,
    including a file an earlier failed flush/fsync of this process left there."""
    folder = tmp_path / "mail" / "you"
    for sub in ("tmp", "cur"):
        (folder / sub).mkdir(parents=True)
    (folder / "new").write_bytes(b"")
    (folder / "tmp" / f"1.M1P{os.getpid()}Q9.host").write_bytes(b"partial")
    reply = LocalDelivery(tmp_path / "mail").deliver("a@b.example", "you@localhost", b"x\r\n")
    assert reply.code == 451
    assert list((folder / "tmp").iterdir()) == []


def test_local_routing() -> None:
    domains = frozenset({"localhost"})
    assert is_local("you@localhost", domains) and is_local("you@LocalHost", domains)
    assert is_local("postmaster", domains)
    assert not is_local("you@example.org", domains)


# ---------------------------------------------------------------------------- delivery

def test_relayed_message_leaves_the_queue_byte_identical(setup, relay) -> None:
    env = setup(relay.address)
    queue_id = env.writer.store("alice@example.com", ["bob@example.org"], DATA)
    assert env.pass_at(2e9) is True
    env.runner.close_relay()
    (got,) = relay.handler.wait_for(1)
    assert got.content == DATA and got.rcpt_tos == ["bob@example.org"]
    assert env.queued() == [] and env.failed() == []
    assert queue_id not in os.listdir(env.config.queue.dir)
    relay.handler.wait_quits(1)
    assert env.pass_at(2e9) is False


def _immutable(path: Path, on: bool) -> None:
    """chattr +i / -i: even root's unlink(2) fails (EPERM) on an immutable inode."""
    done = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"chattr not usable here: {done.stderr.decode(errors='replace')}")


def test_a_delivered_message_that_cannot_be_unlinked_is_not_sent_again(
    setup, relay, log_lines
) -> None:
    """Read in place, a delivered file whose unlink fails stays in queue.dir: it is
    logged once and the unlink is retried, but this process never sends it again."""
    env = setup(relay.address)
    queue_id = env.writer.store("alice@example.com", ["bob@example.org"], DATA)
    path = env.config.queue.dir / queue_id
    _immutable(path, True)
    try:
        assert env.pass_at(2e9) is True
        relay.handler.wait_for(1)
        assert env.pass_at(2e9) is False  # not delivered twice
        assert env.pass_at(2e9) is False
        env.runner.close_relay()
        assert len(relay.handler.messages) == 1 and env.queued() == [queue_id]
        assert len([x for x in log_lines if " finish fail " in x]) == 1
    finally:
        _immutable(path, False)
    env.pass_at(2e9)  # the unlink is retried, and now succeeds
    assert env.queued() == [] and len(relay.handler.messages) == 1


def test_all_recipients_sent_is_one_line_and_the_file_goes(setup, relay, log_lines) -> None:
    """The runner's fast path (every recipient relayed with the dot's 2xx) logs and
    moves exactly as the general one: one `sent ok` line naming every recipient."""
    env = setup(relay.address)
    queue_id = env.writer.store("a@example.com", ["b@example.org", "c@example.net"], DATA)
    assert env.pass_at(2e9) is True
    env.runner.close_relay()
    (got,) = relay.handler.wait_for(1)
    assert got.rcpt_tos == ["b@example.org", "c@example.net"]
    assert env.reader.flush() == []
    assert env.queued() == []
    (line,) = [line for line in log_lines if f"id={queue_id}" in line]
    assert " sent ok " in line and "to=<b@example.org>,<c@example.net>" in line
    assert queue_id not in env.runner.settler.states


def test_one_connection_carries_the_whole_pass(setup, relay) -> None:
    env = setup(relay.address)
    for number in range(5):
        env.writer.store("a@example.com", ["b@example.org"], b"n %d\r\n" % number)
    env.pass_at(2e9)
    env.runner.close_relay()
    got = relay.handler.wait_for(5)
    assert [m.content for m in got] == [b"n %d\r\n" % n for n in range(5)]  # oldest first
    relay.handler.wait_quits(1)
    assert relay.handler.quits == 1


def test_local_delivery_to_maildir(setup) -> None:
    """A bare `postmaster` reaches the postmaster alias, `root` unless configured."""
    env = setup(None)
    env.writer.store("alice@example.com", ["you@localhost", "postmaster"], DATA)
    assert env.pass_at(2e9)
    assert env.queued() == []
    assert not (env.config.local.maildir / "postmaster").exists()
    for name in ("you", "root"):
        folder = env.config.local.maildir / name
        (file,) = list((folder / "new").iterdir())
        content = file.read_bytes()
        assert content.startswith(b"Return-Path: <alice@example.com>\nDelivered-To: ")
        assert content.endswith(b"Subject: hello\n\nbody\n.dot line\n")
        assert len(mailbox.Maildir(folder, create=False)) == 1


def test_unparseable_file_is_quarantined(setup, log_lines) -> None:
    env = setup(None)
    bad = env.config.queue.dir / new_queue_id()
    bad.write_bytes(b"this is not a queue file")
    good = env.writer.store("a@example.com", ["you@localhost"], b"x\r\n")
    assert env.pass_at(2e9)
    quarantine = env.config.queue.quarantine
    assert (quarantine / bad.name).read_bytes() == b"this is not a queue file"
    assert (quarantine / (bad.name + REASON_SUFFIX)).read_text().strip()
    assert env.queued() == [] and good not in os.listdir(quarantine)
    assert any("quarantine fail" in line and bad.name in line for line in log_lines)


def test_5xx_goes_to_failed_with_the_reply(setup, log_lines) -> None:
    handler = RecordingHandler(rcpt_replies={"gone@example.org": "550 5.1.1 no such user"})
    server = Relay(handler=handler).start()
    try:
        env = setup(server.address)
        queue_id = env.writer.store("a@example.com", ["gone@example.org"], DATA)
        env.pass_at(2e9)
        env.runner.close_relay()
    finally:
        server.stop()
    assert env.queued() == []
    assert env.failed() == [queue_id, queue_id + REASON_SUFFIX]
    reason = (env.config.queue.failed / (queue_id + REASON_SUFFIX)).read_text()
    assert "550" in reason and "no such user" in reason and "gone@example.org" in reason
    assert any("failed fail" in line and queue_id in line and "550" in line
               for line in log_lines)


def test_mixed_results_rewrite_the_file_and_retry_with_backoff(setup, log_lines) -> None:
    handler = RecordingHandler(rcpt_replies={
        "gone@example.org": "550 5.1.1 no such user",
        "later@example.org": "451 4.3.0 try later",
    })
    server = Relay(handler=handler).start()
    try:
        env = setup(server.address)
        recipients = ["ok@example.org", "gone@example.org", "later@example.org", "me@localhost"]
        queue_id = env.writer.store("a@localhost", recipients, DATA)
        env.pass_at(1000.0)
        # Delivered ones are gone from the file, the failed one is recorded apart and
        # bounced to the sender (a local mailbox here).
        assert env.queued() == [queue_id]
        assert env.queue_file(queue_id).startswith(
            b"From: <a@localhost>\nTo: <later@example.org>\n\n")
        assert env.failed() == [f"{queue_id}.1", f"{queue_id}.1{REASON_SUFFIX}"]
        assert any("deferred defer" in line and "later@example.org" in line and "451" in line
                   for line in log_lines)
        (notice,) = env.notices().values()
        assert notice.recipients == ("a@localhost",)
        assert b"Final-Recipient: rfc822; gone@example.org" in notice.data
        # Not due before retry_initial (10 s), due after; the relay accepts now.
        assert env.runner.sleep_time(1000.0) == pytest.approx(10.0)
        env.pass_at(1005.0)  # delivers the notice, not the deferred message
        assert len(handler.messages) == 1 and env.notices() == {}
        assert len(list((env.config.local.maildir / "a" / "new").iterdir())) == 1
        handler.rcpt_replies.clear()
        assert env.pass_at(1010.0) is True
        env.runner.close_relay()
        got = handler.wait_for(2)
    finally:
        server.stop()
    assert [m.rcpt_tos for m in got] == [["ok@example.org"], ["later@example.org"]]
    assert env.queued() == []
    maildir = env.config.local.maildir / "me" / "new"
    assert len(list(maildir.iterdir())) == 1  # local copy delivered once, not twice


def test_backoff_doubles_for_a_message_that_keeps_failing(setup) -> None:
    handler = RecordingHandler(data_reply="451 4.3.0 later")
    server = Relay(handler=handler).start()
    try:
        env = setup(server.address)
        queue_id = env.writer.store("a@example.com", ["b@example.org"], DATA)
        now = 5000.0
        waits = []
        for _ in range(4):
            assert env.pass_at(now)
            state = env.runner.settler.states[queue_id]
            waits.append(state.next_attempt - now)
            now = state.next_attempt
        env.runner.close_relay()
    finally:
        server.stop()
    assert waits == [10, 20, 40, 40]
    assert env.queued() == [queue_id]


def test_relay_down_holds_mail_and_delivers_when_it_returns(setup, log_lines) -> None:
    relay = Relay()
    env = setup(relay.address)  # nothing listens there yet
    remote = env.writer.store("a@example.com", ["b@example.org"], DATA)
    local = env.writer.store("a@example.com", ["you@localhost", "c@example.org"], DATA)
    assert env.pass_at(2000.0)
    assert any("connect fail" in line for line in log_lines)
    # Local mail is not held hostage; remote mail stays queued.
    assert (env.config.local.maildir / "you" / "new").exists()
    assert sorted(env.queued()) == sorted([remote, local])
    assert env.relay_state.retry_at == 2010.0
    assert env.runner.sleep_time(2000.0) == pytest.approx(10.0)
    assert env.pass_at(2001.0) is False  # backing off: nothing tried
    # Each message waiting for the relay has its own line, with its id.
    for queue_id in (remote, local):
        (line,) = [x for x in log_lines if f"id={queue_id}" in x and " waiting defer " in x]
        assert "until=1970-01-01T00:33:30+00:00" in line and "relay unavailable" in line
    # Not tried (a wait, not a deferral): no attempt counted.
    assert env.runner.settler.states[remote].attempts == 0
    relay.start()
    try:
        assert env.pass_at(2010.0)
        env.runner.close_relay()
        got = relay.handler.wait_for(2)
    finally:
        relay.stop()
    assert [m.rcpt_tos for m in got] == [["b@example.org"], ["c@example.org"]]
    assert env.queued() == []
    assert len(list((env.config.local.maildir / "you" / "new").iterdir())) == 1


def test_relay_backoff_doubles_while_it_stays_down(setup) -> None:
    env = setup(f"127.0.0.1:{free_port()}")
    env.writer.store("a@example.com", ["b@example.org"], DATA)
    now = 100.0
    retries = []
    for _ in range(4):
        env.pass_at(now)
        retries.append(env.relay_state.retry_at - now)
        now = env.relay_state.retry_at
    assert retries == [10, 20, 40, 40]


def test_no_relay_configured_keeps_mail_and_says_so_once_per_message(setup, log_lines) -> None:
    env = setup(None)  # poll_interval = 60, max_queue_lifetime = 1000
    queue_id = env.writer.store("a@example.com", ["b@example.org"], DATA)
    now = arrival_time(queue_id, 0)
    for offset in (0, 1, 2, 61):  # later passes repeat nothing: it waits for its expiry
        env.pass_at(now + offset)
    assert env.queued() == [queue_id]
    (said,) = [line for line in log_lines if " waiting defer " in line]
    assert f"id={queue_id}" in said and "no relay configured" in said
    assert env.runner.settler.states[queue_id].next_attempt == pytest.approx(now + 1000)
    other = env.writer.store("a@example.com", ["c@example.org"], DATA)
    env.pass_at(now + 62)
    said = [line for line in log_lines if " waiting defer " in line]
    assert len(said) == 2 and f"id={other}" in said[1]
    assert len(env.queued()) == 2


def test_max_queue_lifetime_fails_what_is_still_deferred(setup) -> None:
    handler = RecordingHandler(data_reply="451 4.3.0 later")
    server = Relay(handler=handler).start()
    try:
        env = setup(server.address, max_queue_lifetime=100)
        queue_id = env.writer.store("a@example.com", ["b@example.org"], DATA)
        arrived = arrival_time(queue_id, 0)
        env.pass_at(arrived + 50)
        assert env.queued() == [queue_id]
        env.pass_at(arrived + 101)  # expired: due at once, fails for good
        env.runner.close_relay()
    finally:
        server.stop()
    assert env.queued() == []
    reason = (env.config.queue.failed / (queue_id + REASON_SUFFIX)).read_text()
    assert "expired" in reason and "451" in reason


def test_expired_while_no_relay_configured(setup) -> None:
    env = setup(None, max_queue_lifetime=100)
    queue_id = env.writer.store("a@example.com", ["b@example.org"], DATA)
    arrived = arrival_time(queue_id, 0)
    env.pass_at(arrived + 1)
    assert env.queued() == [queue_id]
    env.pass_at(arrived + 200)
    assert env.queued() == [] and queue_id in env.failed()


def test_messages_per_connection_opens_a_new_session(setup, relay) -> None:
    env = setup(relay.address, messages_per_connection=2)
    for number in range(5):
        env.writer.store("a@example.com", ["b@example.org"], b"n %d\r\n" % number)
    env.pass_at(2e9)
    env.runner.close_relay()
    relay.handler.wait_for(5)
    relay.handler.wait_quits(3)
    assert relay.handler.quits == 3


# ---------------------------------------------------------------------------- pipelined pass

@pytest.fixture
def pipe_relay():
    server = PipeliningRelay()
    yield server
    server.close()


def store_all(env: Setup, bodies: list[bytes]) -> list[str]:
    return [env.writer.store("a@example.com", ["b@example.org"], b"Subject: p\r\n" + body)
            for body in bodies]


def logged(lines: list[str], queue_id: str) -> list[str]:
    """"event outcome" of each line about `queue_id`: the two words before the first
    key=value (EventLog hands loguru the whole rendered line, so the fixture's own
    format does not say where the event is)."""
    found = []
    for line in lines:
        if f"id={queue_id}" in line:
            words = line.split()
            first_detail = next(i for i, w in enumerate(words) if "=" in w)
            found.append(" ".join(words[first_detail - 2:first_detail]))
    return found


def test_a_pipelined_pass_attributes_every_outcome_to_its_message(
    setup, pipe_relay, log_lines
) -> None:
    env = setup(pipe_relay.address)
    ids = store_all(env, [b"\r\nok\r\n", b"X-Reply: 451 4.3.0 later\r\n\r\n1\r\n",
                          b"X-Reply: 554 5.6.0 no\r\n\r\n2\r\n", b"\r\nok\r\n", b"\r\nok\r\n"])
    assert env.pass_at(1000.0)
    env.runner.close_relay()
    (session,) = pipe_relay.sessions  # one session carried the pass
    assert session.count(b"MAIL") == 5 and session[-1] == b"QUIT"
    assert [m[3] for m in pipe_relay.messages] == [b"250", b"451", b"554", b"250", b"250"]
    assert env.queued() == [ids[1]]  # deferred: stays, backing off
    assert env.failed() == [ids[2], ids[2] + REASON_SUFFIX]
    assert logged(log_lines, ids[0]) == ["sent ok"]
    assert logged(log_lines, ids[1]) == ["deferred defer"]
    assert logged(log_lines, ids[2]) == ["failed fail", "bounce ok"]
    assert logged(log_lines, ids[3]) == logged(log_lines, ids[4]) == ["sent ok"]


def test_421_mid_pipeline_defers_what_was_sent_and_the_rest_takes_a_new_session(
    setup, pipe_relay, log_lines
) -> None:
    env = setup(pipe_relay.address)
    ids = store_all(env, [b"\r\nok\r\n", b"X-Reply: 421 4.3.2 closing\r\n\r\n1\r\n"]
                    + [b"\r\nok %d\r\n" % n for n in range(2, 6)])
    assert env.pass_at(1000.0)
    env.runner.close_relay()
    # Message 1's dot got 421; message 2's commands were already in flight behind it:
    # both deferred with the 421. Message 3, handed over but never started, and the
    # rest go out on a second session: a relay that answered message 0 works (a limit
    # of messages per session, say), so it is not backed off.
    assert env.queued() == ids[1:3]
    assert len(pipe_relay.sessions) == 2
    delivered = [m[2] for m in pipe_relay.messages if m[3] == b"250"]
    assert delivered == [b"Subject: p\r\n\r\nok\r\n"] + [
        b"Subject: p\r\n\r\nok %d\r\n" % n for n in range(3, 6)]
    for queue_id in ids[1:3]:
        (line,) = [x for x in log_lines if f"id={queue_id}" in x and "deferred" in x]
        assert "421" in line
    assert not [x for x in log_lines if " session fail " in x]
    assert env.failed() == []


class StallAfterDotRelay(LoopbackRelay):
    """No PIPELINING; never answers a final dot (a relay stuck scanning content)."""

    def __init__(self) -> None:
        self.got_dot = threading.Event()
        super().__init__()

    def session(self, conn) -> None:  # noqa: ANN001
        conn.sendall(b"220 slow.test ESMTP\r\n")
        in_data = False
        for line in self.lines(conn):
            if in_data:
                if line == b".":
                    self.got_dot.set()
                    self.stop.wait(30)  # stall until the test ends
                    return
                continue
            verb = line[:4].upper()
            if verb == b"EHLO":
                conn.sendall(b"250-slow.test\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                in_data = True
                conn.sendall(b"354 go\r\n")
            else:
                conn.sendall(b"250 ok\r\n")


def test_a_stop_settles_a_message_read_but_never_sent(tmp_path: Path) -> None:
    """TERM while the relay stalls on message 1's dot. Message 2 was read already -
    its local recipient delivered - and waited for the relay: at the stop its file
    must be rewritten without the local recipient, so that a restart does not
    deliver it to the Maildir again (a clean stop is not a crash)."""
    relay = StallAfterDotRelay()
    config = load_config(write_config(
        tmp_path, sender={"relay": relay.address, "poll_interval": 60},
        local={"domains": ["localhost"]}))
    writer = QueueWriter(config.queue.dir)
    first = writer.store("a@example.com", ["b@example.org"], b"Subject: 1\r\n\r\none\r\n")
    second = writer.store("a@example.com", ["u@localhost", "c@example.org"],
                          b"Subject: 2\r\n\r\ntwo\r\n")
    os.utime(config.queue.dir / first, ns=(1, 1))  # oldest first: first, then second

    def start_runner(stop: threading.Event) -> tuple[QueueReader, QueueRunner]:
        reader = QueueReader(config.queue.dir, config.queue.failed, config.queue.quarantine)
        assert reader.try_lock()
        log = EventLog("S-SMTP", "-")
        return reader, QueueRunner(
            config, reader, log, relays=build_relays(config, log, stop),
            local=LocalDelivery(config.local.maildir), stop=stop)

    stop = threading.Event()
    reader, runner = start_runner(stop)
    worker = threading.Thread(target=runner.run_pass)
    worker.start()
    try:
        assert relay.got_dot.wait(10)
        stop.set()  # TERM
        worker.join(30)
        assert not worker.is_alive()
    finally:
        runner.close_relay()
        reader.close()
        relay.close()
    maildir = mailbox.Maildir(config.local.maildir / "u", create=False)
    assert len(maildir) == 1
    # The local recipient is done and gone from the file; the remote one is left.
    assert QueueFile.from_bytes((config.queue.dir / second).read_bytes()).recipients == (
        "c@example.org",)
    reader, runner = start_runner(threading.Event())  # the next start
    runner.settler.load_states()
    runner.run_pass()
    runner.close_relay()
    reader.close()
    assert len(mailbox.Maildir(config.local.maildir / "u", create=False)) == 1


# ---------------------------------------------------------------------------- time

class ClockMovingHandler(RecordingHandler):
    """An aiosmtpd handler whose DATA takes (fake) time: it moves the runner's clock
    on by `seconds` before it answers, as a slow relay would."""

    def __init__(self, clock: FakeClock, seconds: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clock = clock
        self.seconds = seconds

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.clock.advance(self.seconds)
        return await super().handle_DATA(server, session, envelope)


def test_backoff_counts_from_the_failure_not_from_the_start_of_the_pass(setup) -> None:
    """The relay takes 300 s (of the fake clock) to say 451: the retry is 10 s after
    that answer. Computed from the start of the pass it would already be due."""
    handler = ClockMovingHandler(FakeClock(), 300.0, data_reply="451 4.3.0 later")
    server = Relay(handler=handler).start()
    try:
        env = setup(server.address)
        handler.clock = env.clock
        queue_id = env.writer.store("a@example.com", ["b@example.org"], DATA)
        env.pass_at(5000.0)
        env.runner.close_relay()
    finally:
        server.stop()
    assert env.runner.settler.states[queue_id].next_attempt == 5000.0 + 300.0 + 10.0
    assert env.runner.sleep_time(env.clock()) == pytest.approx(10.0)


def test_a_relay_failure_backs_off_from_the_time_it_failed(setup) -> None:
    """A relay that hangs until the greeting timeout: its retry counts from then."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    env = setup(f"127.0.0.1:{port}", greeting_timeout=0.5)
    env.writer.store("a@example.com", ["b@example.org"], DATA)
    real_start = time.monotonic()

    class Clock(FakeClock):  # fake time that follows the real time of the wait
        def __call__(self) -> float:
            return 5000.0 + (time.monotonic() - real_start)

    env.runner.clock = Clock()
    try:
        env.runner.run_pass()
    finally:
        listener.close()
    retry = env.relay_state.retry_at
    assert retry >= 5000.0 + 0.5 + 10.0 - 0.05  # greeting timeout, then retry_initial


class SilentRelay(LoopbackRelay):
    """Accepts and never says a word (a relay stuck before its greeting)."""

    def session(self, conn) -> None:  # noqa: ANN001
        self.stop.wait(30)


def test_local_delivery_never_waits_for_a_relay_attempt(setup) -> None:
    """The oldest message is for a relay that never greets (greeting timeout 30 s);
    the two local messages behind it are delivered at once, while the pass waits."""
    relay = SilentRelay()
    env = setup(relay.address, greeting_timeout=30)
    remote = env.writer.store("a@example.com", ["b@example.org"], DATA)
    locals_ = [env.writer.store("a@example.com", [f"u{n}@localhost"], DATA) for n in range(2)]
    os.utime(env.config.queue.dir / remote, ns=(1, 1))  # the oldest
    worker = threading.Thread(target=env.runner.run_pass)
    started = time.monotonic()
    worker.start()
    try:
        for n in range(2):
            new = env.config.local.maildir / f"u{n}" / "new"
            while not (new.exists() and any(new.iterdir())):
                assert time.monotonic() - started < 5, "local mail waited for the relay"
                time.sleep(0.02)
        assert worker.is_alive()  # the relay attempt is still going on
    finally:
        env.stop.set()
        worker.join(10)
        relay.close()
    assert not worker.is_alive()
    assert env.queued() == [remote] and set(locals_).isdisjoint(env.queued())


# ---------------------------------------------------------------------------- state on disk

def test_a_restart_honours_deferrals_and_holds(setup) -> None:
    handler = RecordingHandler(data_reply="451 4.3.0 later")
    server = Relay(handler=handler).start()
    try:
        env = setup(server.address)
        queue_id = env.writer.store("a@example.com", ["b@example.org"], DATA)
        env.pass_at(5000.0)
        state = env.runner.settler.states[queue_id]
        assert (state.attempts, state.next_attempt) == (1, 5010.0)
        assert "451" in state.last_reply
        handler.data_reply = None
        restarted = env.make_runner()  # a new process: only the disk remembers
        env.runner = restarted
        restarted.settler.load_states()
        assert restarted.settler.states[queue_id] == state
        assert env.pass_at(5005.0) is False  # not sent again early
        assert env.pass_at(5010.0) is True
        env.runner.close_relay()
        handler.wait_for(1)
    finally:
        server.stop()
    assert env.queued() == [] and queue_id not in env.runner.settler.states
    assert os.listdir(env.config.queue.dir / ".state") == []  # no state lingers


# ---------------------------------------------------------------------------- bad files

def test_a_control_byte_in_an_address_cannot_stop_delivery(setup, log_lines) -> None:
    """Such a file used to parse, then crash the runner when the message had to be
    failed (the writer refused the address): the sender exited, supervisord gave up,
    and the mail behind it was never sent."""
    env = setup(None)
    bad = new_queue_id()
    (env.config.queue.dir / bad).write_bytes(
        b"From: <a@example.com>\nTo: <bad\x01box@localhost>\n\nx\r\n")
    good = env.writer.store("a@example.com", ["you@localhost"], DATA)
    assert env.pass_at(1e9 + 5)
    assert env.queued() == []
    assert bad in os.listdir(env.config.queue.quarantine) and good not in env.failed()
    assert len(list((env.config.local.maildir / "you" / "new").iterdir())) == 1


def test_entries_that_are_no_file_are_quarantined(setup, log_lines) -> None:
    env = setup(None)
    queue_dir = env.config.queue.dir
    os.symlink("/etc/passwd", queue_dir / "link")
    os.mkfifo(queue_dir / "fifo")
    (queue_dir / "folder").mkdir()
    good = env.writer.store("a@example.com", ["you@localhost"], DATA)
    assert env.pass_at(1e9 + 5)
    assert env.queued() == [] and good not in os.listdir(env.config.queue.quarantine)
    for name, kind in (("link", "symlink"), ("fifo", "fifo"), ("folder", "folder")):
        assert os.path.lexists(env.config.queue.quarantine / name)
        assert kind in (env.config.queue.quarantine / (name + REASON_SUFFIX)).read_text()
    assert not any(os.path.lexists(queue_dir / n) for n in ("link", "fifo", "folder"))


@pytest.fixture
def other_filesystem(tmp_path: Path):
    with tiny_tmpfs(tmp_path / "other-fs", "64k") as mount:
        yield mount


def test_what_cannot_be_quarantined_stays_logged_once_and_mail_flows(
    tmp_path: Path, other_filesystem: Path, log_lines
) -> None:
    """The quarantine on another filesystem: the rename fails (EXDEV). The garbage
    stays in place, is logged once, and the good message behind it is delivered."""
    config = load_config(write_config(
        tmp_path, sender={"relay": ""},
        queue={"dir": "var/queue", "quarantine_dir": str(other_filesystem / "q")}))
    writer = QueueWriter(config.queue.dir)
    reader = QueueReader(config.queue.dir, config.queue.failed, config.queue.quarantine)
    assert reader.try_lock()
    runner = QueueRunner(config, reader, EventLog("S-SMTP", "-"), relays=build_relays(
        config, EventLog("S-SMTP", "-"), threading.Event()))
    garbage = new_queue_id()
    (config.queue.dir / garbage).write_bytes(b"not a queue file")
    good = writer.store("a@example.com", ["you@localhost"], DATA)
    try:
        for _ in range(3):
            runner.run_pass()
    finally:
        reader.close()
    assert [e.name for e in reader.scan().ready] == [garbage]
    assert good not in os.listdir(config.queue.dir)
    stuck = [line for line in log_lines if f"id={garbage}" in line and " stuck fail " in line]
    assert len(stuck) == 1 and "move=quarantine" in stuck[0]


def test_a_failure_that_cannot_be_recorded_is_not_sent_again(
    tmp_path: Path, other_filesystem: Path, log_lines
) -> None:
    """The failed folder is full (ENOSPC): the 550'd message cannot be moved there. It
    stays queued and logged once, is NOT offered to the relay again, and moves as
    soon as there is room."""
    handler = RecordingHandler(rcpt_replies={"gone@example.org": "550 5.1.1 no such user"})
    server = Relay(handler=handler).start()
    (other_filesystem / "filler").write_bytes(b"x" * 60_000)
    config = load_config(write_config(
        tmp_path, sender={"relay": server.address},
        queue={"dir": "var/queue", "failed_dir": str(other_filesystem / "failed")}))
    writer = QueueWriter(config.queue.dir)
    reader = QueueReader(config.queue.dir, config.queue.failed, config.queue.quarantine)
    assert reader.try_lock()
    log = EventLog("S-SMTP", "-")
    runner = QueueRunner(config, reader, log, relays=build_relays(config, log,
                                                                   threading.Event()))
    queue_id = writer.store("a@example.com", ["gone@example.org"], DATA * 400)
    try:
        for _ in range(3):
            runner.run_pass()
        runner.close_relay()
        assert [e.name for e in reader.scan().ready] == [queue_id]
        assert handler.sessions_with_mail <= 1  # tried once, not again
        rcpts = [line for line in log_lines if f"id={queue_id}" in line and "failed fail" in line]
        assert len(rcpts) == 1
        assert len([x for x in log_lines if f"id={queue_id}" in x and " stuck " in x]) == 1
        (other_filesystem / "filler").unlink()
        assert runner.run_pass() is True
        assert reader.scan().ready == []
        assert queue_id in os.listdir(config.queue.failed)
    finally:
        reader.close()
        server.stop()


class UnreadableReader(QueueReader):
    """A reader for which one file cannot be read (EIO): root reads whatever the
    permissions say, so the error is made here, around the real reader."""

    bad = ""

    def read(self, path, size=None):  # noqa: ANN001, ANN201
        if os.path.basename(path) == self.bad:
            raise OSError(5, "Input/output error")
        return super().read(path, size)


def test_an_unreadable_file_backs_off_and_is_quarantined_when_it_expires(
    tmp_path: Path, log_lines
) -> None:
    config = load_config(write_config(tmp_path, sender={
        "retry_initial": 10, "retry_max": 40, "max_queue_lifetime": 100}))
    writer = QueueWriter(config.queue.dir)
    reader = UnreadableReader(config.queue.dir, config.queue.failed, config.queue.quarantine)
    assert reader.try_lock()
    clock = FakeClock()
    runner = QueueRunner(config, reader, EventLog("S-SMTP", "-"), clock=clock,
                         relays=build_relays(config, EventLog("S-SMTP", "-"),
                                             threading.Event()))
    reader.bad = writer.store("a@example.com", ["you@localhost"], DATA)
    arrived = arrival_time(reader.bad, 0)
    try:
        clock.set(arrived + 1)
        runner.run_pass()
        assert runner.settler.states[reader.bad].next_attempt == arrived + 11
        clock.set(arrived + 5)
        runner.run_pass()  # not due: not read again
        assert len([x for x in log_lines if " read fail " in x]) == 1
        clock.set(arrived + 101)
        runner.run_pass()
    finally:
        reader.close()
    assert reader.bad in os.listdir(config.queue.quarantine)
    assert "max_queue_lifetime" in (config.queue.quarantine /
                                    (reader.bad + REASON_SUFFIX)).read_text()


def test_a_queue_folder_that_cannot_be_read_is_logged_once_and_survived(
    setup, log_lines
) -> None:
    env = setup(None)
    queue_dir = env.config.queue.dir
    aside = queue_dir.with_name("aside")
    os.rename(queue_dir, aside)
    try:
        for _ in range(3):
            assert env.pass_at(1e9 + 5) is False
    finally:
        os.rename(aside, queue_dir)
    assert len([x for x in log_lines if " queue fail " in x]) == 1
    env.writer.store("a@example.com", ["you@localhost"], DATA)
    assert env.pass_at(1e9 + 6) is True
    assert any(" queue ok " in x and "readable again" in x for x in log_lines)


# ---------------------------------------------------------------------------- operators

class Running:
    """The runner's loop on a thread of its own, with the real clock, as the sender
    runs it; requests come from the test's thread, as from the control socket."""

    def __init__(self, env: Setup) -> None:
        self.env = env
        env.runner.clock = time.time
        self.wake = threading.Event()
        self.thread = threading.Thread(target=env.runner.run, args=(self.wake,), daemon=True)
        self.thread.start()

    def request(self, action: str, *ids: str) -> dict[str, str]:
        result = self.env.runner.request(action, ids, timeout=10)
        assert result is not None, "the runner did not answer"
        return result

    def stop(self) -> None:
        self.env.stop.set()
        self.wake.set()
        self.thread.join(15)
        assert not self.thread.is_alive()


def test_hold_release_and_delete_at_rest(setup) -> None:
    handler = RecordingHandler(data_reply="451 4.3.0 later")
    server = Relay(handler=handler).start()
    env = setup(server.address, retry_initial=3600, retry_max=3600)
    kept, dropped = (env.writer.store("a@example.com", [f"{n}@example.org"], DATA)
                     for n in ("kept", "dropped"))
    running = Running(env)
    try:
        wait = time.monotonic() + 10
        while not {kept, dropped} <= set(env.runner.settler.states) and time.monotonic() < wait:
            time.sleep(0.02)  # both deferred for an hour
        handler.data_reply = None
        assert running.request("hold", kept) == {kept: "held"}
        assert running.request("hold", kept) == {kept: "already held"}
        assert running.request("delete", dropped, "nosuchid") == {
            dropped: "deleted", "nosuchid": "not in the queue"}
        assert running.request("flush") == {}  # nothing deferred that is not held
        time.sleep(0.3)
        assert handler.messages == [] and env.queued() == [kept]
        assert env.runner.settler.states[kept].held
        assert running.request("release", kept) == {kept: "released"}
        (got,) = handler.wait_for(1)
        assert got.rcpt_tos == ["kept@example.org"]
    finally:
        running.stop()
        server.stop()
    assert env.queued() == [] and os.listdir(env.config.queue.dir / ".state") == []


def test_flush_makes_deferred_mail_and_the_relay_due_at_once(setup) -> None:
    relay = Relay()
    env = setup(relay.address, retry_initial=3600, retry_max=3600,  # nothing listens yet
                relay_retry=3600)
    queue_id = env.writer.store("a@example.com", ["b@example.org"], DATA)
    running = Running(env)
    try:
        wait = time.monotonic() + 10
        while queue_id not in env.runner.settler.states and time.monotonic() < wait:
            time.sleep(0.02)
        assert env.runner.settler.states[queue_id].next_attempt > time.time() + 900  # at expiry
        relay.start()
        started = time.monotonic()
        assert running.request("flush") == {queue_id: "due now"}
        relay.handler.wait_for(1)
        assert time.monotonic() - started < 2
    finally:
        running.stop()
        relay.stop()


def test_a_hold_during_the_attempt_applies_if_the_attempt_does_not_deliver(setup) -> None:
    handler = RecordingHandler(data_reply="451 4.3.0 later", data_delay=1.0)
    server = Relay(handler=handler).start()
    env = setup(server.address)
    queue_id = env.writer.store("a@example.com", ["b@example.org"], DATA)
    running = Running(env)
    try:
        assert handler.in_data.wait(10)
        assert running.request("hold", queue_id) == {
            queue_id: "being delivered now: held unless this attempt delivers it"}
        wait = time.monotonic() + 10
        while queue_id not in env.runner.settler.states and time.monotonic() < wait:
            time.sleep(0.02)
        state = env.runner.settler.states[queue_id]
        assert state.held and state.attempts == 1
    finally:
        running.stop()
        server.stop()
    assert env.queued() == [queue_id]


@pytest.mark.parametrize("action", ["hold", "delete"])
def test_a_change_during_the_attempt_holds_when_the_disk_is_full_at_its_end(
        tmp_path: Path, action: str, log_lines) -> None:
    """The queue's disk is full when the attempt ends with a 451: neither the
    deferral nor the operator's hold can be written, and the move is stuck. The
    operator's change still happens: a delete at once (an unlink needs no room), a
    hold once there is room again - on disk, where a restart reads it, not only in
    the memory of this process."""
    handler = RecordingHandler(data_reply="451 4.3.0 later", data_delay=1.0)
    server = Relay(handler=handler).start()
    with tiny_tmpfs(tmp_path / "queue-fs", "64k") as mount:
        env = Setup(tmp_path, server.address, {"queue": {"dir": str(mount / "queue")}},
                    retry_initial=3600, retry_max=3600)
        queue_id = env.writer.store("a@example.com", ["b@example.org"], DATA)
        running = Running(env)
        try:
            assert handler.in_data.wait(10)
            filler = fill_disk(mount)
            done = "held" if action == "hold" else "deleted"
            assert running.request(action, queue_id) == {
                queue_id: f"being delivered now: {done} unless this attempt delivers it"}
            wait_until(lambda: any(f"id={queue_id}" in x and " stuck fail " in x
                                   for x in log_lines), 10, "the stuck move")
            filler.unlink()
            running.wake.set()  # a pass, as the next poll would start
            if action == "delete":
                wait_until(lambda: env.queued() == [], 10, "the delete")
            else:
                wait_until(lambda: any(f"id={queue_id}" in x and " unstuck ok " in x
                                       for x in log_lines), 10, "the move, once there is room")
            running.stop()
            if action == "delete":
                assert env.queued() == []
            else:
                assert env.queued() == [queue_id]
                on_disk, _unreadable = StateStore(env.config.queue.dir).load_all()  # a restart's
                assert on_disk[queue_id].held and on_disk[queue_id].attempts == 1
        finally:
            if running.thread.is_alive():
                running.stop()
            env.close()
            server.stop()


def test_a_request_after_the_runners_end_is_refused_never_left_waiting(setup) -> None:
    env = setup(None)
    queue_id = env.writer.store("a@example.com", ["b@example.org"], DATA)
    running = Running(env)
    running.stop()
    with pytest.raises(RunnerEnded):
        env.runner.request("hold", [queue_id], timeout=10)
    assert not env.runner.settler.states.get(queue_id, BLANK).held  # not applied


class SlowForSome(RecordingHandler):
    """Holds the reply to the final dot of messages for slow@ recipients."""

    async def handle_DATA(self, server, session, envelope):  # noqa: N802, ANN001, ANN201
        if any(r.startswith("slow@") for r in envelope.rcpt_tos):
            self.in_data.set()
            await asyncio.sleep(1.5)
        return await super().handle_DATA(server, session, envelope)


def test_a_delivered_message_whose_unlink_still_waits_is_not_held(setup, log_lines) -> None:
    handler = SlowForSome()
    server = Relay(handler=handler).start()
    env = setup(server.address)
    done = env.writer.store("a@example.com", ["fast@example.org"], DATA)
    env.writer.store("a@example.com", ["slow@example.org"], DATA)
    running = Running(env)
    try:
        assert handler.in_data.wait(10)
        wait = time.monotonic() + 10  # `done` was delivered, its unlink waits behind
        while not any(f"sent ok id={done}" in x for x in log_lines) and time.monotonic() < wait:
            time.sleep(0.01)
        assert (env.config.queue.dir / done).exists()
        assert running.request("hold", done) == {done: "not in the queue"}
    finally:
        running.stop()
        server.stop()
    assert os.listdir(env.config.queue.dir / ".state") == []
