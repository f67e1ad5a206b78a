"""services/sender/bounce.py: RFC 3464 notices, parsed back with the `email` package."""

from __future__ import annotations

from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import parsedate_to_datetime

import pytest

from services.sender.bounce import (
    DELAYED,
    FAILED,
    MAX_RETURNED_HEADERS,
    SUBJECTS,
    FailedRecipient,
    build_notice,
)
from shared.smtp import Reply

ARRIVAL = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000
NOW = ARRIVAL + 5 * 3600
UNTIL = ARRIVAL + 5 * 86400
QUEUE_ID = "1797a2b3c4d5e6f7a1b2c3"
ORIGINAL = (b"Received: from client (localhost [127.0.0.1])\r\n"
            b"\tby mx.example; Tue, 14 Nov 2023\r\n"
            b"From: Cron Daemon <cron@example.com>\r\nTo: ops@example.org\r\n"
            b"Subject: nightly backup\r\nMessage-ID: <abc@example.com>\r\n\r\n"
            b"SECRET BODY LINE\r\n")


def notice(action=FAILED, recipients=None, original=ORIGINAL, sender="cron@example.com",
           **kwargs) -> bytes:
    failures = recipients or [FailedRecipient(
        "ops@example.org", Reply(550, "5.1.1 <ops@example.org>: User unknown", "5.1.1"),
        original="root@localhost", remote_mta="smtp.example.net", last_attempt=NOW - 60)]
    extra = {"retry_until": UNTIL} if action == DELAYED else {}
    extra.update(kwargs)
    data = build_notice(action, hostname="mx.example", queue_id=QUEUE_ID, sender=sender,
                        recipients=failures, original=original, arrival=ARRIVAL, now=NOW,
                        **extra)
    assert data is not None
    return data


def parse(data: bytes) -> EmailMessage:
    return BytesParser(policy=policy.default).parsebytes(data)


def parts(data: bytes) -> tuple[EmailMessage, EmailMessage, list, EmailMessage]:
    message = parse(data)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    human, status, headers = message.iter_parts()
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    return message, human, status.get_payload(), headers


def content(part: EmailMessage) -> str:
    """A text part's decoded content with LF line ends (the parser keeps the CRLFs)."""
    return part.get_content().replace("\r\n", "\n")


def words(part: EmailMessage) -> str:
    """A text part's words joined by single spaces (line wrapping does not matter)."""
    return " ".join(part.get_content().split())


def date(value: str) -> float:
    return parsedate_to_datetime(value).timestamp()


def test_failed_notice_every_field() -> None:
    message, human, blocks, headers = parts(notice())
    assert message["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.example"
    assert str(message["To"]) == "cron@example.com"
    assert message["Subject"] == SUBJECTS[FAILED] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert date(message["Date"]) == NOW
    assert message["Message-ID"].startswith("<" + QUEUE_ID)
    assert message["Message-ID"].endswith("@mx.example>")
    per_message, per_recipient = blocks
    assert per_message["Reporting-MTA"] == "dns; mx.example"
    assert per_message["X-Mailbag-Queue-ID"] == QUEUE_ID
    assert date(per_message["Arrival-Date"]) == ARRIVAL
    assert per_recipient["Final-Recipient"] == "rfc822; ops@example.org"
    assert per_recipient["Original-Recipient"] == "rfc822; root@localhost"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; smtp.example.net"
    assert per_recipient["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 5.1.1 <ops@example.org>: User unknown")
    assert date(per_recipient["Last-Attempt-Date"]) == NOW - 60
    assert per_recipient["Will-Retry-Until"] is None
    text = words(human)
    assert "mx.example" in text and "<ops@example.org>" in text and "User unknown" in text
    assert "root@localhost" in text
    returned = content(headers)
    assert "Subject: nightly backup\n" in returned and "Message-ID: <abc@example.com>" in returned
    assert "\tby mx.example" in returned  # folded lines returned as they were
    assert "SECRET BODY LINE" not in notice().decode()  # headers only, never the body


def test_delayed_notice() -> None:
    failure = FailedRecipient("ops@example.org", Reply(451, "greylisted, try later", "4.7.1"),
                              remote_mta="smtp.example.net", last_attempt=NOW)
    message, human, blocks, _ = parts(notice(DELAYED, [failure]))
    assert message["Subject"] == "Delayed Mail (still being retried)"
    recipient = blocks[1]
    assert recipient["Action"] == "delayed"
    assert recipient["Status"] == "4.7.1"
    assert recipient["Original-Recipient"] is None
    assert date(recipient["Will-Retry-Until"]) == UNTIL
    assert recipient["Diagnostic-Code"] == "smtp; 451 4.7.1 greylisted, try later"
    text = words(human)
    assert "5 hours" in text and "not yet been delivered" in text


def test_delayed_needs_retry_until() -> None:
    with pytest.raises(ValueError, match="retry_until"):
        build_notice(DELAYED, hostname="h", queue_id=QUEUE_ID, sender="a@b.example",
                     recipients=[FailedRecipient("x@y.example")], original=ORIGINAL,
                     arrival=ARRIVAL, now=NOW)


def test_no_recipients_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="recipient"):
        build_notice(FAILED, hostname="h", queue_id=QUEUE_ID, sender="a@b.example",
                     recipients=[], original=ORIGINAL, arrival=ARRIVAL, now=NOW)


