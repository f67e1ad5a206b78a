"""SMTP smuggling into the receiver (issue 5 §4), end to end over a raw socket.

Only `<CRLF>.<CRLF>` ends a message (RFC 5321 §4.1.1.4, §2.3.8). Each variant below
hides a fake end of data followed by a whole second transaction; the receiver must
answer exactly once at the real end and never queue the hidden message. Bare CR/LF
and NUL inside commands must never reach an envelope or a log line.
"""

from __future__ import annotations

import base64
import re

import pytest

from services.receiver import replies as R
from tests.hardening_support import (
    add_user,
    connect,
    log_text,
    queued,
    start_receiver,
    wait_for,
)
from tests.support import TestCA

pytestmark = pytest.mark.e2e

FAKE_ENDS = {
    "LF.LF": b"\n.\n",
    "CR.CR": b"\r.\r",
    "CRLF.LF": b"\r\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CRLF-NUL.CRLF": b"\r\n\x00.\r\n",
    "CRLF.NUL-CRLF": b"\r\n.\x00\r\n",
    "NUL-CRLF.CRLF-in-line": b"\x00\r\n.\r\n"[0:1] + b"\r\n.\x00\r\n",
    "CRLF.NUL-LF": b"\r\n.\x00\n",
    "LF.NUL-CRLF": b"\n.\x00\r\n",
    "CRLF-LF.LF-CRLF": b"\r\n\n.\n\r\n",
    "CRLF.CR-CR-LF": b"\r\n.\r\r\n",
}

SMUGGLED = (
    b"MAIL FROM:<evil@evil.example>\r\n"
    b"RCPT TO:<victim@localhost>\r\n"
    b"DATA\r\n"
    b"Subject: smuggled\r\n\r\nsmuggled-marker\r\n"
)

LOG_LINE = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+[+-]\d\d:?\d\d R-SMTP \S+ [a-z_]+ (ok|fail|info|defer)"
    r"( [a-z_]+=(\"([^\"\\]|\\.)*\"|\S+))*"
)

USER, PASSWORD = "alice", "pw"


@pytest.fixture(scope="module")
def smuggling_receiver(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smuggling")
    ca = TestCA(folder)
    add_user(folder / "users", USER, PASSWORD)
    config, proc = start_receiver(
        folder,
        receiver={"max_bad_commands": 1000, "tls_cert": str(ca.cert_file),
                  "tls_key": str(ca.key_file), "users_file": str(folder / "users")},
    )
    yield config, ca
    proc.stop()


@pytest.mark.parametrize("fake_end", FAKE_ENDS.values(), ids=FAKE_ENDS.keys())
def test_fake_end_of_data_never_ends_the_message(smuggling_receiver, fake_end):
    config, _ = smuggling_receiver
    before = {m.data for m in queued(config)}
    first = b"Subject: innocent\r\n\r\ninnocent-marker " + fake_end.hex().encode() + b"\r\n"
    with connect(config) as client:
        assert client.command("EHLO client.example").code == 250
        assert client.command("MAIL FROM:<a@localhost>").code == 250
        assert client.command("RCPT TO:<b@localhost>").code == 250
        assert client.command("DATA").code == R.S354_START_DATA.code
        client.send(first + b"line before" + fake_end + SMUGGLED + b".\r\nNOOP\r\n")
        end_reply = client.read_reply()
        noop = client.read_reply()
        # Exactly one reply for the message, then the NOOP's: nothing in between.
        assert noop.code == 250 and noop.text == R.S250_OK.text, (end_reply, noop)
        assert end_reply.code in (250, R.S554_BARE_NEWLINE.code), end_reply
        assert client.command("QUIT").code == 221
    new = [m for m in queued(config) if m.data not in before]
    assert all(m.sender != "evil@evil.example" for m in queued(config))
    if end_reply.code == 250:  # neutralised: ONE message holding everything
        [message] = new
        assert b"innocent-marker" in message.data and b"smuggled-marker" in message.data
    else:
        assert end_reply == R.S554_BARE_NEWLINE
        assert new == []


def test_a_real_end_of_data_after_a_fake_one_is_still_the_only_end(smuggling_receiver):
    """Sanity check of the harness: the same bytes with a real end DO become two."""
    config, _ = smuggling_receiver
    with connect(config) as client:
        assert client.command("EHLO client.example").code == 250
        assert client.command("MAIL FROM:<a@localhost>").code == 250
        assert client.command("RCPT TO:<b@localhost>").code == 250
        assert client.command("DATA").code == 354
        client.send(b"real-two-first\r\n.\r\n" + SMUGGLED.replace(b"evil@", b"second@")
                    + b".\r\n")
        codes = [client.read_reply().code for _ in range(5)]
        assert codes == [250, 250, 250, 354, 250]
    senders = [m.sender for m in queued(config)]
    assert "second@evil.example" in senders


COMMAND_INJECTIONS = [
    b"MAIL FROM:<injected@localhost>\rRCPT TO:<x@other.example>\r\n",
    b"MAIL FROM:<a@local\rhost>\r\n",
    b"MAIL FROM:<a\x00@localhost>\r\n",
    b"MAIL FROM:<a@localhost\n>\r\n",
    b"EHLO x\r2026-01-01T00:00:00.000+00:00 R-SMTP 6.6.6.6:1 queued ok id=FORGED\r\n",
    b"NOOP\rQUIT\r\n",
]


def test_cr_lf_nul_in_commands_never_reach_envelope_or_log(smuggling_receiver):
    config, _ = smuggling_receiver
    with connect(config) as client:
        assert client.command("EHLO client.example").code == 250
        for raw in COMMAND_INJECTIONS:
            client.send(raw)
            replies = [client.read_reply() for _ in range(raw.count(b"\n"))]
            assert all(r.code >= 500 for r in replies), (raw, replies)
            assert client.command("RSET").code == 250
        # The session is intact and a clean transaction still works.
        assert client.command("MAIL FROM:<clean@localhost>").code == 250
        assert client.command("RCPT TO:<b@localhost>").code == 250
        assert client.command("DATA").code == 354
        client.send(b"Subject: clean\r\n\r\ninjection-clean-marker\r\n.\r\n")
        assert client.read_reply().code == 250
    for message in queued(config):
        for address in (message.sender, *message.recipients):
            assert not re.search(r"[\x00-\x1f]", address), message
        assert message.sender != "injected@localhost"  # never the MAIL with a bare CR in it
    _assert_log_is_clean(config)


def test_crlf_in_auth_user_name_is_escaped_in_the_log(smuggling_receiver):
    config, ca = smuggling_receiver
    forged = "x\r\n2026-01-01T00:00:00.000+00:00 R-SMTP 6.6.6.6:1 auth ok user=FORGED"
    with connect(config) as client:
        assert client.command("EHLO client.example").code == 250
        assert client.command("STARTTLS").code == 220
        client.starttls(ca.client_context())
        assert client.command("EHLO client.example").code == 250
        token = base64.b64encode(f"\0{forged}\0wrong".encode()).decode()
        assert client.command(f"AUTH PLAIN {token}").code == R.S535_AUTH_FAILED.code
    wait_for(lambda: "FORGED" in log_text(config), what="the auth failure in the log")
    _assert_log_is_clean(config)


def _assert_log_is_clean(config) -> None:
    text = log_text(config)
    assert text.endswith("\n")
    for line in text.splitlines():
        assert LOG_LINE.fullmatch(line), f"malformed or forged log line: {line!r}"
        assert "6.6.6.6" not in line.split(" ")[2]
