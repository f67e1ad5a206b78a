"""`mailbag-sendmail`, the `mailbag` command and the queue against what a third
hostile review found (each test failed before its fix): an id named twice, a user
who may not enter the queue's folders, file names with control characters, and a
message of many short lines.

Real processes and files; every wait is bounded.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shared.config import Config, load_config
from tests.admin_support import lines_with, mailbag
from tests.support import write_config

SENDMAIL = Path(sys.executable).parent / "mailbag-sendmail"
NOBODY = 65534
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")


def _submit(config_path: Path, *args: str, data: bytes = b"Subject: t\n\nhi\n"
            ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(SENDMAIL), "--config", str(config_path), *args], input=data,
                          capture_output=True, timeout=60)


def _queued_ids(config: Config) -> list[str]:
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
