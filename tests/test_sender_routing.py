"""Where mail goes and who hears about failures (SPEC §8), through the real runner.

Aliases, sender rewriting, DKIM signing and RFC 3464 notices, each with a real
queue, real Maildirs and a real aiosmtpd relay; every notice is parsed back with the
`email` package and every DKIM signature verified with dkimpy.
"""

from __future__ import annotations

import email
import email.policy
import mailbox
import re
from email.message import Message
from pathlib import Path

import dkim
import pytest

from shared.aliases import AliasTable
from shared.queue import arrival_time
from tests.admin_support import mailbag
from tests.sender_support import RecordingHandler, Relay
from tests.support import free_port

DATA = (b"From: Cron Daemon <cron@localhost>\r\nTo: root@localhost\r\n"
        b"Subject: nightly\r\nMessage-ID: <1@localhost>\r\n\r\nall good\r\n")


@pytest.fixture
def relay():
    made: list[Relay] = []

    def start(**replies) -> Relay:
        made.append(Relay(RecordingHandler(**replies)).start())
        return made[-1]

    yield start
    for server in made:
        server.stop()


def mailbox_messages(env, name: str) -> list[Message]:
    box = mailbox.Maildir(env.config.local.maildir / name, create=False)
    return [email.message_from_bytes(m.as_bytes(), policy=email.policy.default)
            for m in box]


def report(notice: Message) -> tuple[Message, list[Message]]:
    """The message/delivery-status part: per-message fields, per-recipient fields."""
    assert notice.get_content_type() == "multipart/report"
    assert notice.get_param("report-type") == "delivery-status"
    human, status, headers = notice.iter_parts()
    assert human.get_content_type() == "text/plain"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert status.get_content_type() == "message/delivery-status"
    groups = status.get_payload()
    return groups[0], groups[1:]


# ---------------------------------------------------------------------------- aliases

def test_aliases_rewriting_and_one_copy_per_target(setup, relay) -> None:
    """The issue's example: root -> ops@example.org, postmaster -> root, and the
    senders of localhost rewritten to example.com when relayed."""
    upstream = relay()
    env = setup(upstream.address, sections={
        "aliases": {"root": "ops@example.org", "postmaster": "root",
                    "admin": ["root", "admin"]},
        "rewrite": {"senders": {"@localhost": "@example.com"}}})
    env.writer.store("cron@localhost", ["root@localhost", "postmaster", "admin@localhost"],
                     DATA)
    env.pass_at(2e9)
    env.runner.close_relay()
    (got,) = upstream.handler.wait_for(1)
    assert got.mail_from == "cron@example.com"
    assert got.rcpt_tos == ["ops@example.org"]  # three roads to it, one copy
    assert b"From: Cron Daemon <cron@example.com>\r\n" in got.content
    assert got.content.endswith(b"Subject: nightly\r\nMessage-ID: <1@localhost>\r\n\r\n"
                                b"all good\r\n")
    (copy,) = mailbox_messages(env, "admin")  # admin's own mailbox: not rewritten
    assert copy["From"] == "Cron Daemon <cron@localhost>"
    assert env.queued() == []


def test_an_alias_loop_made_by_a_reload_fails_with_a_bounce(setup, log_lines) -> None:
    env = setup(None)
    env.runner.router.aliases = AliasTable({"a": "b", "b": "a"}, ("localhost",))  # unchecked
    queue_id = env.writer.store("someone@localhost", ["a@localhost"], DATA)
    env.pass_at(2e9)
    assert queue_id in env.failed()
    (notice,) = env.notices().values()
    _, (rcpt,) = report(email.message_from_bytes(notice.data, policy=email.policy.default))
    assert rcpt["Status"] == "5.3.5" and "alias loop" in rcpt["Diagnostic-Code"]
    assert any(" alias info " in x and f"id={queue_id}" in x and "alias=a" in x
               for x in log_lines)


def test_a_notice_to_a_mailbox_that_cannot_exist_goes_to_postmaster(setup) -> None:
    env = setup(None, sections={"aliases": {"postmaster": "pm"}})
    env.writer.store("", ["../etc@localhost"], b"Subject: a notice\r\n\r\nx\r\n")
    env.pass_at(2e9)
    (got,) = mailbox_messages(env, "pm")
    assert got["Subject"] == "a notice"
    assert env.queued() == [] and env.failed() == []


# ---------------------------------------------------------------------------- rewriting

