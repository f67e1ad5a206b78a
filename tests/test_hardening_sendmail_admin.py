"""`mailbag-sendmail`, the `mailbag` command and the queue against what a hostile
review found (each test failed before its fix): an id named twice, a user
who may not enter the queue's folders, file names with control characters, and a
message of many short lines.

Real processes and files; every wait is bounded.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from services.sender.control import ControlServer, ask_sender, control_path
from shared.config import Config, load_config
from shared.headers import scan_headers
from shared.log import EventLog
from shared.queue import QueueFile
from tests.admin_support import MAILBAG, lines_with, mailbag, start_program
from tests.support import write_config

SENDMAIL = Path(sys.executable).parent / "mailbag-sendmail"
NOBODY = 65534
AS_LIMIT = 400 * 1024 * 1024  # bytes of address space for a 10 MB submission
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")


def _submit(config_path: Path, *args: str, data: bytes = b"Subject: t\n\nhi\n"
            ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(SENDMAIL), "--config", str(config_path), *args], input=data,
                          capture_output=True, timeout=60)


def _queued_ids(config: Config) -> list[str]:
    if not config.queue.dir.exists():
        return []
    return sorted(p.name for p in config.queue.dir.iterdir()
                  if p.is_file() and not p.name.startswith("."))


# ---------------------------------------------------------------------------- ids named twice

def test_an_id_named_twice_is_deleted_once_and_reported_as_deleted(tmp_path: Path) -> None:
    """SPEC §7: every change is logged with the ids. `mailbag delete ID ID` removed
    the message, then answered the second ID "not in the queue": exit 1, stderr
    said the message was not there, and the one ADMIN line for it said `fail` -
    the deletion itself was in no log line."""
    path = write_config(tmp_path)
    config = load_config(path)
    assert _submit(path, "bob@example.com").returncode == 0
    assert _submit(path, "carol@example.com").returncode == 0
    first, second = _queued_ids(config)

    done = mailbag(path, "delete", first, first)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{first}: deleted\n" and done.stderr == ""
    assert _queued_ids(config) == [second]
    assert len(lines_with(config, "ADMIN", "delete ok", f"id={first}")) == 1
    assert not lines_with(config, "ADMIN", "delete fail")

    held = mailbag(path, "hold", second, second)
    assert held.returncode == 0 and held.stdout == f"{second}: held\n", held


# ---------------------------------------------------------------- a user outside the queue

def _as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AS_NOBODY, *command], capture_output=True, text=True, timeout=60,
                          cwd="/")


def test_a_user_who_may_not_enter_the_queue_gets_one_line_never_a_traceback(
        shared_folder: Path) -> None:
    """SPEC §7: a bad argument (or a folder out of reach) gets one clear line, never
    a traceback; `status` exits 0 whatever it finds; `check` prints each problem.
    The queue folders are 0770 (sendmail's umask): for anyone outside the group,
    pathlib's is_dir()/exists()/is_file() raised PermissionError (Python 3.11)
    out of `mailq`, `mailbag queue`, `status`, `check`, `delete --failed ID` and
    `requeue ID`."""
    path = write_config(shared_folder)
    path.chmod(0o644)
    config = load_config(path)
    assert _submit(path, "bob@example.com").returncode == 0
    (queue_id,) = _queued_ids(config)
    var = config.queue.dir.parent
    var.chmod(0o770)  # the appliance's state: not for everyone

    mailq = _as_nobody(str(SENDMAIL), "--config", str(path), "-bp")
    assert mailq.returncode == os.EX_NOPERM, mailq.stderr
    assert mailq.stderr == f"mailbag-sendmail: cannot read {config.queue.dir}: Permission denied\n"

    for args in (("queue",), ("delete", "--failed", queue_id), ("requeue", queue_id),
                 ("show", queue_id)):
        done = _as_nobody(str(MAILBAG), "--config", str(path), *args)
        errors = [line for line in done.stderr.splitlines() if "warning:" not in line]
        assert done.returncode == 1 and len(errors) == 1, (args, done.stderr)
        assert "Permission denied" in errors[0], (args, done.stderr)

    status = _as_nobody(str(MAILBAG), "--config", str(path), "status",
                        "--supervisord-conf", str(shared_folder / "none.conf"))
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    assert f"queue         cannot read {config.queue.dir}: Permission denied" in status.stdout

    check = _as_nobody(str(MAILBAG), "--config", str(path), "check")
    assert check.returncode == 1 and "Traceback" not in check.stderr, check.stderr
    assert f"queue.dir {config.queue.dir} cannot be looked at by user nobody" in check.stdout
    assert _queued_ids(config) == [queue_id]  # nothing changed


# ---------------------------------------------------------------- names the listing prints

def test_the_listing_shows_control_characters_of_a_file_name_escaped(tmp_path: Path) -> None:
    """README: a hostile message cannot drive the operator's terminal. Whoever may
    write the queue (the documented submit group: PHP as www-data) chooses a queued
    file's name; `mailbag queue` and `mailq` printed it raw, ESC sequences and all."""
    path = write_config(tmp_path)
    config = load_config(path)
    assert _submit(path, "bob@example.com").returncode == 0
    (queue_id,) = _queued_ids(config)
    evil = f"{queue_id}\x1b]0;owned\x07\x1b[2J"
    os.rename(config.queue.dir / queue_id, config.queue.dir / evil)

    listing = mailbag(path, "queue")
    assert listing.returncode == 0, listing.stderr
    assert "\x1b" not in listing.stdout and "\x07" not in listing.stdout
    assert f"{queue_id}?]0;owned??[2J" in listing.stdout
    mailq = _submit(path, "-bp", data=b"")
    assert mailq.returncode == 0 and b"\x1b" not in mailq.stdout, mailq


# ---------------------------------------------------------------- many short lines

def test_a_message_of_many_short_lines_takes_memory_near_its_size(tmp_path: Path) -> None:
    """The collector promises a bounded input is never held beyond its size. Each
    line was kept as its own bytes object in a list: 10 MB of empty lines (within
    max_message_bytes) took ~900 MB of memory, enough to get a small appliance's
    sendmail - or its neighbours - killed. Run within an address-space limit of
    400 MB (set in the child: its RSS high-water mark would include the test
    runner's, whose image it starts from)."""
    path = write_config(tmp_path)
    config = load_config(path)
    data = b"\r\n" * (5 * 1024 * 1024 - 512)  # within max_message_bytes as stored

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))

    done = subprocess.run([str(SENDMAIL), "--config", str(path), "-i", "bob@example.com"],
                          input=data, capture_output=True, timeout=120,
                          preexec_fn=limit_memory)
    assert done.returncode == 0, done.stderr[-600:]
    assert len(_queued_ids(config)) == 1


