"""Reload on HUP (SPEC §7 "Reload"), with real processes started as supervisord starts
them: each re-reads the config and the files it names, logs `reload ok`, or logs one
line naming the file and the problem and keeps the old config; an open SMTP session
and a message in flight are not disturbed.

Under supervisord (`make reload`, `supervisorctl signal HUP`) in test_admin_appliance.py.
"""

from __future__ import annotations

import signal
import smtplib
import time
from pathlib import Path

import pytest

from shared.config import load_config
from shared.queue import QueueWriter
from tests.hardening_support import add_user, connect, send_message, wait_for
from tests.sender_support import RecordingHandler, Relay
from tests.support import MailbagProcess, TestCA, free_port, wait_for_banner, write_config

pytestmark = pytest.mark.e2e

BODY = b"Subject: reload\r\n\r\nhello\r\n"


def log_lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.exists() else []


def hup_and_wait(proc: MailbagProcess, log: Path, program: str) -> list[str]:
    """HUP the process; the reload lines it logs in answer (ok, or one fail)."""
    before = len(log_lines(log))
    proc.signal(signal.SIGHUP)

    def answered() -> list[str] | None:
        new = [line for line in log_lines(log)[before:] if f" {program} - reload " in line]
        return new if any(" reload ok " in x or " reload fail " in x for x in new) else None

    wait_for(answered, what=f"{program}'s reload line")
    time.sleep(0.2)  # a needs_restart line follows its reload ok at once
    return [line for line in log_lines(log)[before:] if f" {program} - reload " in line]


def ehlo_size(config) -> int:
    listen = config.receiver.listen
    with smtplib.SMTP(listen.host, listen.port, timeout=10) as client:
        client.ehlo("reload.test")
        return int(client.esmtp_features["size"])


def test_the_receiver_reloads_limits_users_and_certificate_and_keeps_open_sessions(
    tmp_path: Path,
) -> None:
    for name in ("old", "new"):
        (tmp_path / name).mkdir()
    old_ca = TestCA(tmp_path / "old")
    add_user(tmp_path / "users", "alice", "old password")
    sections = {"receiver": {"max_message_bytes": 100000, "tls_cert": str(old_ca.cert_file),
                             "tls_key": str(old_ca.key_file),
                             "users_file": str(tmp_path / "users")}}
    path = write_config(tmp_path, **sections)
    config = load_config(path)
    proc = MailbagProcess("receiver", path).start()
    try:
        wait_for_banner(config.receiver.listen.host, config.receiver.listen.port)
        assert ehlo_size(config) == 100000
        open_session = connect(config)
        assert open_session.command("EHLO before.test").code == 250

        # A good new config: other limits, another certificate, another user.
        new_ca = TestCA(tmp_path / "new")
        add_user(tmp_path / "users2", "bob", "new password")
        sections["receiver"].update(max_message_bytes=200000, tls_cert=str(new_ca.cert_file),
                                    tls_key=str(new_ca.key_file),
                                    users_file=str(tmp_path / "users2"),
                                    listen=f"127.0.0.1:{free_port()}")
        write_config_keeping_port(tmp_path, config, **sections)
        lines = hup_and_wait(proc, config.log.file, "R-SMTP")
        assert any(" reload ok " in x and str(path) in x for x in lines), lines
        assert any("needs_restart=receiver.listen" in x for x in lines), lines
        assert ehlo_size(config) == 200000  # a new session: the new limit (same old port)
        listen = config.receiver.listen
        with smtplib.SMTP(listen.host, listen.port, timeout=10) as client:
            client.starttls(context=new_ca.client_context())  # the new certificate
            client.login("bob", "new password")  # the new users file
        # The session opened before the reload goes on, as it was.
        reply = send_message(open_session, "a@example.com", ["b@example.org"], BODY)
        assert reply.code == 250, reply
        assert open_session.command("QUIT").code == 221

        # A broken config: one line naming the file and the problem; the old one stays.
        sections["receiver"].update(max_message_bytes=300000,
                                    tls_cert=str(tmp_path / "missing.pem"))
        write_config_keeping_port(tmp_path, config, **sections)
        lines = hup_and_wait(proc, config.log.file, "R-SMTP")
        assert len(lines) == 1 and " reload fail " in lines[0], lines
        assert str(path) in lines[0] and "missing.pem" in lines[0]
        assert ehlo_size(config) == 200000
    finally:
        assert proc.stop() == 0
    assert proc.stderr_text() == ""


