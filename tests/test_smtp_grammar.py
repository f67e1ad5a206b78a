"""shared/smtp.py: paths, mailboxes, data transparency and the client's reply reader."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.receiver import replies as R
from shared.queue import QueueFile
from shared.smtp import (
    MAILBOX_RE,
    MAX_PATH,
    PathArgument,
    PathSyntaxError,
    Reply,
    ReplyParser,
    ReplySyntaxError,
    check_mailbox,
    domain_of,
    dot_unstuff,
    local_part_of,
    parse_path_argument,
    to_wire_data,
)

# ---------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    ("argument", "keyword", "expected"),
    [
        ("FROM:<alice@example.com>", "FROM", PathArgument("alice@example.com")),
        ("from:<alice@example.com>", "FROM", PathArgument("alice@example.com")),
        ("FROM: <alice@example.com>", "FROM", PathArgument("alice@example.com")),
        ("FROM : <alice@example.com>", "FROM", PathArgument("alice@example.com")),
        ("FROM: alice@example.com", "FROM", PathArgument("alice@example.com")),
        ("FROM:alice@example.com SIZE=5", "FROM", PathArgument("alice@example.com", {"SIZE": "5"})),
        ("FROM:<>", "FROM", PathArgument("")),
        ("FROM:<a@b.example> SIZE=123 BODY=8BITMIME", "FROM",
         PathArgument("a@b.example", {"SIZE": "123", "BODY": "8BITMIME"})),
        ("FROM:<a@b.example>  size=1   body=7bit ", "FROM",
         PathArgument("a@b.example", {"SIZE": "1", "BODY": "7bit"})),
        ("FROM:<a@b.example> SMTPUTF8", "FROM", PathArgument("a@b.example", {"SMTPUTF8": None})),
        ("TO:<bob@example.org>", "TO", PathArgument("bob@example.org")),
        ("To:<Bob@Example.ORG>", "TO", PathArgument("Bob@Example.ORG")),
        ("TO:<postmaster>", "TO", PathArgument("postmaster")),
        ("TO:<@one.example,@two.example:bob@example.org>", "TO", PathArgument("bob@example.org")),
        ('TO:<"a>b c"@example.org>', "TO", PathArgument('"a>b c"@example.org')),
    ],
)
def test_parse_path_argument(argument: str, keyword: str, expected: PathArgument) -> None:
    assert parse_path_argument(argument, keyword) == expected


@pytest.mark.parametrize(
    ("argument", "keyword"),
    [
        ("", "FROM"),
        ("FROM", "FROM"),
        ("FROM:", "FROM"),
        ("FROM: ", "FROM"),
        ("<a@b.example>", "FROM"),
        ("TO:<a@b.example>", "FROM"),
        ("FROM:<a@b.example>", "TO"),
        ("FROM:<a@b.example", "FROM"),
        ("FROM:<<a@b.example>", "FROM"),
        ("FROM:<a@b.example>x", "FROM"),
        ("FROM:<a@b.example> =1", "FROM"),
        ("FROM:<a@b.example> SIZE==1", "FROM"),
        ("TO:<" + "a" * 60 + "@" + "b" * (MAX_PATH - 62) + ">", "TO"),
        ("TO:" + "a" * 60 + "@" + "b" * (MAX_PATH - 62), "TO"),
    ],
)
def test_parse_path_argument_refuses(argument: str, keyword: str) -> None:
    with pytest.raises(PathSyntaxError):
        parse_path_argument(argument, keyword)


def test_path_of_exactly_256_octets_is_accepted() -> None:
    address = "a" * 60 + "@" + "b" * (MAX_PATH - 63)
    assert len(address) + 2 == MAX_PATH
    assert parse_path_argument(f"TO:<{address}>", "TO").address == address


@pytest.mark.parametrize(
    ("address", "parts"),
    [
        ("alice@example.com", ("alice", "example.com")),
        ("a.b+tag@mail.example.com", ("a.b+tag", "mail.example.com")),
        ("!#$%&'*+/=?^_`{|}~-@x", ("!#$%&'*+/=?^_`{|}~-", "x")),
        ('"john doe"@example.com', ('"john doe"', "example.com")),
        ('"a@b"@example.com', ('"a@b"', "example.com")),
        ("bob@[192.0.2.1]", ("bob", "[192.0.2.1]")),
        ("bob@[IPv6:2001:db8::1]", ("bob", "[IPv6:2001:db8::1]")),
        ("x" * 64 + "@example.com", ("x" * 64, "example.com")),
    ],
)
def test_check_mailbox_accepts(address: str, parts: tuple[str, str]) -> None:
    assert check_mailbox(address) == parts


@pytest.mark.parametrize(
    "address",
    [
        "", "alice", "alice@", "@example.com", "a@b@example.com", ".a@example.com",
        "a.@example.com", "a..b@example.com", "a b@example.com", "a@exa mple.com",
        "a@-example.com", "a@example..com", "a\r\n@example.com", "a@example.com\r\nRCPT",
        "<a@example.com>", "x" * 65 + "@example.com", "a@" + "b" * 256,
        # Beyond the grammar: what the queue file could not hold (SPEC §3).
        '"a>b"@example.com', '"x<y"@example.com', '"\\>"@example.com',
        # Bytes that are not UTF-8 arrive as surrogates (surrogateescape).
        "\udcff@example.com", "a@\udcfe.example",
    ],
)
def test_check_mailbox_refuses(address: str) -> None:
    with pytest.raises(PathSyntaxError):
        check_mailbox(address)


def test_utf8_mailbox_is_accepted() -> None:
    assert check_mailbox("b\u00fccher@b\u00fccher.example") == (
        "b\u00fccher", "b\u00fccher.example")


# The mailbox grammar with its non-ASCII ranges narrowed, so hypothesis draws fast.
_NARROW_MAILBOX = re.compile(MAILBOX_RE.pattern.replace("\\u0080-\\U0010ffff", "\\u00e0-\\u00ef"))


@settings(max_examples=300, deadline=None)
@given(st.from_regex(_NARROW_MAILBOX, fullmatch=True))
def test_every_accepted_mailbox_can_be_queued(address: str) -> None:
    """check_mailbox is the gate to the queue file: what passes must be storable."""
    try:
        check_mailbox(address)
    except PathSyntaxError:
        return
    message = QueueFile(address, (address,), b"")
    assert QueueFile.from_bytes(message.to_bytes()) == message


def test_domain_and_local_part() -> None:
    assert domain_of("Bob@Example.ORG") == "example.org"
    assert domain_of("postmaster") == ""
    assert local_part_of('"a@b"@example.com') == '"a@b"'
    assert local_part_of("postmaster") == "postmaster"


# ---------------------------------------------------------------------------- data


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", b""),
        (b"plain\r\n", b"plain\r\n"),
        (b"..a\r\n", b".a\r\n"),
        (b".\r\n", b"\r\n"),
        (b"a\r\n..b\r\n", b"a\r\n.b\r\n"),
        (b"a\r\n...\r\n", b"a\r\n..\r\n"),
        (b"a.\r\nb..c\r\n", b"a.\r\nb..c\r\n"),
    ],
)
def test_dot_unstuff(content: bytes, expected: bytes) -> None:
    assert dot_unstuff(content) == expected


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        (b"", b".\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b".a\r\n", b"..a\r\n.\r\n"),
        (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"lf\nonly\n", b"lf\r\nonly\r\n.\r\n"),
        (b"cr\ronly\r", b"cr\r\nonly\r\n.\r\n"),
        (b"nul\x00byte\r\n", b"nulbyte\r\n.\r\n"),
    ],
)
def test_to_wire_data(data: bytes, wire: bytes) -> None:
    assert to_wire_data(data) == wire


SMUGGLING = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r\n\x00.\r\n",
             b"\r\n.\x00\r\n", b"\n\x00.\x00\n"]


@pytest.mark.parametrize("smuggle", SMUGGLING, ids=repr)
def test_to_wire_data_turns_smuggling_into_one_message(smuggle: bytes) -> None:
    data = b"Subject: x\r\n\r\nhello" + smuggle + b"MAIL FROM:<evil@example.com>\r\n"
    wire = to_wire_data(data)
    assert wire.endswith(b"\r\n.\r\n")
    assert wire.find(b"\r\n.\r\n") == len(wire) - 5, "an end of data before the end"
    assert wire.count(b"\n") == wire.count(b"\r\n") == wire.count(b"\r")
    assert b"\0" not in wire


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_to_wire_data_properties(data: bytes) -> None:
    wire = to_wire_data(data)
    assert wire.find(b"\r\n.\r\n") in (-1, len(wire) - 5)
    assert wire == b".\r\n" or wire.endswith(b"\r\n.\r\n")
    assert wire.count(b"\n") == wire.count(b"\r\n") == wire.count(b"\r")
    assert b"\0" not in wire


@given(st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                max_size=10))
def test_dot_unstuff_undoes_to_wire_data(lines: list[bytes]) -> None:
    data = b"".join(line + b"\r\n" for line in lines).replace(b"\0", b"")
    wire = to_wire_data(data)
    assert dot_unstuff(wire[:-3]) == data


# ---------------------------------------------------------------------------- replies


def test_reply_rendering() -> None:
    reply = Reply(250, "first\nsecond\nlast", "2.0.0")
    assert reply.to_bytes() == b"250-2.0.0 first\r\n250-2.0.0 second\r\n250 2.0.0 last\r\n"
    assert reply.to_bytes(False) == b"250-first\r\n250-second\r\n250 last\r\n"
    assert Reply(354, "go ahead").to_bytes() == b"354 go ahead\r\n"


def _feed_bytewise(parser: ReplyParser, data: bytes) -> list[Reply]:
    replies: list[Reply] = []
    for index in range(len(data)):
        replies.extend(parser.feed(data[index : index + 1]))
    return replies


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (b"220 mx ESMTP\r\n", [Reply(220, "mx ESMTP")]),
        (b"220\r\n", [Reply(220, "")]),
        (b"250-mx Hello\r\n250-PIPELINING\r\n250 HELP\r\n",
         [Reply(250, "mx Hello\nPIPELINING\nHELP")]),
        (b"250-2.0.0 a\r\n250 2.0.0 b\r\n", [Reply(250, "a\nb", "2.0.0")]),
        (b"550 5.7.1 denied\r\n", [Reply(550, "denied", "5.7.1")]),
        (b"250 5.7.1 class mismatch is text\r\n", [Reply(250, "5.7.1 class mismatch is text")]),
        (b"250 ok\n354 go\r\n", [Reply(250, "ok"), Reply(354, "go")]),
        (b"250-a\r\n250-b\r\n250 c\r\n221 bye\r\n",
         [Reply(250, "a\nb\nc"), Reply(221, "bye")]),
    ],
)
def test_reply_parser(wire: bytes, expected: list[Reply]) -> None:
    assert ReplyParser().feed(wire) == expected
    assert _feed_bytewise(ReplyParser(), wire) == expected


def test_reply_parser_waits_for_the_last_line() -> None:
    parser = ReplyParser()
    assert parser.feed(b"250-first\r\n250-sec") == []
    assert parser.feed(b"ond\r\n") == []
    assert parser.feed(b"250 last\r\n") == [Reply(250, "first\nsecond\nlast")]


@pytest.mark.parametrize(
    "wire",
    [b"hello\r\n", b"25 x\r\n", b"650 x\r\n", b"250x\r\n", b"250-a\r\n251 b\r\n",
     b"2" * 5000],
)
def test_reply_parser_refuses_garbage(wire: bytes) -> None:
    with pytest.raises(ReplySyntaxError):
        ReplyParser().feed(wire)


def _catalogue() -> list[tuple[str, Reply]]:
    """Every reply constant of the receiver, its fields filled in."""
    found = []
    for name, value in vars(R).items():
        if isinstance(value, Reply):
            names = {f for _, f, _, _ in string.Formatter().parse(value.text) if f}
            found.append((name, value.format(**{f: f"<{f}>" for f in names})))
    return found


@pytest.mark.parametrize(("name", "reply"), _catalogue(), ids=[n for n, _ in _catalogue()])
def test_every_catalogue_reply_round_trips_through_the_parser(name: str, reply: Reply) -> None:
    assert ReplyParser().feed(reply.to_bytes(True)) == [reply]
    assert ReplyParser().feed(reply.to_bytes(False)) == [Reply(reply.code, reply.text)]


def test_reply_parser_hands_out_a_repeated_line_as_the_same_reply() -> None:
    """The parser remembers one-line replies (the sender's hot path, issue 6): the
    same line gives the very same immutable Reply, a multi-line reply ending in
    that line is still read as a whole, and the memory stays bounded."""
    parser = ReplyParser()
    (first,) = parser.feed(b"250 2.0.0 Ok\r\n")
    (again,) = parser.feed(b"250 2.0.0 Ok\r\n")
    assert again is first and again == Reply(250, "Ok", "2.0.0")
    assert str(again) == "250 2.0.0 Ok"
    assert parser.feed(b"250-2.0.0 first\r\n250 2.0.0 Ok\r\n") == [
        Reply(250, "first\nOk", "2.0.0")
    ]
    assert parser.feed(b"250 2.0.0 Ok\r\n") == [first]
    for number in range(3 * ReplyParser.SEEN_MAX):
        assert parser.feed(b"250 queued as %d\r\n" % number) == [
            Reply(250, f"queued as {number}")
        ]
    assert len(parser._seen) <= ReplyParser.SEEN_MAX


def test_reply_str_is_rendered_once_and_unchanged() -> None:
    reply = Reply(250, "first\nsecond", "2.0.0")
    assert str(reply) == "250-2.0.0 first / 250 2.0.0 second"
    assert str(reply) is str(reply)
    assert reply == Reply(250, "first\nsecond", "2.0.0")  # the cache is not a field
    assert hash(reply) == hash(Reply(250, "first\nsecond", "2.0.0"))


@pytest.mark.parametrize(
    ("code", "success", "intermediate", "positive", "transient", "permanent"),
    [
        (221, True, False, True, False, False),
        (250, True, False, True, False, False),
        (334, False, True, True, False, False),
        (354, False, True, True, False, False),
        (421, False, False, False, True, False),
        (452, False, False, False, True, False),
        (500, False, False, False, False, True),
        (554, False, False, False, False, True),
    ],
)
def test_reply_classes_by_first_digit(code, success, intermediate, positive, transient,
                                      permanent) -> None:
    reply = Reply(code, "text")
    assert (reply.is_success, reply.is_intermediate, reply.is_positive,
            reply.is_transient, reply.is_permanent) == (
        success, intermediate, positive, transient, permanent)
