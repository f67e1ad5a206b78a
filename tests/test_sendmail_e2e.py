"""`mailbag-sendmail` run as a real process, the way cron, git send-email and mutt run it.

A real cron daemon fires at most once a minute, so cron is not waited for: its exact
invocation is reproduced instead (Debian cron's do_command.c: `sendmail -FCronDaemon
-i -B8BITMIME -oem MAILTO`, with the header fields cron writes). git send-email and
mutt are the real programs (Debian packages git, git-email, libmailtools-perl, mutt),
pointed at the script as their users point them at /usr/sbin/sendmail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.receiver import replies as R
from shared.config import Config, load_config
from shared.queue import TMP_DIRNAME, QueueFile
from tests.appliance_support import wait_until
from tests.support import REPO, MailbagProcess, write_config

SENDMAIL = Path(sys.executable).parent / "mailbag-sendmail"
NOBODY = 65534
SUBMIT_GROUP = 4242  # a group id for the setgid queue folders (no name needed)

pytestmark = pytest.mark.e2e


def sendmail(config: Path, *args: str, data: bytes, program: Path = SENDMAIL,
             prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*prefix, str(program), *args], input=data, capture_output=True,
                          timeout=30, env={**os.environ, "MAILBAG_CONFIG": str(config)})


def queued(config: Config) -> list[QueueFile]:
    return [QueueFile.from_bytes(p.read_bytes()) for p in sorted(config.queue.dir.iterdir())
            if p.is_file() and not p.name.startswith(".")]


def queue_ids(config: Config) -> list[str]:
    return sorted(p.name for p in config.queue.dir.iterdir()
                  if p.is_file() and not p.name.startswith("."))


CRON_MAIL = (
    b"From: root (Cron Daemon)\n"
    b"To: root\n"
    b"Subject: Cron <root@buildhost> /usr/local/bin/nightly\n"
    b"MIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=UTF-8\n"
    b"Content-Transfer-Encoding: 8bit\n"
    b"X-Cron-Env: <SHELL=/bin/sh>\n"
    b"X-Cron-Env: <HOME=/root>\n"
    b"X-Cron-Env: <PATH=/usr/bin:/bin>\n"
    b"X-Cron-Env: <LOGNAME=root>\n"
    b"\n"
    b"nightly: 3 files copied, 1 caf\xc3\xa9\n"
    b".\n"
    b"a line with only a dot above: -i keeps it\n"
)


def test_cron_then_the_listing_by_bp_and_as_mailq(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    config = load_config(config_path)
    result = sendmail(config_path, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root",
                      data=CRON_MAIL)
    assert (result.returncode, result.stderr) == (0, b"")
    (message,) = queued(config)
    assert (message.sender, message.recipients) == ("root@localhost", ("root@localhost",))
    assert message.data.startswith(b"Received: by mailbag.localdomain (mailbag, from userid 0)\r\n")
    assert b"From: root (Cron Daemon)\r\n" in message.data  # cron's own From: is kept
    assert message.data.count(b"From:") == 1
    assert message.data.endswith(b"\r\n\r\nnightly: 3 files copied, 1 caf\xc3\xa9\r\n.\r\n"
                                 b"a line with only a dot above: -i keeps it\r\n")
    (queue_id,) = queue_ids(config)
    assert f"SUBMIT uid=0 queued ok id={queue_id} sender=<root@localhost> rcpts=1" \
        in config.log.file.read_text()

    listing = sendmail(config_path, "-bp", data=b"")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.decode().splitlines()
    assert lines[0].startswith("ID ") and lines[1].startswith(f"{queue_id}  ready  ")
    assert lines[-1].startswith("-- 1 message, ")
    mailq = tmp_path / "mailq"
    mailq.symlink_to(SENDMAIL)  # what `make install-sendmail` does for /usr/bin/mailq
    as_mailq = sendmail(config_path, program=mailq, data=b"")
    shown = as_mailq.stdout.decode().splitlines()
    assert (as_mailq.returncode, shown[0], shown[1][:29], shown[2]) == (
        0, lines[0], lines[1][:29], lines[2])  # the same listing (its AGE may have grown)


def test_git_send_email(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    repo = tmp_path / "repo"
    env = {**os.environ, "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1",
           "MAILBAG_CONFIG": str(config_path)}

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["git", "-C", str(repo), *args], env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    repo.mkdir()
    git("init", "-q")
    git("config", "user.name", "Dev Eloper")
    git("config", "user.email", "dev@example.com")
    (repo / "notes.txt").write_text("first\n")
    git("add", "notes.txt")
    git("commit", "-qm", "notes: start")
    (repo / "notes.txt").write_text("first\nsecond\n")
    git("commit", "-qam", "notes: a second line")
    git("send-email", f"--smtp-server={SENDMAIL}", "--confirm=never", "--quiet",
        "--to=list@example.org", "--envelope-sender=dev@example.com", "-1")
    (message,) = queued(load_config(config_path))
    assert message.sender == "dev@example.com"
    assert message.recipients == ("list@example.org", "dev@example.com")  # git Cc's the author
    assert b"Subject: [PATCH] notes: a second line\r\n" in message.data
    assert b"\r\n+second\r\n" in message.data
    assert b"\n" not in message.data.replace(b"\r\n", b"")  # SMTP data: CRLF only


def test_mutt_batch_mode(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    muttrc = tmp_path / "muttrc"
    muttrc.write_text(
        f'set sendmail="{SENDMAIL} -oem -oi"\n'
        'set from="Alice Example <alice@example.com>"\n'
        "set use_from=yes\nset envelope_from=yes\nset record=\"\"\nset copy=no\n"
        f'set folder="{tmp_path}/Mail"\nset spoolfile="{tmp_path}/Mail/inbox"\n'
        'set charset="utf-8"\nset send_charset="utf-8"\n')
    result = subprocess.run(
        ["mutt", "-n", "-F", str(muttrc), "-s", "from mutt", "-c", "cc@example.org",
         "-b", "hidden@example.org", "--", "to@example.org"],
        input=b"hello from mutt\n", capture_output=True, timeout=30,
        env={**os.environ, "HOME": str(tmp_path), "MAILBAG_CONFIG": str(config_path)})
    assert result.returncode == 0, result.stderr
    (message,) = queued(load_config(config_path))
    assert message.sender == "alice@example.com"
    assert message.recipients == ("to@example.org", "cc@example.org", "hidden@example.org")
    assert b"Subject: from mutt\r\n" in message.data and b"hidden" not in message.data
    assert message.data.endswith(b"\r\n\r\nhello from mutt\r\n")


def test_receiver_down_then_the_sender_delivers_into_the_maildir(tmp_path: Path) -> None:
    # No receiver runs at all: the message goes straight into the queue.
    config_path = write_config(tmp_path, sender={"poll_interval": 1})
    config = load_config(config_path)
    result = sendmail(config_path, "-i", "root", data=b"test\n")
    assert (result.returncode, result.stderr) == (0, b"")
    (queue_id,) = queue_ids(config)
    sender = MailbagProcess("sender", config_path).start()
    try:
        new = config.local.maildir / "root" / "new"
        wait_until(lambda: new.is_dir() and any(new.iterdir()), 20, "the Maildir file")
    finally:
        assert sender.stop() == 0, sender.stderr_text()
    (delivered,) = list(new.iterdir())
    content = delivered.read_bytes().replace(b"\r\n", b"\n")
    assert f"id {queue_id}".encode() in content
    assert content.endswith(b"\n\ntest\n")
    assert queue_ids(config) == []
    assert f"S-SMTP local sent ok id={queue_id}" in config.log.file.read_text()


def test_a_lone_dot_ends_the_input_while_the_caller_keeps_the_pipe_open(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    proc = subprocess.Popen([str(SENDMAIL), "root"], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ,
                                                         "MAILBAG_CONFIG": str(config_path)})
    assert proc.stdin is not None
    proc.stdin.write(b"Subject: dot\n\nbefore\n.\nafter\n")
    proc.stdin.flush()
    try:
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        proc.stdin.close()
        proc.wait()
    (message,) = queued(load_config(config_path))
    assert message.data.endswith(b"\r\n\r\nbefore\r\n")


@pytest.mark.parametrize(("args", "config_text", "code", "error"), [
    (("-i",), None, os.EX_USAGE, "mailbag-sendmail: no recipients\n"),
    (("root",), "[queue\n", os.EX_CONFIG, "mailbag-sendmail: {path}: invalid TOML: "),
], ids=["usage", "config"])
def test_errors_are_one_line_never_a_traceback(tmp_path: Path, args: tuple[str, ...],
                                               config_text: str | None, code: int,
                                               error: str) -> None:
    config_path = write_config(tmp_path)
    if config_text is not None:
        config_path.write_text(config_text)
    result = sendmail(config_path, *args, data=b"hi\n")
    stderr = result.stderr.decode()
    assert result.returncode == code
    assert stderr.startswith(error.format(path=config_path)) and stderr.count("\n") == 1, stderr
    queue_dir = tmp_path / "var" / "queue"
    assert not queue_dir.exists() or not any(p.is_file() for p in queue_dir.iterdir())


def test_who_may_write_the_queue(shared_folder: Path) -> None:
    config_path = write_config(shared_folder)
    config_path.chmod(0o644)
    config = load_config(config_path)
    for folder in (config.queue.dir, config.queue.dir / TMP_DIRNAME):
        folder.mkdir(parents=True)
        folder.chmod(0o755)
    config.log.file.parent.mkdir(parents=True)
    config.log.file.write_text("")  # root's logfile, 0640: not writable by the caller
    config.log.file.chmod(0o640)
    as_nobody = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}")

    refused = sendmail(config_path, "root", data=b"hi\n", prefix=(*as_nobody, "--clear-groups"))
    assert refused.returncode == os.EX_CANTCREAT, refused.stderr
    assert refused.stderr.decode().startswith(
        f"mailbag-sendmail: cannot write the queue {config.queue.dir}: Permission denied")
    assert queue_ids(config) == []

    # The documented setup: the queue folders belong to a group the caller is in,
    # setgid and sticky.
    for folder in (config.queue.dir, config.queue.dir / TMP_DIRNAME):
        os.chown(folder, 0, SUBMIT_GROUP)
        folder.chmod(0o3770)
    accepted = sendmail(config_path, "root", data=b"hi\n",
                        prefix=(*as_nobody, f"--groups={SUBMIT_GROUP}"))
    assert accepted.returncode == 0, accepted.stderr
    (queue_id,) = queue_ids(config)
    info = (config.queue.dir / queue_id).stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (NOBODY, SUBMIT_GROUP, 0o640)
    assert accepted.stderr.decode() == (
        f"mailbag-sendmail: queued as {queue_id}, but cannot write the log file "
        f"{config.log.file}: Permission denied\n")
    # Sticky: another submitter in the group cannot remove (or replace) that message.
    other = subprocess.run(["setpriv", "--reuid=1", "--regid=1", f"--groups={SUBMIT_GROUP}",
                            "rm", "-f", str(config.queue.dir / queue_id)],
                           capture_output=True, text=True, timeout=10)
    assert other.returncode != 0 and "Operation not permitted" in other.stderr
    assert queue_ids(config) == [queue_id]


def test_bs_speaks_smtp_on_stdin_and_stdout(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    session = (b"EHLO app.example\r\nMAIL FROM:<app@example.com>\r\n"
               b"RCPT TO:<root@localhost>\r\nRCPT TO:<postmaster>\r\nDATA\r\n"
               b"Subject: via -bs\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n")
    result = sendmail(config_path, "-bs", data=session)
    assert result.returncode == 0, result.stderr
    (queue_id,) = queue_ids(load_config(config_path))
    assert R.S250_QUEUED.format(queue_id=queue_id).to_bytes() in result.stdout
    assert result.stdout.startswith(b"220 ") and result.stdout.endswith(b"221 2.0.0 "
                                                                        b"mailbag.localdomain "
                                                                        b"closing connection\r\n")
    (message,) = queued(load_config(config_path))
    assert (message.sender, message.recipients) == (
        "app@example.com", ("root@localhost", "postmaster@localhost"))
    assert message.data.startswith(b"Received: by mailbag.localdomain (mailbag, from userid 0)")
    assert message.data.endswith(b"\r\n\r\n.leading dot\r\n")


def make_install(destdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-s", "-C", str(REPO), "-o", ".venv/.installed-stamp",
         "install-sendmail", f"DESTDIR={destdir}", *extra],
        capture_output=True, text=True, timeout=60)


def test_make_install_sendmail_never_replaces_another_mta_unless_forced(tmp_path: Path) -> None:
    real = Path("/usr/sbin/sendmail")
    real_before = real.stat() if real.exists() else None
    fresh = make_install(tmp_path / "fresh")
    assert fresh.returncode == 0, fresh.stderr
    for link in ("usr/sbin/sendmail", "usr/bin/mailq"):
        assert (tmp_path / "fresh" / link).resolve() == SENDMAIL.resolve()
    again = make_install(tmp_path / "fresh")
    assert again.returncode == 0 and again.stdout.count("already mailbag-sendmail") == 2

    other = tmp_path / "other"  # a machine with Postfix: a binary, mailq a link to it
    (other / "usr/sbin").mkdir(parents=True)
    (other / "usr/bin").mkdir(parents=True)
    (other / "usr/sbin/sendmail").write_bytes(b"\x7fELF postfix's sendmail")
    (other / "usr/bin/mailq").symlink_to("../sbin/sendmail")
    refused = make_install(other)
    assert refused.returncode != 0
    assert f"{other}/usr/sbin/sendmail is a file, another MTA's: not replaced" in refused.stderr
    assert (other / "usr/sbin/sendmail").read_bytes() == b"\x7fELF postfix's sendmail"
    forced = make_install(other, "FORCE=1")
    assert forced.returncode == 0, forced.stderr
    assert (other / "usr/sbin/sendmail").resolve() == SENDMAIL.resolve()
    assert (other / "usr/bin/mailq").resolve() == SENDMAIL.resolve()
    assert (other / "usr/sbin/sendmail.before-mailbag").read_bytes() == \
        b"\x7fELF postfix's sendmail"
    if real_before is not None:  # the machine's own sendmail was never touched
        assert real.stat() == real_before


def test_make_install_sendmail_is_all_or_nothing(tmp_path: Path) -> None:
    """Another MTA's sendmail and no mailq: mailq alone must not become mailbag's
    (it would list one queue while sendmail fills another)."""
    (tmp_path / "usr/sbin").mkdir(parents=True)
    (tmp_path / "usr/sbin/sendmail").write_bytes(b"\x7fELF another MTA")
    refused = make_install(tmp_path)
    assert refused.returncode != 0 and "nothing installed" in refused.stderr
    assert not os.path.lexists(tmp_path / "usr/bin/mailq")


def test_a_cron_job_whose_output_has_a_long_line_is_queued_in_lines_smtp_allows(
        tmp_path: Path) -> None:
    """A job printing one 5,000-character line: queued (not refused, so the mail is
    not lost), every stored line within RFC 5321's 998 octets, and the text whole
    once the inserted line breaks are taken out again."""
    config_path = write_config(tmp_path)
    output = b"".join(b"%d" % (n % 10) for n in range(5000))
    done = sendmail(config_path, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root",
                    data=b"Subject: Cron <root@host> job\n\n" + output + b"\n")
    assert done.returncode == 0, done.stderr
    (message,) = queued(load_config(config_path))
    assert max(len(line) for line in message.data.split(b"\r\n")) <= 998
    assert output in message.data.replace(b"\r\n ", b"")
