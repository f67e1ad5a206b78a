"""`mailbag check`: what `make run` would only reveal after a start, found before it.

First the config itself is loaded (shared/config.py): an unknown or misspelt key,
a wrong type, a value out of range - its one-line error names the closest known
key. Then each concern of a valid config is checked by one function in `CHECKS`,
each returning its problems as one line apiece (an empty list: all is well):

    check_listen           the receiver's addresses can be listened on (a port held by
                           mailbag's own running receiver is fine; by another: not)
    check_receiver_tls     the receiver's certificate and key, loaded as a pair
    check_users_file       the AUTH users file parses
    check_relay            each relay's password file (readable, not empty) and CA file
    check_dkim             every DKIM key file loads
    check_folders          the queue, failed, quarantine, Maildir and log folders (and
                           the logfile) are writable by the user running the check

Wherever a program checks the same thing at start, the check calls the program's
own start-up code (`services/receiver/app.py`, `services/sender/app.py`), so that
the two can never disagree.

To check a new concern (a config section of its own, with files it names): write
`check_<concern>(config: Config) -> list[str]` here, one line per problem naming
the key and the file, and add it to `CHECKS`. A check must not
change anything (it runs against the live appliance) and must not raise for a
problem it finds: it returns it.
"""

from __future__ import annotations

import errno
import os
import pwd
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

from services.receiver.app import build_password_check, build_tls_context
from services.sender.app import build_relays
from services.sender.runner import PROGRAM as SENDER
from shared.cli import StartupError
from shared.config import Config, ConfigError, HostPort, load_config
from shared.dkim import DkimSigner
from shared.log import EventLog

Check = Callable[[Config], list[str]]


WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def answers_220(listen: HostPort, hostname: str, *, tls: bool = False) -> bool:
    """Our receiver greets with `220 <hostname> ...`; another server on the port does
    not. `tls`: the implicit-TLS port, greeting after the handshake (any certificate:
    this only asks who answers)."""
    host = WILDCARDS.get(listen.host, listen.host)
    try:
        with socket.create_connection((host, listen.port), timeout=2.0) as plain:
            sock = plain
            if tls:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                sock = context.wrap_socket(plain)
            greeting = sock.recv(512)
            sock.sendall(b"QUIT\r\n")
            return greeting.startswith(f"220 {hostname} ".encode())
    except (OSError, ssl.SSLError):
        return False


def check_listen(config: Config) -> list[str]:
    rcv = config.receiver
    problems = []
    for key, listen in (("receiver.listen", rcv.listen), ("receiver.tls_listen", rcv.tls_listen)):
        if listen is None:
            continue
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the receiver
            try:
                probe.bind((listen.host, listen.port))
            except OSError as err:
                in_use = err.errno == errno.EADDRINUSE
                implicit_tls = key == "receiver.tls_listen"
                if not (in_use and answers_220(listen, config.hostname, tls=implicit_tls)):
                    problems.append(f"{key} {listen}: cannot listen: {err.strerror or err}"
                                    + (" (by another program)" if in_use else ""))
    return problems


def check_receiver_tls(config: Config) -> list[str]:
    return _startup_problems(lambda: build_tls_context(config))


def check_users_file(config: Config) -> list[str]:
    return _startup_problems(lambda: build_password_check(config))


def check_relay(config: Config) -> list[str]:
    """Each relay's password file and (with TLS) CA file, read as the sender reads
    them at start."""
    return _startup_problems(
        lambda: build_relays(config, EventLog(SENDER, "-"), threading.Event()))


def check_dkim(config: Config) -> list[str]:
    try:
        DkimSigner.from_config(config.dkim)
    except ConfigError as err:
        return [str(err)]
    return []


def check_folders(config: Config) -> list[str]:
    """Each folder the programs write must be writable (or creatable) by this user."""
    queue = config.queue
    folders = [("queue.dir", queue.dir), ("queue.failed_dir", queue.failed),
               ("queue.quarantine_dir", queue.quarantine), ("local.maildir", config.local.maildir),
               ("the log folder", config.log.file.parent)]
    problems = [problem for key, folder in folders if (problem := _looked_at(key, folder))]
    log = config.log.file
    try:
        if log.exists() and not os.access(log, os.W_OK):
            problems.append(f"log.file {log} is not writable by {invoking_user()}")
    except OSError:
        pass  # the log folder cannot be looked at: that problem is in the list already
    return problems


CHECKS: tuple[Check, ...] = (check_listen, check_receiver_tls, check_users_file, check_relay,
                             check_dkim, check_folders)


def run_checks(config_path: Path, checks: tuple[Check, ...] = CHECKS) -> list[str]:
    """Every problem found, one line each; [] when the config and its files are fine."""
    try:
        config = load_config(config_path)
    except ConfigError as err:
        return [str(err)]  # nothing else can be checked without a valid config
    return [problem for check in checks for problem in check(config)]


def invoking_user() -> str:
    """`user alice (uid 1000)`: whose permissions the folder checks are about."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "?"
    return f"user {name} (uid {uid})"


def _startup_problems(build: Callable[[], object]) -> list[str]:
    try:
        build()
    except StartupError as err:
        return [str(err)]
    return []


def _looked_at(key: str, folder: Path) -> str | None:
    """`_folder_problem`, or why this user cannot even look: a parent it may not
    enter makes pathlib's exists() raise PermissionError, not answer False."""
    try:
        return _folder_problem(key, folder)
    except OSError as err:
        return f"{key} {folder} cannot be looked at by {invoking_user()}: {err.strerror or err}"


def _folder_problem(key: str, folder: Path) -> str | None:
    """Why `folder` cannot be written by this user, or None. A folder that does not
    exist yet is fine if its nearest existing parent is writable (it is created)."""
    path = folder
    while not path.exists():
        if path.parent == path:
            return f"{key} {folder}: no part of the path exists"
        path = path.parent
    if not path.is_dir():
        return f"{key} {folder}: {path} is not a folder"
    if not os.access(path, os.W_OK | os.X_OK):
        what = "is" if path == folder else f"cannot be created: {path} is"
        return f"{key} {folder} {what} not writable by {invoking_user()}"
    return None
