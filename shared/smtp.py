"""SMTP grammar both sides share: replies, paths and addresses, data transparency.

No I/O here: pure functions and small value types, tested without sockets.
RFC 5321 section numbers sit next to the rules they implement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

CRLF = b"\r\n"

# RFC 5321 §4.5.3.1: size limits.
MAX_COMMAND_LINE = 512  # §4.5.3.1.4, including the verb and <CRLF>
MAX_TEXT_LINE = 1000  # §4.5.3.1.6, including <CRLF>
MAX_LOCAL_PART = 64  # §4.5.3.1.1
MAX_DOMAIN = 255  # §4.5.3.1.2
MAX_PATH = 256  # §4.5.3.1.3, including the angle brackets

# ---------------------------------------------------------------------------- replies


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: code, optional enhanced status code (RFC 3463), text.

    A text with newlines is a multi-line reply (§4.2.1): `250-first` ... `250 last`.
    """

    code: int
    text: str
    enhanced: str = ""

    def format(self, **values: object) -> Reply:
        return Reply(self.code, self.text.format(**values), self.enhanced)

    @property
    def is_success(self) -> bool:
        """2xx: the command did what was asked."""
        return 200 <= self.code < 300

    @property
    def is_intermediate(self) -> bool:
        """3xx: accepted so far, more is expected (354 after DATA, 334 inside AUTH)."""
        return 300 <= self.code < 400

    @property
    def is_positive(self) -> bool:
        """2xx or 3xx: the command was accepted."""
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self, enhanced: bool = True) -> list[str]:
        prefix = f"{self.enhanced} " if enhanced and self.enhanced else ""
        texts = self.text.split("\n")
        last = len(texts) - 1
        return [
            f"{self.code}{' ' if i == last else '-'}{prefix}{text}" for i, text in enumerate(texts)
        ]

    def to_bytes(self, enhanced: bool = True) -> bytes:
        return "".join(line + "\r\n" for line in self.lines(enhanced)).encode(
            "utf-8", "surrogateescape"
        )

    def __str__(self) -> str:
        return self._text_line

    @cached_property
    def _text_line(self) -> str:
        # Rendered once per Reply: the sender logs every outcome with it, and the
        # parser hands out the same Reply for a repeated line (ReplyParser._seen).
        return " / ".join(self.lines())


class ReplyParser:
    """Bytes from a server -> complete `Reply` objects (the client's reader).

    Multi-line replies are joined with "\\n"; the enhanced code, if the first line
    has one, is split off. A malformed line raises `ReplySyntaxError`.
    """

    _LINE = re.compile(rb"([2-5][0-9][0-9])([ -])(.*)", re.DOTALL)
    _ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3}) (.*)", re.DOTALL)
    MAX_LINE = 4096
    MAX_LINES = 200  # lines of one multi-line reply (an EHLO reply has a few dozen)
    SEEN_MAX = 64  # single-line replies remembered (a relay repeats "250 2.0.0 Ok")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pending: list[str] = []
        self._code: int | None = None
        # A complete one-line reply seen before -> its (immutable) Reply: a pipelined
        # sender reads four replies per message, mostly the same few lines, and a
        # dict lookup is far cheaper than the regex parse of each.
        self._seen: dict[bytes, Reply] = {}

    @property
    def partial(self) -> bool:
        """A reply has begun and is not complete yet."""
        return bool(self._buffer or self._pending)

    def feed(self, data: bytes) -> list[Reply]:
        """Buffer `data`; return the replies it completes (the client's hot path: one
        split of all complete lines, not a search and a copy per line)."""
        self._buffer += data
        end = self._buffer.rfind(b"\n")
        if end < 0:
            if len(self._buffer) > self.MAX_LINE:
                raise ReplySyntaxError("reply line too long")
            return []
        complete = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        if len(self._buffer) > self.MAX_LINE:
            raise ReplySyntaxError("reply line too long")
        replies = []
        seen = self._seen
        for line in complete.split(b"\n"):
            if not self._pending:
                reply = seen.get(line)
                if reply is not None:
                    replies.append(reply)
                    continue
            reply = self._take_line(line.rstrip(b"\r"))
            if reply is not None:
                if "\n" not in reply.text:  # a one-line reply: remember it
                    if len(seen) >= self.SEEN_MAX:
                        seen.clear()
                    seen[line] = reply
                replies.append(reply)
        return replies

    def _take_line(self, line: bytes) -> Reply | None:
        match = self._LINE.fullmatch(line) or (
            self._LINE.fullmatch(line + b" ") if len(line) == 3 else None
        )
        if not match:
            raise ReplySyntaxError(f"malformed reply line {line[:80]!r}")
        code = int(match.group(1))
        if self._code is not None and code != self._code:
            raise ReplySyntaxError("multi-line reply changed its code")
        self._code = code
        self._pending.append(match.group(3).decode("utf-8", "replace"))
        if match.group(2) == b"-":
            if len(self._pending) >= self.MAX_LINES:  # never an endless reply in memory
                raise ReplySyntaxError(f"a reply of more than {self.MAX_LINES} lines")
            return None
        texts, self._pending, self._code = self._pending, [], None
        enhanced = ""
        first = self._ENHANCED.fullmatch(texts[0])
        if first and first.group(1)[0] == str(code)[0]:
            enhanced = first.group(1)
            if len(texts) == 1:
                return Reply(code, first.group(2), enhanced)
            texts = [m.group(2) if (m := self._ENHANCED.fullmatch(t)) else t for t in texts]
        return Reply(code, "\n".join(texts), enhanced)