# ---------------------------------------------------------------- a deep queue folder

def test_a_queue_folder_deeper_than_a_socket_address_is_still_reachable(tmp_path: Path) -> None:
    """SPEC §7: hold/release work with or without a running sender. A unix socket
    address holds 107 bytes of path: with a deeper queue.dir, connecting to
    `.control` raised "AF_UNIX path too long" - every hold, release, delete and
    flush failed (exit 1) even with no sender running, and a running sender
    served no control socket at all."""
    deep = tmp_path / ("q" * 60) / ("u" * 60)
    path = write_config(tmp_path, queue={"dir": str(deep / "queue")},
                        sender={"relay": "127.0.0.1:9", "relay_retry": 3600})
    config = load_config(path)
    assert len(os.fsencode(config.queue.dir / ".control")) > 107
    assert _submit(path, "bob@example.com").returncode == 0
    (queue_id,) = _queued_ids(config)

    held = mailbag(path, "hold", queue_id)  # no sender: the command takes the queue lock
    assert held.returncode == 0 and held.stdout == f"{queue_id}: held\n", held.stderr

    sender = start_program("sender", path, "S-SMTP - start ok")
    try:
        released = mailbag(path, "release", queue_id)
        assert released.returncode == 0, released.stderr
        assert released.stdout == f"{queue_id}: released\n"
        assert lines_with(config, "ADMIN", "release ok", f"id={queue_id}", "via=sender")
    finally:
        assert sender.stop() == 0
    assert not (config.queue.dir / ".control").exists()  # a clean stop removes it


# ---------------------------------------------------------------- what programs hand sendmail

GIT_PATCH = (b"From 3b18e512dba79e4c8300dd08aeb37f8e728b8dad Mon Sep 17 00:00:00 2001\n"
             b"From: Dev <dev@example.com>\n"
             b"To: list@example.org\n"
             b"Subject: [PATCH] queue: fix it\n"
             b"\n"
             b"From the start, the fix.\n")


def test_a_message_starting_with_an_mbox_from_line_keeps_its_header(tmp_path: Path) -> None:
    """`git format-patch` output (and a saved mailbox's message) starts with an mbox
    `From <hash> <date>` line, which Postfix's sendmail drops. Kept, it is no header
    field, so the header section ended before it: From:, To: and Subject: became
    body text, a second From: was added, and `sendmail -t` found no recipients (64)."""
    path = write_config(tmp_path)
    config = load_config(path)
    done = _submit(path, "-t", "-i", data=GIT_PATCH)
    assert done.returncode == 0, done.stderr
    (queue_id,) = _queued_ids(config)
    message = QueueFile.from_bytes((config.queue.dir / queue_id).read_bytes())
    assert message.recipients == ("list@example.org",)
    section = scan_headers(message.data)
    header = message.data[:section.end]
    assert b"From 3b18e512" not in message.data
    assert header.count(b"\r\nFrom: ") == 1 and b"From: Dev <dev@example.com>\r\n" in header
    assert b"Subject: [PATCH] queue: fix it\r\n" in header
    assert message.data.endswith(b"\r\n\r\nFrom the start, the fix.\r\n")  # only the first


