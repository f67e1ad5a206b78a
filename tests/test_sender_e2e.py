"""The chain with real processes: receiver -> queue -> sender -> a real relay / Maildir.

`python -m services.sender --config FILE` runs exactly as supervisord starts it; the
relay is aiosmtpd (in this test process) or Postfix's smtp-sink.
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.config import Config, load_config
from shared.queue import QueueWriter
from tests.sender_support import Relay, SmtpSink, authenticator
from tests.support import REPO, MailbagProcess, TestCA, write_config
from tests.trace_support import assert_as_sent

pytestmark = pytest.mark.e2e

FAST = {"retry_initial": 0.3, "retry_max": 0.6, "poll_interval": 60,
        "connect_timeout": 2, "greeting_timeout": 5, "command_timeout": 5}


def wait_until(condition: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or condition}")


def log_text(config: Config) -> str:
    return config.log.file.read_text() if config.log.file.exists() else ""


def queued(config: Config) -> list[str]:
    """Messages still in the queue: ready in queue.dir (dot names are not messages)."""
    return sorted(p.name for p in config.queue.dir.iterdir()
                  if p.is_file() and not p.name.startswith("."))


@pytest.fixture
def sender_factory():
    started: list[MailbagProcess] = []

    def start(config_path: Path, until: str = "S-SMTP - start ok") -> MailbagProcess:
        """Start a sender; return once the log shows `until` once more (or it died)."""
        config = load_config(config_path)
        before = log_text(config).count(until)
        proc = MailbagProcess("sender", config_path).start()
        started.append(proc)
        wait_until(lambda: log_text(config).count(until) > before
                   or proc.proc.poll() is not None, what="the sender to start")
        assert proc.proc.poll() is None, proc.stderr_text()
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def relay():
    servers: list[Relay] = []

    def make() -> Relay:
        servers.append(Relay())
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


def swaks(port: int, to: str, data_file: Path) -> None:
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--from", "alice@example.com",
         "--to", to, "--data", f"@{data_file}", "--helo", "client.test"],
        capture_output=True, timeout=20, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_swaks_to_relay_woken_by_watchdog_byte_identical(
    receiver_factory, sender_factory, relay, tmp_path: Path
) -> None:
    server = relay().start()
    config, _ = receiver_factory(sender={**FAST, "relay": server.address})
    sender = sender_factory(config.path)
    content = (b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: e2e\r\n\r\n"
               b"first line\r\n.a dot line\r\n..two dots\r\nlast\r\n")
    data_file = tmp_path / "message.eml"
    data_file.write_bytes(content)
    swaks(config.receiver.listen.port, "bob@example.org", data_file)
    # poll_interval is 60 s: arriving well before that means the watchdog woke the
    # sender (how fast it is, is the benchmark's business: bench/run.py "250 -> upstream").
    (got,) = server.handler.wait_for(1, timeout=10)
    # swaks always ends the data with "\r\n.\r\n", so what the receiver queued is
    # the file plus one empty line (and our trace); the relay has exactly that.
    assert_as_sent(got.content, content + b"\r\n", recipients=["bob@example.org"])
    assert got.mail_from == "alice@example.com" and got.rcpt_tos == ["bob@example.org"]
    wait_until(lambda: queued(config) == [], what="the queue to empty")
    server.handler.wait_quits(1)  # the pass ended with QUIT
    assert sender.stop() == 0
    text = log_text(config)
    assert "S-SMTP 127.0.0.1:" in text and " sent ok id=" in text and "to=<bob@example.org>" in text


def test_relay_down_then_back(receiver_factory, sender_factory, relay) -> None:
    server = relay()  # not started: nothing listens on its port
    config, _ = receiver_factory(sender={**FAST, "relay": server.address})
    sender_factory(config.path)
    with smtplib.SMTP("127.0.0.1", config.receiver.listen.port, timeout=10) as client:
        client.sendmail("a@example.com", ["b@example.org"], b"Subject: wait\r\n\r\nhi\r\n")
    wait_until(lambda: "connect fail" in log_text(config), what="a connect failure")
    assert len(queued(config)) == 1  # it waits in the queue
    server.start()
    (got,) = server.handler.wait_for(1, timeout=10)
    assert_as_sent(got.content, b"Subject: wait\r\n\r\nhi\r\n")
    wait_until(lambda: queued(config) == [], what="the queue to empty")
    assert log_text(config).count("connect fail") >= 1


def test_relay_4xx_then_accepts(receiver_factory, sender_factory, relay) -> None:
    server = relay()
    server.handler.data_reply = "451 4.3.0 not now"
    server.start()
    config, _ = receiver_factory(sender={**FAST, "relay": server.address})
    sender_factory(config.path)
    with smtplib.SMTP("127.0.0.1", config.receiver.listen.port, timeout=10) as client:
        client.sendmail("a@example.com", ["b@example.org"], b"Subject: 4xx\r\n\r\nhi\r\n")
    wait_until(lambda: "deferred defer" in log_text(config), what="a deferral")
    assert len(queued(config)) == 1
    server.handler.data_reply = None
    assert_as_sent(server.handler.wait_for(1, timeout=10)[0].content, b"Subject: 4xx\r\n\r\nhi\r\n")
    wait_until(lambda: queued(config) == [], what="the queue to empty")


@pytest.mark.filterwarnings("ignore:Requiring AUTH")
def test_starttls_and_auth_from_the_config_file(
    tmp_path: Path, sender_factory, relay
) -> None:
    ca = TestCA(tmp_path)
    server = relay()
    server.smtp_kwargs.update(tls_context=ca.server_context(), require_starttls=True,
                              authenticator=authenticator({"mailbag": "s3cret pw"}),
                              auth_required=True)
    server.start()
    (tmp_path / "relay.password").write_text("s3cret pw\n")
    path = write_config(tmp_path, sender={
        **FAST, "relay": server.address, "tls": "starttls", "ca_file": str(ca.ca_file),
        "username": "mailbag", "password_file": "relay.password"})
    config = load_config(path)
    sender_factory(path)
    QueueWriter(config.queue.dir).store("a@example.com", ["b@example.org"], b"tls\r\n")
    (got,) = server.handler.wait_for(1)
    assert got.tls and got.content == b"tls\r\n"
    wait_until(lambda: queued(config) == [], what="the queue to empty")
    assert "s3cret" not in log_text(config)


def test_local_mail_lands_in_maildir(receiver_factory, sender_factory) -> None:
    config, _ = receiver_factory(sender=FAST)  # no relay needed for local mail
    sender_factory(config.path)
    with smtplib.SMTP("127.0.0.1", config.receiver.listen.port, timeout=10) as client:
        client.sendmail("a@example.com", ["you@localhost"], b"Subject: local\r\n\r\nhi\r\n")
    new = config.local.maildir / "you" / "new"
    wait_until(lambda: new.exists() and any(new.iterdir()), what="the Maildir file")
    (file,) = list(new.iterdir())
    header = b"Return-Path: <a@example.com>\nDelivered-To: you@localhost\n"
    assert file.read_bytes().startswith(header)
    wait_until(lambda: queued(config) == [], what="the queue to empty")
    assert "S-SMTP local sent ok" in log_text(config)


def test_a_second_sender_waits_delivers_nothing_and_takes_over_after_a_kill(
    tmp_path: Path, sender_factory, relay
) -> None:
    """One sender per queue: the second one waits for the queue lock; when the first
    dies (kill -9: the kernel drops its flock) it takes over, and nothing is lost."""
    server = relay().start()
    path = write_config(tmp_path, sender={**FAST, "relay": server.address})
    config = load_config(path)
    writer = QueueWriter(config.queue.dir)
    first = sender_factory(path)
    second = sender_factory(path, until="S-SMTP - standby info")
    count = 30
    for number in range(count):
        writer.store("a@example.com", ["b@example.org"], b"Subject: %d\r\n\r\nx\r\n" % number)
    server.handler.wait_for(count, timeout=20)
    wait_until(lambda: queued(config) == [], what="the queue to empty")
    text = log_text(config)
    (start,) = [line for line in text.splitlines() if "S-SMTP - start ok" in line]
    assert f"pid={first.proc.pid}" in start  # the second one never started delivering
    assert text.count("standby info") == 1 and "takeover" not in text
    assert second.proc.poll() is None

    # The first one is paused mid-queue, then killed: its lock goes with it.
    server.handler.data_delay = 60.0
    server.handler.in_data.clear()
    writer.store("a@example.com", ["b@example.org"], b"Subject: held\r\n\r\nx\r\n")
    assert server.handler.in_data.wait(10)
    first.proc.kill()
    first.proc.wait(10)
    server.handler.data_delay = 0.0
    for number in range(count, 2 * count):
        writer.store("a@example.com", ["b@example.org"], b"Subject: %d\r\n\r\nx\r\n" % number)
    wait_until(lambda: "takeover ok" in log_text(config), what="the standby to take over")
    wait_until(lambda: queued(config) == [], what="the queue to empty again")
    time.sleep(0.3)  # a duplicate, if any, would arrive now
    subjects = {m.content for m in server.handler.messages}
    expected = {b"Subject: %d\r\n\r\nx\r\n" % n for n in range(2 * count)}
    assert expected | {b"Subject: held\r\n\r\nx\r\n"} == subjects  # nothing lost
    # Exactly once, but for the one in flight at the kill (at-least-once).
    assert len(server.handler.messages) - len(subjects) <= 1


def test_term_on_standby_exits_0_and_leaves_the_queue_alone(
    tmp_path: Path, sender_factory
) -> None:
    path = write_config(tmp_path, sender=FAST)
    config = load_config(path)
    first = sender_factory(path)
    second = sender_factory(path, until="S-SMTP - standby info")
    second.signal(signal.SIGTERM)
    assert second.proc.wait(10) == 0
    assert first.proc.poll() is None  # the owner goes on
    assert log_text(config).count("S-SMTP - exit ok") == 1


def test_term_exits_0_and_leaves_undelivered_mail_queued(tmp_path: Path, sender_factory) -> None:
    path = write_config(tmp_path, sender=FAST)
    config = load_config(path)
    sender = sender_factory(path)
    QueueWriter(config.queue.dir).store("a@example.com", ["b@example.org"], b"x\r\n")
    wait_until(lambda: "waiting defer" in log_text(config), what="the waiting notice")
    sender.signal(signal.SIGTERM)
    assert sender.proc.wait(10) == 0
    assert len(queued(config)) == 1
    assert "S-SMTP - exit ok" in log_text(config)


@pytest.mark.parametrize(("delay", "delivered"), [(1.0, True), (60.0, False)],
                         ids=["finishes", "abandons"])
def test_term_during_a_transaction(
    tmp_path: Path, sender_factory, relay, delay: float, delivered: bool
) -> None:
    server = relay()
    server.handler.data_delay = delay
    server.start()
    path = write_config(tmp_path, sender={**FAST, "relay": server.address})
    config = load_config(path)
    sender = sender_factory(path)
    QueueWriter(config.queue.dir).store("a@example.com", ["b@example.org"], b"x\r\n")
    assert server.handler.in_data.wait(10)
    started = time.monotonic()
    sender.signal(signal.SIGTERM)
    assert sender.proc.wait(15) == 0
    assert time.monotonic() - started < 8
    if delivered:  # it got its 250: out of the queue, and the session ended with QUIT
        assert len(server.handler.wait_for(1)) == 1
        assert queued(config) == []
        server.handler.wait_quits(1)
    else:  # abandoned without a 250: still queued where it was
        assert len(queued(config)) == 1
    assert not (config.queue.dir / ".work").exists()


def test_idle_sender_uses_no_cpu(tmp_path: Path, sender_factory, relay) -> None:
    server = relay().start()
    path = write_config(tmp_path, sender={**FAST, "relay": server.address})
    sender = sender_factory(path)

    def cpu_seconds() -> float:
        fields = Path(f"/proc/{sender.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu_seconds()
    time.sleep(1.5)  # measuring, not synchronising: an idle sender must not spin
    assert cpu_seconds() - before < 0.05


def test_bad_password_file_is_a_one_line_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, sender={"relay": "127.0.0.1:1", "username": "u",
                                          "password_file": "missing.txt"})
    proc = MailbagProcess("sender", path).start()
    assert proc.proc.wait(10) == 2
    err = proc.stderr_text().strip()
    proc.stop()
    assert err.startswith("sender: error:") and "missing.txt" in err and "\n" not in err


@pytest.mark.skipif(not SmtpSink.available(), reason="postfix smtp-sink not installed")
def test_chain_to_smtp_sink_with_smuggling_queue_file(tmp_path: Path, sender_factory) -> None:
    sink = SmtpSink(tmp_path / "sink").start()
    try:
        path = write_config(tmp_path, sender={**FAST, "relay": sink.address})
        config = load_config(path)
        writer = QueueWriter(config.queue.dir)
        # A queue file written behind the receiver's back with every trick in it.
        body = (b"Subject: smuggle\r\n\r\na\n.\nMAIL FROM:<x@evil.example>\r\n"
                b"b\r.\r\nc\n.\r\nd\r\n.\ne\r\n.\0\r\nRCPT TO:<victim@example.org>\r\nend\r\n")
        writer.store("a@example.com", ["b@example.org"], body)
        sender_factory(path)
        wait_until(lambda: queued(config) == [], what="the queue to empty")
        wait_until(lambda: len(sink.dumps()) >= 1, what="smtp-sink's dump")
        time.sleep(0.2)
        (dump,) = sink.dumps()
        assert b"X-Rcpt-Args: <b@example.org>" in dump.read_bytes()
    finally:
        sink.stop()


def test_a_bad_address_in_a_queue_file_never_stops_the_sender(
    tmp_path: Path, sender_factory
) -> None:
    """A control byte in an address used to crash the sender (exit 1) at the moment the
    message had to be failed, at every restart: nothing behind it was delivered."""
    path = write_config(tmp_path, sender=FAST)
    config = load_config(path)
    config.queue.dir.mkdir(parents=True)
    bad = config.queue.dir / "18ec000000000000bad001"
    bad.write_bytes(b"From: <a@example.com>\nTo: <bad\x01box@localhost>\n\nx\r\n")
    os.utime(bad, ns=(1, 1))  # the oldest: in the way of the others
    sender = sender_factory(path)
    QueueWriter(config.queue.dir).store("a@example.com", ["you@localhost"], b"x\r\n")
    box = config.local.maildir / "you" / "new"
    wait_until(lambda: box.exists() and any(box.iterdir()), what="the good message")
    wait_until(lambda: queued(config) == [], what="the queue to empty")
    assert sender.proc.poll() is None
    assert bad.name in os.listdir(config.queue.quarantine)
    assert " crash " not in log_text(config)


def test_term_during_a_hanging_connect_exits_0_within_5_seconds(
    tmp_path: Path, sender_factory
) -> None:
    """The relay's SYN queue is full (a listener that never accepts, its backlog taken
    by two idle connections): the sender's connect hangs. TERM ends it at once, not
    after connect_timeout (which supervisord would have cut with a KILL)."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        path = write_config(tmp_path, sender={**FAST, "relay": f"127.0.0.1:{port}",
                                              "connect_timeout": 60})
        config = load_config(path)
        sender = sender_factory(path)
        QueueWriter(config.queue.dir).store("a@example.com", ["b@example.org"], b"x\r\n")
        time.sleep(1.0)  # the sender is inside its connect now
        assert sender.proc.poll() is None
        started = time.monotonic()
        sender.signal(signal.SIGTERM)
        assert sender.proc.wait(10) == 0
        assert time.monotonic() - started < 5
        assert queued(config) != []
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


CRASHING_SENDER = """
import sys
from shared.signals import StopFlag
stop = StopFlag().install()
import services.sender.runner as runner
def crash(self, wake):
    raise RuntimeError("an injected bug")
runner.QueueRunner.run = crash
from services.sender.app import main
from shared.cli import run_program
run_program("sender", "crashing sender", main, stop, ["--config", sys.argv[1]])
"""


def test_a_crash_is_never_logged_as_exit_ok(tmp_path: Path) -> None:
    path = write_config(tmp_path, sender=FAST)
    config = load_config(path)
    done = subprocess.run([sys.executable, "-c", CRASHING_SENDER, str(path)],
                          cwd=REPO, capture_output=True, timeout=30)
    assert done.returncode == 1
    lines = log_text(config).splitlines()
    assert any(" crash fail " in line and "an injected bug" in line for line in lines)
    (exit_line,) = [line for line in lines if " exit " in line]
    assert " exit fail " in exit_line and "status=1" in exit_line