class ReplySyntaxError(ValueError):
    """The peer sent something that is not an SMTP reply."""


# ---------------------------------------------------------------------------- paths

# Non-ASCII (RFC 6531 UTF-8, and surrogate-escaped bytes that check_mailbox refuses) as
# `[^\x00-\x7f]`: a class spanning to U+10FFFF costs ~5 ms to compile, per class, at
# every program start.
_NON_ASCII = r"[^\x00-\x7f]"
_ATEXT = rf"(?:[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-]|{_NON_ASCII})"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED_STRING = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|{_NON_ASCII}|\\[\x20-\x7e])*"'
_LET_DIG = rf"(?:[A-Za-z0-9_]|{_NON_ASCII})"  # RFC 5321 Let-dig, plus "_" and UTF-8 (liberal)
_LABEL = rf"{_LET_DIG}(?:(?:[A-Za-z0-9_\-]|{_NON_ASCII})*{_LET_DIG})?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_ADDRESS_LITERAL = r"\[[A-Za-z0-9:.\-]+\]"
MAILBOX_RE = re.compile(rf"({_DOT_STRING}|{_QUOTED_STRING})@({_DOMAIN}|{_ADDRESS_LITERAL})")
# §4.1.2 A-d-l: "@one.example,@two.example:" before the mailbox; accepted and dropped.
_SOURCE_ROUTE = re.compile(rf"@{_DOMAIN}(?:,@{_DOMAIN})*:")
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9\-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?")
_PATH_KEYWORD = {keyword: re.compile(rf"\s*{keyword}\s*:\s*", re.IGNORECASE)
                 for keyword in ("FROM", "TO")}


class PathSyntaxError(ValueError):
    """A MAIL/RCPT argument that does not parse; str() says what is wrong."""


class ArgumentSyntaxError(PathSyntaxError):
    """An argument that is not `FROM:<path> [parameters]` at all (no keyword, a
    malformed parameter): a command syntax error (RFC 3463 X.5.4), whatever the
    address; every other PathSyntaxError is about the address itself."""


@dataclass(frozen=True)
class PathArgument:
    """A parsed `FROM:<...> PARAMS` / `TO:<...> PARAMS` argument."""

    address: str  # without angle brackets or source route; "" for <>
    params: dict[str, str | None] = field(default_factory=dict)


def parse_path_argument(argument: str, keyword: str) -> PathArgument:
    """Parse the argument of MAIL (keyword "FROM") or RCPT ("TO").

    Liberal in what it accepts (§4.1.1.2 is strict, clients are not): spaces around
    the colon, a missing pair of angle brackets, ESMTP parameters after the path.
    """
    match = _PATH_KEYWORD[keyword].match(argument)
    if not match:
        command = "MAIL FROM" if keyword == "FROM" else "RCPT TO"
        raise ArgumentSyntaxError(f"Syntax: {command}:<address>")
    rest = argument[match.end():]
    if rest.startswith("<"):
        end = _closing_bracket(rest)
        if len(rest[: end + 1]) > MAX_PATH:
            raise PathSyntaxError("Path too long")
        path, rest = rest[1:end], rest[end + 1:]
        if rest and not rest[0].isspace():
            raise PathSyntaxError("Garbage after the address")
    else:
        parts = rest.split(None, 1)
        path = parts[0] if parts else ""
        rest = parts[1] if len(parts) > 1 else ""
        if not path:
            raise PathSyntaxError("Missing address")
        if len(path) + 2 > MAX_PATH:
            raise PathSyntaxError("Path too long")
    route = _SOURCE_ROUTE.match(path)
    if route:
        path = path[route.end():]
    return PathArgument(path, parse_params(rest))


def _closing_bracket(text: str) -> int:
    """Index of the '>' closing the path that starts at text[0] == '<' (quotes honoured)."""
    if '"' not in text:  # the common case, without a loop over the characters
        end = text.find(">")
        if end > 0 and text.find("<", 1, end) < 0:
            return end
        raise PathSyntaxError("Unbalanced angle brackets in the address")
    quoted = escaped = False
    for index, char in enumerate(text[1:], 1):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
        elif char == "<" and not quoted:
            break
    raise PathSyntaxError("Unbalanced angle brackets in the address")


