"""Where mail goes, end to end (SPEC §8): swaks -> the receiver -> the sender -> a real
upstream, with aliases and sender rewriting, as an administrator configures them.

`root = "ops@example.org"`, `postmaster = "root"` and `[rewrite] senders =
{"@localhost" = "@example.com"}`: cron's mail to root@localhost must reach the
upstream as `MAIL FROM:<cron@example.com>` `RCPT TO:<ops@example.org>`, with its
`From:` rewritten and exactly one `Received:` field of mailbag's on top; a 550 for one
of two recipients bounces to the sender's Maildir (RFC 3464), the other recipient
gets the message once; a failing message from `<>` bounces nowhere.
"""

from __future__ import annotations

import email
import email.policy
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from shared.config import load_config
from tests.hardening_support import wait_for
from tests.sender_support import RecordingHandler, Relay
from tests.support import MailbagProcess, wait_for_banner, write_config
from tests.trace_support import split_trace

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("swaks") is None, reason="needs swaks (.ci/run installs it)"),
]


def swaks(port: int, *args: str) -> None:
    done = subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(port),
                           "--helo", "cron.box.example", *args],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def appliance(tmp_path: Path):
    handler = RecordingHandler(rcpt_replies={"gone@example.org": "550 5.1.1 no such user"})
    upstream = Relay(handler).start()
    path = write_config(
        tmp_path, top={"hostname": "mailbag.test"},
        sender={"relay": upstream.address, "poll_interval": 60},
        aliases={"root": "ops@example.org", "postmaster": "root"},
        rewrite={"senders": {"@localhost": "@example.com"}})
    config = load_config(path)
    processes = [MailbagProcess("receiver", path).start(), MailbagProcess("sender", path).start()]
    wait_for_banner(config.receiver.listen.host, config.receiver.listen.port)
    yield config, handler
    for process in processes:
        process.stop()
    upstream.stop()


def test_cron_mail_to_root_leaves_as_the_verified_sender_to_the_alias(appliance) -> None:
    config, handler = appliance
    swaks(config.receiver.listen.port, "--from", "cron@localhost", "--to", "root@localhost",
          "--header", "From: Cron Daemon <cron@localhost>", "--header", "Subject: nightly",
          "--body", "all good")
    (got,) = handler.wait_for(1, timeout=15)
    assert got.mail_from == "cron@example.com" and got.rcpt_tos == ["ops@example.org"]
    trace, rest = split_trace(got.content)
    assert trace["host"] == b"mailbag.test" and trace["helo"] == b"cron.box.example"
    assert trace["rcpt"] == b"root@localhost"
    assert b"\r\nReceived:" not in rest.split(b"\r\n\r\n")[0]  # ours, and only ours
    message = email.message_from_bytes(got.content, policy=email.policy.default)
    assert message["From"] == "Cron Daemon <cron@example.com>"
    assert message["Subject"] == "nightly" and message["Message-ID"]


def test_a_550_for_one_of_two_bounces_and_the_other_gets_it_once(appliance) -> None:
    config, handler = appliance
    swaks(config.receiver.listen.port, "--from", "alice@localhost",
          "--to", "gone@example.org,ok@example.org", "--header", "Subject: two")
    (got,) = handler.wait_for(1, timeout=15)
    assert got.rcpt_tos == ["ok@example.org"]
    box = config.local.maildir / "alice" / "new"
    (notice_file,) = wait_for(lambda: box.is_dir() and list(box.iterdir()), what="the bounce")
    notice = email.message_from_bytes(notice_file.read_bytes(), policy=email.policy.default)
    assert notice.get_content_type() == "multipart/report"
    status = notice.get_payload()[1].get_payload()
    assert status[1]["Final-Recipient"] == "rfc822; gone@example.org"
    assert status[1]["Status"] == "5.1.1" and status[1]["Action"] == "failed"
    time.sleep(0.5)
    assert len(handler.messages) == 1  # once


def test_a_failing_message_from_the_null_sender_bounces_nowhere(appliance) -> None:
    config, handler = appliance
    swaks(config.receiver.listen.port, "--from", "<>", "--to", "gone@example.org",
          "--header", "Subject: a bounce")
    wait_for(lambda: any(p.suffix == ".reason" for p in config.queue.failed.iterdir())
             if config.queue.failed.is_dir() else False, what="the failed record")
    time.sleep(0.5)
    queued = [p for p in config.queue.dir.iterdir() if p.is_file() and not p.name.startswith(".")]
    assert queued == [] and handler.messages == []
    assert not (config.local.maildir).exists() or not any(config.local.maildir.iterdir())
