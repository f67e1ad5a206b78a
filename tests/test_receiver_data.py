"""`DataReader`: one message's DATA as it streams, against a whole-message oracle.

The oracle is the plain way to decide a message - find the end, then check and
unstuff the whole of it at once. The reader must reach the same verdict and the same
bytes whatever the reads and its run size, in memory that follows the message's
bytes, not its line count.
"""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.receiver.data import RUN_SIZE, DataReader, Refusal
from shared.smtp import MAX_TEXT_LINE
from tests.support import PROPERTY_SETTINGS, chunked

MAX_BYTES = 300


def oracle(stream: bytes, max_bytes: int = MAX_BYTES) -> tuple[Refusal | None, bytes, bytes]:
    """(refusal, message data, what follows the end) decided on the whole stream."""
    framed = b"\r\n" + stream
    end = framed.find(b"\r\n.\r\n")
    assert end >= 0, "the stream must hold an end of data"
    raw, rest = framed[: end + 2], framed[end + 5 :]
    crlf = raw.count(b"\r\n")
    unstuffed = raw.replace(b"\r\n.", b"\r\n")
    if len(raw) - 2 > max_bytes:
        return Refusal.TOO_BIG, b"", rest
    if raw.count(b"\n") != crlf or raw.count(b"\r") != crlf or b"\0" in raw:
        return Refusal.BARE_NEWLINE, b"", rest
    if max(map(len, unstuffed.split(b"\r\n"))) > MAX_TEXT_LINE - 2:
        return Refusal.LINE_TOO_LONG, b"", rest
    return None, unstuffed[2:], rest


def read(pieces: list[bytes], max_bytes: int = MAX_BYTES,
         run_size: int = RUN_SIZE) -> tuple[Refusal | None, bytes, bytes]:
    """Feed the pieces as reads; (refusal, data, the buffer left after the end)."""
    reader = DataReader(max_bytes, run_size)
    buffer = bytearray()
    reader.start(buffer)
    for index, piece in enumerate(pieces):
        buffer += piece
        if reader.read(buffer):
            refusal = reader.refusal
            data = b"" if refusal else b"".join(reader.chunks)
            return refusal, data, bytes(buffer) + b"".join(pieces[index + 1:])
    raise AssertionError("no end of data was found")


LONG = b"L" * (MAX_TEXT_LINE - 1)  # 999 octets: one over, unless it is a stuffed dot
CASES = [
    (b".\r\n", (None, b"")),
    (b"hello\r\n.\r\nNOOP\r\n", (None, b"hello\r\n")),
    (b"..x\r\n.y\r\n\r\n..\r\n.\r\n", (None, b".x\r\ny\r\n\r\n.\r\n")),
    (b"bare\nlf\r\n.\r\n", (Refusal.BARE_NEWLINE, b"")),
    (b"a\n.\nb\r\n.\r\n", (Refusal.BARE_NEWLINE, b"")),  # a smuggled end is no end
    (b"nul\0\r\n.\r\n", (Refusal.BARE_NEWLINE, b"")),
    (b"cr\r\r\n.\r\n", (Refusal.BARE_NEWLINE, b"")),
    (LONG + b"\r\n.\r\n", (Refusal.LINE_TOO_LONG, b"")),
    (b"." + LONG + b"\r\n.\r\n", (Refusal.LINE_TOO_LONG, b"")),
    (b"." + LONG[1:] + b"\r\n.\r\n", (None, LONG[1:] + b"\r\n")),  # 999 stuffed: 998
    (b".." + LONG[2:] + b"\r\n.\r\n", (None, b"." + LONG[2:] + b"\r\n")),
    (LONG + b"\r\nbare\n\r\n.\r\n", (Refusal.BARE_NEWLINE, b"")),  # bare wins over long
    (b"x" * 2000 + b"\r\n.\r\n", (Refusal.TOO_BIG, b"")),  # too big wins over all
]


@pytest.mark.parametrize(("stream", "expected"), CASES)
@pytest.mark.parametrize("run_size", [6, 64, RUN_SIZE])
def test_verdict_and_data_at_every_cut(stream: bytes, expected: tuple, run_size: int) -> None:
    max_bytes = 1500 if len(stream) < 1500 else MAX_BYTES
    assert oracle(stream, max_bytes)[:2] == expected  # the table agrees with the oracle
    for cut in range(len(stream) + 1):
        assert read([stream[:cut], stream[cut:]], max_bytes, run_size)[:2] == expected, cut
    assert read([bytes([b]) for b in stream], max_bytes, run_size)[:2] == expected


body_pieces = st.lists(st.one_of(
    st.sampled_from([b"\r\n", b".", b"..", b"\r", b"\n", b"\0", b"text", b"\r\n.",
                     b"x" * 200, b"y" * 999, b"\r\n.\r", b"\n.\n"]),
    st.binary(max_size=12),
), max_size=30).map(b"".join)


@PROPERTY_SETTINGS
@given(body=body_pieces, cuts=st.lists(st.integers(min_value=0), max_size=12),
       run_size=st.integers(min_value=5, max_value=300),
       max_bytes=st.sampled_from([50, 300, 5000]))
def test_any_stream_any_cuts_any_run_size_agrees_with_the_oracle(body, cuts, run_size,
                                                                  max_bytes):
    stream = body + b"\r\n.\r\nQUIT\r\n"
    expected = oracle(stream, max_bytes)
    assert read(chunked(stream, cuts), max_bytes, run_size) == expected


def test_a_message_of_short_lines_costs_about_its_own_size() -> None:
    """1 MiB of 2-octet lines, read 64 KiB at a time: the reader holds the message
    once, in runs, plus a bounded amount for the run being checked."""
    size = 1024 * 1024
    message = b"ab\r\n" * (size // 4)
    pieces = [message[start:start + RUN_SIZE] for start in range(0, size, RUN_SIZE)]
    pieces.append(b".\r\n")
    reader = DataReader(max_bytes=2 * size)
    tracemalloc.start()
    try:
        buffer = bytearray()
        reader.start(buffer)
        for piece in pieces:
            buffer += piece
            reader.read(buffer)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reader.refusal is None
    assert sum(map(len, reader.chunks)) == size
    # The message itself, plus at most one run split into its lines (~16x of 64 KiB).
    assert peak < size + 1536 * 1024, f"peak {peak / 1048576:.1f} MiB for 1 MiB"
