"""shared/headers.py: header fields by offset, and address fields by the `email` package."""

from __future__ import annotations

from email.headerregistry import Address, Group

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.sender.bounce import FAILED, FailedRecipient, build_notice
from services.sender.rewrite import SenderRewriter
from shared.dkim import DkimSigner, keygen, load_key
from shared.headers import (
    format_address_field,
    header_section,
    line_ending,
    parse_address_field,
)
from tests.support import PROPERTY_SETTINGS

# (case, data, [(name, field bytes)], body)
SECTIONS = [
    ("simple", b"A: 1\r\nB: 2\r\n\r\nbody\r\n", [("A", b"A: 1\r\n"), ("B", b"B: 2\r\n")],
     b"body\r\n"),
    ("folded", b"A: 1\r\n 1b\r\n\tc\r\nB:2\r\n\r\n", [("A", b"A: 1\r\n 1b\r\n\tc\r\n"),
                                                      ("B", b"B:2\r\n")], b""),
    ("lf-only", b"A: 1\n 2\nB: 3\n\nbody\n", [("A", b"A: 1\n 2\n"), ("B", b"B: 3\n")],
     b"body\n"),
    ("no-header-section", b"\r\nA: not a header\r\n", [], b"A: not a header\r\n"),
    ("body-without-empty-line", b"A: 1\r\nthis is body\r\nB: 2\r\n", [("A", b"A: 1\r\n")],
     b"this is body\r\nB: 2\r\n"),
    ("leading-continuation-is-body", b" A: 1\r\n\r\n", [], b" A: 1\r\n\r\n"),
    ("mbox-from-line-is-body", b"From x@y Mon\r\nA: 1\r\n", [], b"From x@y Mon\r\nA: 1\r\n"),
    ("no-line-end", b"A: 1", [("A", b"A: 1")], b""),
    ("empty", b"", [], b""),
    ("empty-value", b"A:\r\nB: \r\n\r\n", [("A", b"A:\r\n"), ("B", b"B: \r\n")], b""),
    ("8bit-value", "Subject: café\r\n\r\nx".encode(), [("Subject", "Subject: café\r\n".encode())],
     b"x"),
    ("space-before-colon-is-body", b"A : 1\r\n\r\n", [], b"A : 1\r\n\r\n"),
]


@pytest.mark.parametrize(("data", "fields", "body"),
                         [pytest.param(d, f, b, id=i) for i, d, f, b in SECTIONS])
def test_header_section(data: bytes, fields, body: bytes) -> None:
    section = header_section(data)
    assert [(f.name, data[f.start:f.end]) for f in section.fields] == fields
    assert data[section.body_start:] == body
    assert section.end == (section.fields[-1].end if section.fields else 0)


def test_raw_value_and_named() -> None:
    data = b"From: a@b.example\r\nfrom:\r\n c@d.example\r\nTo: x\r\n\r\n"
    section = header_section(data)
    assert [f.raw_value(data) for f in section.named("FROM")] == [b" a@b.example",
                                                                  b"\r\n c@d.example"]


@pytest.mark.parametrize(("data", "linesep"), [
    (b"A: 1\r\n", b"\r\n"), (b"A: 1\n", b"\n"), (b"A: 1", b"\r\n"), (b"\n", b"\n"),
    (b"\r\n", b"\r\n"), (b"", b"\r\n"),
])
def test_line_ending(data: bytes, linesep: bytes) -> None:
    assert line_ending(data) == linesep


_NAMES = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                        blacklist_characters=":"), min_size=1, max_size=8)
_VALUES = st.lists(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                           max_size=20), min_size=1, max_size=3)


@PROPERTY_SETTINGS
@given(st.lists(st.tuples(_NAMES, _VALUES), max_size=8), st.binary(max_size=40),
       st.sampled_from([b"\r\n", b"\n"]))
def test_fields_cover_the_header_section_exactly(fields, body, linesep) -> None:
    """Fields (with folds) written out are found again, byte for byte, in order."""
    raw = [(name + ":" + (linesep.decode() + " ").join(values) + linesep.decode()).encode()
           for name, values in fields]
    data = b"".join(raw) + linesep + body
    section = header_section(data)
    assert [data[f.start:f.end] for f in section.fields] == raw
    assert [f.name for f in section.fields] == [name for name, _ in fields]
    assert data[section.body_start:] == body


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