def test_an_unparseable_from_is_relayed_unchanged_with_a_warning(setup, relay,
                                                                  log_lines) -> None:
    upstream = relay()
    env = setup(upstream.address, sections={"rewrite": {"senders": {"@localhost": "@x.org"}}})
    data = b"From: root\r\nSubject: s\r\n\r\nbody\r\n"
    queue_id = env.writer.store("root@localhost", ["b@example.org"], data)
    env.pass_at(2e9)
    env.runner.close_relay()
    (got,) = upstream.handler.wait_for(1)
    assert got.mail_from == "root@x.org" and got.content == data
    assert any(" rewrite info " in x and f"id={queue_id}" in x and "warning=" in x
               for x in log_lines)


# ---------------------------------------------------------------------------- bounces

def test_a_550_for_one_of_two_bounces_it_and_delivers_the_other_once(setup, relay) -> None:
    upstream = relay(rcpt_replies={"gone@example.org": "550 5.1.1 no such user here"})
    env = setup(upstream.address)
    queue_id = env.writer.store("alice@localhost", ["gone@example.org", "ok@example.org"],
                                DATA)
    env.pass_at(2e9)
    env.pass_at(2e9 + 1)  # the notice is delivered like any message: to alice's Maildir
    env.runner.close_relay()
    assert [m.rcpt_tos for m in upstream.handler.wait_for(1)] == [["ok@example.org"]]
    (notice,) = mailbox_messages(env, "alice")
    assert notice["From"] == "Mail Delivery System <MAILER-DAEMON@mailbag.localdomain>"
    assert notice["Auto-Submitted"] == "auto-replied"
    per_message, (rcpt,) = report(notice)
    assert per_message["Reporting-MTA"] == "dns; mailbag.localdomain"
    arrived = email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp()
    assert arrived == int(arrival_time(queue_id, 0))
    assert rcpt["Final-Recipient"] == "rfc822; gone@example.org"
    assert rcpt["Action"] == "failed" and rcpt["Status"] == "5.1.1"
    assert rcpt["Remote-MTA"] == "dns; 127.0.0.1"
    assert rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user here"
    returned = list(notice.iter_parts())[2].get_content()
    assert "Subject: nightly" in returned and "all good" not in returned
    assert len(upstream.handler.messages) == 1  # the other recipient: once


def test_a_5xx_to_the_final_dot_bounces_every_recipient(setup, relay) -> None:
    upstream = relay(data_reply="554 5.7.1 content rejected")
    env = setup(upstream.address)
    env.writer.store("alice@localhost", ["b@example.org", "c@example.org"], DATA)
    env.pass_at(2e9)
    env.pass_at(2e9 + 1)
    (notice,) = mailbox_messages(env, "alice")
    _, recipients = report(notice)
    assert [r["Final-Recipient"] for r in recipients] == ["rfc822; b@example.org",
                                                          "rfc822; c@example.org"]
    assert {r["Status"] for r in recipients} == {"5.7.1"}


def test_expiry_bounces_with_4_4_7_and_the_last_reply(setup, relay) -> None:
    upstream = relay(data_reply="451 4.3.0 try later")
    env = setup(upstream.address, max_queue_lifetime=100,
                sections={"bounce": {"delay_warning": ""}})
    queue_id = env.writer.store("alice@localhost", ["b@example.org"], DATA)
    arrived = arrival_time(queue_id, 0)
    env.pass_at(arrived + 50)
    assert env.notices() == {}
    env.pass_at(arrived + 101)
    env.pass_at(arrived + 102)
    (notice,) = mailbox_messages(env, "alice")
    _, (rcpt,) = report(notice)
    assert rcpt["Action"] == "failed" and rcpt["Status"].startswith("4.")
    assert "451 4.3.0 try later" in rcpt["Diagnostic-Code"]
    assert "expired" in notice.get_body(("plain",)).get_content()


def test_one_delay_warning_then_the_delivery(setup, relay) -> None:
    upstream = relay(data_reply="451 4.3.0 try later")
    env = setup(upstream.address, sections={"bounce": {"delay_warning": "30"}})
    queue_id = env.writer.store("alice@localhost", ["b@example.org"], DATA)
    arrived = arrival_time(queue_id, 0)
    env.pass_at(arrived + 1)  # deferred; the next try is capped at the warning time
    assert env.runner.settler.states[queue_id].next_attempt == arrived + 11
    for at in (arrived + 11, arrived + 31, arrived + 71):
        env.pass_at(at)
    env.pass_at(arrived + 72)
    (warning,) = mailbox_messages(env, "alice")
    assert warning["Subject"] == "Delayed Mail (still being retried)"
    _, (rcpt,) = report(warning)
    assert rcpt["Action"] == "delayed" and rcpt["Will-Retry-Until"]
    assert env.runner.settler.states[queue_id].warned


