"""The `mailbag` command against real programs: the issue's "Done means" and each
change with its ADMIN line, through the running sender and without one.

The console script runs as an operator runs it (`.venv/bin/mailbag --config FILE`,
from another folder); the receiver and the sender are real processes started as
supervisord starts them; the relay is aiosmtpd.
"""

from __future__ import annotations

import smtplib
import socket
import time
from pathlib import Path

import pytest

from services.admin import changes, cli
from services.admin.errors import AdminError
from shared.config import Config, load_config
from shared.queue import BLANK, DeliveryState, QueueReader, QueueWriter, StateStore
from tests.admin_support import lines_with, mailbag, queue_json, start_program
from tests.hardening_support import wait_for
from tests.sender_support import RecordingHandler, Relay
from tests.support import free_port, write_config

pytestmark = pytest.mark.e2e

BODY = b"Subject: admin\r\n\r\nhello\r\n"
SENDER_READY = "S-SMTP - start ok"
RECEIVER_READY = "R-SMTP - start ok"


def state(config: Config, queue_id: str) -> DeliveryState:
    """The message's delivery state as the sender wrote it (polled cheaply)."""
    try:
        return StateStore(config.queue.dir).load(queue_id)
    except ValueError:  # read while being replaced: not there yet
        return BLANK


def submit(config: Config, recipient: str) -> str:
    """A message through the real receiver; its queue id."""
    listen = config.receiver.listen
    with smtplib.SMTP(listen.host, listen.port, timeout=10) as client:
        client.sendmail("ops@example.com", [recipient], BODY)
    lines = wait_for(lambda: lines_with(config, " R-SMTP ", " queued ok "), what="queued")
    return lines[-1].split(" id=")[1].split()[0]


def test_done_means_deferred_listed_not_retried_early_and_flushed_at_once(tmp_path: Path) -> None:
    relay = Relay()  # its port, not listening yet: the relay is down
    path = write_config(tmp_path, sender={"relay": relay.address, "retry_initial": 600,
                                          "retry_max": 3600, "relay_retry": 3600,
                                          "connect_timeout": 2})
    config = load_config(path)
    sender = start_program("sender", path, SENDER_READY)
    try:
        queue_id = QueueWriter(config.queue.dir).store("ops@example.com", ["b@example.org"],
                                                       BODY)
        wait_for(lambda: state(config, queue_id).next_attempt, what="the message deferred")
        row = queue_json(path)[queue_id]
        assert row["state"] == "deferred"
        assert "Connection refused" in row["last_reply"]
        assert row["next_attempt"] > time.time() + 500
        text = mailbag(path, "queue").stdout
        assert queue_id in text and "deferred" in text and "Connection refused" in text

        relay.start()  # back, but the message's next attempt is 10 minutes away
        sender.stop()
        sender = start_program("sender", path, SENDER_READY)
        time.sleep(1.0)  # a restart that retried everything at once would have sent it
        assert relay.handler.messages == []
        assert queue_json(path)[queue_id]["state"] == "deferred"

        done = mailbag(path, "flush")
        answered = time.monotonic()  # (the command's own start-up is not the sender's)
        assert done.returncode == 0 and f"{queue_id}: due now" in done.stdout, done
        relay.handler.wait_for(1, timeout=5)
        assert time.monotonic() - answered < 1.0, "flush did not deliver within a second"
        assert lines_with(config, " ADMIN uid=", " flush ok ", f"id={queue_id}")
    finally:
        sender.stop()
        relay.stop()


