""""This program runs", told by the program itself: a lock the kernel drops when it dies.

A running program holds a SHARED `flock` on its alive file (`AliveMark.hold`) for
as long as it lives; nothing has to be cleaned up after a crash or a `kill -9`,
because the kernel releases a dead process's locks. Whoever wants to know tries
an EXCLUSIVE lock without waiting (`is_alive`): refused means some process holds
the file, granted means none does (and the probe lets go at once).

Shared for the holder, exclusive for the probe: a program that starts while a
probe holds the file for its few microseconds waits for it instead of failing,
and two holders (never expected, but possible when someone starts a second copy
by hand) do not exclude each other. Liveness comes from the programs, not from
supervisord, so it is right however they were started (SPEC §9). The file is
never unlinked: a holder and a probe must always meet on the same inode.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

HOLD_WAIT = 1.0  # seconds a starting program waits for probes to let go (each takes µs)


class AliveMark:
    """A running program's alive lock; `release()` (or the process's end) drops it."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def hold(cls, path: Path) -> AliveMark:
        """Create `path` if needed and hold it shared. OSError if it cannot be opened,
        TimeoutError if an exclusive lock stays on it (something other than a probe)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
        deadline = time.monotonic() + HOLD_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return cls(fd)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TimeoutError(f"{path} stays locked by another process") from None
                time.sleep(0.001)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None


def is_alive(path: Path) -> bool:
    """True while some process holds `path` (AliveMark); never waits. A file that
    does not exist or cannot be opened: nobody ever held it, so False."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also lets go of the probe's lock when it was granted
    return False
