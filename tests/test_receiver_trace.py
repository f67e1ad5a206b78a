"""services/receiver/trace.py: what the receiver adds to a message, checked on the bytes.

Messages come from a real `ServerSession` (read as they stream, in runs of lines: a
big header section falls across chunks); what is stored is parsed back with the
`email` package and compared with what the client sent.
"""

from __future__ import annotations

from email import message_from_bytes, policy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.receiver import replies as R
from services.receiver.data import DataReader
from services.receiver.session import MessageReady, SendReply
from services.receiver.trace import first_bytes, split_at
from tests.support import PROPERTY_SETTINGS
from tests.trace_support import HOST, NOW, QUEUE_ID, assert_as_sent, receive, split_trace, stored


def test_received_field_names_the_client_the_server_the_id_and_the_one_recipient() -> None:
    message = receive(b"Subject: hi\r\nDate: x\r\nMessage-ID: <m@x>\r\n\r\nbody\r\n")
    assert isinstance(message, MessageReady)
    data = stored(message)
    trace, rest = split_trace(data)
    assert (trace["helo"], trace["ip"], trace["host"], trace["protocol"], trace["id"],
            trace["rcpt"]) == (b"client.example", b"192.0.2.7", HOST.encode(), b"ESMTP",
                               QUEUE_ID.encode(), b"b@localhost")
    assert rest == b"Subject: hi\r\nDate: x\r\nMessage-ID: <m@x>\r\n\r\nbody\r\n"
    parsed = message_from_bytes(data, policy=policy.default)
    assert QUEUE_ID in parsed["Received"] and parsed["Subject"] == "hi"


def test_for_is_left_out_with_several_recipients_and_helo_means_smtp() -> None:
    message = receive(b"Subject: s\r\n\r\nb\r\n", rcpts=("b@localhost", "c@localhost"),
                      greet=b"HELO old.example")
    assert isinstance(message, MessageReady)
    trace, _ = split_trace(stored(message))
    assert trace["rcpt"] is None and trace["protocol"] == b"SMTP"


@pytest.mark.parametrize("may_relay", [True, False])
def test_missing_date_and_message_id_are_added_for_clients_that_may_relay(may_relay) -> None:
    sent = b"Subject: no date\r\nX-Long: " + b"y" * 60 + b"\r\n\r\nbody\r\n.dot\r\n"
    message = receive(sent, may_relay=may_relay)
    assert isinstance(message, MessageReady)
    data = stored(message)
    assert_as_sent(data, sent, queue_id=QUEUE_ID, trusted=may_relay)
    parsed = message_from_bytes(data, policy=policy.default)
    assert (parsed["Message-ID"] is not None) is may_relay
    if may_relay:
        assert parsed["Message-ID"] == f"<{QUEUE_ID}@{HOST}>"
        assert parsed["Date"].datetime == NOW
    assert parsed.get_content() == "body\r\n.dot\r\n"


@pytest.mark.parametrize(("sent", "body"), [
    (b"just body text\r\nmore\r\n", b"just body text\r\nmore\r\n"),  # no header section
    (b"\r\nbody after an empty header section\r\n", b"body after an empty header section\r\n"),
    (b"Subject: only headers\r\n", b""),
    (b"", b""),
], ids=["body-first", "empty-section", "no-body", "empty"])
def test_added_fields_never_turn_the_body_into_headers(sent: bytes, body: bytes) -> None:
    message = receive(sent)
    assert isinstance(message, MessageReady)
    data = stored(message)
    assert_as_sent(data, sent, queue_id=QUEUE_ID)
    parsed = message_from_bytes(data, policy=policy.default)
    assert parsed["Message-ID"] == f"<{QUEUE_ID}@{HOST}>"
    assert parsed.get_payload(decode=True) == body


def test_a_header_section_over_a_megabyte_still_gets_its_fields() -> None:
    fields = b"".join(b"X-Filler-%05d: %s\r\n" % (n, b"y" * 80) for n in range(12_000))
    sent = fields + b"\r\nthe body\r\n"
    message = receive(sent)
    assert isinstance(message, MessageReady)
    assert len(message.chunks) > 10 and message.headers.end == len(fields)
    data = stored(message)
    assert_as_sent(data, sent, queue_id=QUEUE_ID)
    assert data.endswith(b"Message-ID: <%s@%s>\r\n\r\nthe body\r\n" % (QUEUE_ID.encode(),
                                                                      HOST.encode()))


@pytest.mark.parametrize(("hops", "accepted"), [(50, True), (51, False)])
def test_more_received_fields_than_max_hops_is_a_loop(hops: int, accepted: bool) -> None:
    sent = b"".join(b"Received: from hop%d\r\n\tby x; date\r\n" % n for n in range(hops))
    result = receive(sent + b"Subject: loop\r\n\r\nbody\r\n")
    if accepted:
        assert isinstance(result, MessageReady) and result.headers.received == 50
    else:
        assert isinstance(result, SendReply)
        assert result.reply == R.S554_TOO_MANY_HOPS.format(hops=51, limit=50)
        assert result.data.startswith(b"554 5.4.6 ")


def test_received_fields_in_the_body_are_not_hops() -> None:
    body = b"".join(b"Received: quoted %d\r\n" % n for n in range(60))
    result = receive(b"Subject: forwarded\r\n\r\n" + body, max_hops=1)
    assert isinstance(result, MessageReady) and result.headers.received == 0


@PROPERTY_SETTINGS
@given(pieces=st.lists(st.binary(min_size=0, max_size=9), max_size=8),
       offset=st.integers(min_value=0, max_value=80))
def test_split_at_cuts_the_data_at_the_offset_without_copying(pieces, offset) -> None:
    whole = b"".join(pieces)
    offset = min(offset, len(whole))
    before, after = split_at(pieces, offset)
    assert b"".join(bytes(c) for c in before) == whole[:offset]
    assert b"".join(bytes(c) for c in after) == whole[offset:]
    assert first_bytes(after, 2) == whole[offset:offset + 2]


def test_data_reader_feeds_the_header_scanner_exactly_the_kept_chunks() -> None:
    reader = DataReader(max_bytes=10_000, run_size=8)
    buffer = bytearray()
    reader.start(buffer)
    buffer += b"..dot: x\r\nB: y\r\n\r\nbody\r\n.\r\n"
    assert reader.read(buffer)
    section = reader.headers.finish()
    assert b"".join(reader.chunks) == b".dot: x\r\nB: y\r\n\r\nbody\r\n"
    assert section.end == len(b".dot: x\r\nB: y\r\n") and section.names == {".dot", "b"}
