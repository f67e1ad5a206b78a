"""STARTTLS, implicit TLS and AUTH on the receiver (issue 5 §2), with a trustme test CA.

Real TLS clients only: Python's smtplib, swaks and curl, each verifying the server
certificate against the test CA; raw sockets where an attacker's bytes are needed
(commands pipelined behind STARTTLS, CVE-2011-0411 / CVE-2024-34083 class).
"""

from __future__ import annotations

import base64
import shutil
import smtplib
import socket
import subprocess
import time

import pytest

from services.receiver import replies as R
from services.receiver.server import AUTH_FAILURE_DELAY
from tests.hardening_support import (
    add_user,
    connect,
    find_queued,
    log_text,
    start_receiver,
    wait_for,
)
from tests.support import TestCA, free_port
from tests.trace_support import split_trace

pytestmark = pytest.mark.e2e

USER, PASSWORD = "alice", "s3cret pass"


@pytest.fixture(scope="module")
def tls_receiver(tmp_path_factory):
    """TLS + AUTH configured, implicit TLS listener too; relaying needs no AUTH here."""
    folder = tmp_path_factory.mktemp("tls")
    ca = TestCA(folder)
    add_user(folder / "users", USER, PASSWORD)
    config, proc = start_receiver(
        folder,
        receiver={
            "tls_cert": str(ca.cert_file),
            "tls_key": str(ca.key_file),
            "tls_listen": f"127.0.0.1:{free_port()}",
            "users_file": str(folder / "users"),
        },
    )
    yield config, ca
    proc.stop()


def _smtp(config) -> smtplib.SMTP:
    listen = config.receiver.listen
    return smtplib.SMTP(listen.host, listen.port, timeout=10)


def _message(marker: str) -> str:
    return f"From: a@localhost\r\nTo: b@localhost\r\nSubject: {marker}\r\n\r\n{marker}\r\n"


# ------------------------------------------------------------------ advertising


def test_no_starttls_nor_auth_when_not_configured(receiver):
    with _smtp(receiver) as smtp:
        smtp.ehlo("client.example")
        assert not smtp.has_extn("starttls")
        assert not smtp.has_extn("auth")
        assert smtp.docmd("STARTTLS")[0] == R.S502_NOT_IMPLEMENTED.code
        assert smtp.docmd("AUTH", "PLAIN AGFAAGI=")[0] == R.S502_NOT_IMPLEMENTED.code


def test_starttls_advertised_auth_only_after_tls(tls_receiver):
    config, ca = tls_receiver
    with _smtp(config) as smtp:
        smtp.ehlo("client.example")
        assert smtp.has_extn("starttls")
        assert not smtp.has_extn("auth")  # RFC 4954 §4: no AUTH in clear text
        token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        code, _ = smtp.docmd("AUTH", f"PLAIN {token}")
        assert code == R.S538_ENCRYPTION_REQUIRED.code
        assert smtp.starttls(context=ca.client_context())[0] == 220
        smtp.ehlo("client.example")  # the second EHLO, right after STARTTLS
        assert smtp.has_extn("auth")
        assert set(smtp.esmtp_features["auth"].upper().split()) == {"PLAIN", "LOGIN"}
        assert not smtp.has_extn("starttls")
        assert smtp.docmd("STARTTLS")[0] == R.S503_BAD_SEQUENCE.code  # no TLS in TLS


# ------------------------------------------------------------------ smtplib AUTH


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smtplib_starttls_and_auth(tls_receiver, mechanism):
    config, ca = tls_receiver
    marker = f"smtplib-auth-{mechanism}"
    with _smtp(config) as smtp:
        smtp.starttls(context=ca.client_context())
        smtp.ehlo("client.example")
        smtp.user, smtp.password = USER, PASSWORD
        method = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
        code, _ = smtp.auth(mechanism, method)
        assert code == R.S235_AUTH_OK.code
        assert smtp.sendmail("a@localhost", ["far@other.example"], _message(marker)) == {}
    [message] = find_queued(config, marker.encode())
    assert message.recipients == ("far@other.example",)
    trace, _ = split_trace(message.data)  # RFC 3848: TLS and AUTH
    assert (trace["helo"], trace["protocol"]) == (b"client.example", b"ESMTPSA")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_wrong_password_535_delayed_and_logged_with_ip(tls_receiver, mechanism):
    config, ca = tls_receiver
    with _smtp(config) as smtp:
        smtp.starttls(context=ca.client_context())
        smtp.ehlo("client.example")
        smtp.user, smtp.password = USER, "wrong " + mechanism
        method = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
        started = time.monotonic()
        with pytest.raises(smtplib.SMTPAuthenticationError) as failure:
            smtp.auth(mechanism, method)
        assert time.monotonic() - started >= AUTH_FAILURE_DELAY * 0.9
        assert failure.value.smtp_code == R.S535_AUTH_FAILED.code
        port = smtp.sock.getsockname()[1]
    line = wait_for(
        lambda: next((ln for ln in log_text(config).splitlines()
                      if f" 127.0.0.1:{port} auth fail" in ln), None),
        what="auth failure log line",
    )
    assert f"mechanism={mechanism}" in line and f"user={USER}" in line
    assert "wrong" not in line  # never the password


