"""The shared logfile when it cannot be written - a full disk (a real tiny tmpfs), a
removed folder - or rotated: whole lines or none, and one word about it.

- a record that does not fit is not written at all: no half line, nothing glued to
  the next record once space is back;
- the program says so ONCE on stderr (supervisord's `*.out`), and once in the log
  when it can write again, with the number of lines lost; no traceback per line;
- the receiver keeps answering 250 while its log cannot be written.
"""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import load_config
from shared.log import EventLog, SharedFileSink
from tests.hardening_support import ready_files
from tests.support import (
    REPO,
    MailbagProcess,
    fill_disk,
    tiny_tmpfs,
    wait_for_banner,
    write_config,
)

pytestmark = pytest.mark.e2e

TIMESTAMP = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}[+-]\d{2}:\d{2}"
RECORD = re.compile(TIMESTAMP + r" [A-Z-]+ \S+ [a-z-]+ (ok|info|fail|defer)( \S+=.*)?")


def records(log: Path) -> list[str]:
    """The log's lines; every one must be a whole record (a blanked line is skipped)."""
    data = log.read_bytes()
    assert data.endswith(b"\n"), f"the log ends in a partial line: {data[-80:]!r}"
    lines = [line for line in data.decode().split("\n")[:-1] if line.strip()]
    for line in lines:
        assert RECORD.fullmatch(line), f"torn or glued line: {line[:120]!r}...{line[-60:]!r}"
        glued = re.findall(TIMESTAMP + " [A-Z]", line)
        assert len(glued) == 1, f"two records on one line: {line[:200]!r}"
    return lines


# One program's logging, as the programs set it up: record 1 fits, the disk fills,
# record 2 fits only in part (a short write), record 3 not at all, space comes back,
# record 4 is written.
WRITER = r"""
import sys
from pathlib import Path
from shared.config import load_config
from shared.log import EventLog, SharedFileSink
from shared.log import setup_logging, shutdown_logging

from tests.support import fill_disk

config_path, mount = sys.argv[1:3]
log = setup_logging(load_config(Path(config_path)).log, "S-SMTP")
pad = "x" * 2900
log.info("line", n=1, pad=pad)
filler = fill_disk(Path(mount))
log.info("line", n=2, pad=pad)
log.info("line", n=3, pad=pad)
filler.unlink()
log.info("line", n=4, pad=pad)
shutdown_logging()
"""


def test_a_record_that_does_not_fit_is_dropped_whole_and_counted(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "tiny", "64k") as mount:
        config_path = write_config(tmp_path, log={"file": str(mount / "mailbag.log")})
        result = subprocess.run(
            [sys.executable, "-c", WRITER, str(config_path), str(mount)],
            cwd=REPO, capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 0, result.stderr
        lines = records(mount / "mailbag.log")

    numbers = [int(m.group(1)) for line in lines if (m := re.search(r" n=(\d+) ", line))]
    assert numbers == [1, 4]  # 2 and 3 are not there, not even in part
    (notice,) = [line for line in lines if " log fail " in line]
    assert lines.index(notice) == 1  # before the first record written again
    assert " lost=2 " in notice + " " and "S-SMTP - log fail" in notice
    stderr = result.stderr.strip().splitlines()
    assert len(stderr) == 1, result.stderr  # once, not once per line: no traceback
    assert "mailbag.log" in stderr[0] and "Traceback" not in result.stderr


def test_receiver_keeps_accepting_mail_while_its_log_is_full(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "tiny", "64k") as mount:
        path = write_config(tmp_path, log={"file": str(mount / "mailbag.log")})
        config = load_config(path)
        proc = MailbagProcess("receiver", path).start()
        listen = config.receiver.listen
        try:
            wait_for_banner(listen.host, listen.port)
            filler = fill_disk(mount)
            body = b"Subject: full log\r\n\r\n" + b"body line\r\n" * 20
            for number in range(80):  # a line each: well past the log's last page
                with smtplib.SMTP(listen.host, listen.port, timeout=10) as client:
                    refused = client.sendmail(f"a{number}@example.com", ["b@localhost"], body)
                    assert refused == {}
            filler.unlink()
            with smtplib.SMTP(listen.host, listen.port, timeout=10) as client:
                client.sendmail("after@example.com", ["b@localhost"], body)
            assert len(ready_files(config.queue.dir)) == 81  # mail kept flowing
        finally:
            assert proc.stop() == 0
        lines = records(mount / "mailbag.log")

    (notice,) = [line for line in lines if " log fail " in line]
    lost = int(re.search(r" lost=(\d+)", notice).group(1))
    assert lost >= 10
    after = lines[lines.index(notice):]
    assert any("sender=<after@example.com>" in line for line in after)
    stderr = proc.stderr_text().strip().splitlines()
    assert len(stderr) == 1, proc.stderr_text()
    assert "mailbag.log" in stderr[0] and "No space left on device" in stderr[0]


def test_a_log_whose_folder_is_gone_drops_records_and_closes_nothing_else(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "logs"
    sink = SharedFileSink(folder / "mailbag.log", None, 0, "R-SMTP")
    events = EventLog("R-SMTP", "-")
    sink.write(events.render("line", "info", n=1))
    folder.rename(tmp_path / "away")  # the log cannot be found nor created again
    sink.write(events.render("line", "info", n=2))
    with open(tmp_path / "other", "wb") as other:  # takes the lowest free descriptor
        sink.write(events.render("line", "info", n=3))
        os.fstat(other.fileno())  # still open: the sink closed nothing but its own
        other.write(b"still ours")
    (tmp_path / "away").rename(folder)
    sink.write(events.render("line", "info", n=4))
    sink.close()
    lines = records(folder / "mailbag.log")
    assert [line.split(" ", 3)[3] for line in lines if " log fail " not in line] == [
        "line info n=1", "line info n=4"]
    assert " log fail lost=2 " in lines[1] and "No such file or directory" in lines[1]
    assert (tmp_path / "other").read_bytes() == b"still ours"


def test_a_rotation_that_fails_is_said_once_and_records_still_go_in(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "mailbag.log"
    (tmp_path / "mailbag.log.1").mkdir()  # in the way of the rename
    (tmp_path / "mailbag.log.1" / "x").write_bytes(b"")
    sink = SharedFileSink(log, 100, 1, "S-SMTP")
    events = EventLog("S-SMTP", "-")
    for n in range(5):
        sink.write(events.render("line", "info", n=n, pad="x" * 60))
    sink.close()
    lines = records(log)
    assert [line.split(" n=")[1][0] for line in lines] == ["0", "1", "2", "3", "4"]
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot rotate the log" in err[0], err
