"""What both programs do at start and stop: arguments, config, one-line errors, signals.

A program's `main(config)` raises `StartupError` (or the config raises ConfigError)
for anything the operator must fix; `run_program` prints ONE line naming it and exits
with status 2, never a traceback (SPEC §2).

Signals: `shared/signals.py` (the program's `__main__` installs its StopFlag and
ReloadFlag first).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from shared.config import ENV_VAR, Config, ConfigError, load_config, resolve_config_path
from shared.log import EventLog, setup_logging
from shared.signals import ReloadFlag, StopFlag, ignore_from_now_on

EXIT_OK = 0
EXIT_RUNTIME_ERROR = 1
EXIT_USAGE = 2


class StartupError(Exception):
    """The program cannot start; str() is one line for the operator."""


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
    prog: str, description: str, main: Callable[[Config, StopFlag, ReloadFlag], int],
    stop: StopFlag, argv: list[str] | None = None, reload: ReloadFlag | None = None,
) -> None:
    """Load the config and run `main`; turn operator errors into one line + exit 2."""
    try:
        config = parse_args(prog, description, argv)
        status = main(config, stop, reload or ReloadFlag())
    except (ConfigError, StartupError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        status = EXIT_OK
    finally:
        ignore_from_now_on()
    sys.exit(status)
