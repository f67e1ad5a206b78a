"""`make run`'s last step: wait until the receiver answers 220, then say where things are.

Reads the same config the programs read (`MAILBAG_CONFIG`, else mailbag.toml), so
what it prints is where the queue, the mailboxes and the shared logfile really are.
Exit status 1, with the receiver's captured output, if no 220 comes in time - or
at once, saying so plainly, when mailbag was already running with another config
than the one asked for now (supervisord's own MAILBAG_CONFIG is what its programs
use: a second `make run` cannot change it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

# Not resolve(): a private instance (tests) links tools/ into its own folder.
REPO = Path(__file__).absolute().parent.parent
sys.path.insert(0, str(REPO))

from services.admin.check import WILDCARDS, answers_220  # noqa: E402
from services.admin.supervisor import (  # noqa: E402
    SupervisorConf,
    SupervisorUnavailable,
    config_in_use,
    program_states,
    supervisord_pid,
)
from shared.config import (  # noqa: E402
    ENV_VAR,
    ConfigError,
    HostPort,
    load_config,
    resolve_config_path,
)

WAIT_SECONDS = 20.0
def receiver_gave_up(conf: SupervisorConf | None) -> bool:
    """supervisord has given up on the receiver (FATAL): no point in waiting longer."""
    if conf is None:
        return False
    try:
        states = program_states(conf)
    except SupervisorUnavailable:
        return False
    return any(program.name == "receiver" and program.state == "FATAL" for program in states)


def wait_for_receiver(listen: HostPort, hostname: str, conf: SupervisorConf | None,
                      timeout: float = WAIT_SECONDS) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers_220(listen, hostname):
            return True
        if receiver_gave_up(conf):
            return False
        time.sleep(0.2)
    return False


def tail(path: Path, lines: int = 10) -> str:
    """The last distinct lines of a file (a restart loop repeats the same error)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} is not readable)"
    distinct = [line for i, line in enumerate(text) if i == 0 or line != text[i - 1]]
    return "\n".join(distinct[-lines:])


def supervisor_conf() -> SupervisorConf | None:
    """This folder's supervisord.conf (REPO: a private instance has its own), None if
    it cannot be read."""
    try:
        return SupervisorConf.read(REPO / "supervisord.conf")
    except SupervisorUnavailable:
        return None


def running_with_another_config(conf: SupervisorConf | None, asked: Path) -> str | None:
    """What to tell the operator when the running programs use another config."""
    if conf is None:
        return None
    pid = supervisord_pid(conf)
    used = config_in_use(pid) if pid else None
    if used is None or used == asked:
        return None
    return (f"already running with {ENV_VAR}={used} (supervisord pid {pid}), "
            f"NOT with {asked} as asked now; to switch: make stop, then make run")


def main(argv: list[str]) -> int:
    """`--same-config`: only check that the running programs use the config asked for."""
    path = resolve_config_path(None)
    conf = supervisor_conf()
    other = running_with_another_config(conf, path)
    if other:
        print(f"mailbag: {other}", file=sys.stderr)
        return 1
    if "--same-config" in argv:
        return 0
    try:
        config = load_config(path)
    except ConfigError as err:
        print(f"mailbag: error: {err}", file=sys.stderr)
        return 2
    listen = config.receiver.listen
    if not wait_for_receiver(listen, config.hostname, conf):
        print(f"mailbag: the receiver does not answer 220 on {listen}; "
              "its output (var/log/receiver.out):", file=sys.stderr)
        print(tail(REPO / "var" / "log" / "receiver.out"), file=sys.stderr)
        print("mailbag: supervisord is still running: fix the problem, then make stop; "
              "make run", file=sys.stderr)
        return 1
    relay = (", ".join(map(str, config.sender.relay))
             or "none (only local domains are delivered; set [sender] relay)")
    server = HostPort(WILDCARDS.get(listen.host, listen.host), listen.port)
    metrics = config.metrics.listen
    if metrics:
        endpoint = (f"http://{HostPort(WILDCARDS.get(metrics.host, metrics.host), metrics.port)}"
                    "/metrics and /healthz")
    else:
        endpoint = "off (set [metrics] listen, README Monitoring)"
    print(f"""mailbag is running (receiver answers 220 on {listen}).
  config     {path}
  queue      {config.queue.dir}
  mailboxes  {config.local.maildir}/<user>/new/   (local domains: {', '.join(config.local.domains)})
  logfile    {config.log.file}
  relay      {relay}
  metrics    {endpoint}

Send a first message:   swaks --server {server} --to you@localhost
Watch it:               tail -f {config.log.file}
Read it:                ls {config.local.maildir}/you/new/
Control:                .venv/bin/supervisorctl -c supervisord.conf status
Stop everything:        make stop""")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:  # `make run | head`: the reader left, nothing to report
        sys.exit(0)
