"""The benchmark's second peer: a private Postfix instance that only receives.

    peer = PostfixPeer.start(workdir / "postfix", port)   # its own config and queue
    ...                                                   # smtp-source at peer.port
    peer.stop()

Everything of the instance lives under its folder, on the same filesystem as
mailbag's queue: `etc/` (main.cf, master.cf: `config_directory`), `queue/`
(`queue_directory`), `data/`, and `maillog` (Postfix's own logfile, through postlogd,
as mailbag writes its logfile). It listens on 127.0.0.1:<port> only.

What it does with a message is what Postfix does by default up to the 250: smtpd
hands it to cleanup, which writes the queue file and fsyncs it (one fsync per
message; Postfix does not fsync the folder), and only then does smtpd answer 250.
`check_client_access static:HOLD` then files every message in `queue/hold/`, so the
queue manager never delivers anything: the instance only receives, as the other
servers in the benchmark do, and `hold/` holds one file per accepted message.

The master runs as root (Postfix's master needs it to start its daemons), the
daemons as the `postfix` user: `available()` says why not when that cannot be.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import time
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
MAIL_OWNER = "postfix"

# Every service the instance needs; chroot off (the queue is not the system's).
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix  n - n -     0 cleanup
qmgr      unix  n - n 300   1 qmgr
rewrite   unix  - - n -     - trivial-rewrite
bounce    unix  - - n -     0 bounce
defer     unix  - - n -     0 bounce
trace     unix  - - n -     0 bounce
verify    unix  - - n -     1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -     - proxymap
showq     unix  n - n -     - showq
error     unix  - - n -     - error
retry     unix  - - n -     - error
discard   unix  - - n -     - discard
anvil     unix  - - n -     1 anvil
scache    unix  - - n -     1 scache
postlog   unix-dgram n - n - 1 postlogd
smtp      unix  - - n -     - smtp
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {folder}/queue
data_directory = {folder}/data
command_directory = {command_directory}
daemon_directory = {daemon_directory}
shlib_directory = {shlib_directory}
meta_directory = {meta_directory}
mail_owner = {mail_owner}
setgid_group = {setgid_group}
myhostname = postfix-peer.localdomain
mydestination =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions = check_client_access static:HOLD
maillog_file = {folder}/maillog
maillog_file_prefixes = {folder}
biff = no
"""


def available() -> str:
    """'' if a private instance can run here, else why not."""
    if not os.access(POSTFIX, os.X_OK):
        return f"{POSTFIX} is not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "Postfix's master must be started as root"
    try:
        pwd.getpwnam(MAIL_OWNER)
    except KeyError:
        return f"there is no {MAIL_OWNER} user"
    return ""


def _default(name: str) -> str:
    done = subprocess.run([POSTCONF, "-d", "-h", name], capture_output=True, text=True,
                          check=True, timeout=30)
    return done.stdout.strip()


class PostfixPeer:
    """A running private instance; `store` is the folder its messages land in."""

    name = "postfix"

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        self.config_dir = folder / "etc"
        self.store = folder / "queue" / "hold"

    @classmethod
    def start(cls, folder: Path, port: int, timeout: float = 30.0) -> PostfixPeer:
        peer = cls(folder, port)
        peer._configure()
        peer._postfix("start")
        deadline = time.monotonic() + timeout
        while not peer._master_pid_file().exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"postfix did not start: {peer.log_tail()}")
            time.sleep(0.05)
        return peer

    def _configure(self) -> None:
        for sub in ("etc", "queue", "data"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        # The daemons run as the postfix user: it must be able to reach the instance's
        # folder through the benchmark's (a mkdtemp folder, 0700 otherwise).
        parent_mode = stat.S_IMODE(self.folder.parent.stat().st_mode)
        self.folder.parent.chmod(parent_mode | stat.S_IXGRP | stat.S_IXOTH)
        owner = pwd.getpwnam(MAIL_OWNER)
        os.chown(self.folder / "data", owner.pw_uid, owner.pw_gid)
        values = {name: _default(name) for name in (
            "command_directory", "daemon_directory", "shlib_directory", "meta_directory",
            "setgid_group")}
        (self.config_dir / "main.cf").write_text(
            MAIN_CF.format(folder=self.folder, mail_owner=MAIL_OWNER, **values))
        (self.config_dir / "master.cf").write_text(MASTER_CF.format(port=self.port))

    def _postfix(self, command: str) -> None:
        # The postfix command reports only to syslog and its logfile, never to stderr.
        done = subprocess.run([POSTFIX, "-c", str(self.config_dir), command],
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise SystemExit(f"postfix {command} failed: {self.log_tail()}")

    def _master_pid_file(self) -> Path:
        return self.folder / "queue" / "pid" / "master.pid"

    @property
    def pid(self) -> int:
        """The master's pid: every other process of the instance descends from it."""
        return int(self._master_pid_file().read_text().strip())

    def cpu_seconds(self) -> float:
        """utime + stime of the whole instance: the master, every live daemon, and the
        daemons that have exited (the master reaped them: its cutime + cstime)."""
        return process_tree_cpu(self.pid)

    def log_tail(self) -> str:
        log = self.folder / "maillog"
        return log.read_text(errors="replace")[-800:] if log.exists() else "(no maillog)"

    def stop(self) -> None:
        if self._master_pid_file().exists():
            self._postfix("stop")
            deadline = time.monotonic() + 15
            while self._master_pid_file().exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def process_tree_cpu(root: int) -> float:
    """CPU seconds of a process and all its descendants, alive or reaped."""
    clock_ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, tuple[int, int]] = {}  # pid -> (own ticks, reaped children's ticks)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        times[pid] = (int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]))
    total = times.get(root, (0, 0))[1]  # reaped descendants, through the master
    for pid in times:
        ancestor = pid
        while ancestor not in (root, 0, 1) and ancestor in parents:
            ancestor = parents[ancestor]
        if ancestor == root:
            total += times[pid][0]
    return total / clock_ticks
