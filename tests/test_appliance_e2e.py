"""The whole appliance, the way its owner uses it (issue 4, SPEC §1, §5, §6).

supervisord runs from the repository's own `supervisord.conf` (a private instance:
see `tests/appliance_support.py`), a real upstream relay (aiosmtpd) listens on a
private port, and real mail programs send: `swaks`, `msmtp` and `mutt` (batch mode,
`smtp_url`). While the sender is stopped with `supervisorctl stop sender` the
messages wait in the queue, so we can compare what reaches the relay with what was
queued, byte for byte; `@localhost` mail must land in the Maildir. Then the
programs are stopped and started with supervisorctl, and `supervisorctl shutdown`
must leave no process behind.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from shared.queue import QueueFile
from tests.appliance_support import Appliance, Upstream, pid_alive, wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not all(shutil.which(tool) for tool in ("swaks", "msmtp", "mutt")),
        reason="needs the Debian packages swaks, msmtp and mutt (.ci/run installs them)",
    ),
]

TIMEOUT = 15.0


def run_tool(args: list[str], home: Path, stdin: bytes = b"") -> None:
    """Run a mail program with a private HOME (no ~/.muttrc, ~/.msmtprc); must exit 0."""
    done = subprocess.run(
        args, input=stdin, capture_output=True, timeout=TIMEOUT,
        env={"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
    )
    assert done.returncode == 0, (args[0], done.stdout.decode(errors="replace"),
                                  done.stderr.decode(errors="replace"))


def send_with_swaks(host: str, port: int, home: Path) -> None:
    run_tool(["swaks", "--server", host, "--port", str(port), "--helo", "client.example",
              "--from", "alice@example.com", "--to", "you@localhost,remote1@example.org",
              "--header", "Subject: from swaks", "--body", "Hello from swaks.\n.leading dot\n"],
             home)


def send_with_msmtp(host: str, port: int, home: Path) -> None:
    message = (b"From: bob@example.com\r\nTo: remote2@example.net\r\nSubject: from msmtp\r\n"
               b"\r\nHello from msmtp.\r\n..two dots\r\n")
    run_tool(["msmtp", "-C", "/dev/null", f"--host={host}", f"--port={port}",
              "--from=bob@example.com", "--auth=off", "--tls=off", "--domain=client.example",
              "remote2@example.net"], home, stdin=message)


def send_with_mutt(host: str, port: int, home: Path) -> None:
    settings = [
        f"set smtp_url=smtp://{host}:{port}", "set from=carol@example.com",
        "set use_from=yes", "set envelope_from=yes", "set hostname=client.example",
        "set ssl_starttls=no", "set ssl_force_tls=no", "set copy=no", "set record=",
    ]
    args = ["mutt", "-n", "-F", "/dev/null"]
    for setting in settings:
        args += ["-e", setting]
    args += ["-s", "from mutt", "--", "remote3@example.com"]
    run_tool(args, home, stdin=b"Hello from mutt.\n")


def queue_ids_in_log(lines: list[str], program: str, event: str) -> dict[str, int]:
    """queue id -> index of the first `program` line with `event` ... id=<queue id>."""
    found: dict[str, int] = {}
    pattern = re.compile(rf"\S+ {program} \S+ {event} ok id=(\w+)")
    for index, line in enumerate(lines):
        match = pattern.match(line)
        if match:
            found.setdefault(match.group(1), index)
    return found


def test_the_appliance_end_to_end(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    with Upstream() as upstream:
        app = Appliance(sender={"relay": upstream.address, "poll_interval": 60},
                        top={"hostname": "mailbag.test"})
        try:
            run_the_appliance(app, upstream, home)
        finally:
            app.cleanup()


def run_the_appliance(app: Appliance, upstream: Upstream, home: Path) -> None:
    host, port = app.listen
    app.start()
    app.wait_running("receiver", "sender")

    # 1. The sender stopped (graceful: exit 0): mail from three MUAs waits in the queue.
    stopped = app.ctl("stop", "sender")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    info = app.info("sender")
    assert (info["statename"], info["exitstatus"]) == ("STOPPED", 0), info
    send_with_swaks(host, port, home)
    send_with_msmtp(host, port, home)
    send_with_mutt(host, port, home)
    queued = {p.name: QueueFile.from_bytes(p.read_bytes()) for p in app.queued_files()}
    assert sorted(q.sender for q in queued.values()) == [
        "alice@example.com", "bob@example.com", "carol@example.com"]
    by_sender = {q.sender: q for q in queued.values()}
    assert by_sender["alice@example.com"].recipients == ("you@localhost", "remote1@example.org")
    assert b"\n.leading dot" in by_sender["alice@example.com"].data  # dot-unstuffed
    assert b"\r\n..two dots\r\n" in by_sender["bob@example.com"].data
    assert upstream.messages == []

    # 2. `supervisorctl start all`: everything is delivered, byte-identical.
    started = app.ctl("start", "all")
    assert started.returncode == 0, started.stdout + started.stderr
    wait_until(lambda: len(upstream.messages) == 3 and not app.queued_files(),
               TIMEOUT, "three messages at the upstream relay and an empty queue")
    relayed = {m[0]: m for m in upstream.messages}
    expected_rcpts = {"alice@example.com": ("remote1@example.org",),
                      "bob@example.com": ("remote2@example.net",),
                      "carol@example.com": ("remote3@example.com",)}
    for sender, rcpts in expected_rcpts.items():
        mail_from, rcpt_tos, data = relayed[sender]
        assert rcpt_tos == rcpts
        assert data == by_sender[sender].data, f"{sender}: not byte-identical"
    local = wait_until(lambda: app.maildir_new("you"), TIMEOUT, "the Maildir delivery")
    assert len(local) == 1
    swaks_data = by_sender["alice@example.com"].data
    assert local[0].read_bytes() == (
        b"Return-Path: <alice@example.com>\nDelivered-To: you@localhost\n"
        + swaks_data.replace(b"\r\n", b"\n")
    )

    # 3. The shared log tells the story: R-SMTP queued (with the client), then S-SMTP.
    lines = app.log_lines()
    received = queue_ids_in_log(lines, "R-SMTP", "queued")
    delivered = queue_ids_in_log(lines, "S-SMTP", "sent")
    assert set(queued) <= set(received) and set(queued) <= set(delivered), lines
    for queue_id in queued:
        assert received[queue_id] < delivered[queue_id], (queue_id, lines)
        line = lines[received[queue_id]]
        assert line.split(" ")[2].startswith("127.0.0.1:") and line.endswith(" tls=no"), line
    relay_peer = f" S-SMTP {upstream.address} sent ok id="
    assert sum(relay_peer in line for line in lines) == 3, lines
    swaks_id = next(qid for qid, q in queued.items() if q.sender == "alice@example.com")
    local_line = f" S-SMTP local sent ok id={swaks_id} to=<you@localhost> "
    assert sum(local_line in line for line in lines) == 1, lines

    # 4. TERM to the receiver: exit 0, shown as EXITED; start all brings it back.
    assert app.ctl("signal", "TERM", "receiver").returncode == 0
    info = app.wait_state("receiver", "EXITED", "BACKOFF", "FATAL", timeout=TIMEOUT)
    assert (info["statename"], info["exitstatus"]) == ("EXITED", 0), info
    assert "EXITED" in app.ctl("status", "receiver").stdout
    assert not app.answers_220()
    assert app.ctl("restart", "sender").returncode == 0
    assert app.ctl("start", "all").returncode == 0
    app.wait_running("receiver", "sender")
    wait_until(app.answers_220, TIMEOUT, "the restarted receiver's 220")
    send_with_swaks(host, port, home)
    wait_until(lambda: len(upstream.messages) == 4 and len(app.maildir_new("you")) == 2,
               TIMEOUT, "delivery after the restart")
    status = app.ctl("status")
    assert status.returncode == 0 and status.stdout.count("RUNNING") == 2, status.stdout

    # 5. `supervisorctl shutdown` leaves no process behind.
    pids = {app.supervisord_pid, app.info("receiver")["pid"], app.info("sender")["pid"],
            *app.seen_pids}
    done = app.shutdown()
    assert done.returncode == 0, done.stdout + done.stderr
    wait_until(lambda: not [pid for pid in pids if pid and pid_alive(pid)], TIMEOUT,
               "every process of the appliance to exit")
    assert not (app.var / "supervisord.pid").exists()
    assert upstream.quits >= 2  # the sender ended its relay sessions with QUIT