@pytest.mark.parametrize("action", [FAILED, DELAYED])
def test_null_sender_never_gets_a_notice(action) -> None:
    assert build_notice(action, hostname="h", queue_id=QUEUE_ID, sender="",
                        recipients=[FailedRecipient("x@y.example")], original=ORIGINAL,
                        arrival=ARRIVAL, now=NOW, retry_until=UNTIL) is None


STATUSES = [
    ("enhanced", FAILED, Reply(550, "no", "5.7.1"), "5.7.1"),
    ("no-enhanced-5xx", FAILED, Reply(554, "no"), "5.0.0"),
    ("no-enhanced-4xx-expired", FAILED, Reply(421, "busy"), "4.0.0"),
    ("expired-keeps-4xx-enhanced", FAILED, Reply(450, "mailbox busy", "4.2.1"), "4.2.1"),
    ("no-reply-failed", FAILED, None, "5.0.0"),
    ("no-reply-delayed", DELAYED, None, "4.0.0"),
    ("enhanced-class-mismatch", FAILED, Reply(550, "odd", "4.1.1"), "5.0.0"),
]


@pytest.mark.parametrize(("action", "reply", "status"),
                         [pytest.param(a, r, s, id=i) for i, a, r, s in STATUSES])
def test_status_from_the_reply(action, reply, status) -> None:
    _, _, blocks, _ = parts(notice(action, [FailedRecipient("x@example.org", reply)]))
    assert blocks[1]["Status"] == status


def test_several_recipients_one_notice_no_reply_ones_use_our_words() -> None:
    failures = [
        FailedRecipient("a@example.org", Reply(550, "unknown user", "5.1.1"),
                        remote_mta="relay.example"),
        FailedRecipient("b@example.org", None, reason="expired after 5 days in the queue; "
                        "last error: connection refused by relay.example:25"),
        FailedRecipient("bob@localhost", Reply(550, "local mailbox 'x/y' is not allowed",
                                               "5.1.3")),
    ]
    _, human, blocks, _ = parts(notice(FAILED, failures))
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; a@example.org", "rfc822; b@example.org", "rfc822; bob@localhost"]
    assert blocks[2]["Diagnostic-Code"].startswith("X-mailbag; expired after 5 days")
    assert blocks[2]["Remote-MTA"] is None and blocks[3]["Remote-MTA"] is None
    assert blocks[2]["Status"] == "5.0.0"
    text = words(human)
    for address in ("<a@example.org>", "<b@example.org>", "<bob@localhost>"):
        assert address in text
    assert "connection refused" in text


def test_multi_line_and_hostile_reply_stays_one_clean_field() -> None:
    reply = Reply(550, "first line\nsecond\x1b[31m line\r\nInjected: yes\n" + "z" * 3000, "5.7.1")
    data = notice(FAILED, [FailedRecipient("x@example.org", reply, remote_mta="evil\nhost")])
    _, _, blocks, _ = parts(data)
    diagnostic = blocks[1]["Diagnostic-Code"]
    assert diagnostic.startswith("smtp; 550 5.7.1 first line second?[31m line Injected: yes z")
    assert diagnostic.endswith("...") and len(diagnostic) < 900
    assert blocks[1]["Injected"] is None
    assert blocks[1]["Remote-MTA"] == "dns; evil host"


def test_utf8_recipient_and_sender() -> None:
    failure = FailedRecipient("josé@example.org", Reply(553, "no SMTPUTF8", "5.6.7"),
                              original="łukasz@localhost")
    data = notice(FAILED, [failure], sender="zoë@example.com")
    message, _, blocks, _ = parts(data)
    assert str(message["To"]) == "zoë@example.com"
    assert blocks[1]["Final-Recipient"] == "utf-8; jos\\x{E9}@example.org"
    assert blocks[1]["Original-Recipient"] == "utf-8; \\x{142}ukasz@localhost"


def test_notice_is_crlf_7bit_short_lines_even_for_8bit_long_headers() -> None:
    original = (b"From: J\xc3\xb6rg <j@example.com>\r\nSubject: \xff\xfe broken utf8\r\n"
                b"X-Long: " + b"y" * 5000 + b"\r\n\r\nbody\r\n")
    data = notice(FAILED, original=original)
    assert data.count(b"\n") == data.count(b"\r\n")
    assert all(byte < 128 for byte in data)
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    returned = content(parts(data)[3])
    assert "From: Jörg <j@example.com>\n" in returned
    assert "\ufffd" in returned  # bad bytes replaced, not an exception
    assert "X-Long: " + "y" * 5000 + "\n" in returned


def test_lf_only_original() -> None:
    data = notice(FAILED, original=ORIGINAL.replace(b"\r\n", b"\n"))
    assert data.count(b"\n") == data.count(b"\r\n")
    assert "Subject: nightly backup\n" in content(parts(data)[3])


def test_huge_header_section_is_cut_at_a_field() -> None:
    filler = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"v" * 80) for i in range(20000))
    original = b"From: a@example.com\r\n" + filler + b"Subject: last\r\n\r\nbody\r\n"
    data = notice(FAILED, original=original)
    _, human, _, headers = parts(data)
    returned = content(headers)
    assert returned.startswith("From: a@example.com\n")
    assert len(returned.encode()) <= MAX_RETURNED_HEADERS
    assert returned.endswith("v" * 80 + "\n") and "Subject: last" not in returned
    assert "first part" in words(human)


def test_no_header_section_in_the_original() -> None:
    _, _, _, headers = parts(notice(FAILED, original=b"just a body\r\n"))
    assert content(headers).strip() == ""
