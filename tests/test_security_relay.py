"""No open relay (issue 5 §1), against a real receiver process over loopback.

The client connects from 127.0.0.2, outside `relay_networks = ["127.0.0.1/32"]`, so it
may only send to the local domains. Every address trick must either be refused or end
up queued for a local domain; nothing for a foreign domain is ever queued. The
decision is made on the client (address or login), never on MAIL FROM.
"""

from __future__ import annotations

import base64
import secrets

import pytest

from services.receiver import replies as R
from services.sender.local import is_local
from shared.smtp import domain_of
from tests.hardening_support import (
    add_user,
    connect,
    find_queued,
    queued,
    send_message,
    start_receiver,
)
from tests.support import TestCA

pytestmark = pytest.mark.e2e

OUTSIDER = "127.0.0.2"  # not in relay_networks below
INSIDER = "127.0.0.1"
LOCAL_DOMAINS = ["localhost", "us.example"]


@pytest.fixture(scope="module")
def relay_receiver(tmp_path_factory):
    folder = tmp_path_factory.mktemp("relay")
    ca = TestCA(folder)
    add_user(folder / "users", "alice", "correct horse")
    config, proc = start_receiver(
        folder,
        receiver={
            "relay_networks": [f"{INSIDER}/32"],
            "max_bad_commands": 1000,
            "tls_cert": str(ca.cert_file),
            "tls_key": str(ca.key_file),
            "users_file": str(folder / "users"),
        },
        local={"domains": LOCAL_DOMAINS},
    )
    yield config, ca
    proc.stop()


def _marker() -> bytes:
    return b"marker-" + secrets.token_hex(8).encode()


def _body(marker: bytes) -> bytes:
    return b"Subject: relay test\r\n\r\n" + marker + b"\r\n"


def test_outsider_to_foreign_domain_is_denied_and_nothing_queued(relay_receiver):
    config, _ = relay_receiver
    before = len(queued(config))
    with connect(config, source=OUTSIDER) as client:
        assert client.command("EHLO outside.example").code == 250
        assert client.command("MAIL FROM:<someone@us.example>").code == 250
        reply = client.command("RCPT TO:<victim@other.example>")
        assert (reply.code, reply.enhanced) == (R.S554_RELAY_DENIED.code, "5.7.1")
        assert "Relay access denied" in reply.text
        # No recipient was accepted: DATA is out of sequence, nothing can be queued.
        assert client.command("DATA").code == R.S503_BAD_SEQUENCE.code
        assert client.command("QUIT").code == 221
    assert len(queued(config)) == before


def test_outsider_to_local_domain_is_accepted(relay_receiver):
    config, _ = relay_receiver
    marker = _marker()
    with connect(config, source=OUTSIDER) as client:
        assert client.command("EHLO outside.example").code == 250
        reply = send_message(
            client, "someone@other.example", ["bob@localhost", "carol@US.EXAMPLE"], _body(marker)
        )
        assert reply.code == 250
    [message] = find_queued(config, marker)
    assert message.recipients == ("bob@localhost", "carol@US.EXAMPLE")


def test_mixed_recipients_only_local_ones_are_queued(relay_receiver):
    config, _ = relay_receiver
    marker = _marker()
    with connect(config, source=OUTSIDER) as client:
        assert client.command("EHLO outside.example").code == 250
        assert client.command("MAIL FROM:<x@other.example>").code == 250
        assert client.command("RCPT TO:<bob@localhost>").code == 250
        assert client.command("RCPT TO:<victim@other.example>").code == 554
        assert client.command("DATA").code == 354
        client.send(_body(marker) + b".\r\n")
        assert client.read_reply().code == 250
    [message] = find_queued(config, marker)
    assert message.recipients == ("bob@localhost",)


def test_insider_may_relay_anywhere(relay_receiver):
    config, _ = relay_receiver
    marker = _marker()
    with connect(config, source=INSIDER) as client:
        assert client.command("EHLO inside.example").code == 250
        assert send_message(client, "a@b.example", ["far@other.example"], _body(marker)).code == 250
    [message] = find_queued(config, marker)
    assert message.recipients == ("far@other.example",)


