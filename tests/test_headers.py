"""shared/headers.py: the trace field, the fields added when missing, fields by offset and
address fields (SPEC §3, §8)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from email import message_from_bytes, policy
from email.headerregistry import Address, Group

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.sender.bounce import FAILED, FailedRecipient, build_notice
from services.sender.rewrite import SenderRewriter
from shared.dkim import DkimSigner, keygen, load_key
from shared.headers import (
    HeaderScanner,
    body_separator,
    format_address_field,
    from_field,
    local_received,
    missing_fields,
    parse_address_field,
    scan_headers,
    smtp_received,
    without_fields,
)
from tests.support import PROPERTY_SETTINGS, chunked

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


# (case, data, [(name as written, field bytes)])
FIELDS = [
    ("simple", b"A: 1\r\nB: 2\r\n\r\nbody\r\n", [("A", b"A: 1\r\n"), ("B", b"B: 2\r\n")]),
    ("folded", b"A: 1\r\n 1b\r\n\tc\r\nB:2\r\n\r\n", [("A", b"A: 1\r\n 1b\r\n\tc\r\n"),
                                                      ("B", b"B:2\r\n")]),
    ("lf-only", b"A: 1\n 2\nB: 3\n\nbody\n", [("A", b"A: 1\n 2\n"), ("B", b"B: 3\n")]),
    ("no-header-section", b"\r\nA: not a header\r\n", []),
    ("body-without-empty-line", b"A: 1\r\nthis is body\r\nB: 2\r\n", [("A", b"A: 1\r\n")]),
    ("leading-continuation-is-body", b" A: 1\r\n\r\n", []),
    ("mbox-from-line-is-body", b"From x@y Mon\r\nA: 1\r\n", []),
    ("no-line-end", b"A: 1", [("A", b"A: 1")]),
    ("empty-value", b"A:\r\nB: \r\n\r\n", [("A", b"A:\r\n"), ("B", b"B: \r\n")]),
    ("8bit-value", "Subject: café\r\n\r\nx".encode(), [("Subject", "Subject: café\r\n".encode())]),
    ("space-before-colon", b"FROM : 1\r\n\r\n", [("FROM", b"FROM : 1\r\n")]),
]


@pytest.mark.parametrize(("data", "fields"), [pytest.param(d, f, id=i) for i, d, f in FIELDS])
def test_fields_by_offset(data: bytes, fields) -> None:
    section = scan_headers(data)
    assert [(f.name, data[f.start:f.end]) for f in section.fields] == fields
    assert section.end == (section.fields[-1].end if section.fields else 0)


def test_raw_value_and_named() -> None:
    data = b"From: a@b.example\r\nfrom:\r\n c@d.example\r\nTo: x\r\n\r\n"
    section = scan_headers(data)
    assert [f.raw_value(data) for f in section.named("FROM")] == [b" a@b.example",
                                                                  b"\r\n c@d.example"]


_NAMES = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                        blacklist_characters=":"), min_size=1, max_size=8)
_VALUES = st.lists(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                           max_size=20), min_size=1, max_size=3)


@settings(PROPERTY_SETTINGS, max_examples=100)
@given(st.lists(st.tuples(_NAMES, _VALUES), max_size=8), st.binary(max_size=40),
       st.sampled_from([b"\r\n", b"\n"]))
def test_fields_cover_the_header_section_exactly(fields, body, linesep) -> None:
    """Fields (with folds) written out are found again, byte for byte, in order."""
    raw = [(name + ":" + (linesep.decode() + " ").join(values) + linesep.decode()).encode()
           for name, values in fields]
    data = b"".join(raw) + linesep + body
    section = scan_headers(data)
    assert [data[f.start:f.end] for f in section.fields] == raw
    assert [f.name for f in section.fields] == [name for name, _ in fields]
    assert data[section.end:] == linesep + body


@settings(PROPERTY_SETTINGS, max_examples=100)
@given(st.lists(st.sampled_from([b"Received: x\r\n", b"Subject: s\n", b" folded\r\n", b"\r\n",
                                 b"\n", b"\r", b"X:", b"body", b"\t", b":", b"y" * 700]),
                max_size=20).map(b"".join),
       st.lists(st.integers(min_value=0), max_size=10))
def test_a_header_section_read_in_pieces_is_read_as_in_one(data: bytes, cuts: list[int]) -> None:
    """The receiver scans a message as the runs of lines it reads: wherever the data
    is cut, the header section found is the same."""
    scanner = HeaderScanner()
    for piece in chunked(data, cuts):
        scanner.feed(bytearray(piece))
    assert scanner.finish() == scan_headers(data)


PARSED = [
    ("plain", b" a@b.example", [("", "a@b.example")]),
    ("display", b' "Doe, J" <j@x.example>', [("Doe, J", "j@x.example")]),
    ("encoded", b" =?utf-8?b?SsO2cmc=?= <j@x.example>", [("Jörg", "j@x.example")]),
    ("folded-list", b" a@x.example,\r\n\tB <b@y.example>", [("", "a@x.example"),
                                                            ("B", "b@y.example")]),
    ("utf8-raw", " Zoë <zoë@x.example>".encode(), [("Zoë", "zoë@x.example")]),
    ("comment", b" root@x.example (Cron Daemon)", [("", "root@x.example")]),
    ("group", b" G: a@x.example, b@x.example;", [("", "a@x.example"), ("", "b@x.example")]),
]


@pytest.mark.parametrize(("raw", "addresses"),
                         [pytest.param(r, a, id=i) for i, r, a in PARSED])
def test_parse_address_field(raw: bytes, addresses) -> None:
    parsed = parse_address_field("From", raw)
    assert parsed.error is None
    assert [(a.display_name, a.addr_spec) for a in parsed.addresses] == addresses


@pytest.mark.parametrize("raw", [b" root", b" <>", b" a@b c@d", b" \xff@x.example",
                                 b" Foo <a@b",
                                 b".From: a@example.com"])  # AttributeError in the stdlib
def test_parse_address_field_errors_are_one_line(raw: bytes) -> None:
    parsed = parse_address_field("Reply-To", raw)
    assert parsed.error is not None and parsed.error.startswith("Reply-To:")
    assert "\n" not in parsed.error and parsed.addresses == ()


def test_empty_address_field_is_no_address_and_no_error() -> None:
    assert parse_address_field("From", b" ") == parse_address_field("From", b"")
    assert parse_address_field("From", b"").addresses == ()
    assert parse_address_field("From", b"").error is None


def test_format_address_field() -> None:
    groups = (Group(None, [Address("Doe, J", "j", "x.example")]),
              Group("Team", [Address("", "a", "x.example")]))
    assert format_address_field("From", groups, b"\n") == (
        b'From: "Doe, J" <j@x.example>, Team: a@x.example;\n')
    utf8 = (Group(None, [Address("Zoë", "zoë", "x.example")]),)
    assert format_address_field("From", utf8, b"\r\n") == "From: Zoë <zoë@x.example>\r\n".encode()
    encoded = (Group(None, [Address("Zoë", "zoe", "x.example")]),)
    assert format_address_field("From", encoded, b"\r\n") == (
        b"From: =?utf-8?q?Zo=C3=AB?= <zoe@x.example>\r\n")


_SOUP = st.lists(st.sampled_from([
    b"From: a@example.com", b"Reply-To: ", b"Sender:", b"\r\n", b"\n", b"\r", b" ", b"\t",
    b":", b"X", b"\xff", b"\xc3\xa9", b"\x00", b"To: b", b"From:", b"=?utf-8?q?x?=", b"<",
    b">", b"@", b",", b'"', b"example.com", b".", b"(", b")", b";", b"\\", b"[", b"]",
]), max_size=30).map(b"".join)


@pytest.fixture(scope="module")
def signer(tmp_path_factory) -> DkimSigner:
    generated = keygen("example.com", "s", tmp_path_factory.mktemp("key"), "ed25519")
    return DkimSigner([load_key("example.com", "s", generated.path)])


@settings(PROPERTY_SETTINGS, max_examples=100)  # a notice costs ~10 ms: the email package
@given(data=_SOUP)
def test_readers_of_header_fields_answer_for_any_bytes(signer: DkimSigner, data: bytes) -> None:
    """Rewriting, signing and bouncing read header fields of data from anyone: no input
    may make them raise (the stdlib's address parser crashes on some)."""
    assert signer.sign(data).data.endswith(data)
    rewriter = SenderRewriter("", {"@example.com": "@example.org"})
    assert rewriter.message(data).data is not None
    notice = build_notice(FAILED, hostname="mx.example", queue_id="1", sender="a@example.com",
                          recipients=[FailedRecipient("x@example.net")], original=data,
                          arrival=0, now=1)
    assert notice is not None and notice.count(b"\n") == notice.count(b"\r\n")
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