def test_a_reload_cannot_take_tls_from_the_implicit_tls_port_that_stays_open(
    tmp_path: Path,
) -> None:
    """tls_listen needs a restart, so its socket stays open after a reload; a new
    config without the certificate would leave it without TLS (every session there
    an internal error). Such a reload is refused, in one line, and the port goes on."""
    ca = TestCA(tmp_path)
    tls_port = free_port()
    sections = {"receiver": {"tls_listen": f"127.0.0.1:{tls_port}",
                             "tls_cert": str(ca.cert_file), "tls_key": str(ca.key_file)}}
    path = write_config(tmp_path, **sections)
    config = load_config(path)
    proc = MailbagProcess("receiver", path).start()
    try:
        wait_for_banner(config.receiver.listen.host, config.receiver.listen.port)
        write_config_keeping_port(tmp_path, config, receiver={})  # no TLS at all
        lines = hup_and_wait(proc, config.log.file, "R-SMTP")
        assert len(lines) == 1 and " reload fail " in lines[0], lines
        assert "receiver.tls_listen" in lines[0] and "receiver.tls_cert" in lines[0]
        with smtplib.SMTP_SSL("127.0.0.1", tls_port, timeout=10,
                              context=ca.client_context()) as client:
            assert client.ehlo()[0] == 250
    finally:
        assert proc.stop() == 0
    assert proc.stderr_text() == ""


def write_config_keeping_port(folder: Path, config, **sections) -> Path:
    """Rewrite the config; the receiver's port is the one it listens on unless the
    test asks for another (`listen`), which needs a restart."""
    sections = {name: dict(values) for name, values in sections.items()}
    sections["receiver"].setdefault("listen", str(config.receiver.listen))
    return write_config(folder, **sections)


def test_the_sender_reloads_its_relay_between_passes_and_keeps_a_bad_config_out(
    tmp_path: Path,
) -> None:
    slow = RecordingHandler(data_delay=1.0)
    first, second = Relay(handler=slow).start(), Relay().start()
    path = write_config(tmp_path, sender={"relay": first.address, "poll_interval": 60})
    config = load_config(path)
    proc = MailbagProcess("sender", path).start()
    writer = QueueWriter(config.queue.dir)
    try:
        in_flight = writer.store("a@example.com", ["b@example.org"], BODY)
        assert slow.in_data.wait(10)
        # HUP while the relay holds the message's final dot: it is not disturbed.
        write_config(tmp_path, sender={"relay": second.address, "poll_interval": 60})
        lines = hup_and_wait(proc, config.log.file, "S-SMTP")
        assert any(" reload ok " in x for x in lines), lines
        assert [m.rcpt_tos for m in slow.wait_for(1)] == [["b@example.org"]]
        log = log_lines(config.log.file)
        sent = next(i for i, x in enumerate(log) if " sent ok " in x and in_flight in x)
        assert sent < next(i for i, x in enumerate(log) if " reload ok " in x)
        writer.store("a@example.com", ["c@example.org"], BODY)
        assert [m.rcpt_tos for m in second.handler.wait_for(1)] == [["c@example.org"]]

        # A bad config (a password file that is not there): one line, the relay stays.
        write_config(tmp_path, sender={"relay": first.address, "username": "u",
                                       "password_file": str(tmp_path / "absent")})
        lines = hup_and_wait(proc, config.log.file, "S-SMTP")
        assert len(lines) == 1 and " reload fail " in lines[0] and "absent" in lines[0], lines
        writer.store("a@example.com", ["d@example.org"], BODY)
        assert [m.rcpt_tos for m in second.handler.wait_for(2)][1] == ["d@example.org"]
        assert len(slow.messages) == 1
    finally:
        status = proc.stop()
        first.stop()
        second.stop()
    assert status == 0, proc.stderr_text()
