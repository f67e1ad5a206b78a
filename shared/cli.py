"""What both programs do at start and stop: arguments, config, one-line errors, signals.

A program's `main(config)` raises `StartupError` (or the config raises ConfigError)
for anything the operator must fix; `run_program` prints ONE line naming it and exits
with status 2, never a traceback (SPEC §2).

Signals (supervisor's habit): the handler only records the signal in a `StopFlag`;
the program's main loop looks at the flag and acts.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

from shared.config import ENV_VAR, Config, ConfigError, load_config, resolve_config_path
from shared.log import EventLog, setup_logging

EXIT_OK = 0
EXIT_RUNTIME_ERROR = 1
EXIT_USAGE = 2


class StartupError(Exception):
    """The program cannot start; str() is one line for the operator."""


class StopFlag:
    """Set by SIGTERM/SIGINT; waited on by main loops (an Event, so waits wake at once)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name = ""

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._record)

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        self.event.set()

    @property
    def is_set(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float | None) -> bool:
        return self.event.wait(timeout)


def open_log(config: Config, program: str) -> EventLog:
    """Start logging into the shared logfile; StartupError (one line) if it cannot."""
    try:
        return setup_logging(config.log, program)
    except OSError as err:
        raise StartupError(f"cannot open log file {config.log.file}: {err.strerror}") from None


def parse_args(prog: str, description: str, argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"TOML config (default: ${ENV_VAR}, else mailbag.toml at the repository root)",
    )
    args = parser.parse_args(argv)
    return load_config(resolve_config_path(args.config))


def run_program(
    prog: str, description: str, main: Callable[[Config], int], argv: list[str] | None = None
) -> None:
    """Load the config and run `main`; turn operator errors into one line + exit 2."""
    try:
        config = parse_args(prog, description, argv)
        status = main(config)
    except (ConfigError, StartupError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        status = EXIT_OK
    sys.exit(status)
