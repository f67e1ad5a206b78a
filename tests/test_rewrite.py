"""services/sender/rewrite.py: envelope and header sender rewriting (SPEC §8 [rewrite])."""

from __future__ import annotations

from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest

from services.sender.rewrite import SenderRewriter
from shared.config import load_config, parse_config

SENDERS = {"root@localhost": "alerts@example.com", "@localhost": "@example.com"}


def rewriter(envelope_sender: str = "", senders: dict[str, str] | None = None) -> SenderRewriter:
    return SenderRewriter(envelope_sender, SENDERS if senders is None else senders)


def headers_of(data: bytes):
    return BytesParser(policy=policy.default).parsebytes(data)


# ---------------------------------------------------------------------------- envelope

ENVELOPES = [
    ("exact-beats-domain", "", "root@localhost", "alerts@example.com"),
    ("domain-keeps-local-part", "", "cron@localhost", "cron@example.com"),
    ("case-insensitive-key", "", "ROOT@LocalHost", "alerts@example.com"),
    ("domain-case-keeps-local-case", "", "Cron@LOCALHOST", "Cron@example.com"),
    ("no-match", "", "me@example.org", "me@example.org"),
    ("null-sender-never", "", "", ""),
    ("forced", "me@gmail.com", "cron@localhost", "me@gmail.com"),
    ("forced-not-for-null", "me@gmail.com", "", ""),
]


@pytest.mark.parametrize(("forced", "sender", "expected"),
                         [pytest.param(f, s, e, id=i) for i, f, s, e in ENVELOPES])
def test_envelope(forced: str, sender: str, expected: str) -> None:
    assert rewriter(forced).envelope(sender) == expected


def test_domain_key_to_one_address_and_subdomain_not_matched() -> None:
    m365 = rewriter(senders={"@localhost": "alerts@contoso.com"})
    assert m365.envelope("cron@localhost") == "alerts@contoso.com"
    assert m365.envelope("cron@sub.localhost") == "cron@sub.localhost"


def test_active() -> None:
    assert not SenderRewriter("", {}).active
    assert SenderRewriter("a@b.example", {}).active
    assert SenderRewriter("", {"@x": "@y"}).active


def test_from_config() -> None:
    config = parse_config({"rewrite": {"envelope_sender": "me@gmail.com",
                                       "senders": {"@localhost": "@example.com"}}},
                          Path("/etc/mailbag.toml"))
    rewrite = SenderRewriter.from_config(config.rewrite)
    assert rewrite.envelope("") == ""
    assert rewrite.envelope("x@localhost") == "me@gmail.com"
    assert rewrite.address("x@localhost") == "x@example.com"


# ---------------------------------------------------------------------------- headers

BODY = b"Body line\r\nFrom: root@localhost\r\n\r\nReply-To: root@localhost\r\n"


def message(*headers: bytes, linesep: bytes = b"\r\n", body: bytes = BODY) -> bytes:
    data = b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body
    return data.replace(b"\r\n", linesep)


def test_only_the_rewritten_field_changes_every_other_byte_kept() -> None:
    data = message(b"Received: from a (b [127.0.0.1])\r\n\tby mx; Mon, 1 Jan 2024",
                   b"From: Root <root@localhost>", b"To: root@localhost",
                   b"Subject: =?utf-8?q?caf=C3=A9?=  odd  spacing", b"X-Weird:   kept\t")
    result = rewriter().message(data)
    expected = data.replace(b"From: Root <root@localhost>", b"From: Root <alerts@example.com>")
    assert result.data == expected
    assert result.changed == [("From", "root@localhost", "alerts@example.com")]
    assert result.warnings == []


def test_nothing_to_change_returns_the_same_object() -> None:
    data = message(b"From: me@example.org", b"Sender: you@example.org")
    result = rewriter().message(data)
    assert result.data is data and result.changed == [] and result.warnings == []


@pytest.mark.parametrize("name", ["From", "Sender", "Reply-To", "FROM", "reply-to"])
def test_each_rewritten_field(name: str) -> None:
    data = message(name.encode() + b": cron@localhost", b"To: cron@localhost")
    result = rewriter().message(data)
    assert result.changed == [(name, "cron@localhost", "cron@example.com")]
    assert headers_of(result.data)[name] == "cron@example.com"
    assert headers_of(result.data)["To"] == "cron@localhost"


DISPLAY_NAMES = [
    ("comma-in-quotes", b'From: "Doe, John" <root@localhost>', "Doe, John"),
    ("escaped-quote", b'From: "The \\"Boss\\"" <root@localhost>', 'The "Boss"'),
    ("rfc2047-q", b"From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <root@localhost>", "Jörg Müller"),
    ("rfc2047-b", b"From: =?UTF-8?B?5bGx55Sw?= <root@localhost>", "山田"),
    ("raw-utf8", "From: Jörg <root@localhost>".encode(), "Jörg"),
    ("plain-words", b"From: Cron Daemon <root@localhost>", "Cron Daemon"),
]


@pytest.mark.parametrize(("header", "display"),
                         [pytest.param(h, d, id=i) for i, h, d in DISPLAY_NAMES])
def test_display_names_are_kept(header: bytes, display: str) -> None:
    result = rewriter().message(message(header, b"Subject: x"))
    parsed = headers_of(result.data)["From"]
    assert [(a.display_name, a.addr_spec) for a in parsed.addresses] == [
        (display, "alerts@example.com")]
    assert result.data.endswith(b"\r\nSubject: x\r\n\r\n" + BODY)


def test_rewritten_field_is_7bit_when_the_address_is_ascii() -> None:
    result = rewriter().message(message("From: Jörg <root@localhost>".encode()))
    from_line = result.data.split(b"\r\n\r\n")[0]
    assert from_line.isascii()  # RFC 2047 encoded word, not raw UTF-8