@pytest.mark.parametrize(("argument", "expected"), [
    ("ops@example.com,dev@example.com", ("ops@example.com", "dev@example.com")),  # cron MAILTO
    ("ops@example.com, root", ("ops@example.com", "root@localhost")),
    ("<root>", ("root@localhost",)),
    ("Ops Team <ops@example.com>", ("ops@example.com",)),
])
def test_an_argument_is_an_address_list_as_postfix_reads_it(
        tmp_path: Path, argument: str, expected: tuple[str, ...]) -> None:
    """Postfix's sendmail parses each recipient argument as an address list. cron
    passes `MAILTO=ops@example.com,dev@example.com` as ONE argument: it was refused
    (65, "Malformed address") and the job's output was lost."""
    path = write_config(tmp_path)
    config = load_config(path)
    done = _submit(path, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", argument)
    assert done.returncode == 0, done.stderr
    (queue_id,) = _queued_ids(config)
    message = QueueFile.from_bytes((config.queue.dir / queue_id).read_bytes())
    assert message.recipients == expected


@pytest.mark.parametrize("argument", ["a@b@c", ",", "<>", "ops@example.com,a b@c"])
def test_a_bad_address_list_is_still_refused_whole(tmp_path: Path, argument: str) -> None:
    path = write_config(tmp_path)
    done = _submit(path, argument)
    assert done.returncode == os.EX_DATAERR, done.stderr
    assert done.stderr.decode().startswith("mailbag-sendmail: bad recipient")
    assert _queued_ids(load_config(path)) == []


# ---------------------------------------------------------------- the control socket

def test_a_client_that_trickles_its_request_does_not_hold_the_control_socket(
        tmp_path: Path) -> None:
    """The control socket serves one connection at a time, and promises each its
    CONNECTION_TIMEOUT to send its request. The timeout applied to each recv: a
    client (any member of the group) sending a byte every few seconds held the
    socket for as long as it liked, and every `mailbag hold/flush/...` waited
    and failed. The request line must now be complete in that time, in all."""
    def apply(action: str, ids: Sequence[str], timeout: float) -> dict[str, str]:
        return {queue_id: "done" for queue_id in ids}  # the runner's side, answering

    server = ControlServer(tmp_path, apply, EventLog("S-SMTP", "-"),
                           connection_timeout=1.0, runner_timeout=1.0)
    stop = threading.Event()

    def trickle() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
            slow.connect(str(control_path(tmp_path)))
            for byte in b'{"action": "hold", "ids": ["x"]}':
                if stop.wait(0.5):
                    return
                try:
                    slow.sendall(bytes([byte]))
                except OSError:
                    return  # dropped by the server: what should happen

    trickler = threading.Thread(target=trickle, daemon=True)
    try:
        trickler.start()
        time.sleep(0.3)  # it is connected and being served
        started = time.monotonic()
        assert ask_sender(tmp_path, "hold", ["a"], timeout=10) == {"a": "done"}
        assert time.monotonic() - started < 3, "waited for the trickling client"
    finally:
        stop.set()
        trickler.join(5)
        server.close()


def test_the_listing_of_an_envelope_that_is_not_utf8_prints_on_a_strict_terminal(
        tmp_path: Path) -> None:
    """The queue format takes any byte but controls and angle brackets in an
    address, and the listing reads them as surrogates. On a strict UTF-8 stdout (a
    terminal under en_US.UTF-8) printing them raised UnicodeEncodeError: one such
    file put there by anyone who may write the queue made `mailbag queue` and
    `mailq` end in a traceback, listing nothing."""
    path = write_config(tmp_path)
    config = load_config(path)
    config.queue.dir.mkdir(parents=True)
    name = "18ed352a6d4a00aef62b99"
    (config.queue.dir / name).write_bytes(
        b"From: <\xff@example.org>\nTo: <b\xfe@example.com>\n\nSubject: x\r\n\r\nhi\r\n")
    strict = {"PYTHONIOENCODING": "utf-8"}
    listing = mailbag(path, "queue", env=strict)
    assert listing.returncode == 0, listing.stderr
    assert f"{name}  ready" in listing.stdout
    assert "<\ufffd@example.org>" in listing.stdout and "<b\ufffd@example.com>" in listing.stdout
    mailq = subprocess.run([str(SENDMAIL), "--config", str(path), "-bp"], capture_output=True,
                           timeout=60, env={**os.environ, **strict})
    assert mailq.returncode == 0 and b"Traceback" not in mailq.stderr, mailq.stderr


def test_status_names_the_oldest_message_printably(tmp_path: Path) -> None:
    """`mailbag status` names the oldest message by its file name - chosen by
    whoever may write the queue - and printed it raw: terminal escapes went to the
    operator's terminal, and bytes that are not UTF-8 ended it in a traceback."""
    path = write_config(tmp_path)
    config = load_config(path)
    config.queue.dir.mkdir(parents=True)
    name = os.fsdecode(b"00000000000000ff\x1b[2J\xff")
    (config.queue.dir / name).write_bytes(b"From: <a@example.org>\nTo: <b@example.com>\n\nx\r\n")
    done = mailbag(path, "status", "--supervisord-conf", str(tmp_path / "none.conf"),
                   env={"PYTHONIOENCODING": "utf-8"})
    assert done.returncode == 0, done.stderr
    assert "(00000000000000ff?[2J\ufffd)" in done.stdout and "\x1b" not in done.stdout


def test_delete_all_reports_odd_file_names_printably_and_logs_each(tmp_path: Path) -> None:
    """`mailbag delete --all` prints each id it removed; ids there are file names.
    One with bytes that are not UTF-8 ended the command in a traceback on a strict
    stdout after its deletion - and the ADMIN lines of the ids after it were never
    written; control characters went raw to the terminal."""
    path = write_config(tmp_path)
    config = load_config(path)
    config.queue.dir.mkdir(parents=True)
    odd = os.fsdecode(b"00000000000000ff\x1b[2J\xff")
    (config.queue.dir / odd).write_bytes(b"From: <a@example.org>\nTo: <b@example.com>\n\nx\r\n")
    assert _submit(path, "bob@example.com").returncode == 0
    done = mailbag(path, "delete", "--all", env={"PYTHONIOENCODING": "utf-8"})
    assert done.returncode == 0, done.stderr
    assert "00000000000000ff?[2J\ufffd: deleted" in done.stdout and "\x1b" not in done.stdout
    assert _queued_ids(config) == []
    assert len(lines_with(config, "ADMIN", "delete ok")) == 2


# ---------------------------------------------------------------- dkim-keygen

def test_dkim_keygen_refuses_a_key_size_no_verifier_needs_at_once(tmp_path: Path) -> None:
    """A bad argument gets one line and a non-zero exit (SPEC §7). `--bits 32768`
    (a 4096 typed with a digit too many) was taken: the command spun at 100% CPU
    for minutes to hours, for a key RFC 8301 does not require verifiers to check
    and whose record would not fit a DNS answer."""
    path = write_config(tmp_path)
    done = subprocess.run([str(MAILBAG), "--config", str(path), "dkim-keygen", "example.com",
                           "sel", "--dir", str(tmp_path / "dkim"), "--bits", "32768"],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 2, done.stderr
    assert done.stderr == ("mailbag: an RSA key for DKIM has 1024 to 4096 bits (RFC 8301), "
                           "not 32768 (see mailbag --help)\n")
    assert not (tmp_path / "dkim").exists() or not any((tmp_path / "dkim").iterdir())


# ------------------------------------------------- one id's failure amid several

@pytest.mark.parametrize("owner", ["at rest", "running sender"])
def test_a_change_that_fails_for_one_id_still_changes_and_logs_the_others(
        tmp_path: Path, owner: str) -> None:
    """SPEC §7: every change is logged with the ids. A hold whose state cannot be
    written for the middle one of three ids (its state path is a folder) used to end
    the whole command with one error: the first id was held, but neither reported
    nor logged, and the third was never held."""
    path = write_config(tmp_path, sender={"relay": "127.0.0.1:9", "poll_interval": 60})
    config = load_config(path)
    for name in ("a", "b", "c"):
        assert _submit(path, f"{name}@example.com").returncode == 0
    first, middle, last = _queued_ids(config)
    blocker = config.queue.dir / ".state" / middle
    blocker.mkdir(parents=True)
    (blocker / "x").write_text("")  # a non-empty folder: no state file can replace it
    sender = (start_program("sender", path, "start ok") if owner == "running sender"
              else None)
    try:
        done = mailbag(path, "hold", first, middle, last)
    finally:
        if sender is not None:
            sender.stop()
    assert done.returncode == 1
    assert f"{first}: held\n" in done.stdout and f"{last}: held\n" in done.stdout
    assert f"{middle}: error: " in done.stderr
    for queue_id in (first, last):
        assert len(lines_with(config, "ADMIN", "hold ok", f"id={queue_id}")) == 1
    assert len(lines_with(config, "ADMIN", "hold fail", f"id={middle}")) == 1
