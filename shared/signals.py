"""Stop and reload signals, recorded from the first moment of a program's life.

Supervisor's habit: a handler only records the signal; the main loop looks at the
flag and acts. Each program's `__main__` installs its `StopFlag` and `ReloadFlag`
before it imports anything heavy, so that a TERM arriving during start-up (a
`supervisorctl stop` right after RUNNING, on a loaded machine) is a graceful stop
like any other, and a HUP then is a reload once the program runs - not a death by
signal (HUP's default action). This module imports nothing but the standard
library for that.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopFlag:
    """Set by SIGTERM/SIGINT; waited on by main loops (an Event, so waits wake at once)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name = ""

    def install(self) -> StopFlag:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._record)
        return self

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        self.event.set()

    @property
    def is_set(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float | None) -> bool:
        return self.event.wait(timeout)


class ReloadFlag:
    """Set by SIGHUP: re-read the config (SPEC §7 "Reload").

    The main loop `take()`s it when it is between two pieces of work; HUPs that come
    before it does make one reload, of the file as it is then. `wake_also(event)`:
    a loop that sleeps on its own Event is woken by a HUP too."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._wakes: list[threading.Event] = []

    def install(self) -> ReloadFlag:
        signal.signal(signal.SIGHUP, self._record)
        return self

    def wake_also(self, event: threading.Event) -> None:
        self._wakes.append(event)
        if self.event.is_set():
            event.set()

    def _record(self, _signum: int, _frame: FrameType | None) -> None:
        self.event.set()
        for event in self._wakes:
            event.set()

    def take(self) -> bool:
        """True (once) if a HUP came since the last take."""
        if not self.event.is_set():
            return False
        self.event.clear()
        return True
