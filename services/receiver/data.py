"""The DATA phase of one message, read as it streams (RFC 5321 §4.1.1.4, §4.5.2).

`DataReader` takes bytes from the front of the session's input buffer as they come
and keeps the message as a list of chunks (runs of whole lines, dot-unstuffed), so
that memory follows the bytes of the message, not its line count, and nothing is
ever copied whole: the chunks go to the queue as they are (one writev).

Rules this module guarantees:
- the end of data is `<CRLF>.<CRLF>` and nothing else, wherever the reads split it
  (a bare `<LF>.<LF>` or `<CR>.<CR>` never ends a message: SMTP smuggling);
- data holding a bare CR, a bare LF or a NUL is refused whole, as is a line over
  1000 octets (§4.5.3.1.6; a dot-stuffed line may be one octet longer on the wire),
  as is a message over the size limit; which of them is reported does not depend on
  how the bytes were cut (too big, then bare newline, then line too long);
- memory is bounded: complete lines are taken out once `run_size` bytes are
  buffered; a line with no end in sight is dropped as it arrives (after its bytes
  were checked), and so is everything once the message is too big;
- the header section is read as the runs are kept (`headers`, a HeaderScanner):
  where it ends and how many Received: fields it has, whatever its size.

Invariant while reading: the input buffer starts with the CRLF that ended the
previous line (for the first line, a virtual CRLF put there by `start`), so each run
taken out is whole lines and a leading dot is always seen - except while a line too
long to keep is dropped, when nothing is kept anyway.
"""

from __future__ import annotations

import enum

from shared.headers import HeaderScanner
from shared.smtp import MAX_TEXT_LINE

END_OF_DATA = b"\r\n.\r\n"
RUN_SIZE = 64 * 1024  # bytes buffered before their complete lines are taken out


class Refusal(enum.Enum):
    """Why a message is refused after its final dot, in the order they are reported."""

    TOO_BIG = "too big"
    BARE_NEWLINE = "bare CR, LF or NUL"
    LINE_TOO_LONG = "line too long"


class DataReader:
    """One message: `start(buffer)` at the 354, then `read(buffer)` after every receive
    until it returns True (the final dot was read and removed from the buffer)."""

    def __init__(self, max_bytes: int, run_size: int = RUN_SIZE) -> None:
        self.max_bytes = max_bytes
        self.run_size = run_size
        self.chunks: list[bytearray] = []  # the message so far, dot-unstuffed
        self.headers = HeaderScanner()  # fed the chunks, as they are kept
        self._consumed = 0  # octets taken from the buffer, with the virtual CRLF
        self._scanned = 0  # the buffer before this offset holds no end of data
        self._too_big = False
        self._bare = False
        self._long_line = False

    def start(self, buffer: bytearray) -> None:
        """The data begins at a line start: a virtual CRLF in front makes an empty
        message (".\\r\\n" at once) and the first line's dot look like any other."""
        buffer[0:0] = b"\r\n"

    @property
    def refusal(self) -> Refusal | None:
        if self._too_big:
            return Refusal.TOO_BIG
        if self._bare:
            return Refusal.BARE_NEWLINE
        if self._long_line:
            return Refusal.LINE_TOO_LONG
        return None

    def read(self, buffer: bytearray) -> bool:
        """Take what the buffer holds of the message; True once the end was read."""
        end = buffer.find(END_OF_DATA, self._scanned)
        if end >= 0:
            self._take_lines(buffer, end + 2)  # through the last line's CRLF
            del buffer[:3]  # ".\r\n"
            return True
        # No end in the buffer: all of it is message but the virtual CRLF and at most
        # the ".\r" of an end still to come.
        if self._too_big or self._consumed + len(buffer) - 4 > self.max_bytes:
            self._too_big = True
            self.chunks.clear()
            self._drop(buffer)
        elif len(buffer) >= self.run_size:
            last = buffer.rfind(b"\r\n")
            if last > 0:
                self._take_lines(buffer, last)
            elif len(buffer) > MAX_TEXT_LINE + 2:  # a line too long: drop it as it comes
                self._check_bare(buffer, 0, len(buffer) - 4)
                self._long_line = True
                self._drop(buffer)
        self._scanned = max(0, len(buffer) - 4)
        return False

    def _take_lines(self, buffer: bytearray, end: int) -> None:
        """Take `buffer[:end]` (whole lines, ending right before a CRLF or with one)."""
        run = buffer[:end]
        del buffer[:end]
        first = self._consumed == 0
        self._consumed += end
        if self._consumed - 2 > self.max_bytes:
            self._too_big = True
            self.chunks.clear()
            return
        if self._bare:
            return  # nothing reported after it but TOO_BIG: only the size matters now
        self._check_bare(run, 0, len(run))
        if self._bare:
            self.chunks.clear()
        if self._bare or self._long_line:
            return
        if b"\r\n." in run:
            run = run.replace(b"\r\n.", b"\r\n")
        if _longest_line_over(run, MAX_TEXT_LINE - 2):
            self._long_line = True
            self.chunks.clear()
            return
        if first:
            del run[:2]  # the virtual CRLF
        if run:
            self.chunks.append(run)
            if not self.headers.done:
                self.headers.feed(run)

    def _check_bare(self, data: bytearray, start: int, end: int) -> None:
        """A CR or LF that is not part of a CRLF, or a NUL, in data[start:end]."""
        if self._bare or end <= start:
            return
        crlf = data.count(b"\r\n", start, end)
        self._bare = (data.count(b"\n", start, end) != crlf
                      or data.count(b"\r", start, end) != crlf
                      or data.find(b"\0", start, end) >= 0)

    def _drop(self, buffer: bytearray) -> None:
        """Forget all but the last 4 bytes (they may begin the end of data)."""
        if len(buffer) > 4:
            dropped = len(buffer) - 4
            del buffer[:dropped]
            self._consumed += dropped
            if self._consumed - 2 > self.max_bytes:
                self._too_big = True
                self.chunks.clear()


def _longest_line_over(run: bytearray, limit: int) -> bool:
    """Whether a line of `run` (CRLF-separated) has more than `limit` octets.

    Splitting the run into its lines makes an object per line - 16,000 for 64 KiB of
    2-octet lines - so first look for a line end in every window of (limit + 1) // 2
    bytes: a line longer than `limit` spans a whole window. Only a run with a window
    without one (a line of half the limit or more) is split to measure its lines.
    """
    if len(run) <= limit + 2:
        return False
    step = (limit + 1) // 2
    for start in range(0, len(run), step):
        if run.find(b"\n", start, start + step) < 0:
            return max(map(len, run.split(b"\r\n"))) > limit
    return False