def parse_params(text: str) -> dict[str, str | None]:
    """`SIZE=123 BODY=8BITMIME` -> {"SIZE": "123", "BODY": "8BITMIME"} (RFC 5321 §4.1.2)."""
    params: dict[str, str | None] = {}
    for word in text.split():
        match = _PARAM.fullmatch(word)
        if not match:
            raise ArgumentSyntaxError(f"Malformed parameter {word[:40]!r}")
        params[match.group(1).upper()] = match.group(2)
    return params


def check_mailbox(address: str) -> tuple[str, str]:
    """Validate a mailbox `local@domain` and return (local part, domain).

    The domain is taken after the LAST '@' that is outside a quoted local part, and
    everything must match the RFC 5321 §4.1.2 grammar: a second unquoted '@' (the
    `a@b@c` trick) is a syntax error, never silently re-split.

    Refusals beyond the grammar, so that every accepted address can be stored, logged
    and written into a header (a bounce's To:): bytes that are not UTF-8 (they arrive
    as surrogates); C1 controls and the Unicode line and paragraph separators (the
    `email` package reads those as line ends); '<' or '>' in a quoted local part (the
    queue file writes addresses between angle brackets, SPEC §3).
    """
    if not address.isascii():
        try:
            address.encode("utf-8")
        except UnicodeEncodeError:
            raise PathSyntaxError("Address is not valid UTF-8") from None
        if _NOT_IN_ADDRESSES.search(address):
            raise PathSyntaxError("Control character in the address")
    match = MAILBOX_RE.fullmatch(address)
    if not match:
        if "@" not in address:
            raise PathSyntaxError("Address must contain @ and a domain")
        raise PathSyntaxError("Malformed address")
    local, domain = match.group(1), match.group(2)
    if "<" in local or ">" in local:
        raise PathSyntaxError("Angle brackets in an address are not supported")
    if len(local.encode()) > MAX_LOCAL_PART:
        raise PathSyntaxError("Local part too long")
    if len(domain.encode()) > MAX_DOMAIN:
        raise PathSyntaxError("Domain too long")
    return local, domain


_NOT_IN_ADDRESSES = re.compile("[\x80-\x9f\u2028\u2029]")
_NOT_IN_MAILBOX_NAMES = re.compile(r"[\x00-\x1f\x7f-\x9f/\\\u2028\u2029]")


def mailbox_name(recipient: str) -> str:
    """The Maildir folder name of a local recipient (the local part, lower case, UTF-8
    kept); ValueError says why it cannot be one: it would leave its folder or hide
    in it (`/`, `\\`, a leading dot, `..`), or hold a control character."""
    local = local_part_of(recipient)
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        local = local[1:-1]
    if not local:
        raise ValueError("empty local part")
    if local.startswith("."):
        raise ValueError("starts with a dot")
    if _NOT_IN_MAILBOX_NAMES.search(local):
        raise ValueError("contains '/', '\\' or a control character")
    return local.lower()


def domain_of(address: str) -> str:
    """The domain of an already-checked mailbox, lower-cased ("" if there is none)."""
    at = address.rfind("@")
    return address[at + 1:].lower() if at >= 0 else ""


def idna_twin(domain: str) -> str | None:
    """The same domain in its other IDNA form (RFC 5890): A-labels (`xn--...`) for a
    domain in Unicode, Unicode for one in A-labels; None for a plain ASCII domain,
    or one that is not valid IDNA. Clients that do not speak SMTPUTF8 write a local
    domain in A-labels, clients that do may write it in Unicode: both are the same."""
    try:
        if domain.isascii():
            if "xn--" not in domain:
                return None
            twin = domain.encode("ascii").decode("idna")
        else:
            twin = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    twin = twin.lower()
    return twin if twin != domain else None


def local_part_of(address: str) -> str:
    at = address.rfind("@")
    return address[:at] if at >= 0 else address


# ---------------------------------------------------------------------------- data

def dot_unstuff(content: bytes) -> bytes:
    """Remove the transparency dot of every line that starts with one (§4.5.2).

    `content` is the data up to (not including) the final `.<CRLF>`; lines end in CRLF.
    """
    if content.startswith(b"."):
        content = content[1:]
    if b"\r\n." in content:
        content = content.replace(b"\r\n.", b"\r\n")
    return content


def crlf_lines(data: bytes) -> bytes:
    """Every CR, LF or CRLF as one CRLF, and a CRLF after the last line (RFC 5321
    §2.3.8: SMTP data is lines ending in CRLF). Data already in that form is
    returned as is, without a copy."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def to_wire_data(data: bytes) -> bytes:
    """Queued data -> what goes after DATA: CRLF lines, dot-stuffed, then `.<CRLF>`.

    Whatever the bytes: every CR, LF or CRLF becomes one CRLF, and NULs are dropped,
    so no bare CR/LF or NUL-hidden line can ever form an end-of-data at the relay
    (the "SMTP smuggling" class of attacks).
    """
    if b"\0" in data:
        data = data.replace(b"\0", b"")
    data = crlf_lines(data)
    if data.startswith(b"."):
        data = b"." + data
    if b"\r\n." in data:
        data = data.replace(b"\r\n.", b"\r\n..")
    return data + b".\r\n"
