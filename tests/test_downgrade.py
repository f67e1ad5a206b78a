"""8-bit data for a relay without 8BITMIME (services/sender/downgrade.py): pure, no I/O.

What comes out is checked by reading it back with the stdlib's own MIME parser: it
is 7 bit, and every part decodes to the bytes that went in.
"""

from __future__ import annotations

import email
import email.policy
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.sender.downgrade import MAX_NESTING, NotConvertible, downgrade, for_relay
from tests.support import PROPERTY_SETTINGS

GRUSS = "Grüße aus Köln, 10 € \r\n".encode()


def parse(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def decoded(part: email.message.Message) -> bytes:
    """A part's payload decoded, line ends as LF, without the last one."""
    payload = part.get_payload(decode=True)
    return payload.replace(b"\r\n", b"\n").rstrip(b"\n")


def plain(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").rstrip(b"\n")


def assert_7bit(data: bytes) -> None:
    assert data.isascii()
    assert all(len(line) <= 78 for line in data.split(b"\r\n")), "lines over 76 + CRLF"
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF only


# ---------------------------------------------------------------------------- for_relay

def test_7bit_data_goes_as_it_is_without_body_parameter() -> None:
    data = b"Subject: hi\r\n\r\nplain\r\n"
    assert for_relay(data, True) == (data, False)
    assert for_relay(data, False) == (data, False)


def test_8bit_data_goes_as_it_is_to_a_relay_with_8bitmime() -> None:
    data = b"Subject: hi\r\n\r\n" + GRUSS
    assert for_relay(data, True) == (data, True)


def test_8bit_data_is_converted_for_a_relay_without_8bitmime() -> None:
    data = b"Subject: hi\r\n\r\n" + GRUSS
    converted, eight_bit = for_relay(data, False)
    assert not eight_bit and converted == downgrade(data)
    assert_7bit(converted)


# ---------------------------------------------------------------------------- conversion

def test_a_message_without_mime_becomes_quoted_printable_text_plain() -> None:
    data = b"Subject: hi\nFrom: a@example.com\n\n" + GRUSS + b"trailing space \nend\n"
    out = downgrade(data)
    assert_7bit(out)
    header, body = out.split(b"\r\n\r\n", 1)
    assert header.split(b"\r\n") == [
        b"Subject: hi", b"From: a@example.com", b"MIME-Version: 1.0",
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Transfer-Encoding: quoted-printable",
    ]
    assert body.startswith(b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln, 10 =E2=82=AC=20\r\n")
    assert decoded(parse(out)) == plain(GRUSS + b"trailing space \nend\n")


def test_bytes_that_are_not_utf8_are_labelled_unknown_8bit() -> None:
    out = downgrade(b"Subject: latin-1\r\n\r\nGr\xfc\xdfe\r\n")
    assert b"Content-Type: text/plain; charset=unknown-8bit\r\n" in out
    assert decoded(parse(out)) == b"Gr\xfc\xdfe"


def test_a_mime_8bit_part_gets_its_encoding_replaced_where_it_stands() -> None:
    data = (b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: 8bit\r\n"
            b"Content-Type: text/plain;\r\n charset=utf-8\r\nSubject: s\r\n\r\n" + GRUSS)
    out = downgrade(data)
    assert out.split(b"\r\n\r\n")[0].split(b"\r\n") == [
        b"MIME-Version: 1.0", b"Content-Transfer-Encoding: quoted-printable",
        b"Content-Type: text/plain;", b" charset=utf-8", b"Subject: s",
    ]
    assert decoded(parse(out)) == plain(GRUSS)


MULTIPART = (
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"=_b1\"\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"This is a MIME message.\r\n"
    b"--=_b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n" + GRUSS +
    b"--=_b1 \r\n"  # transport padding after the delimiter
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"seven bit, untouched\r\n"
    b"--=_b1\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"AAECAwQF\r\n"
    b"--=_b1\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Subject: inner\r\n"
    b"\r\n"
    b"inner \xc3\xa9t\xc3\xa9\r\n"
    b"--=_b1--\r\n"
    b"epilogue\r\n"
)


def test_a_multipart_converts_only_its_8bit_parts_and_keeps_the_rest_byte_for_byte() -> None:
    out = downgrade(MULTIPART)
    assert_7bit(out)
    message = parse(out)
    assert message["Content-Transfer-Encoding"] == "7bit"
    first, second, third, fourth = message.get_payload()
    assert first["Content-Transfer-Encoding"] == "quoted-printable"
    assert decoded(first) == plain(GRUSS)
    assert b"--=_b1 \r\nContent-Type: text/plain\r\n\r\nseven bit, untouched\r\n" in out
    assert b"base64\r\n\r\nAAECAwQF\r\n--=_b1\r\n" in out
    assert fourth["Content-Transfer-Encoding"] == "7bit"
    (inner,) = fourth.get_payload()
    assert inner["Content-Transfer-Encoding"] == "quoted-printable"
    assert decoded(inner) == "inner été".encode()
    assert out.startswith(b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed;")
    assert out.endswith(b"--=_b1--\r\nepilogue\r\n")


def test_parts_of_a_digest_are_messages_by_default() -> None:
    data = (b"MIME-Version: 1.0\r\nContent-Type: multipart/digest; boundary=d\r\n\r\n"
            b"--d\r\n\r\nSubject: one\r\n\r\n" + GRUSS + b"--d--\r\n")
    message = parse(downgrade(data))
    (part,) = message.get_payload()
    (inner,) = part.get_payload()
    assert inner["Subject"] == "one" and decoded(inner) == plain(GRUSS)


def test_a_body_without_header_separator_starts_at_the_first_non_field_line() -> None:
    out = downgrade(b"Received: from x\r\nhello w\xc3\xb6rld\r\n")
    assert out.startswith(b"Received: from x\r\nMIME-Version: 1.0\r\n")
    assert decoded(parse(out)) == "hello wörld".encode()


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nbody\r\n", "8-bit data in a header"),
        (b"From: J\xc3\xb6rg <j@example.com>\r\n\r\nb\xc3\xb6dy\r\n", "8-bit data in a header"),
        (MULTIPART.replace(b"--=_b1\r\nContent-Type: text/plain; charset=utf-8",
                           b"--=_b1\r\nContent-Description: \xc3\xa9\r\n"
                           b"Content-Type: text/plain; charset=utf-8"),
         "8-bit data in a header"),
        (MULTIPART.replace(b"This is a MIME message.", b"Pr\xc3\xa9ambule"),
         "8-bit data outside the parts of a multipart"),
        (MULTIPART.replace(b"epilogue", b"\xc3\xa9pilogue"),
         "8-bit data outside the parts of a multipart"),
        (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n\r\n" + GRUSS,
         "8-bit data in a multipart without a boundary"),
        (b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: base64\r\n\r\nAAEC\xff\r\n",
         "8-bit data in a body labelled base64"),
        (b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: Quoted-Printable\r\n\r\n" + GRUSS,
         "8-bit data in a body labelled quoted-printable"),
        (b"MIME-Version: 1.0\r\nContent-Type: message/partial; id=x\r\n\r\n" + GRUSS,
         "8-bit data in a message/partial part"),
    ],
)
def test_what_cannot_be_converted_says_why(data: bytes, why: str) -> None:
    with pytest.raises(NotConvertible, match=re.escape(why)):
        downgrade(data)


def test_nesting_is_bounded() -> None:
    def nested(depth: int) -> bytes:
        if depth == 0:
            return b"Content-Type: text/plain\r\n\r\n" + GRUSS
        return (b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (depth, depth)
                + nested(depth - 1) + b"--b%d--\r\n" % depth)

    (leaf,) = [p for p in parse(downgrade(nested(MAX_NESTING))).walk() if not p.is_multipart()]
    assert decoded(leaf) == plain(GRUSS)
    with pytest.raises(NotConvertible, match="nested deeper"):
        downgrade(nested(MAX_NESTING + 1))


# ---------------------------------------------------------------------------- properties

texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
                max_size=200)
bodies = st.lists(texts, min_size=1, max_size=8)
endings = st.sampled_from(["\r\n", "\n", "\r"])


@PROPERTY_SETTINGS
@given(parts=st.lists(bodies, min_size=1, max_size=4), ending=endings,
       multipart=st.booleans())
def test_every_part_decodes_to_what_went_in(parts: list[list[str]], ending: str,
                                            multipart: bool) -> None:
    encoded = [ending.join(["€ 8 bit", *lines]).encode() for lines in parts]
    if multipart:
        data = (f"MIME-Version: 1.0{ending}Content-Type: multipart/mixed; boundary=zz"
                f"{ending}{ending}").encode()
        for body in encoded:
            data += (f"--zz{ending}Content-Type: text/plain; charset=utf-8{ending}"
                     f"Content-Transfer-Encoding: 8bit{ending}{ending}").encode()
            data += body + ending.encode()
        data += f"--zz--{ending}".encode()
    else:
        data = f"Subject: property{ending}{ending}".encode() + encoded[0] + ending.encode()
        encoded = encoded[:1]
    out, eight_bit = for_relay(data, relay_has_8bitmime=False)
    assert not eight_bit
    assert_7bit(out)
    message = parse(out)
    leaves = [p for p in message.walk() if not p.is_multipart()]
    assert len(leaves) == len(encoded)
    for leaf, body in zip(leaves, encoded, strict=True):
        expected = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").rstrip(b"\n")
        assert decoded(leaf) == expected
