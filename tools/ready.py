"""`make run`'s last step: wait until the receiver answers 220, then say where things are.

Reads the same config the programs read (`MAILBAG_CONFIG`, else mailbag.toml), so
what it prints is where the queue, the mailboxes and the shared logfile really are.
Exit status 1, with the receiver's captured output, if no 220 comes in time.
"""

from __future__ import annotations

import socket
import sys
import time
import xmlrpc.client
from pathlib import Path

from supervisor.xmlrpc import SupervisorTransport

# Not resolve(): a private instance (tests) links tools/ into its own folder.
REPO = Path(__file__).absolute().parent.parent
sys.path.insert(0, str(REPO))

from shared.config import ConfigError, HostPort, load_config, resolve_config_path  # noqa: E402

WAIT_SECONDS = 20.0
WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def answers_220(listen: HostPort, hostname: str) -> bool:
    """Our receiver greets with `220 <hostname> ...`; another server on the port does not."""
    host = WILDCARDS.get(listen.host, listen.host)
    try:
        with socket.create_connection((host, listen.port), timeout=2.0) as sock:
            greeting = sock.recv(512)
            sock.sendall(b"QUIT\r\n")
            return greeting.startswith(f"220 {hostname} ".encode())
    except OSError:
        return False


def receiver_gave_up() -> bool:
    """supervisord has given up on the receiver (FATAL): no point in waiting longer."""
    transport = SupervisorTransport(None, None, f"unix://{REPO / 'var' / 'supervisor.sock'}")
    proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
    try:
        return proxy.supervisor.getProcessInfo("receiver")["statename"] == "FATAL"
    except (OSError, xmlrpc.client.Error):
        return False


def wait_for_receiver(listen: HostPort, hostname: str, timeout: float = WAIT_SECONDS) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers_220(listen, hostname):
            return True
        if receiver_gave_up():
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


def main() -> int:
    path = resolve_config_path(None)
    try:
        config = load_config(path)
    except ConfigError as err:
        print(f"mailbag: error: {err}", file=sys.stderr)
        return 2
    listen = config.receiver.listen
    if not wait_for_receiver(listen, config.hostname):
        print(f"mailbag: the receiver does not answer 220 on {listen}; "
              "its output (var/log/receiver.out):", file=sys.stderr)
        print(tail(REPO / "var" / "log" / "receiver.out"), file=sys.stderr)
        print("mailbag: supervisord is still running: fix the problem, then make stop; "
              "make run", file=sys.stderr)
        return 1
    relay = (", ".join(map(str, config.sender.relay))
             or "none (only local domains are delivered; set [sender] relay)")
    host = WILDCARDS.get(listen.host, listen.host)
    server = f"[{host}]:{listen.port}" if ":" in host else f"{host}:{listen.port}"
    print(f"""mailbag is running (receiver answers 220 on {listen}).
  config     {path}
  queue      {config.queue.dir}
  mailboxes  {config.local.maildir}/<user>/new/   (local domains: {', '.join(config.local.domains)})
  logfile    {config.log.file}
  relay      {relay}

Send a first message:   swaks --server {server} --to you@localhost
Watch it:               tail -f {config.log.file}
Read it:                ls {config.local.maildir}/you/new/
Control:                .venv/bin/supervisorctl -c supervisord.conf status
Stop everything:        make stop""")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `make run | head`: the reader left, nothing to report
        sys.exit(0)
