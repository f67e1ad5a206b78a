"""shared/headers.py: the trace field and the fields added when missing (SPEC §3, §8)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from email import message_from_bytes, policy

import pytest

from shared.headers import (
    body_separator,
    from_field,
    local_received,
    missing_fields,
    scan_headers,
    smtp_received,
    without_fields,
)

NOW = datetime(2026, 12, 1, 14, 50, 33, tzinfo=UTC)


@pytest.mark.parametrize(
    ("data", "end", "eol", "names", "received"),
    [
        (b"Subject: hi\r\nFrom: a@b\r\n\r\nbody\r\n", 24, b"\r\n", {"subject", "from"}, 0),
        (b"Subject: hi\nX: folded\n  more\n\nbody\n", 29, b"\n", {"subject", "x"}, 0),
        (b"Received: a\r\nreceived : b\r\n\tc\r\n\r\n", 31, b"\r\n", {"received"}, 2),
        (b"\r\nbody only\r\n", 0, b"\r\n", set(), 0),
        (b"just a body line\r\n", 0, b"\r\n", set(), 0),
        (b"Subject: no body\r\n", 18, b"\r\n", {"subject"}, 0),
        (b"Subject: x\r\nnot a field\r\n", 12, b"\r\n", {"subject"}, 0),
        (b"", 0, b"\n", set(), 0),
    ],
    ids=["crlf", "lf-folded", "received-count", "no-headers", "body-first", "no-body",
         "stray-line", "empty"],
)
def test_scan_headers(data: bytes, end: int, eol: bytes, names: set[str], received: int) -> None:
    section = scan_headers(data)
    assert (section.end, section.eol, set(section.names), section.received) == (
        end, eol, names, received)


def test_a_huge_header_section_is_scanned_to_its_end() -> None:
    data = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"y" * 80) for n in range(12_000))
    section = scan_headers(data + b"\r\nbody\r\n")
    assert section.end == len(data) and len(data) > 1_000_000


def test_missing_fields_are_added_at_the_end_of_the_header_section() -> None:
    data = b"Subject: hi\r\n\r\nbody\r\n"
    section = scan_headers(data)
    added = missing_fields(section, queue_id="0123", hostname="mb.example", now=NOW)
    assert added == (b"Date: Tue, 01 Dec 2026 14:50:33 +0000\r\n"
                     b"Message-ID: <0123@mb.example>\r\n")
    message = message_from_bytes(data[:section.end] + added + data[section.end:],
                                 policy=policy.default)
    assert message["Subject"] == "hi" and message["Message-ID"] == "<0123@mb.example>"
    assert message.get_content() == "body\r\n"
    complete = scan_headers(b"Date: x\nMessage-ID: <y>\n\n")
    assert missing_fields(complete, queue_id="1", hostname="h", now=NOW) == b""


def test_smtp_received_is_folded_like_postfix_and_parses() -> None:
    field = smtp_received(helo="client.example", client_ip="192.0.2.7", hostname="mb.example",
                          protocol="ESMTPS", queue_id="18ec5", recipient="bob@example.org",
                          now=NOW.astimezone(timezone(timedelta(hours=1))))
    assert field == (b"Received: from client.example ([192.0.2.7])\r\n"
                     b"\tby mb.example (mailbag) with ESMTPS id 18ec5\r\n"
                     b"\tfor <bob@example.org>; Tue, 01 Dec 2026 15:50:33 +0100\r\n")
    message = message_from_bytes(field + b"\r\n", policy=policy.default)
    assert "by mb.example (mailbag) with ESMTPS id 18ec5" in str(message["Received"])


def test_smtp_received_neutralises_a_hostile_helo_and_names_ipv6() -> None:
    field = smtp_received(helo="x)(evil;\u00e9", client_ip="::1", hostname="h",
                          protocol="ESMTP", queue_id="1", recipient=None, now=NOW)
    assert field.startswith(b"Received: from x??evil;? ([IPv6:::1])\r\n\tby h (mailbag)")
    assert b"for <" not in field


def test_local_received() -> None:
    assert local_received(uid=1000, hostname="h", queue_id="9", recipient=None, now=NOW) == (
        b"Received: by h (mailbag, from userid 1000)\r\n"
        b"\tid 9; Tue, 01 Dec 2026 14:50:33 +0000\r\n")


@pytest.mark.parametrize(("data", "kept"), [
    (b"Bcc: a@b\r\nSubject: s\r\n\r\nbody\r\n", b"Subject: s\r\n"),
    (b"To: x\r\nBCC : a@b,\r\n c@d\r\n\tmore\r\nCc: y\r\n\r\n", b"To: x\r\nCc: y\r\n"),
    (b"Subject: s\nbcc:\n\nBcc: in the body\n", b"Subject: s\n"),
    (b"Subject: s\r\n\r\n", b"Subject: s\r\n"),
    (b"X-Bcc: kept\r\nBcc-Like: kept\r\n", b"X-Bcc: kept\r\nBcc-Like: kept\r\n"),
], ids=["first", "folded", "empty-value", "none", "look-alikes"])
def test_without_fields_drops_whole_fields_of_the_header_section(data: bytes, kept: bytes) -> None:
    assert without_fields(data, {"bcc"}) == kept


@pytest.mark.parametrize(("data", "separator"), [
    (b"Subject: s\r\n\r\nbody\r\n", b""),
    (b"Subject: s\r\n", b""),
    (b"", b""),
    (b"body only\r\n", b"\r\n"),
    (b"Subject: s\nnot a field\n", b"\n"),
    (b"\r\nbody after an empty header section\r\n", b""),
], ids=["has-empty-line", "no-body", "empty", "body-first", "stray-line", "empty-header"])
def test_body_separator(data: bytes, separator: bytes) -> None:
    assert body_separator(data, scan_headers(data)) == separator


@pytest.mark.parametrize(("address", "name", "field"), [
    ("root@localhost", None, b"From: root@localhost\r\n"),
    ("root@localhost", "Cron Daemon", b"From: Cron Daemon <root@localhost>\r\n"),
    ("a@x.org", "Smith, Bob", b'From: "Smith, Bob" <a@x.org>\r\n'),
    ("a@x.org", "J\u00f6rg", b"From: =?utf-8?b?SsO2cmc=?= <a@x.org>\r\n"),
    ("j\u00f6rg@x.org", "J\u00f6rg", "From: j\u00f6rg@x.org\r\n".encode()),
], ids=["bare", "name", "quoted", "rfc2047", "utf8-address"])
def test_from_field(address: str, name: str | None, field: bytes) -> None:
    assert from_field(address, name) == field