def test_a_delay_warning_while_no_relay_answers_names_no_remote_mta(setup) -> None:
    """Remote-MTA (RFC 3464 §2.3.5) names the host that answered; while the relay
    cannot be reached, none did: the notice says no host."""
    env = setup(f"127.0.0.1:{free_port()}", sections={"bounce": {"delay_warning": "30"}})
    queue_id = env.writer.store("alice@localhost", ["b@example.org"], DATA)
    arrived = arrival_time(queue_id, 0)
    for at in (arrived + 1, arrived + 31, arrived + 100, arrived + 101):
        env.pass_at(at)
    (warning,) = mailbox_messages(env, "alice")
    _, (rcpt,) = report(warning)
    assert rcpt["Action"] == "delayed" and rcpt["Remote-MTA"] is None
    assert "the mail system" in warning.get_body(("plain",)).get_content()


def test_mail_from_the_null_sender_never_bounces(setup, relay) -> None:
    upstream = relay(rcpt_replies={"gone@example.org": "550 5.1.1 no"})
    env = setup(upstream.address)
    queue_id = env.writer.store("", ["gone@example.org"], b"Subject: a bounce\r\n\r\nx\r\n")
    env.pass_at(2e9)
    env.pass_at(2e9 + 1)
    assert queue_id in env.failed() and env.all_queued() == []


# ---------------------------------------------------------------------------- DKIM

def published(record: str) -> bytes:
    """The TXT record's value as a resolver returns it: its strings joined."""
    return "".join(re.findall(r'"([^"]*)"', record)).encode()


def test_relayed_mail_is_signed_after_rewriting_and_verifies(setup, relay,
                                                             tmp_path: Path) -> None:
    """`mailbag dkim-keygen` makes the key and prints the record; a message relayed
    through mailbag verifies against that record (dkimpy, through its DNS hook)."""
    done = mailbag(None, "dkim-keygen", "example.com", "mb1", "--dir", str(tmp_path / "keys"))
    assert done.returncode == 0, done.stderr
    record = done.stdout.strip().splitlines()[-1]
    assert record.startswith('mb1._domainkey.example.com IN TXT "v=DKIM1; k=rsa; p=')
    key_file = tmp_path / "keys" / "example.com.mb1.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    upstream = relay()
    env = setup(upstream.address, sections={
        "rewrite": {"senders": {"@localhost": "@example.com"}},
        "dkim": {"domain": "example.com", "selector": "mb1", "key_file": str(key_file)}})
    data = ("From: Jörg <joerg@localhost>\r\nTo: b@example.org\r\nSubject: Grüße\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\nSchöne Grüße\r\n.\r\n..dots\r\n").encode()
    env.writer.store("joerg@localhost", ["b@example.org"], data)
    env.writer.store("joerg@localhost", ["you@localhost"], data)  # local: never signed
    env.pass_at(2e9)
    env.runner.close_relay()
    (got,) = upstream.handler.wait_for(1)
    assert got.content.startswith(b"DKIM-Signature: ")

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"mb1._domainkey.example.com."
        return published(record)

    assert dkim.verify(got.content, dnsfunc=dns)
    assert not dkim.verify(got.content.replace(b"Sch", b"sch"), dnsfunc=dns)
    (local,) = mailbox_messages(env, "you")
    assert "DKIM-Signature" not in local


# ---------------------------------------------------------------------------- SMTPUTF8

def test_a_utf8_address_needs_a_relay_with_smtputf8(setup) -> None:
    plain = Relay(RecordingHandler(), enable_SMTPUTF8=False).start()
    env = setup(plain.address)
    queue_id = env.writer.store("alice@localhost", ["jos\u00e9@example.org"], DATA)
    env.pass_at(2e9)
    env.pass_at(2e9 + 1)
    plain.stop()
    assert plain.handler.messages == [] and queue_id in env.failed()
    (notice,) = mailbox_messages(env, "alice")
    _, (rcpt,) = report(notice)
    assert rcpt["Status"] == "5.6.7"


def test_smtputf8_is_passed_to_a_relay_that_offers_it(setup) -> None:
    upstream = Relay(enable_SMTPUTF8=True).start()
    try:
        env = setup(upstream.address)
        env.writer.store("jos\u00e9@example.com", ["b@example.org"], DATA)
        env.pass_at(2e9)
        env.runner.close_relay()
        (got,) = upstream.handler.wait_for(1)
    finally:
        upstream.stop()
    assert got.mail_from == "jos\u00e9@example.com" and "SMTPUTF8" in got.mail_options
