"""services/sendmail/app.py in this process: exit codes, one-line errors, the queue
and the log as they really are on disk (tests/test_sendmail_e2e.py runs the script
as the programs that call it do)."""

from __future__ import annotations

import io
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.sendmail import app
from shared.config import load_config
from shared.queue import TMP_DIRNAME, QueueFile
from tests.support import tiny_tmpfs, write_config


@pytest.fixture(autouse=True)
def keep_umask() -> Iterator[None]:
    """The command sets its umask for the files it creates; not for the next test."""
    before = os.umask(0o022)
    os.umask(before)
    yield
    os.umask(before)


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], config: Path,
        *args: str, data: bytes = b"Subject: s\n\nhi\n") -> tuple[int, str]:
    """`mailbag-sendmail ARGS < data` with this config: (exit status, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    monkeypatch.setenv("MAILBAG_CONFIG", str(config))
    status = app.main(["mailbag-sendmail", *args])
    return status, capsys.readouterr().err


def queued(queue_dir: Path) -> list[Path]:
    return sorted(p for p in queue_dir.iterdir() if p.is_file() and not p.name.startswith("."))


@pytest.mark.parametrize(("args", "data", "code", "error"), [
    ((), b"Subject: s\n\nhi\n", os.EX_USAGE, "no recipients"),
    (("-t",), b"Subject: s\n\nhi\n", os.EX_USAGE, "no recipients (none on the command line"),
    (("a@b@c",), b"hi\n", os.EX_DATAERR, "bad recipient address 'a@b@c': Malformed address"),
    (("-t",), b"To: foo@\n\nhi\n", os.EX_DATAERR, "cannot read the To: field of the message"),
    (("-f", "not valid", "root"), b"hi\n", os.EX_DATAERR, "bad sender address 'not valid'"),
    (("-Z", "root"), b"hi\n", os.EX_USAGE, "unknown option -Z"),
    (("root", "-oi"), b"hi\n", os.EX_USAGE, "option -oi after the recipients"),
    (("-bs", "root"), b"", os.EX_USAGE, "-bs takes no recipients"),
    (("--config", "/nonexistent/mailbag.toml", "root"), b"hi\n", os.EX_CONFIG,
     "config file /nonexistent/mailbag.toml does not exist"),
    (("root",), b"x" * 2000 + b"\n", os.EX_DATAERR, "message larger than max_message_bytes"),
], ids=["no-recipients", "t-without-any", "bad-recipient", "unparsable-header", "bad-sender",
        "unknown-flag", "option-after-recipient", "bs-with-recipients", "no-config", "too-big"])
def test_refused_with_its_sysexits_code_one_line_and_nothing_queued(
        monkeypatch, capsys, tmp_path: Path, args: tuple[str, ...], data: bytes, code: int,
        error: str) -> None:
    config = write_config(tmp_path, receiver={"max_message_bytes": 1000})
    status, err = run(monkeypatch, capsys, config, *args, data=data)
    assert status == code
    assert err.startswith(f"mailbag-sendmail: {error}") and err.count("\n") == 1, err
    queue_dir = load_config(config).queue.dir
    assert not queue_dir.exists() or queued(queue_dir) == []


def test_an_invalid_config_is_78(monkeypatch, capsys, tmp_path: Path) -> None:
    config = write_config(tmp_path, queue={"dri": "var/queue"})
    assert run(monkeypatch, capsys, config, "root") == (
        os.EX_CONFIG, "mailbag-sendmail: unknown key 'dri' in [queue]; did you mean 'dir'?\n")


def test_queued_durably_with_its_log_line(monkeypatch, capsys, tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    config = load_config(config_path)
    assert run(monkeypatch, capsys, config_path, "-i", "root", "you@example.org") == (0, "")
    (path,) = queued(config.queue.dir)
    message = QueueFile.from_bytes(path.read_bytes())
    assert (message.sender, message.recipients) == ("root@localhost",
                                                    ("root@localhost", "you@example.org"))
    assert message.data.startswith(b"Received: by mailbag.localdomain (mailbag, from userid 0)")
    assert list((config.queue.dir / TMP_DIRNAME).iterdir()) == []
    (line,) = config.log.file.read_text().splitlines()
    assert re.fullmatch(
        rf"\S+ SUBMIT uid={os.getuid()} queued ok id={path.name} sender=<root@localhost> "
        rf"rcpts=2 size={len(message.data)}", line), line


def test_a_queue_that_is_no_folder_is_73(monkeypatch, capsys, tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    queue_dir = load_config(config_path).queue.dir
    queue_dir.parent.mkdir(parents=True)
    queue_dir.write_text("not a folder")
    status, err = run(monkeypatch, capsys, config_path, "root")
    assert status == os.EX_CANTCREAT
    assert err.startswith(f"mailbag-sendmail: cannot write the queue {queue_dir}: ")
    assert "\n" not in err.rstrip("\n")


def test_a_full_disk_is_75_and_leaves_nothing(monkeypatch, capsys, tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "disk", "64k") as disk:
        config_path = write_config(tmp_path, queue={"dir": str(disk / "queue")},
                                   receiver={"max_message_bytes": 1_000_000})
        big = b"Subject: big\n\n" + b"0123456789abcdef\n" * 12_000  # ~200 KB
        status, err = run(monkeypatch, capsys, config_path, "root", data=big)
        assert status == os.EX_TEMPFAIL
        assert err.startswith(f"mailbag-sendmail: queue {disk / 'queue'} is full (")
        assert queued(disk / "queue") == [] and list((disk / "queue" / TMP_DIRNAME).iterdir()) == []
        assert "SUBMIT uid=0 submit fail exit=75" in load_config(config_path).log.file.read_text()
        # A message that fits still goes in: nothing of the failed one takes space.
        assert run(monkeypatch, capsys, config_path, "root")[0] == 0
        assert len(queued(disk / "queue")) == 1


def test_newaliases_has_nothing_to_do(monkeypatch, capsys, tmp_path: Path) -> None:
    config = write_config(tmp_path)
    status, err = run(monkeypatch, capsys, config, "-bi")
    assert status == 0 and "nothing to rebuild" in err
