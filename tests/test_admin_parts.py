"""The `mailbag` command's parts without sockets or programs: reading the log's tail,
formatting the status, reading supervisord.conf and a process's config, showing a
message safely."""

from __future__ import annotations

import subprocess
import time

from services.admin.show import show
from services.admin.status import LogEvent, Status, format_status, last_events
from services.admin.supervisor import SupervisorConf, config_in_use
from shared.config import load_config
from shared.queue import QueueWriter
from tests.support import write_config

LINES = """\
2026-11-28T22:01:10.328+00:00 R-SMTP 127.0.0.1:50128 connect ok tls=no
2026-11-28T22:01:11.000+00:00 S-SMTP 10.0.0.1:25 sent ok id=A to=<a@example.org> reply="250 ok"
2026-11-28T22:01:12.000+00:00 S-SMTP local sent ok id=B to=<b@localhost> reply="250 maildir"
2026-11-28T22:01:13.000+00:00 S-SMTP 10.0.0.1:25 deferred defer id=C to=<c@x.org> reply="451 busy"
2026-11-28T22:01:14.000+00:00 R-SMTP 127.0.0.1:50130 reject fail command=RCPT reply="554 5.7.1 no"
2026-11-28T22:01:15.000+00:00 ADMIN uid=0 hold fail id=nosuch result="not in the queue"
a line that is no log line
"""


def test_the_last_relay_delivery_and_error_leave_out_clients_and_operators(tmp_path) -> None:
    log = tmp_path / "mailbag.log"
    log.write_text(LINES)
    delivery, error = last_events(log)
    assert delivery is not None and "id=A" in delivery.details  # not the local one (B)
    assert error is not None and "id=C" in error.details  # not the refusal nor the typo


def test_the_rotated_log_is_read_for_what_the_current_one_lacks(tmp_path) -> None:
    log = tmp_path / "mailbag.log"
    (tmp_path / "mailbag.log.1").write_text(LINES)
    log.write_text("2026-11-28T23:00:00.000+00:00 S-SMTP - start ok pid=1\n")
    delivery, error = last_events(log)
    assert delivery and "id=A" in delivery.line and error and "id=C" in error.line


def test_a_status_without_a_usable_config_still_shows_supervisord(tmp_path) -> None:
    status = Status(tmp_path / "mailbag.toml", None, "config file ... does not exist",
                    supervisor_problem="not running (its socket x: No such file or directory)")
    assert format_status(status, time.time()) == [
        f"config        {tmp_path}/mailbag.toml: config file ... does not exist",
        "supervisord   not running (its socket x: No such file or directory)"]


def test_supervisord_conf_paths_are_relative_to_its_folder_as_given(tmp_path) -> None:
    conf = tmp_path / "supervisord.conf"
    conf.write_text("[supervisord]\npidfile=%(here)s/var/sd.pid ; the pidfile\n"
                    "[unix_http_server]\nfile=%(here)s/var/supervisor.sock\n")
    read = SupervisorConf.read(conf)
    assert (read.socket, read.pidfile) == (tmp_path / "var/supervisor.sock",
                                           tmp_path / "var/sd.pid")


def test_the_config_a_process_runs_with_comes_from_its_environment(tmp_path) -> None:
    path = tmp_path / "other.toml"
    process = subprocess.Popen(["sleep", "10"], env={"MAILBAG_CONFIG": str(path)})
    try:
        time.sleep(0.05)
        assert config_in_use(process.pid) == path
    finally:
        process.kill()
        process.wait()


def test_show_escapes_what_could_drive_a_terminal(tmp_path) -> None:
    config = load_config(write_config(tmp_path))
    data = b"Subject: \x1b[31mred\r\nX-Bare: a\rb\r\n\r\nbody \x1b]0;title\x07\r\n"
    queue_id = QueueWriter(config.queue.dir).store("a@example.com", ["b@example.org"], data)
    headers = b"".join(show(config, queue_id, body=False, now=time.time()))
    assert b"Subject: \\x1b[31mred\n" in headers and b"X-Bare: a\\x0db\n" in headers
    assert b"\x1b" not in headers and b"body" not in headers
    whole = b"".join(show(config, queue_id, body=True, now=time.time()))
    assert b"body \\x1b]0;title\\x07\n" in whole and b"\x1b" not in whole


def test_a_log_line_is_split_into_its_fields() -> None:
    event = LogEvent.parse('2026-11-28T22:01:10.328+00:00 R-SMTP - start ok pid=1 queue="a b"')
    assert event is not None
    assert (event.program, event.peer, event.event, event.outcome, event.details) == (
        "R-SMTP", "-", "start", "ok", 'pid=1 queue="a b"')
    assert LogEvent.parse("not a log line at all") is None
