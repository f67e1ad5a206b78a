"""Maildir `tmp/` leftovers (services/sender/local.py): what a killed sender left there
is deleted at the next start once it is 36 hours old, and nothing younger."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from services.sender.local import STALE_TMP_SECONDS, LocalDelivery
from shared.config import load_config
from tests.support import MailbagProcess, write_config
from tests.test_sender_e2e import log_text, wait_until

HOUR = 3600


def leftover(folder: Path, name: str, age: float, now: float) -> Path:
    """A file in `folder` last read and written `age` seconds before `now`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(b"Return-Path: <a@example.com>\nhalf a mess")
    os.utime(path, (now - age, now - age))
    return path


def test_only_tmp_files_older_than_36_hours_are_removed(tmp_path: Path) -> None:
    now = time.time()
    root = tmp_path / "mail"
    LocalDelivery(root).deliver("a@example.com", "bob@localhost", b"Subject: kept\r\n\r\nx\r\n")
    stale = [leftover(root / "bob" / "tmp", "1.P99Q1.host", 37 * HOUR, now),
             leftover(root / "alice" / "tmp", "2.P98Q1.host", 400 * HOUR, now)]
    young = leftover(root / "bob" / "tmp", "3.P97Q1.host", STALE_TMP_SECONDS - 60, now)
    read_lately = leftover(root / "bob" / "tmp", "4.P96Q1.host", 40 * HOUR, now)
    os.utime(read_lately, (now - HOUR, now - 40 * HOUR))  # atime: read an hour ago
    old_in_cur = leftover(root / "bob" / "cur", "5:2,S", 500 * HOUR, now)
    (root / "bob" / "tmp" / "subdir").mkdir()
    os.utime(root / "bob" / "tmp" / "subdir", (now - 500 * HOUR, now - 500 * HOUR))
    (root / "not-a-maildir").write_bytes(b"")

    removed = LocalDelivery(root).clean_stale_tmp(now)

    assert sorted(removed) == sorted(stale)
    assert not any(path.exists() for path in stale)
    for kept in (young, read_lately, old_in_cur, root / "bob" / "tmp" / "subdir"):
        assert kept.exists(), kept
    assert len(list((root / "bob" / "new").iterdir())) == 1  # delivered mail untouched


def test_a_missing_maildir_root_cleans_nothing(tmp_path: Path) -> None:
    assert LocalDelivery(tmp_path / "nowhere").clean_stale_tmp(time.time()) == []


@pytest.mark.e2e
def test_the_sender_cleans_tmp_at_start_and_logs_it(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    config = load_config(path)
    now = time.time()
    stale = leftover(config.local.maildir / "bob" / "tmp", "1.P1Q1.host", 40 * HOUR, now)
    young = leftover(config.local.maildir / "bob" / "tmp", "2.P1Q1.host", HOUR, now)
    proc = MailbagProcess("sender", path).start()
    try:
        wait_until(lambda: "S-SMTP - start ok" in log_text(config), what="the sender's start")
    finally:
        assert proc.stop() == 0
    assert not stale.exists() and young.exists()
    assert "S-SMTP - maildir-clean info removed=1 " in log_text(config)
