"""`make run`, `make status`, `make stop`: the README's commands, on a private instance.

The instance folder links the repository's Makefile, tools/, supervisord.conf, .venv
and code (see `tests/appliance_support.py`); `MAILBAG_CONFIG` in make's environment
names the test config (the Makefile's `?=` keeps it). `-o .venv/.installed-stamp`
tells make not to reinstall the shared venv from here.
"""

from __future__ import annotations

import os

import pytest

from tests.appliance_support import Appliance, make, pid_alive, wait_until

pytestmark = pytest.mark.e2e


def test_make_run_starts_the_daemon_once_and_make_stop_ends_it(make_app: Appliance) -> None:
    app = make_app
    started = make(app, "run")
    assert started.returncode == 0, started.stdout + started.stderr
    assert "mailbag is running" in started.stdout
    for where in (app.config.queue.dir, app.config.local.maildir, app.config.log.file):
        assert str(where) in started.stdout
    assert "swaks --server" in started.stdout
    assert "metrics    off (set [metrics] listen" in started.stdout
    assert app.answers_220()
    app.supervisord_pid = int(app.pidfile.read_text())
    # Detached: supervisord is not a child of make (nor of this test).
    with open(f"/proc/{app.supervisord_pid}/stat") as handle:
        assert int(handle.read().rsplit(")", 1)[1].split()[1]) != os.getpid()

    again = make(app, "run")  # idempotent: the same supervisord, still serving
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already running" in again.stdout
    assert int(app.pidfile.read_text()) == app.supervisord_pid

    app.wait_running("receiver", "sender")
    status = make(app, "status")
    assert status.stdout.count("RUNNING") == 2, status.stdout

    # `supervisorctl stop all`: both stop cleanly (exit 0); `make run` brings them back.
    stopped_all = app.ctl("stop", "all")
    assert stopped_all.returncode == 0, stopped_all.stdout + stopped_all.stderr
    for program in ("receiver", "sender"):
        info = app.info(program)
        assert (info["statename"], info["exitstatus"]) == ("STOPPED", 0), info
    assert not app.answers_220()
    again = make(app, "run")
    assert again.returncode == 0 and "mailbag is running" in again.stdout, again.stdout
    app.wait_running("receiver", "sender")
    pids = [app.supervisord_pid, app.info("receiver")["pid"], app.info("sender")["pid"]]

    stopped = make(app, "stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not [pid for pid in pids if pid_alive(pid)]  # make stop waited for them
    assert "not running" in make(app, "status").stdout
    assert "not running" in make(app, "stop").stdout
    wait_until(lambda: not app.answers_220(), 5, "the port to close")
