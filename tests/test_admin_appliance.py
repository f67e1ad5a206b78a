"""The appliance under supervisord, as an operator runs it: `mailbag status` from
supervisord's control socket, `make reload` (HUP to both programs), and `make run`
saying plainly that mailbag already runs with another config.
"""

from __future__ import annotations

import pytest

from tests.admin_support import mailbag
from tests.appliance_support import Appliance, make
from tests.hardening_support import wait_for
from tests.support import write_config

pytestmark = pytest.mark.e2e


def test_status_reload_and_make_run_with_another_config(make_app: Appliance) -> None:
    app = make_app
    app.start()
    app.wait_running("receiver", "sender")
    wait_for(lambda: any(" S-SMTP - start ok " in x for x in app.log_lines()),
               what="the sender serving")
    pids = {name: app.info(name)["pid"] for name in ("receiver", "sender")}
    status = ["status", "--supervisord-conf", str(app.conf)]
    done = mailbag(app.config_path, *status)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(x.startswith("receiver") and "RUNNING" in x for x in lines), done.stdout
    assert any(x.startswith("sender") and "RUNNING" in x for x in lines), done.stdout
    assert f"a sender serves the queue (pid {pids['sender']})" in done.stdout, done.stdout
    assert "NOTE" not in done.stdout  # the programs run with this very config
    done = mailbag(app.config_path, "check")  # its port is held by its own receiver: fine
    assert done.returncode == 0, done.stdout

    # make reload: both programs re-read the config (a new limit), neither restarts.
    write_config(app.home, receiver={"listen": f"{app.listen[0]}:{app.listen[1]}",
                                     "max_message_bytes": 12345})
    done = make(app, "reload")
    assert done.returncode == 0, done.stdout + done.stderr
    for program in ("R-SMTP", "S-SMTP"):
        wait_for(lambda p=program: any(f" {p} - reload ok " in x for x in app.log_lines()),
                   what=f"{program} reload ok")
    assert {name: app.info(name)["pid"] for name in pids} == pids

    # make run with another MAILBAG_CONFIG while mailbag runs: said plainly, nothing started.
    other = app.home / "other.toml"
    other.write_text("")
    done = make(app, "run", other)
    assert done.returncode != 0
    assert (f"already running with MAILBAG_CONFIG={app.config_path}" in done.stderr
            and f"NOT with {other}" in done.stderr), done.stderr
    assert {name: app.info(name)["pid"] for name in pids} == pids
    done = mailbag(other, *status)
    assert f"NOTE: the programs run with {app.config_path}, not {other}" in done.stdout

    app.shutdown()
    done = mailbag(app.config_path, *status)
    assert done.returncode == 0
    assert "supervisord   not running" in done.stdout and "queue         0 messages" in done.stdout
