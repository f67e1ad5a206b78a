"""SMTPUTF8 end to end (RFC 6531/6532): smtplib -> the receiver -> the queue -> the
sender -> an aiosmtpd relay that offers SMTPUTF8, and a UTF-8 local part into its
own Maildir. Real processes, as supervisord runs them."""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

import pytest

from shared.config import load_config
from tests.sender_support import Relay
from tests.support import MailbagProcess, wait_for_banner, write_config
from tests.trace_support import assert_as_sent, split_trace

pytestmark = pytest.mark.e2e

DATA = "From: José <jos\u00e9@example.com>\r\nSubject: Grüße\r\n\r\nHallo\r\n".encode()


def test_a_utf8_sender_is_taken_with_smtputf8_and_relayed_with_it(tmp_path: Path) -> None:
    upstream = Relay(enable_SMTPUTF8=True).start()
    path = write_config(tmp_path, sender={"relay": upstream.address, "poll_interval": 60})
    config = load_config(path)
    receiver = MailbagProcess("receiver", path).start()
    sender = MailbagProcess("sender", path).start()
    try:
        host, port = config.receiver.listen.host, config.receiver.listen.port
        wait_for_banner(host, port)
        with smtplib.SMTP(host, port, timeout=10) as client:
            client.ehlo("client.test")
            assert client.has_extn("smtputf8")
            client.command_encoding = "utf-8"
            code, text = client.docmd("MAIL", "FROM:<jos\u00e9@example.com>")  # no SMTPUTF8
            assert (code, text[:5]) == (553, b"5.6.7")
            client.rset()
            recipients = ["b\u00fcb@example.org", "j\u00f6rg@localhost"]
            client.sendmail("jos\u00e9@example.com", recipients, DATA, mail_options=["SMTPUTF8"])
        (got,) = upstream.handler.wait_for(1)
        assert got.mail_from == "jos\u00e9@example.com" and "SMTPUTF8" in got.mail_options
        assert got.rcpt_tos == ["b\u00fcb@example.org"]
        trace, _ = split_trace(got.content)
        assert trace["protocol"] == b"UTF8SMTP"  # RFC 6531 §3.7.3
        assert_as_sent(got.content, DATA, recipients=recipients)
        box = config.local.maildir / "j\u00f6rg" / "new"
        deadline = time.monotonic() + 10
        while not (box.is_dir() and any(box.iterdir())):
            assert time.monotonic() < deadline, "the UTF-8 mailbox got nothing"
            time.sleep(0.05)
        (stored,) = box.iterdir()
        content = stored.read_bytes()
        assert "Delivered-To: j\u00f6rg@localhost\n".encode() in content
        assert DATA.split(b"\r\n\r\n")[0].replace(b"\r\n", b"\n") in content
        assert content.endswith(b"\n\nHallo\n")
    finally:
        sender.stop()
        receiver.stop()
        upstream.stop()
