"""mailbag as a service: `make install-service`, the systemd unit it writes, and the
appliance run as that unprivileged user with the unit's own command line.

No systemd runs here: the test reads ExecStart=, Environment= and WorkingDirectory=
from the installed unit and runs that command with `runuser`, as systemd would with
User=. The instance is a copy of the checkout in a folder other users may enter
(the repository itself may sit under /root), with a venv built from the system's
Python (an interpreter under /root cannot be run by anyone else) that borrows the
test venv's packages. `make install-service` creates the user; the teardown
removes it.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import site
import smtplib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.config import Config, load_config
from tests.sender_support import SmtpSink
from tests.support import REPO, wait_for_banner, write_config

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="creates a system user: needs root"),
]

COPIED = ("services", "shared", "tools", "contrib", "Makefile", "supervisord.conf",
          "pyproject.toml")
SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
# Where an unprivileged user could write at all, besides what it owns (var/).
WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock", "/var/crash")


@dataclass
class Service:
    home: Path  # the checkout copy
    user: str
    unit: Path
    config: Config
    sink: SmtpSink

    def unit_value(self, key: str) -> str:
        (value,) = re.findall(rf"^{key}=(.*)$", self.unit.read_text(), re.MULTILINE)
        return value

    def as_user(self, *command: str, **kwargs) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runuser", "-u", self.user, "--", *command],
                              capture_output=True, text=True, timeout=30, **kwargs)

    def supervisorctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.as_user(str(self.home / ".venv/bin/supervisorctl"), "-c",
                            str(self.home / "supervisord.conf"), *args)


def make_venv(home: Path) -> None:
    """A venv any user can run: the system's Python, the test venv's packages."""
    subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", "--without-pip", str(home / ".venv")],
                   check=True, timeout=60)
    (purelib,) = Path(home / ".venv/lib").glob("python3*/site-packages")
    (purelib / "mailbag-test-packages.pth").write_text(site.getsitepackages()[0] + "\n")
    for name, module in (("supervisord", "supervisord"), ("supervisorctl", "supervisorctl")):
        script = home / ".venv/bin" / name
        script.write_text(f"#!{home}/.venv/bin/python\n"
                          f"from supervisor.{module} import main\nmain()\n")
        script.chmod(0o755)
    (home / ".venv/.installed-stamp").touch()  # make: the venv is up to date


def install(home: Path, units: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MAILBAG_CONFIG"}
    return subprocess.run(["make", "--no-print-directory", "install-service",
                           f"UNIT_DIR={units}"],
                          cwd=home, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"{SYSTEM_PYTHON} (a Python any user may run) is not installed")
    user = f"mbt{os.getpid() % 100000}"
    home = Path(tempfile.mkdtemp(prefix="mbsvc-", dir="/var/tmp"))
    home.chmod(0o755)
    sink = SmtpSink(home.parent / (home.name + "-sink"))
    try:
        for name in COPIED:
            source = REPO / name
            if source.is_dir():
                shutil.copytree(source, home / name,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(source, home / name)
        make_venv(home)
        sink.start()
        path = write_config(home, sender={"relay": sink.address, "retry_initial": 1},
                            service={"user": user})
        units = home / "units"
        units.mkdir()
        first = install(home, units)
        assert first.returncode == 0, first.stdout + first.stderr
        unit = units / "mailbag.service"
        rendered, created = unit.read_text(), pwd.getpwnam(user)
        again = install(home, units)  # idempotent: the same user, the same unit
        assert again.returncode == 0, again.stdout + again.stderr
        assert unit.read_text() == rendered and pwd.getpwnam(user) == created
        yield Service(home, user, unit, load_config(path), sink)
    finally:
        sink.stop()
        subprocess.run(["userdel", user], capture_output=True, check=False)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(sink.folder, ignore_errors=True)


def test_install_service_creates_a_system_user_owning_var_and_a_unit_for_this_checkout(
    service: Service,
) -> None:
    entry = pwd.getpwnam(service.user)
    assert entry.pw_uid < 1000 and entry.pw_shell.endswith("nologin")  # system, no login
    for path in (service.home / "var", service.home / "var" / "log"):
        assert path.stat().st_uid == entry.pw_uid
    home = str(service.home)
    assert service.unit_value("User") == service.user
    assert service.unit_value("ExecStart") == (
        f"{home}/.venv/bin/supervisord -n -c {home}/supervisord.conf")
    assert service.unit_value("ExecReload") == (
        f"{home}/.venv/bin/supervisorctl -c {home}/supervisord.conf signal HUP receiver sender")
    assert service.unit_value("ReadWritePaths") == f"{home}/var"
    assert service.unit_value("Environment") == f"MAILBAG_CONFIG={home}/mailbag.toml"
    for key, value in (("Type", "simple"), ("Restart", "on-failure"),
                       ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("PrivateTmp", "yes"), ("ProtectHome", "yes")):
        assert service.unit_value(key) == value
    assert "/opt/mailbag" not in service.unit.read_text()


def test_systemd_analyze_verifies_the_installed_unit(service: Service) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    result = subprocess.run(["systemd-analyze", "verify", str(service.unit)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def owned_by(user: str, roots: list[Path]) -> list[str]:
    found = subprocess.run(["find", *map(str, roots), "-xdev", "-user", user],
                           capture_output=True, text=True, timeout=30)
    return found.stdout.split()


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE).group(1))


def send_two(config: Config) -> None:
    """One message for the local Maildir, one for the relay (smtp-sink)."""
    listen = config.receiver.listen
    with smtplib.SMTP(listen.host, listen.port, timeout=10) as client:
        client.sendmail("cron@example.com", ["bob@localhost"], b"Subject: local\r\n\r\nhi\r\n")
        client.sendmail("cron@example.com", ["ops@example.org"], b"Subject: relay\r\n\r\nhi\r\n")


def wait_delivered(service: Service, before: int) -> None:
    deadline = time.monotonic() + 15
    maildir = service.config.local.maildir / "bob" / "new"
    while time.monotonic() < deadline:
        if maildir.is_dir() and len(list(maildir.iterdir())) > before and service.sink.dumps():
            return
        time.sleep(0.05)
    raise AssertionError("the messages were not delivered")


def test_the_units_command_line_runs_mailbag_as_the_user_and_writes_only_var(
    service: Service,
) -> None:
    marker = service.home / "var" / ".before"
    marker.touch()
    time.sleep(0.01)
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    env.update([service.unit_value("Environment").split("=", 1)])
    command = shlex.split(service.unit_value("ExecStart"))
    proc = subprocess.Popen(["runuser", "-u", service.user, "--", *command],
                            cwd=service.unit_value("WorkingDirectory"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        listen = service.config.receiver.listen
        wait_for_banner(listen.host, listen.port)
        send_two(service.config)
        wait_delivered(service, before=0)
        receiver_pid = int(service.supervisorctl("pid", "receiver").stdout)
        sender_pid = int(service.supervisorctl("pid", "sender").stdout)
        uid = pwd.getpwnam(service.user).pw_uid
        supervisord_pid = int((service.home / "var/supervisord.pid").read_text())
        for pid in (supervisord_pid, receiver_pid, sender_pid):
            assert uid_of(pid) == uid
    finally:
        service.supervisorctl("shutdown")
        try:
            output = proc.communicate(timeout=20)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0].decode(errors="replace")
    assert proc.returncode == 0, output
    # Nothing written outside var/: no file of the user anywhere it could write, and
    # nothing new in the checkout but under var/.
    var = str(service.home / "var")
    writable = [Path(p) for p in WRITABLE if Path(p).is_dir()]
    outside = [p for p in owned_by(service.user, [*writable, service.home])
               if p != var and not p.startswith(var + "/")]
    assert outside == []
    newer = subprocess.run(["find", str(service.home), "-path", var, "-prune",
                            "-o", "-newer", str(marker), "-print"],
                           capture_output=True, text=True, timeout=30).stdout.split()
    assert newer == []
    assert "Supervisor is running as root" not in (
        service.home / "var/log/supervisord.log").read_text()


def test_make_run_as_root_with_service_user_runs_everything_as_that_user(
    service: Service,
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MAILBAG_CONFIG"}

    def make(target: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["make", "--no-print-directory", target], cwd=service.home,
                              env=env, capture_output=True, text=True, timeout=60)

    started = make("run")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"run as {service.user} ([service] user)" in started.stdout
        maildir = service.config.local.maildir / "bob" / "new"
        before = len(list(maildir.iterdir())) if maildir.is_dir() else 0
        send_two(service.config)
        wait_delivered(service, before)
        uid = pwd.getpwnam(service.user).pw_uid
        supervisord_pid = int((service.home / "var/supervisord.pid").read_text())
        for program in ("receiver", "sender"):
            pid = int(service.supervisorctl("pid", program).stdout)
            assert uid_of(pid) == uid, program
        assert uid_of(supervisord_pid) == uid
    finally:
        stopped = make("stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