# ------------------------------------------------------------------ real TLS clients


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_tls_auth(tls_receiver):
    config, ca = tls_receiver
    listen = config.receiver.listen
    result = subprocess.run(
        ["swaks", "--server", listen.host, "--port", str(listen.port), "--tls",
         "--tls-verify", "--tls-ca-path", str(ca.ca_file),
         "--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD,
         "--from", "a@localhost", "--to", "far@other.example",
         "--header", "Subject: swaks-tls-marker", "--body", "swaks-tls-marker"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TLS started" in result.stdout
    assert find_queued(config, b"swaks-tls-marker")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_curl_ssl_reqd(tls_receiver, tmp_path, implicit):
    config, ca = tls_receiver
    listen = config.receiver.tls_listen if implicit else config.receiver.listen
    marker = f"curl-marker-{'implicit' if implicit else 'starttls'}"
    mail = tmp_path / "mail.txt"
    mail.write_text(_message(marker))
    scheme = "smtps" if implicit else "smtp"
    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--ssl-reqd", "--cacert", str(ca.ca_file),
         f"{scheme}://{listen.host}:{listen.port}", "--user", f"{USER}:{PASSWORD}",
         "--mail-from", "a@localhost", "--mail-rcpt", "b@localhost",
         "--upload-file", str(mail)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert find_queued(config, marker.encode())


def test_curl_refuses_a_server_without_tls(receiver, tmp_path):
    """--ssl-reqd against a plain server fails: we never pretend to offer TLS."""
    mail = tmp_path / "mail.txt"
    mail.write_text(_message("never"))
    listen = receiver.receiver.listen
    result = subprocess.run(
        ["curl", "--silent", "--ssl-reqd", f"smtp://{listen.host}:{listen.port}",
         "--mail-from", "a@localhost", "--mail-rcpt", "b@localhost",
         "--upload-file", str(mail)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0


# ------------------------------------------------------------------ STARTTLS injection


def test_commands_pipelined_after_starttls_are_discarded(tls_receiver):
    """CVE-2011-0411: plain-text commands sent with STARTTLS must never be run."""
    config, ca = tls_receiver
    with connect(config) as client:
        assert client.command("EHLO client.example").code == 250
        client.send(b"STARTTLS\r\nRSET\r\nEHLO injected.example\r\n"
                    b"MAIL FROM:<injected@evil.example>\r\n")
        assert client.read_reply().code == R.S220_READY_FOR_TLS.code
        assert client.replies == []  # nothing answered the injected lines in clear
        client.starttls(ca.client_context())
        # If any injected line had been kept, its reply would come first now.
        client.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.read_reply()
        client.sock.settimeout(10)
        reply = client.command("NOOP")
        assert reply.text == R.S250_OK.text  # not RSET's "Reset state"
        ehlo = client.command("EHLO client.example")
        assert ehlo.code == 250 and "injected" not in ehlo.text  # state is back to INITIAL
        assert client.command("MAIL FROM:<real@localhost>").code == 250


def test_starttls_then_rset_in_one_packet_over_plain_tcp(tls_receiver):
    """Same attack, checking the very first TLS reply is the one we asked for."""
    config, ca = tls_receiver
    with connect(config) as client:
        assert client.command("EHLO client.example").code == 250
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.send(b"STARTTLS\r\nRSET\r\n")
        assert client.read_reply().code == 220
        client.starttls(ca.client_context())
        assert client.command("HELP").code == R.S214_HELP.code


# ------------------------------------------------------------------ implicit TLS


def test_implicit_tls_listener(tls_receiver):
    config, ca = tls_receiver
    listen = config.receiver.tls_listen
    marker = "implicit-tls-smtplib"
    with smtplib.SMTP_SSL(listen.host, listen.port, context=ca.client_context(),
                          timeout=10) as smtp:
        smtp.ehlo("client.example")
        assert smtp.has_extn("auth") and not smtp.has_extn("starttls")
        smtp.login(USER, PASSWORD)
        assert smtp.sendmail("a@localhost", ["b@localhost"], _message(marker)) == {}
    [message] = find_queued(config, marker.encode())
    assert split_trace(message.data)[0]["protocol"] == b"ESMTPSA"


def test_starttls_without_auth_is_esmtps(tls_receiver):
    config, ca = tls_receiver
    with _smtp(config) as smtp:
        smtp.starttls(context=ca.client_context())
        smtp.ehlo("client.example")
        assert smtp.sendmail("a@localhost", ["b@localhost"], _message("esmtps-trace")) == {}
    [message] = find_queued(config, b"esmtps-trace")
    assert split_trace(message.data)[0]["protocol"] == b"ESMTPS"


def test_implicit_tls_listener_refuses_plain_text(tls_receiver):
    config, _ = tls_receiver
    listen = config.receiver.tls_listen
    with socket.create_connection((listen.host, listen.port), timeout=10) as sock:
        sock.sendall(b"EHLO plain.example\r\n")
        data = b""
        try:
            while chunk := sock.recv(4096):  # the server gives up on the handshake, closes
                data += chunk
        except ConnectionResetError:
            pass
    assert b"250" not in data


# ------------------------------------------------------------------ require_auth


def test_require_auth_mail_before_auth_gets_530(receiver_factory, tmp_path):
    ca = TestCA(tmp_path)
    add_user(tmp_path / "users", USER, PASSWORD)
    config, _ = receiver_factory(receiver={
        "tls_cert": str(ca.cert_file), "tls_key": str(ca.key_file),
        "users_file": str(tmp_path / "users"), "require_auth": True,
    })
    with _smtp(config) as smtp:  # from 127.0.0.1, inside relay_networks: still must AUTH
        smtp.ehlo("client.example")
        assert smtp.docmd("MAIL", "FROM:<a@localhost>")[0] == R.S530_AUTH_REQUIRED.code
        smtp.starttls(context=ca.client_context())
        smtp.ehlo("client.example")
        assert smtp.docmd("MAIL", "FROM:<a@localhost>")[0] == R.S530_AUTH_REQUIRED.code
        smtp.login(USER, PASSWORD)
        assert smtp.sendmail("a@localhost", ["b@localhost"], _message("after-auth")) == {}
    assert find_queued(config, b"after-auth")
