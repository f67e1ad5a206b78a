"""`mailbag status`: is mailbag working, at a glance (SPEC §7).

What it shows, and where each part comes from:

- both programs' states: from supervisord over its control socket (supervisor.py);
  when supervisord does not run, it says so and shows the rest;
- the config the running programs use, when it is not the one this command read
  (supervisord's environment);
- whether a sender serves the queue: its control socket answers (with its pid) -
  true also for a sender started by hand, without supervisord;
- the queue: counts by state and the oldest message's age (listing.py: the rule of
  `mailbag queue`, counted as the metrics count it, from names and states without
  opening a message), and the failed folder's count;
- the last successful relay delivery and the last error: from the tail of the
  shared logfile. The log is the one record both programs keep of what happened
  (SPEC §5), it survives restarts, and it is what an operator reads next; no
  other state is kept for this. The last TAIL_BYTES of `mailbag.log` are read,
  and of `mailbag.log.1` when the current file holds no such line (just rotated).
  "Error" means a `fail` or `defer` line, leaving out the receiver's answers to
  a client's own mistakes (`REFUSALS`: refused commands, failed logins and TLS
  handshakes, connections over the limit, sessions a client broke off) and the
  operator's own (`ADMIN` lines: an unknown id).

Gathering (`gather`) reads; formatting (`format_status`) is pure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from services.admin.listing import (
    STATES,
    Census,
    ListingError,
    duration,
    oldest_message,
    printable,
)
from services.admin.supervisor import (
    ProgramState,
    SupervisorConf,
    SupervisorUnavailable,
    config_in_use,
    program_states,
    supervisord_pid,
)
from services.sender.control import ControlError, ping_sender
from shared.config import Config

TAIL_BYTES = 1024 * 1024
REFUSALS = frozenset({"reject", "auth", "tls", "connect", "close"})  # R-SMTP, a client's


@dataclass(frozen=True)
class LogEvent:
    """One line of the shared logfile, split into its fixed fields."""

    when: datetime
    program: str
    peer: str
    event: str
    outcome: str
    details: str
    line: str

    @classmethod
    def parse(cls, line: str) -> LogEvent | None:
        parts = line.rstrip("\n").split(" ", 5)
        if len(parts) < 5:
            return None
        try:
            when = datetime.fromisoformat(parts[0])
        except ValueError:
            return None
        details = parts[5] if len(parts) > 5 else ""
        return cls(when, parts[1], parts[2], parts[3], parts[4], details, line.rstrip("\n"))

    @property
    def is_relay_delivery(self) -> bool:
        return (self.program == "S-SMTP" and self.event == "sent" and self.outcome == "ok"
                and self.peer != "local")

    @property
    def is_error(self) -> bool:
        if self.outcome not in ("fail", "defer") or self.program == "ADMIN":
            return False
        return not (self.program == "R-SMTP" and self.event in REFUSALS)


@dataclass
class Status:
    """Everything `mailbag status` prints."""

    config_path: Path
    config: Config | None  # None: the config cannot be used (`config_problem` says why)
    config_problem: str = ""
    supervisor: list[ProgramState] | None = None
    supervisor_problem: str = ""
    supervisord_pid: int | None = None
    config_in_use: Path | None = None
    sender_pid: int | None = None
    sender_problem: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    oldest: tuple[str, float] | None = None  # (id, arrival)
    queue_problem: str = ""
    last_delivery: LogEvent | None = None
    last_error: LogEvent | None = None


def gather(config_path: Path, config: Config | None, config_problem: str,
           conf: SupervisorConf | None, conf_problem: str, now: float) -> Status:
    """Everything there is to know; what cannot be known is said why, never raised."""
    status = Status(config_path, config, config_problem)
    if conf is None:
        status.supervisor_problem = conf_problem
    else:
        try:
            status.supervisor = program_states(conf)
            status.supervisord_pid = supervisord_pid(conf)
        except SupervisorUnavailable as err:
            status.supervisor_problem = str(err)
        if status.supervisord_pid is not None:
            status.config_in_use = config_in_use(status.supervisord_pid)
    if config is None:
        return status
    try:
        status.sender_pid = ping_sender(config.queue.dir)
    except ControlError as err:
        status.sender_problem = str(err)
    _gather_queue(status, config, now)
    status.last_delivery, status.last_error = last_events(config.log.file)
    return status


def _gather_queue(status: Status, config: Config, now: float) -> None:
    try:
        census = Census(config.queue.dir, config.queue.failed).count(now)
        status.oldest = oldest_message(config.queue.dir)
    except ListingError as err:
        status.queue_problem = str(err)
        return
    status.counts = {state: census.counts[state] for state in STATES if state != "failed"}
    status.failed = census.counts["failed"]


def last_events(log_file: Path) -> tuple[LogEvent | None, LogEvent | None]:
    """The last relay delivery and the last error in the tail of the logfile (and of
    its first rotated file, for what the current one lacks)."""
    delivery = error = None
    for path in (log_file, log_file.with_name(log_file.name + ".1")):
        for event in _events_backwards(path):
            if delivery is None and event.is_relay_delivery:
                delivery = event
            if error is None and event.is_error:
                error = event
            if delivery and error:
                return delivery, error
    return delivery, error


def _events_backwards(path: Path) -> Iterator[LogEvent]:
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - TAIL_BYTES))
            data = handle.read(TAIL_BYTES)
    except OSError:
        return
    lines = data.decode("utf-8", "replace").splitlines()
    if size > TAIL_BYTES:
        lines = lines[1:]  # cut in the middle
    for line in reversed(lines):
        event = LogEvent.parse(line)
        if event is not None:
            yield event


def format_status(status: Status, now: float) -> list[str]:
    if status.config is None:
        return [_row("config", f"{status.config_path}: {status.config_problem}"),
                *_supervisor_lines(status)]
    lines = [_row("config", str(status.config_path)), *_supervisor_lines(status)]
    if status.sender_pid is not None:
        lines.append(_row("queue owner", f"a sender serves the queue (pid {status.sender_pid})"))
    else:
        lines.append(_row("queue owner", status.sender_problem or
                          "no sender serves the queue (its control socket does not answer)"))
    lines += _queue_lines(status, now)
    lines.append(_row("last delivery", _event_text(status.last_delivery, now,
                                                   "none to the relay in the recent log")))
    lines.append(_row("last error", _event_text(status.last_error, now,
                                                "none in the recent log")))
    return lines


def _supervisor_lines(status: Status) -> list[str]:
    if status.supervisor is None:
        return [_row("supervisord", status.supervisor_problem)]
    pid = f" (pid {status.supervisord_pid})" if status.supervisord_pid else ""
    lines = [_row("supervisord", f"running{pid}")]
    used = status.config_in_use
    if used is not None and used != status.config_path:
        lines.append(_row("", f"NOTE: the programs run with {used}, not {status.config_path}"))
    for program in status.supervisor:
        lines.append(_row(program.name, f"{program.state:<9} {program.description}".rstrip()))
    return lines


def _queue_lines(status: Status, now: float) -> list[str]:
    if status.queue_problem:
        return [_row("queue", status.queue_problem)]
    total = sum(status.counts.values())
    parts = ", ".join(f"{n} {state}" for state, n in status.counts.items() if n)
    text = f"{total} message{'' if total == 1 else 's'}" + (f": {parts}" if parts else "")
    lines = [_row("queue", text)]
    if status.oldest is not None:
        queue_id, arrival = status.oldest
        # The id is a file name: whoever may write the queue chose it.
        lines.append(_row("oldest", f"{duration(now - arrival)} ({printable(queue_id)})"))
    lines.append(_row("failed", f"{status.failed} message{'' if status.failed == 1 else 's'}"
                      + (" (mailbag queue --failed)" if status.failed else "")))
    return lines


def _event_text(event: LogEvent | None, now: float, none: str) -> str:
    if event is None:
        return none
    ago = duration(now - event.when.timestamp())
    return f"{ago} ago: {event.program} {event.peer} {event.event} {event.outcome} {event.details}"


def _row(label: str, text: str) -> str:
    return f"{label:<14}{text}"
