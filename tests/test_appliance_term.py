"""Graceful TERM through supervisord (SPEC §6), the way the owner uses it.

Nothing here calls a stop function: supervisord runs the programs from the
repository's `supervisord.conf`, the signal comes from `supervisorctl signal TERM`
or `supervisorctl stop`, and what we look at is what a user sees: SMTP replies,
queue files, `supervisorctl status`, supervisord's record of the exit status.
"""

from __future__ import annotations

import smtplib
import socket
import time
from collections.abc import Iterator

import pytest

from services.receiver import replies as R
from shared.queue import QueueFile
from shared.smtp import Reply, ReplyParser
from tests.appliance_support import Appliance, Upstream, wait_until
from tests.trace_support import assert_as_sent

pytestmark = pytest.mark.e2e

TIMEOUT = 10.0


class LineClient:
    """A plain SMTP client over a real socket that can stop in the middle of DATA."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=TIMEOUT)
        self.parser = ReplyParser()
        self.pending: list[Reply] = []

    def reply(self) -> Reply:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the server")
            self.pending.extend(self.parser.feed(data))
        return self.pending.pop(0)

    def command(self, line: str) -> Reply:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def at_eof(self) -> bool:
        """True when the server has closed (EOF or reset) and nothing more comes."""
        try:
            return self.sock.recv(65536) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def appliance_factory() -> Iterator:
    made: list[Appliance] = []

    def make(**sections) -> Appliance:
        appliance = Appliance(**sections)
        made.append(appliance)
        return appliance

    yield make
    for appliance in made:
        appliance.cleanup()


def test_term_to_receiver_finishes_data_in_progress_and_closes_the_rest(appliance_factory):
    app = appliance_factory().start()
    app.wait_running("receiver")
    # The sender would take the message out of the queue; here we look at the queue.
    app.ctl("stop", "sender")
    app.wait_state("sender", "STOPPED", "FATAL", "EXITED")
    receiver_pid = app.info("receiver")["pid"]

    in_data = LineClient(app.listen)
    assert in_data.reply().code == 220
    assert in_data.command("EHLO client.example").code == 250
    assert in_data.command("MAIL FROM:<alice@example.com>").code == 250
    assert in_data.command("RCPT TO:<bob@example.org>").code == 250
    assert in_data.command("RCPT TO:<carol@example.net>").code == 250
    assert in_data.command("DATA").code == R.S354_START_DATA.code
    first_half = b"Subject: graceful\r\n\r\nfirst half of the body\r\n"
    in_data.send(first_half)

    idle = LineClient(app.listen)
    assert idle.reply().code == 220
    assert idle.command("HELO idle.example").code == 250

    signalled = app.ctl("signal", "TERM", "receiver")
    assert signalled.returncode == 0, signalled.stdout + signalled.stderr

    # Every other open session: 421 (shutdown), then closed by the server.
    closing = idle.reply()
    assert (closing.code, closing.text) == (R.S421_SHUTDOWN.code, R.S421_SHUTDOWN.format(
        hostname=app.config.hostname).text)
    assert idle.at_eof()
    # It stopped accepting at once.
    wait_until(lambda: not app.answers_220(), 3.0, "the receiver to stop accepting")

    # The DATA in progress finishes and is acknowledged.
    second_half = b"second half, sent after TERM\r\n"
    in_data.send(second_half + b".\r\n")
    queued = in_data.reply()
    assert queued.code == 250, queued
    queue_id = queued.text.rsplit(" ", 1)[-1]
    in_data.close()
    idle.close()

    # The receiver exits 0 within a few seconds; supervisord sees an expected exit.
    info = app.wait_state("receiver", "EXITED", "BACKOFF", "FATAL", timeout=10.0)
    assert info["statename"] == "EXITED", info
    assert info["exitstatus"] == 0, info
    status = app.ctl("status", "receiver").stdout
    assert "EXITED" in status, status
    assert "exited: receiver (exit status 0; expected)" in app.supervisord_log()

    # Nothing acknowledged is lost: the queue holds exactly what was sent.
    files = {p.name: p for p in app.queued_files()}
    assert queue_id in files, (queue_id, list(files))
    message = QueueFile.from_bytes(files[queue_id].read_bytes())
    assert message.sender == "alice@example.com"
    assert message.recipients == ("bob@example.org", "carol@example.net")
    assert_as_sent(message.data, first_half + second_half, queue_id=queue_id)
    lines = app.log_lines()
    assert any(f"queued ok id={queue_id}" in line for line in lines), lines
    assert any("R-SMTP - stop info signal=SIGTERM" in line for line in lines), lines

    # `supervisorctl start all` brings it back, as a new process.
    started = app.ctl("start", "all")
    assert started.returncode == 0, started.stdout + started.stderr
    app.wait_running("receiver")
    assert app.info("receiver")["pid"] != receiver_pid
    wait_until(app.answers_220, TIMEOUT, "the restarted receiver's 220")

    app.shutdown()


def test_a_bad_config_is_fatal_with_one_clear_line(appliance_factory):
    app = appliance_factory()
    text = app.config_path.read_text()
    app.config_path.write_text(text.replace("[receiver]\n", "[receiver]\nmax_connections = 0\n"))
    app.start()
    wait_until(
        lambda: "exited: receiver (exit status 2; not expected)" in app.supervisord_log(),
        TIMEOUT, "the receiver's exit with status 2",
    )
    # Exited before startsecs: supervisord backs off and, after startretries, gives up.
    assert app.info("receiver")["statename"] in ("BACKOFF", "STARTING", "FATAL")
    output = (app.var / "log" / "receiver.out").read_text()
    assert "receiver: error: receiver.max_connections: must be greater than 0" in output
    assert "Traceback" not in output
    start = time.monotonic()
    app.shutdown()
    assert time.monotonic() - start < 10


def test_term_to_sender_ends_the_transaction_in_flight_sends_quit_and_exits_0(
    appliance_factory,
):
    with Upstream(hold=True) as upstream:
        app = appliance_factory(sender={"relay": upstream.address, "poll_interval": 60})
        app.start()
        app.wait_running("receiver", "sender")
        stopped = app.ctl("stop", "sender")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert app.info("sender")["exitstatus"] == 0

        # Two messages wait in the queue while the sender is down.
        sent: list[bytes] = []
        for n in (1, 2):
            data = f"Subject: message {n}\r\n\r\nbody {n}\r\n".encode()
            with smtplib.SMTP(*app.listen, timeout=TIMEOUT) as client:
                client.sendmail("alice@example.com", [f"remote{n}@example.org"], data)
            sent.append(data)
        queued = [QueueFile.from_bytes(p.read_bytes()) for p in app.queued_files()]
        assert len(queued) == len(sent)
        for message, data in zip(queued, sent, strict=True):
            assert_as_sent(message.data, data)

        # The sender starts on the oldest; the relay holds the reply to its final dot.
        assert app.ctl("start", "sender").returncode == 0
        assert upstream.data_started.wait(TIMEOUT), "the sender never reached DATA"
        signalled = app.ctl("signal", "TERM", "sender")
        assert signalled.returncode == 0, signalled.stdout + signalled.stderr
        time.sleep(1.0)  # the scenario: a slow relay answers 1 s after the TERM
        upstream.release.set()

        info = app.wait_state("sender", "EXITED", "BACKOFF", "FATAL", timeout=TIMEOUT)
        assert (info["statename"], info["exitstatus"]) == ("EXITED", 0), info
        assert "exited: sender (exit status 0; expected)" in app.supervisord_log()
        # The transaction in flight got its 250 and left the queue; QUIT was sent;
        # the next message was not started and is still queued.
        assert len(upstream.messages) == 1
        assert_as_sent(upstream.messages[0][2], sent[0])
        assert upstream.quits == 1
        [left] = [QueueFile.from_bytes(p.read_bytes()).data for p in app.queued_files()]
        assert_as_sent(left, sent[1])

        # After a restart the rest is delivered, each message exactly once.
        assert app.ctl("start", "all").returncode == 0
        wait_until(lambda: len(upstream.messages) == 2 and not app.queued_files(),
                   TIMEOUT, "the second message to be delivered")
        for (_sender, _recipients, data), sent_data in zip(upstream.messages, sent, strict=True):
            assert_as_sent(data, sent_data)
        assert [m[1] for m in upstream.messages] == [("remote1@example.org",),
                                                     ("remote2@example.org",)]
        wait_until(lambda: upstream.quits == 2, TIMEOUT, "the sender's QUIT")
        app.shutdown()
