"""Reload on HUP (SPEC §7 "Reload"): re-read the config and the files it names, or
keep everything as it was.

Both programs do it the same way (`reload_config`): the config file the program
started with is read again, and the program's `apply(new)` builds everything it
needs from it - the password file, the users file, the TLS certificate, relay
settings, limits - before it swaps anything in. Any problem (ConfigError or
StartupError, one line) leaves the old settings in force and is logged as ONE
line naming the file and the problem; a good config is logged as `reload ok`, so
that an operator sees that it took.

Some keys cannot change in a running program (the listening sockets, the queue
folders, the logfile): a changed one is named in one more line, `needs_restart=`,
and keeps its old value until the program is restarted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from shared.cli import StartupError
from shared.config import Config, ConfigError, load_config
from shared.log import EventLog

# Keys neither program can change while it runs (metrics.listen: the receiver's
# endpoint socket, and whether the sender counts at all).
RESTART_KEYS = ("queue.dir", "queue.failed_dir", "queue.quarantine_dir",
                "log.file", "log.level", "log.rotation", "log.retention", "metrics.listen")


def reload_config(started: Config, log: EventLog, restart_keys: Sequence[str],
                  apply: Callable[[Config], None]) -> None:
    """Read the config file again and `apply` it; on any problem, one line, and what
    runs stays as it was.

    `started`: the config the program started with - its path (a reload reads the
    same file), and the restart keys in force whatever reloads came between."""
    try:
        new = load_config(started.path)
        apply(new)
    except (ConfigError, StartupError) as err:
        log.error("reload", file=started.path, error=str(err), kept="the running config")
        return
    except Exception as exc:  # noqa: BLE001 - a file a reload reads must never end the program
        log.error("reload", file=started.path, exc=exc, kept="the running config")
        return
    log.ok("reload", file=new.path)
    pending = changed_keys(started, new, restart_keys)
    if pending:
        log.info("reload", file=new.path, needs_restart=",".join(pending))


def changed_keys(old: Config, new: Config, keys: Sequence[str]) -> list[str]:
    """The dotted keys ("receiver.listen") whose values differ."""
    return [key for key in keys if _value(old, key) != _value(new, key)]


def _value(config: Config, key: str) -> object:
    value: object = config
    for part in key.split("."):
        value = getattr(value, part)
    return value
