"""Stop signals, recorded from the first moment of a program's life.

Supervisor's habit: a handler only records the signal; the main loop looks at the
flag and acts. Each program's `__main__` installs its `StopFlag` before it imports
anything heavy, so that a TERM arriving during start-up (a `supervisorctl stop`
right after RUNNING, on a loaded machine) is a graceful stop like any other, not a
death by signal. This module imports nothing but the standard library for that.
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