def test_hold_release_delete_requeue_each_with_its_admin_line(tmp_path: Path) -> None:
    handler = RecordingHandler(rcpt_replies={
        "later@example.org": "451 4.3.0 try later",
        "gone@example.org": "550 5.1.1 no such user",
        "gone2@example.org": "550 5.1.1 no such user"})
    relay = Relay(handler=handler).start()
    path = write_config(tmp_path, sender={"relay": relay.address, "retry_initial": 600,
                                          "retry_max": 3600})
    config = load_config(path)
    receiver = start_program("receiver", path, RECEIVER_READY)
    sender = start_program("sender", path, SENDER_READY)
    try:
        later = submit(config, "later@example.org")
        wait_for(lambda: state(config, later).attempts == 1, what="deferred")
        assert queue_json(path)[later]["state"] == "deferred"
        assert mailbag(path, "hold", later).stdout == f"{later}: held\n"
        assert queue_json(path)[later]["state"] == "held"
        shown = mailbag(path, "show", later).stdout
        assert "state         held" in shown and "451 4.3.0 try later" in shown
        assert "<later@example.org>" in shown and "Subject: admin" in shown
        assert "hello" not in shown and "hello" in mailbag(path, "show", later, "--body").stdout

        assert mailbag(path, "release", later).stdout == f"{later}: released\n"
        wait_for(lambda: state(config, later).attempts == 2, what="a second attempt")
        assert mailbag(path, "delete", later).stdout == f"{later}: deleted\n"
        assert later not in queue_json(path)
        assert not (config.queue.dir / ".state" / later).exists()

        gone = submit(config, "gone@example.org")
        wait_for(lambda: (config.queue.failed / gone).exists(), what="failed")
        assert gone in mailbag(path, "queue", "--failed").stdout
        assert "550 5.1.1" in mailbag(path, "show", gone).stdout
        handler.rcpt_replies.pop("gone@example.org")  # the mailbox exists now
        done = mailbag(path, "requeue", gone)
        assert done.returncode == 0, done.stderr
        new_id = done.stdout.split("requeued as ")[1].strip()
        wait_for(lambda: [m for m in handler.messages if m.rcpt_tos == ["gone@example.org"]],
                   what="the requeued message at the relay")  # after the bounce to ops@
        assert not (config.queue.failed / gone).exists()
        assert not (config.queue.failed / f"{gone}.reason").exists()

        gone2 = submit(config, "gone2@example.org")
        wait_for(lambda: (config.queue.failed / gone2).exists(), what="failed")
        assert mailbag(path, "delete", "--failed", gone2).returncode == 0
        assert list(config.queue.failed.iterdir()) == []
    finally:
        sender.stop()
        receiver.stop()
        relay.stop()

    # grep ID tells each message's story, the operator's part included. (The
    # receiver's queued line and the sender's first one are written by two processes
    # at about the same time: their order is not fixed.)
    story = [(parts[1], parts[3]) for parts in (x.split(" ") for x in lines_with(config, later))]
    assert sorted(story[:2]) == [("R-SMTP", "queued"), ("S-SMTP", "deferred")], story
    assert story[2:] == [("ADMIN", "hold"), ("ADMIN", "release"), ("S-SMTP", "deferred"),
                         ("ADMIN", "delete")], story
    assert lines_with(config, " ADMIN uid=", " requeue ok ", f"id={gone}", f"new_id={new_id}")
    assert lines_with(config, " S-SMTP ", " sent ok ", f"id={new_id}")
    assert lines_with(config, " ADMIN uid=", " delete ok ", f"id={gone2}", "where=failed")


def test_without_a_sender_the_command_owns_the_queue_and_waits_for_a_busy_lock(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path)
    config = load_config(path)
    writer = QueueWriter(config.queue.dir)
    ids = [writer.store("ops@example.com", [f"{n}@example.org"], BODY) for n in range(3)]
    assert mailbag(path, "hold", ids[0]).stdout == f"{ids[0]}: held\n"
    assert queue_json(path)[ids[0]]["state"] == "held"
    assert mailbag(path, "delete", "--all").returncode == 0
    assert queue_json(path) == {}
    assert len(lines_with(config, " ADMIN uid=", " delete ok ", 'via="queue lock"')) == 3

    # The lock held by someone who does not answer (a sender starting up): a clear error.
    other = QueueReader(config.queue.dir, config.queue.failed, config.queue.quarantine)
    assert other.try_lock()
    try:
        started = time.monotonic()
        with pytest.raises(AdminError, match="locked, but no sender answers"):
            changes.change_queued(config, "hold", ["x"], wait=0.5)
        assert time.monotonic() - started < 3
    finally:
        other.close()