def test_several_addresses_in_one_from_some_rewritten() -> None:
    data = message(b'From: "A, a" <root@localhost>, b@example.org,\r\n  =?utf-8?q?C=C3=A9?= '
                   b"<c@localhost>")
    result = rewriter().message(data)
    addresses = headers_of(result.data)["From"].addresses
    assert [(a.display_name, a.addr_spec) for a in addresses] == [
        ("A, a", "alerts@example.com"), ("", "b@example.org"), ("Cé", "c@example.com")]
    assert result.changed == [("From", "root@localhost", "alerts@example.com"),
                              ("From", "c@localhost", "c@example.com")]


def test_folded_field_is_unfolded_and_rewritten() -> None:
    data = message(b"Reply-To:\r\n Team\r\n <team@localhost>", b"To: x@example.org")
    result = rewriter().message(data)
    assert headers_of(result.data)["Reply-To"].addresses[0].addr_spec == "team@example.com"
    assert b"To: x@example.org\r\n\r\n" + BODY in result.data


def test_group_syntax_is_kept() -> None:
    data = message(b"Reply-To: Team: a@localhost, b@example.org;")
    result = rewriter().message(data)
    group = headers_of(result.data)["Reply-To"].groups[0]
    assert group.display_name == "Team"
    assert [a.addr_spec for a in group.addresses] == ["a@example.com", "b@example.org"]


def test_every_from_field_is_rewritten() -> None:
    data = message(b"From: root@localhost", b"Subject: s", b"From: x@localhost")
    result = rewriter().message(data)
    assert headers_of(result.data).get_all("From") == ["alerts@example.com", "x@example.com"]


def test_utf8_address_is_written_as_utf8() -> None:
    data = message("From: José <josé@localhost>".encode())
    result = rewriter().message(data)
    assert "From: José <josé@example.com>\r\n".encode() in result.data


def test_lf_only_data_stays_lf_only() -> None:
    data = message(b"From: Root <root@localhost>", b"To: x@example.org", linesep=b"\n")
    result = rewriter().message(data)
    assert b"\r" not in result.data
    assert result.data == data.replace(b"<root@localhost>", b"<alerts@example.com>")


def test_body_is_never_touched() -> None:
    data = message(b"Subject: no from here", body=b"From: root@localhost\r\n")
    assert rewriter().message(data).data is data


def test_no_header_section() -> None:
    for data in (b"\r\nFrom: root@localhost\r\n", b"just a body line\r\nFrom: root@localhost\r\n",
                 b""):
        result = rewriter().message(data)
        assert result.data is data and result.changed == [] and result.warnings == []


def test_header_only_message_without_line_end() -> None:
    """Data without any line end counts as LF data (scan_headers' rule)."""
    result = rewriter().message(b"From: root@localhost")
    assert result.data == b"From: alerts@example.com\n"


UNPARSEABLE = [
    ("bare-name", b"From: root"),
    ("cron-style", b"From: root (Cron Daemon)"),
    ("garbage", b"From: <<>>@@"),
    ("two-without-comma", b"From: a@localhost b@localhost"),
    ("not-utf8", b"From: J\xf6rg <root@localhost>"),
]


@pytest.mark.parametrize("header", [pytest.param(h, id=i) for i, h in UNPARSEABLE])
def test_unparseable_from_is_left_unchanged_with_a_warning(header: bytes) -> None:
    data = message(header, b"Sender: root@localhost")
    result = rewriter().message(data)
    assert result.data == data.replace(b"Sender: root@localhost",
                                       b"Sender: alerts@example.com")
    assert len(result.warnings) == 1 and result.warnings[0].startswith("From:")
    assert "\n" not in result.warnings[0]


def test_huge_header_section() -> None:
    """Tens of thousands of fields: the From: at the end is found and only it changes."""
    filler = [b"X-Filler-%d: %s" % (i, b"v" * 60) for i in range(20000)]
    data = message(*filler, b"From: Root <root@localhost>")
    result = rewriter().message(data)
    assert len(data) > 1_000_000
    assert result.data == data.replace(b"<root@localhost>", b"<alerts@example.com>")


GMAIL = """
[rewrite]
envelope_sender = "me@gmail.com"
senders = {"@localhost" = "me@gmail.com"}
"""


def test_gmail_style_everything_becomes_the_account(tmp_path: Path) -> None:
    """Gmail accepts only the account (or a verified alias) in MAIL FROM and From:."""
    (tmp_path / "m.toml").write_text(GMAIL)
    rewrite = SenderRewriter.from_config(load_config(tmp_path / "m.toml").rewrite)
    data = message(b"From: Cron Daemon <root@localhost>", b"Reply-To: www-data@localhost")
    result = rewrite.message(data)
    parsed = headers_of(result.data)
    assert rewrite.envelope("root@localhost") == "me@gmail.com"
    assert str(parsed["From"]) == "Cron Daemon <me@gmail.com>"
    assert str(parsed["Reply-To"]) == "me@gmail.com"


def test_m365_style_verified_domain() -> None:
    """Microsoft 365 (and SES) take any address of a verified domain: map per domain."""
    m365 = rewriter(senders={"@localhost": "@contoso.com", "@app.internal": "@contoso.com"})
    data = message(b"From: App <noreply@app.internal>", b"Sender: cron@localhost")
    parsed = headers_of(m365.message(data).data)
    assert str(parsed["From"]) == "App <noreply@contoso.com>"
    assert str(parsed["Sender"]) == "cron@contoso.com"
    assert m365.envelope("noreply@app.internal") == "noreply@contoso.com"
