"""Helpers for the `mailbag` command's tests: run the real console script, start the
real programs, read the log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from shared.config import Config, load_config
from tests.hardening_support import wait_for
from tests.support import MailbagProcess

MAILBAG = Path(sys.executable).parent / "mailbag"  # the venv's console script


def mailbag(config: Path | None, *args: str, env: dict[str, str] | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`mailbag --config CONFIG ARGS...` as an operator runs it (from another folder)."""
    command = [str(MAILBAG), *(["--config", str(config)] if config else []), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          cwd="/", env={**os.environ, **(env or {})})
    assert "Traceback" not in done.stderr, done.stderr
    return done


def queue_json(config: Path) -> dict[str, dict[str, Any]]:
    """`mailbag queue --json`, by id."""
    done = mailbag(config, "queue", "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    return {row["id"]: row for row in rows}


def log_lines(config: Config) -> list[str]:
    path = config.log.file
    return path.read_text(errors="replace").splitlines() if path.exists() else []


def lines_with(config: Config, *parts: str) -> list[str]:
    return [line for line in log_lines(config) if all(part in line for part in parts)]


def start_program(program: str, path: Path, ready: str) -> MailbagProcess:
    """Start a program; return once its log shows `ready` once more."""
    config = load_config(path)
    before = len(lines_with(config, ready))
    proc = MailbagProcess(program, path).start()
    try:
        wait_for(lambda: len(lines_with(config, ready)) > before or proc.proc.poll() is not None,
                 what=ready)
    except AssertionError:
        proc.stop()
        raise
    if proc.proc.poll() is not None:
        proc.stop()
        raise AssertionError(f"{program} did not start: {proc.stderr_text()}")
    return proc