def test_unknown_ids_and_a_missing_config_get_one_line_and_a_non_zero_exit(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path)
    cases = [
        (("hold", "nosuchid"), "nosuchid: not in the queue"),
        (("show", "nosuchid"), "nosuchid: no such message"),
        (("requeue", "nosuchid"), "nosuchid: not in the failed folder"),
        (("delete", "--failed", "../etc"), "../etc: not in the failed folder"),
    ]
    for args, message in cases:
        done = mailbag(path, *args)
        assert done.returncode == 1, (args, done)
        assert done.stderr.count("\n") == 1 and message in done.stderr, (args, done.stderr)
    missing = mailbag(None, "queue", env={"MAILBAG_CONFIG": str(tmp_path / "absent.toml")})
    assert missing.returncode == 2 and "absent.toml does not exist" in missing.stderr
    assert missing.stderr.count("\n") == 1


@pytest.mark.parametrize(("args", "message"), [
    (("queue", "--bogus"), "unrecognized arguments: --bogus"),
    (("frobnicate",), "invalid choice: 'frobnicate'"),
    ((), "required: COMMAND"),
    (("hold",), "required: ID"),
    (("delete",), "delete needs ids, --all or --failed"),
    (("delete", "--all", "x"), "ids or --all, not both"),
])
def test_a_bad_command_line_is_one_line_and_exit_2(args, message, capsys) -> None:
    assert cli.main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err, err


def test_check_names_every_problem_and_passes_a_good_config(tmp_path: Path) -> None:
    good = write_config(tmp_path)
    done = mailbag(good, "check")
    assert done.returncode == 0 and "no problems found" in done.stdout, done

    typo = tmp_path / "typo.toml"
    typo.write_text("[receiver]\nmax_conections = 3\n")
    done = mailbag(typo, "check")
    assert done.returncode == 1
    assert done.stdout == ("unknown key 'max_conections' in [receiver]; "
                           "did you mean 'max_connections'?\n")

    (tmp_path / "empty-password").write_text("")
    (tmp_path / "users").write_text("not a users file\n")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "bad").mkdir()
    busy = socket.create_server(("127.0.0.1", 0))  # another program on the port
    bad = write_config(tmp_path / "bad",
                       receiver={"listen": f"127.0.0.1:{busy.getsockname()[1]}",
                                 "tls_cert": str(tmp_path / "no-cert.pem"),
                                 "tls_key": str(tmp_path / "no-key.pem"),
                                 "users_file": str(tmp_path / "users")},
                       sender={"relay": f"127.0.0.1:{free_port()}", "username": "u",
                               "password_file": str(tmp_path / "empty-password")},
                       dkim={"domain": "example.com", "selector": "s1",
                             "key_file": str(tmp_path / "no-dkim.key")},
                       queue={"dir": str(tmp_path / "a-file" / "queue"),
                              "failed_dir": str(tmp_path / "failed"),
                              "quarantine_dir": str(tmp_path / "quarantine")})
    with busy:
        done = mailbag(bad, "check")
    assert done.returncode == 1, done
    problems = done.stdout.splitlines()
    assert len(problems) == 6, problems
    assert "receiver.listen" in problems[0] and "by another program" in problems[0]
    assert "no-cert.pem" in problems[1]
    assert str(tmp_path / "users") in problems[2]
    assert "empty-password" in problems[3] and "empty" in problems[3]
    assert "no-dkim.key" in problems[4]
    assert problems[5] == f"queue.dir {tmp_path}/a-file/queue: {tmp_path}/a-file is not a folder"
