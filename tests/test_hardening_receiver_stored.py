"""Receiver hardening: what the stored message and the replies must be.

Protocol logic is checked by feeding bytes to a `ServerSession` (sans-I/O) and
rendering what `trace.py` would store, as the server does.
"""

from __future__ import annotations

from email import message_from_bytes, policy
from pathlib import Path

import pytest

from services.receiver.session import (
    NEED_DATA,
    MessageReady,
    SendReply,
    ServerSession,
    SessionPolicy,
)
from services.sender.local import is_local
from shared.config import load_config
from shared.smtp import idna_twin
from tests.support import write_config
from tests.trace_support import HOST, QUEUE_ID, assert_as_sent, receive, split_trace, stored


@pytest.mark.parametrize("may_relay", [False, True], ids=["outside", "relay-network"])
@pytest.mark.parametrize("sent", [b" indented first line\r\nmore\r\n",
                                  b"\tSubject: folded away\r\n\r\nbody\r\n"],
                         ids=["space", "tab"])
def test_data_starting_with_white_space_never_continues_the_received_field(
        sent: bytes, may_relay: bool) -> None:
    """A first line that begins with white space would be read as a continuation of
    the Received: field put in front of it (RFC 5322 §2.2.3): the trace's date gets
    the client's text appended and the line is lost from the body. As Postfix's
    smtpd, an empty line goes between them."""
    message = receive(sent, may_relay=may_relay)
    assert isinstance(message, MessageReady), message
    data = stored(message)
    trace, _rest = split_trace(data)
    assert_as_sent(data, sent, queue_id=QUEUE_ID, trusted=may_relay)
    parsed = message_from_bytes(data, policy=policy.default)
    assert parsed["Received"].endswith(trace["date"].decode())
    assert parsed.get_payload(decode=True) == sent


def replies_to(*commands: str) -> list[bytes]:
    """The wire replies of an EHLO session to `commands` (the EHLO's left out)."""
    session = ServerSession(SessionPolicy(hostname=HOST), "192.0.2.7", may_relay=True)
    session.receive_data(b"".join(c.encode() + b"\r\n" for c in ("EHLO c.example", *commands)))
    replies = []
    while (event := session.next_event()) is not NEED_DATA:
        assert isinstance(event, SendReply)
        replies.append(event.data)
    return replies[1:]


@pytest.mark.parametrize(("commands", "expected"), [
    (["MAIL FROM:<a@b@c.example>"], b"501 5.1.7 "),  # X.1.7: bad sender address syntax
    (["MAIL FROM:<alice>"], b"501 5.1.7 "),
    (["MAIL FROM:<a@b.example>", "RCPT TO:<a@b@c.example>"], b"501 5.1.3 "),  # destination
    (["MAIL FROM:<a@b.example> SIZE="], b"501 5.5.4 "),  # a malformed parameter: syntax
    (["MAIL FROM:<a@b.example>", "RCPT TO:<c@d.example> NOTIFY"], b"555 5.5.4 "),
    (["MAIL FROM:<a@b.example>", "RCPT TO:<c@d.example> X=\x7f"], b"501 5.5.4 "),
    (["MAIL <a@b.example>"], b"501 5.5.4 "),  # no FROM: keyword: command syntax
    (["MAIL FROM:<a@b.example>", "RCPT <c@d.example>"], b"501 5.5.4 "),
])
def test_an_enhanced_code_says_whose_address_or_which_syntax_was_bad(
        commands: list[str], expected: bytes) -> None:
    """RFC 3463: X.1.7 is a bad sender address, X.1.3 a bad recipient address, X.5.4
    a command's arguments that are no path at all (Postfix answers the same)."""
    assert replies_to(*commands)[-1].startswith(expected)


# ---------------------------------------------------- an internationalised local domain

@pytest.mark.parametrize("configured", ["münchen.example", "xn--mnchen-3ya.example"])
def test_an_international_local_domain_is_local_in_both_idna_forms(
        tmp_path: Path, configured: str) -> None:
    """RFC 5890: `münchen.example` and `xn--mnchen-3ya.example` are one domain. A
    client that does not speak SMTPUTF8 writes the A-labels; the domain compared as
    text took that for a foreign domain - 554 relay access denied from outside, and
    relayed, never delivered locally, from a relay client. Both forms are local now,
    whichever is configured, the configured one first."""
    config = load_config(write_config(tmp_path, local={"domains": [configured],
                                                       "maildir": "var/mail"}))
    assert config.local.domains[0] == configured
    assert set(config.local.domains) == {"münchen.example", "xn--mnchen-3ya.example"}
    policy = SessionPolicy(hostname=HOST, local_domains=frozenset(config.local.domains))
    session = ServerSession(policy, "192.0.2.7", may_relay=False)
    session.receive_data(b"EHLO client.example\r\nMAIL FROM:<a@example.com>\r\n"
                         b"RCPT TO:<bob@xn--mnchen-3ya.example>\r\n")
    replies = []
    while (event := session.next_event()) is not NEED_DATA:
        if isinstance(event, SendReply):
            replies.append(event.reply.code)
    assert replies == [250, 250, 250], replies  # EHLO, MAIL, RCPT
    assert is_local("bob@xn--mnchen-3ya.example", config.local.domains)
    assert is_local("bob@münchen.example", config.local.domains)


def test_a_plain_or_broken_domain_has_no_idna_twin() -> None:
    assert idna_twin("example.com") is None
    assert idna_twin("xn--zz.example") is None  # not valid punycode for IDNA


@pytest.mark.parametrize("line", ["ſtarttls".encode(), "quıt".encode(), "ehlo x".upper().encode()])
def test_a_verb_is_matched_in_ascii_only(line: bytes) -> None:
    """Unicode case mapping turns "ſ" into "S" and "ı" into "I": such a word is no
    SMTP verb (500), while an ASCII verb in any case still is one."""
    session = ServerSession(SessionPolicy(hostname=HOST), "192.0.2.7", may_relay=False)
    session.receive_data(line + b"\r\n")
    event = session.next_event()
    assert isinstance(event, SendReply)
    assert event.reply.code == (250 if line.startswith(b"EHLO") else 500), event.reply
