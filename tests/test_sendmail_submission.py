"""services/sendmail/submission.py: what a locally submitted message becomes (no I/O)."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from email import message_from_bytes, policy

import pytest

from services.sendmail.submission import (
    InputCollector,
    Submission,
    SubmissionError,
    Submitter,
    collect,
    envelope_sender,
    fold_long_lines,
    prepare,
    without_from_lines,
)

NOW = datetime(2026, 12, 1, 14, 50, 33, tzinfo=UTC)
ROOT = Submitter(uid=0, login="root", hostname="mb.example", domain="localhost")
QUEUE_ID = "18ec54825f00078d31547c"


def submit(raw: bytes, *recipients: str, extract: bool = False, sender: str | None = None,
           full_name: str | None = None) -> Submission:
    return prepare(raw, recipients=recipients, extract=extract, sender=sender,
                   full_name=full_name, submitter=ROOT, queue_id=QUEUE_ID, now=NOW)


def stored(submission: Submission) -> bytes:
    return b"".join(submission.chunks)


@pytest.mark.parametrize(("pieces", "dot_ends_input", "data"), [
    ([b"a\n", b".\n", b"b\n"], True, b"a\n"),
    ([b"a\n", b".\n", b"b\n"], False, b"a\n.\nb\n"),
    ([b"a\r\n", b".\r\n", b"b\r\n"], True, b"a\r\n"),
    ([b"a\n", b"."], True, b"a\n"),
    ([b".\n"], True, b""),
    ([b"..\n", b" .\n", b".x\n"], True, b"..\n .\n.x\n"),
    ([b"a long line cut by the reader", b".\n", b"next\n"], True,
     b"a long line cut by the reader.\nnext\n"),
], ids=["dot-ends", "-i", "crlf-dot", "dot-at-eof", "only-dot", "no-unstuffing", "mid-line-dot"])
def test_the_input_ends_at_a_lone_dot_unless_i(pieces: list[bytes], dot_ends_input: bool,
                                               data: bytes) -> None:
    collector = InputCollector(dot_ends_input=dot_ends_input, limit=1000)
    assert collect(iter(pieces), collector) == data


def test_input_over_the_limit_is_refused_as_it_arrives() -> None:
    collector = InputCollector(dot_ends_input=False, limit=10)

    def endless():
        while True:
            yield b"0123456789\n"

    with pytest.raises(SubmissionError) as caught:
        collect(endless(), collector)
    assert caught.value.exit_code == os.EX_DATAERR
    assert "max_message_bytes (10)" in str(caught.value)


CRON_MESSAGE = (
    b"From: root (Cron Daemon)\n"
    b"To: root\n"
    b"Subject: Cron <root@host> /usr/local/bin/backup\n"
    b"MIME-Version: 1.0\n"
    b"Content-Type: text/plain; charset=UTF-8\n"
    b"Content-Transfer-Encoding: 8bit\n"
    b"X-Cron-Env: <SHELL=/bin/sh>\n"
    b"X-Cron-Env: <HOME=/root>\n"
    b"\n"
    b"backup done: 3 files, caf\xc3\xa9\n"
)


def test_a_cron_message() -> None:
    submission = submit(CRON_MESSAGE, "root", full_name="CronDaemon")
    assert (submission.sender, submission.recipients) == ("root@localhost", ("root@localhost",))
    data = stored(submission)
    header = CRON_MESSAGE.split(b"\n\n")[0] + b"\n"
    assert data == (
        b"Received: by mb.example (mailbag, from userid 0)\r\n"
        b"\tid 18ec54825f00078d31547c\r\n"
        b"\tfor <root@localhost>; Tue, 01 Dec 2026 14:50:33 +0000\r\n"
        + header.replace(b"\n", b"\r\n")  # cron's header section as it came, in CRLF
        + b"Date: Tue, 01 Dec 2026 14:50:33 +0000\r\n"
        b"Message-ID: <18ec54825f00078d31547c@mb.example>\r\n"
        b"\r\nbackup done: 3 files, caf\xc3\xa9\r\n")  # 8-bit text as it came
    assert submission.size == len(data)


def test_a_bare_body_gets_from_date_message_id_and_the_empty_line() -> None:
    data = stored(submit(b"test\n", "root"))
    message = message_from_bytes(data, policy=policy.default)
    assert message["From"] == "root@localhost"
    assert message["Message-ID"] == f"<{QUEUE_ID}@mb.example>"
    assert message["Date"] == "Tue, 01 Dec 2026 14:50:33 +0000"
    assert message.get_content() == "test\r\n"
    assert not message.defects
    assert data.endswith(b"\r\n\r\ntest\r\n")


def test_an_empty_message_still_gets_its_fields_in_crlf() -> None:
    data = stored(submit(b"", "root"))
    assert data.endswith(b"From: root@localhost\r\nDate: Tue, 01 Dec 2026 14:50:33 +0000\r\n"
                         b"Message-ID: <18ec54825f00078d31547c@mb.example>\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"")


@pytest.mark.parametrize(("raw", "data"), [
    (b"Subject: x\n\na\nb\n", b"Subject: x\r\n\r\na\r\nb\r\n"),
    (b"Subject: x\r\n\r\na\rb", b"Subject: x\r\n\r\na\r\nb\r\n"),
    (b"Subject: x\r\n\r\nmixed\nends\r\n", b"Subject: x\r\n\r\nmixed\r\nends\r\n"),
    (b"Subject: x\n\nnul\x00 and \xff stay\n", b"Subject: x\r\n\r\nnul\x00 and \xff stay\r\n"),
])
def test_line_ends_become_crlf_and_nothing_else_changes(raw: bytes, data: bytes) -> None:
    message = stored(submit(raw + b"", "root", sender="a@x.org"))
    header_end = message.index(b"Subject: x\r\n")
    added = b"From: a@x.org\r\nDate: Tue, 01 Dec 2026 14:50:33 +0000\r\n" \
            b"Message-ID: <18ec54825f00078d31547c@mb.example>\r\n"
    assert message[header_end:] == data[:12] + added + data[12:]


def test_t_reads_to_cc_bcc_and_removes_bcc() -> None:
    raw = (b"From: Me <me@x.org>\n"
           b"To: Alice <alice@example.com>, root\n"
           b"Cc: \"Smith, Bob\" <bob@example.org>,\n  alice@example.com\n"
           b"Bcc: secret@example.net,\n\thidden\n"
           b"Subject: hi\n\nbody\n")
    submission = submit(raw, extract=True)
    assert submission.recipients == ("alice@example.com", "root@localhost", "bob@example.org",
                                     "secret@example.net", "hidden@localhost")
    data = stored(submission)
    assert b"Bcc" not in data and b"secret" not in data and b"hidden" not in data
    assert b"Cc: \"Smith, Bob\" <bob@example.org>,\r\n  alice@example.com\r\nSubject: hi\r\n" \
        in data
    assert b"\tfor <" not in data  # several recipients: none named in Received:


def test_command_line_and_t_recipients_are_both_used_like_postfix() -> None:
    submission = submit(b"To: b@x.org\nCc: undisclosed-recipients:;\n\nhi\n", "a@x.org",
                        "b@x.org", extract=True)
    assert submission.recipients == ("a@x.org", "b@x.org")


def test_bcc_is_removed_without_t_too() -> None:
    submission = submit(b"Bcc: other@x.org\nSubject: s\n\nhi\n", "root")
    assert submission.recipients == ("root@localhost",)
    assert b"Bcc" not in stored(submission) and b"other@x.org" not in stored(submission)


def test_an_8bit_address_in_a_header_is_read_as_utf8() -> None:
    raw = "To: J\u00f6rg <j\u00f6rg@b\u00fccher.example>\n\nhi\n".encode()
    assert submit(raw, extract=True).recipients == ("j\u00f6rg@b\u00fccher.example",)


@pytest.mark.parametrize(("recipients", "raw", "extract", "code", "message"), [
    ((), b"Subject: s\n\nhi\n", False, os.EX_USAGE, "no recipients"),
    ((), b"Subject: s\n\nhi\n", True, os.EX_USAGE,
     "no recipients (none on the command line, none in To:, Cc:, Bcc:)"),
    (("a@b@c",), b"\nhi\n", False, os.EX_DATAERR, "bad recipient address 'a@b@c'"),
    (("a b",), b"\nhi\n", False, os.EX_DATAERR, "bad recipient address 'a b'"),
    ((), b"To: ok@x.org\nBcc: a@b@c\n\nhi\n", True, os.EX_DATAERR, "bad Bcc: recipient address"),
    ((), b"To: @x.org\n\nhi\n", True, os.EX_DATAERR, "bad To: recipient address"),
    ((), b"To: ok@x.org\nCc: foo@\n\nhi\n", True, os.EX_DATAERR,
     "cannot read the Cc: field of the message"),
    ((), b"To: x@[1.2\n\nhi\n", True, os.EX_DATAERR, "cannot read the To: field"),
], ids=["none", "none-t", "two-ats", "space", "bad-bcc", "bad-to", "parser-fails",
        "parser-fails-2"])
def test_refused_recipients(recipients: tuple[str, ...], raw: bytes, extract: bool, code: int,
                            message: str) -> None:
    with pytest.raises(SubmissionError) as caught:
        submit(raw, *recipients, extract=extract)
    assert caught.value.exit_code == code
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(("given", "sender"), [
    (None, "root@localhost"),
    ("alice", "alice@localhost"),
    ("alice@example.com", "alice@example.com"),
    ("<alice@example.com>", "alice@example.com"),
    ("<>", ""),
    ("", ""),
])
def test_envelope_sender(given: str | None, sender: str) -> None:
    assert envelope_sender(given, ROOT) == sender


def test_a_bad_sender_is_refused() -> None:
    with pytest.raises(SubmissionError) as caught:
        envelope_sender("not an address", ROOT)
    assert caught.value.exit_code == os.EX_DATAERR
    assert str(caught.value).startswith("bad sender address 'not an address'")


def test_the_from_field_names_the_sender_with_the_full_name() -> None:
    data = stored(submit(b"Subject: s\n\nhi\n", "root", sender="ops@x.org",
                         full_name="J\u00f6rg Ops"))
    assert message_from_bytes(data, policy=policy.default)["From"] == "J\u00f6rg Ops <ops@x.org>"
    assert b"From: =?utf-8?b?" in data  # RFC 2047: the header itself stays ASCII
    null = stored(submit(b"Subject: s\n\nhi\n", "root", sender="<>"))
    assert b"From: MAILER-DAEMON@mb.example\r\n" in null
    kept = stored(submit(b"From: x@y.org\n\nhi\n", "root", full_name="Ignored"))
    assert kept.count(b"From:") == 1 and b"Ignored" not in kept


@pytest.mark.parametrize("length", [998, 999, 1995, 1996, 5000])
def test_a_long_line_is_broken_into_lines_smtp_allows(length: int) -> None:
    """RFC 5321 §4.5.3.1.6: at most 998 octets and CRLF. Longer lines are broken
    with CRLF and a space, as Postfix's smtp_line_length_limit; unbroken again
    (CRLF+space removed) the text is what was written."""
    line = b"".join(b"%d" % (n % 10) for n in range(length))
    folded = fold_long_lines(b"Subject: x\r\n\r\n" + line + b"\r\nend\r\n")
    lines = folded.split(b"\r\n")
    assert max(len(x) for x in lines) <= 998
    assert folded.replace(b"\r\n ", b"") == b"Subject: x\r\n\r\n" + line + b"\r\nend\r\n"
    assert (folded == b"Subject: x\r\n\r\n" + line + b"\r\nend\r\n") == (length <= 998)


def test_a_long_header_line_becomes_a_folded_field_the_email_package_reads() -> None:
    """-t reads the recipients from the field as written, and the stored field is
    folded before whitespace: unfolded, it is exactly what was written."""
    addresses = [f"user{n}@example.org" for n in range(120)]
    field = b"To: " + ", ".join(addresses).encode()
    submission = submit(field + b"\nSubject: many\n\nbody\n", extract=True)
    assert submission.recipients == tuple(addresses)
    data = stored(submission)
    assert max(len(x) for x in data.split(b"\r\n")) <= 998
    message = message_from_bytes(data, policy=policy.default)
    assert message["Subject"] == "many"
    assert [a.addr_spec for a in message["To"].addresses] == addresses
    assert field in data.replace(b"\r\n ", b" ")


def test_the_size_limit_applies_to_the_message_in_smtp_form() -> None:
    """LF line ends become CRLF: 600 LF lines of 1 octet are 1,200 octets stored."""
    raw = b"Subject: s\n\n" + b"x\n" * 600
    with pytest.raises(SubmissionError) as refused:
        prepare(raw, recipients=("root",), extract=False, sender=None, full_name=None,
                submitter=ROOT, queue_id=QUEUE_ID, now=NOW, limit=len(raw) + 100)
    assert refused.value.exit_code == os.EX_DATAERR


@pytest.mark.parametrize("ending", [b"\n", b"\r", b"\r\n"])
def test_mbox_from_lines_are_dropped_whatever_the_line_ends(ending: bytes) -> None:
    raw = ending.join([b"From me Tue Dec  1 10:00:00 2026", b">From you", b"To: a@b",
                       b"", b"From here on, body", b""])
    assert without_from_lines(raw) == ending.join([b"To: a@b", b"", b"From here on, body",
                                                   b""])