def test_a_local_mail_from_does_not_open_the_relay(relay_receiver):
    """The decision is on the client, never on MAIL FROM (a forged local sender)."""
    config, _ = relay_receiver
    with connect(config, source=OUTSIDER) as client:
        assert client.command("EHLO outside.example").code == 250
        assert client.command("MAIL FROM:<postmaster@localhost>").code == 250
        assert client.command("RCPT TO:<victim@other.example>").code == 554


# Address tricks an open-relay scanner tries. None may queue a foreign recipient.
# (argument of RCPT TO:, expected code, the recipient queued when accepted)
TRICKS = [
    ("<user%other.example@localhost>", 250, "user%other.example@localhost"),  # %-hack: local
    ("<user%other.example>", 501, None),
    ("<other.example!user@localhost>", 250, "other.example!user@localhost"),  # bang: local
    ("<other.example!user>", 501, None),
    # RFC 5321 §4.1.2: the source route is accepted and dropped; decide on the mailbox.
    ("<@localhost:user@other.example>", 554, None),
    ("<@localhost,@us.example:user@other.example>", 554, None),
    ("<@other.example:user@localhost>", 250, "user@localhost"),
    ('<"user@other.example"@localhost>', 250, '"user@other.example"@localhost'),
    ('<"user@other.example">', 501, None),
    ("<user@other.example@localhost>", 501, None),
    ("<user@localhost@other.example>", 501, None),
    ("<user@other.example.>", 501, None),
    ("<user@[192.0.2.1]>", 554, None),
    ("<USER@OTHER.EXAMPLE>", 554, None),
    ("user@other.example", 554, None),  # no angle brackets
    ("<postmaster@other.example>", 554, None),
    ("<user@localhost><victim@other.example>", 501, None),
    ("<user@localhost> <victim@other.example>", 501, None),
    ("<user@other.example> ORCPT=rfc822;user@localhost", 555, None),
]


@pytest.mark.parametrize(("argument", "expected", "recipient"), TRICKS)
def test_address_tricks_never_relay(relay_receiver, argument, expected, recipient):
    config, _ = relay_receiver
    marker = _marker()
    with connect(config, source=OUTSIDER) as client:
        assert client.command("EHLO outside.example").code == 250
        assert client.command("MAIL FROM:<x@localhost>").code == 250
        reply = client.command(f"RCPT TO:{argument}")
        assert reply.code == expected, reply
        if reply.code == 250:
            assert client.command("DATA").code == 354
            client.send(_body(marker) + b".\r\n")
            assert client.read_reply().code == 250
        else:
            assert client.command("DATA").code == R.S503_BAD_SEQUENCE.code
    messages = find_queued(config, marker)
    if recipient is None:
        assert messages == []
    else:
        [message] = messages
        assert message.recipients == (recipient,)
        assert domain_of(recipient) in LOCAL_DOMAINS
        assert is_local(recipient, tuple(LOCAL_DOMAINS))  # the sender will not relay it


def test_nothing_foreign_was_ever_queued_from_outside(relay_receiver):
    """Whatever the tests above did: every queued recipient of an outsider is local,
    by the receiver's rule and by the sender's routing (which decides what is relayed)."""
    config, _ = relay_receiver
    for message in queued(config):
        if message.sender == "a@b.example":  # the insider's message
            continue
        for rcpt in message.recipients:
            assert domain_of(rcpt) in LOCAL_DOMAINS, message
            assert is_local(rcpt, tuple(LOCAL_DOMAINS)), message


def test_authenticated_outsider_may_relay(relay_receiver):
    config, ca = relay_receiver
    marker = _marker()
    with connect(config, source=OUTSIDER) as client:
        assert client.command("EHLO outside.example").code == 250
        assert client.command("STARTTLS").code == 220
        client.starttls(ca.client_context())
        assert client.command("EHLO outside.example").code == 250
        assert client.command("MAIL FROM:<x@other.example>").code == 250
        assert client.command("RCPT TO:<far@other.example>").code == 554  # not yet
        assert client.command("RSET").code == 250
        token = base64.b64encode(b"\0alice\0correct horse").decode()
        assert client.command(f"AUTH PLAIN {token}").code == R.S235_AUTH_OK.code
        assert send_message(client, "x@other.example", ["far@other.example"],
                            _body(marker)).code == 250
    [message] = find_queued(config, marker)
    assert message.recipients == ("far@other.example",)
