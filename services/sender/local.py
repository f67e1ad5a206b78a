"""Local delivery: a recipient in a `[local] domains` domain gets the message in a Maildir.

`<[local] maildir>/<local-part>/{tmp,new,cur}` (stdlib `mailbox.Maildir`), created
on the first delivery. The outcome of each delivery is an SMTP-style `Reply`, so the
queue runner decides on local and relayed recipients by the same rule (the code):

- 250: the file is in `new/` and durable (mailbox fsyncs the file; we fsync `new/`);
- 550: a local part that could leave its folder (`/`, a leading `.`, NUL, control
  characters, empty) is refused for good — it is never turned into a path;
- 452 / 451: the disk is full, or another I/O error: try again later.

The stored file is the queued data with `Return-Path:` and `Delivered-To:` in front
(RFC 5321 §4.4), with LF line ends as Maildir readers expect. Local parts are folded
to lower case: `You@localhost` and `you@localhost` share one Maildir.

A sender killed while it writes leaves its file in a Maildir's `tmp/`, where no
reader ever looks. `clean_stale_tmp` (called at the sender's start) deletes what is
there and was neither read nor written for 36 hours, as the Maildir spec asks of
whoever cleans `tmp/`: a delivery in progress - ours, or another delivery agent's
into the same Maildir - is never that old.
"""

from __future__ import annotations

import errno
import mailbox
import os
import stat
from pathlib import Path

from shared.queue import fsync_dir
from shared.smtp import Reply, domain_of, local_part_of, mailbox_name

DELIVERED = Reply(250, "delivered to maildir {folder}", "2.0.0")
BAD_MAILBOX = Reply(550, "local mailbox {local!r} is not allowed: {why}", "5.1.3")
DISK_FULL = Reply(452, "cannot deliver to {folder}: {error}", "4.3.1")
IO_ERROR = Reply(451, "cannot deliver to {folder}: {error}", "4.3.0")


STALE_TMP_SECONDS = 36 * 3600  # the Maildir spec's age for leftovers in tmp/


def is_local(recipient: str, local_domains: tuple[str, ...] | frozenset[str]) -> bool:
    """A recipient without a domain (`postmaster`) or in a local domain is ours."""
    return "@" not in recipient or domain_of(recipient) in local_domains


class LocalDelivery:
    """Deliver to Maildirs under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def deliver(self, sender: str, recipient: str, data: bytes) -> Reply:
        """Store one copy for `recipient`; the reply says how it went (never raises OSError)."""
        try:
            name = mailbox_name(recipient)
        except ValueError as err:
            return BAD_MAILBOX.format(local=local_part_of(recipient), why=str(err))
        folder = self.root / name
        try:
            box = self._open(folder)
            key = box.add(self._content(sender, recipient, data))
            fsync_dir(folder / "new")
        except OSError as err:
            _remove_own_leftovers(folder)
            full = err.errno in (errno.ENOSPC, errno.EDQUOT)
            reply = DISK_FULL if full else IO_ERROR
            return reply.format(folder=folder, error=err.strerror or str(err))
        except mailbox.Error as err:  # e.g. a name clash: try again later
            return IO_ERROR.format(folder=folder, error=str(err))
        return DELIVERED.format(folder=f"{folder}/new/{key}")

    def clean_stale_tmp(self, now: float) -> list[Path]:
        """Delete the files in every `<root>/<mailbox>/tmp/` that were neither read nor
        written for STALE_TMP_SECONDS before `now`; return them. What cannot be looked
        at or removed is left for the next start (never raises OSError)."""
        removed: list[Path] = []
        try:
            folders = [entry.path for entry in os.scandir(self.root)]
        except OSError:
            return removed
        for folder in folders:
            tmp = Path(folder) / "tmp"
            try:
                entries = list(os.scandir(tmp))
            except OSError:  # not a Maildir, or not readable
                continue
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                    if not stat.S_ISREG(info.st_mode):
                        continue
                    if now - max(info.st_atime, info.st_mtime) < STALE_TMP_SECONDS:
                        continue
                    os.unlink(entry.path)
                except OSError:
                    continue
                removed.append(tmp / entry.name)
        return removed

    def _open(self, folder: Path) -> mailbox.Maildir:
        created = not folder.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        box = mailbox.Maildir(folder, factory=None, create=True)
        if created:  # make the new folders themselves durable
            for path in (folder, self.root):
                fsync_dir(path)
        return box

    @staticmethod
    def _content(sender: str, recipient: str, data: bytes) -> bytes:
        header = f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n"
        body = data.replace(b"\r\n", b"\n")
        return header.encode("utf-8", "surrogateescape") + body


def _remove_own_leftovers(folder: Path) -> None:
    """Delete the temporary files this process left in `folder/tmp`.

    `mailbox.Maildir.add` removes its tmp file when writing fails, but not when the
    final flush/fsync fails (e.g. ENOSPC): without this, every retry on a full disk
    would leave one more partial file. Maildir tmp names carry `P<pid>Q`, and the
    sender delivers from one thread, so every such file of ours is a leftover.
    """
    try:
        for leftover in (folder / "tmp").glob(f"*P{os.getpid()}Q*"):
            leftover.unlink(missing_ok=True)
    except OSError:
        pass
