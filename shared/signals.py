"""Stop and reload signals, recorded from the first moment of a program's life.

Supervisor's habit: a handler only records the signal; the main loop looks at the
flag and acts. Each program's `__main__` installs its `StopFlag` and `ReloadFlag`
before it imports anything heavy, so that a TERM arriving during start-up (a
`supervisorctl stop` right after RUNNING, on a loaded machine) is a graceful stop
like any other, and a HUP then is a reload once the program runs - not a death by
signal (HUP's default action). This module imports nothing but the standard
library for that.

Who records: not the Python handler. The kernel may hand a process's signal to
any of its threads, and Python runs handlers in the main thread only, between
two bytecodes: a main thread asleep on a lock (the receiver's main loop, the
sender's idle wait) is not woken by a signal that landed elsewhere, so a TERM or
a HUP waited for some unrelated event - and supervisord's KILL came first. The
C-level handler, in whatever thread it runs, writes the signal's number to the
wakeup fd (`signal.set_wakeup_fd`); a thread of this module blocks on it and
records the signal at once, whoever sleeps. The Python handlers do nothing.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

_recorders: dict[int, Callable[[int], None]] = {}  # signal number -> what records it
_watcher: threading.Thread | None = None


def _route(signum: int, record: Callable[[int], None]) -> None:
    """Have `signum` recorded by `record`, on the watcher thread (see the module
    docstring). Call from the main thread (Python installs handlers only there)."""
    global _watcher
    if _watcher is None:
        reader, writer = os.pipe()
        os.set_blocking(writer, False)  # the C handler must never block
        signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
        _watcher = threading.Thread(target=_watch, args=(reader,), name="signals",
                                    daemon=True)
        _watcher.start()
    _recorders[signum] = record
    signal.signal(signum, _ignore)  # a Python handler: only then is the wakeup fd written


def _ignore(_signum: int, _frame: FrameType | None) -> None:
    """The main thread's part: none (the watcher thread has recorded it)."""


def _watch(reader: int) -> None:
    """The watcher thread: each byte on the wakeup fd is one signal's number."""
    while True:
        for signum in os.read(reader, 512):
            record = _recorders.get(signum)
            if record is not None:
                record(signum)


def ignore_from_now_on() -> None:
    """The program has stopped: what signals come from now on are ignored.

    Python's finalization puts back the default action of every signal that has a
    Python handler, and TERM's default is death. A second TERM in that last moment
    (supervisord's or an operator's, to a program already on its way out after a
    graceful stop) would turn a clean exit 0 into "killed by SIGTERM". An ignored
    signal is left ignored by the finalization. Call from the main thread."""
    for signum in _recorders:
        signal.signal(signum, signal.SIG_IGN)


class _Flag:
    """An Event set by a signal, and other Events it sets with it: a loop that sleeps
    on its own Event (`wake_also`) is woken by the signal too."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._wakes: list[threading.Event] = []

    def wake_also(self, event: threading.Event) -> None:
        self._wakes.append(event)
        if self.event.is_set():
            event.set()

    def _set(self) -> None:
        self.event.set()
        for event in self._wakes:
            event.set()


class StopFlag(_Flag):
    """Set by SIGTERM/SIGINT; waited on by main loops (an Event, so waits wake at once)."""

    def __init__(self) -> None:
        super().__init__()
        self.signal_name = ""

    def install(self) -> StopFlag:
        for signum in (signal.SIGTERM, signal.SIGINT):
            _route(signum, self._record)
        return self

    def _record(self, signum: int) -> None:
        self.signal_name = signal.Signals(signum).name
        self._set()

    @property
    def is_set(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float | None) -> bool:
        return self.event.wait(timeout)


class ReloadFlag(_Flag):
    """Set by SIGHUP: re-read the config (SPEC §7 "Reload").

    The main loop `take()`s it when it is between two pieces of work; HUPs that come
    before it does make one reload, of the file as it is then."""

    def install(self) -> ReloadFlag:
        _route(signal.SIGHUP, self._record)
        return self

    def _record(self, _signum: int) -> None:
        self._set()

    def take(self) -> bool:
        """True (once) if a HUP came since the last take."""
        if not self.event.is_set():
            return False
        self.event.clear()
        return True
