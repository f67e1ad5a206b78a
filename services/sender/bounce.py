"""Delivery status notices (SPEC §8, RFC 3464): bounces and delay warnings.

`build_notice` turns "these recipients of this message failed (or are still
waiting)" into the data of a new message, ready for the queue: CRLF bytes, queued by
the runner from the null sender `<>` to the original envelope sender. No I/O and no
clock: the runner passes `now` and the times it knows.

The notice is a `multipart/report; report-type=delivery-status` (RFC 6522) built
with the `email` package:
1. a human-readable `text/plain` part: which recipient failed and why;
2. a `message/delivery-status` part: per message Reporting-MTA, X-Mailbag-Queue-ID,
   Arrival-Date; per recipient Final-Recipient, Original-Recipient (when an alias led
   there), Action, Status, Remote-MTA, Diagnostic-Code, Last-Attempt-Date and, for
   a delay warning, Will-Retry-Until (RFC 3464 §2.2, §2.3);
3. a `text/rfc822-headers` part with the original header section (RFC 6522 §4),
   cut at a field boundary after `MAX_RETURNED_HEADERS` bytes. 8-bit or long lines
   there get a transfer encoding, so the notice itself is always 7-bit and short-lined.

Rules the runner relies on:
- a message from `<>` never gets a notice (`build_notice` returns None): a notice
  about a notice could loop between two MTAs;
- Status is the relay's enhanced code (RFC 3463) when its reply had one, else the
  reply's class (`5.0.0` / `4.0.0`), else `5.0.0` for failed and `4.0.0` for delayed;
- text from relays (replies, reasons) is reduced to printable ASCII before it goes
  into a field, so no reply can break the report's syntax.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage, Message, MIMEPart
from email.utils import format_datetime
from typing import Literal

from shared.headers import scan_headers
from shared.smtp import Reply

Action = Literal["failed", "delayed"]
FAILED: Action = "failed"
DELAYED: Action = "delayed"

SUBJECTS: dict[Action, str] = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
}
DEFAULT_STATUS: dict[Action, str] = {FAILED: "5.0.0", DELAYED: "4.0.0"}
MAX_RETURNED_HEADERS = 64 * 1024  # bytes of the original header section in the notice
MAX_DIAGNOSTIC = 800  # characters of a reply in Diagnostic-Code: one line under RFC 5322's 998

# The notice is written with header lines up to RFC 5322's 998 unfolded, so that no
# report field is ever split into RFC 2047 encoded words; CRLF for the queue.
_POLICY = policy.SMTP.clone(cte_type="7bit", max_line_length=998)
# Parts' bodies: 7-bit (a relay without 8BITMIME takes the notice), and quoted-printable
# lines of at most 76 characters (RFC 2045 §6.7).
_BODY_POLICY = policy.SMTP.clone(cte_type="7bit")
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient the notice reports on."""

    recipient: str  # the address that was tried: Final-Recipient
    reply: Reply | None = None  # the last reply about it (relay or local delivery)
    reason: str = ""  # why, in words, when there is no reply or more to say ("expired")
    original: str | None = None  # the recipient as queued, when an alias led to `recipient`
    remote_mta: str | None = None  # the relay's host name, when a relay answered
    last_attempt: float | None = None  # seconds since the epoch


def build_notice(
    action: Action,
    *,
    hostname: str,
    queue_id: str,
    sender: str,
    recipients: Sequence[FailedRecipient],
    original: bytes,
    arrival: float,
    now: float,
    retry_until: float | None = None,
) -> bytes | None:
    """The notice about message `queue_id` (envelope sender `sender`), or None for `<>`.

    `original` is the message data as queued (its header section is returned);
    `arrival` is when it was queued, `retry_until` when a delayed message expires
    (Will-Retry-Until; required for DELAYED). Raises ValueError for a call that
    cannot make sense (no recipients, a delay warning without `retry_until`).
    """
    if not sender:
        return None
    if not recipients:
        raise ValueError("a notice needs at least one recipient")
    if action == DELAYED and retry_until is None:
        raise ValueError("a delay warning needs retry_until")
    utf8 = not sender.isascii()
    notice = EmailMessage(policy=_POLICY.clone(utf8=True) if utf8 else _POLICY)
    notice["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    notice["To"] = sender
    notice["Subject"] = SUBJECTS[action]
    notice["Date"] = _date(now)
    notice["Message-ID"] = f"<{queue_id}.{action}.{int(now)}@{hostname}>"
    notice["Auto-Submitted"] = "auto-replied"  # RFC 3834: no vacation replies to this
    notice.make_mixed()
    notice.set_type("multipart/report")
    notice.set_param("report-type", "delivery-status")
    headers, cut = _returned_headers(original)
    notice.attach(_human_part(action, hostname, recipients, arrival, now, retry_until, cut))
    notice.attach(_status_part(action, hostname, queue_id, recipients, arrival, retry_until))
    notice.attach(_headers_part(headers))
    return notice.as_bytes(policy=notice.policy)


# ---------------------------------------------------------------------------- parts


def _human_part(action: Action, hostname: str, recipients: Sequence[FailedRecipient],
                arrival: float, now: float, retry_until: float | None, cut: bool) -> MIMEPart:
    if action == FAILED:
        lead = ("Your message could not be delivered to the recipients below, and "
                "will not be tried again. The reason is given for each of them.")
    else:
        lead = (f"Your message has not yet been delivered to the recipients below, "
                f"after {_span(now - arrival)} of trying. Nothing is lost: it will be "
                f"tried again until {_date(retry_until or now)}, and you will be "
                f"told if it fails for good. You do not need to send it again.")
    lines = [f"This is the mail system at host {hostname}.", "", textwrap.fill(lead, 72), "",
             f"For help, write to postmaster@{hostname} and include this report.", ""]
    for failure in recipients:
        lines.append(f"<{failure.recipient}>: {_why(failure)}")
        if failure.original:
            lines.append(f"    (sent to <{failure.original}>)")
    lines += ["", "The headers of your message are attached"
              + (" (only the first part of them: they are very long)." if cut else ".")]
    part = MIMEPart(policy=_BODY_POLICY)
    part.set_content("\n".join(lines) + "\n")
    part["Content-Description"] = "Notification"
    return part


def _status_part(action: Action, hostname: str, queue_id: str,
                 recipients: Sequence[FailedRecipient], arrival: float,
                 retry_until: float | None) -> MIMEPart:
    per_message = Message(policy=_POLICY)
    per_message["Reporting-MTA"] = f"dns; {hostname}"
    per_message["X-Mailbag-Queue-ID"] = queue_id
    per_message["Arrival-Date"] = _date(arrival)
    blocks = [per_message]
    for failure in recipients:
        block = Message(policy=_POLICY)
        block["Final-Recipient"] = _address_field(failure.recipient)
        if failure.original:
            block["Original-Recipient"] = _address_field(failure.original)
        block["Action"] = action
        block["Status"] = _status(action, failure.reply)
        if failure.remote_mta:
            block["Remote-MTA"] = f"dns; {_printable(failure.remote_mta)}"
        diagnostic = _diagnostic(failure)
        if diagnostic:
            block["Diagnostic-Code"] = diagnostic
        if failure.last_attempt is not None:
            block["Last-Attempt-Date"] = _date(failure.last_attempt)
        if action == DELAYED and retry_until is not None:
            block["Will-Retry-Until"] = _date(retry_until)
        blocks.append(block)
    part = MIMEPart(policy=_POLICY)
    part["Content-Type"] = "message/delivery-status"
    part.set_payload(blocks)
    part["Content-Description"] = "Delivery report"
    return part


def _headers_part(headers: str) -> MIMEPart:
    part = MIMEPart(policy=_BODY_POLICY)
    part.set_content(headers, subtype="rfc822-headers")
    part["Content-Description"] = "Undelivered Message Headers"
    return part


# ---------------------------------------------------------------------------- fields


def _returned_headers(data: bytes) -> tuple[str, bool]:
    """The original header section as text (bad UTF-8 replaced), and whether it was cut."""
    section = scan_headers(data)
    end, cut = section.end, False
    if end > MAX_RETURNED_HEADERS:
        fitting = [f.end for f in section.fields if f.end <= MAX_RETURNED_HEADERS]
        end, cut = (fitting[-1] if fitting else 0), True
    text = data[:end].decode("utf-8", "replace")
    return text.replace("\r\n", "\n").replace("\r", "\n"), cut


def _status(action: Action, reply: Reply | None) -> str:
    if reply is None:
        return DEFAULT_STATUS[action]
    if _ENHANCED.fullmatch(reply.enhanced) and reply.enhanced[0] == str(reply.code)[0]:
        return reply.enhanced
    if reply.code >= 400:
        return f"{reply.code // 100}.0.0"
    return DEFAULT_STATUS[action]


def _diagnostic(failure: FailedRecipient) -> str:
    """RFC 3464 §2.3.6: `smtp; <the reply>`, or our own words when nobody replied."""
    if failure.reply is not None:
        reply = failure.reply
        words = [str(reply.code), reply.enhanced, *reply.text.split("\n")]
        return f"smtp; {_printable(' '.join(w for w in words if w), MAX_DIAGNOSTIC)}"
    if failure.reason:
        return f"X-mailbag; {_printable(failure.reason, MAX_DIAGNOSTIC)}"
    return ""


def _why(failure: FailedRecipient) -> str:
    parts = []
    if failure.reply is not None:
        said = " ".join(w for w in [str(failure.reply.code), failure.reply.enhanced,
                                    *failure.reply.text.split("\n")] if w)
        who = f"host {failure.remote_mta}" if failure.remote_mta else "the mail system"
        parts.append(f"{who} said: {_printable(said, MAX_DIAGNOSTIC)}")
    if failure.reason:
        parts.append(_printable(failure.reason, MAX_DIAGNOSTIC))
    return "; ".join(parts) or "delivery failed"


def _address_field(address: str) -> str:
    """`rfc822; addr`, or RFC 6533's `utf-8; addr` with \\x{..} escapes when not ASCII."""
    if address.isascii():
        return f"rfc822; {_printable(address)}"
    escaped = "".join(
        c if " " < c <= "~" and c not in "\\+=" else f"\\x{{{ord(c):X}}}" for c in address
    )
    return f"utf-8; {escaped}"


def _printable(text: str, limit: int = MAX_DIAGNOSTIC) -> str:
    """Printable ASCII on one line: others become `?`, runs of white space one space."""
    flat = " ".join(text.split())
    clean = "".join(c if " " <= c <= "~" else "?" for c in flat)
    return clean if len(clean) <= limit else clean[:limit - 3] + "..."


def _date(timestamp: float) -> str:
    """RFC 5322 date-time in UTC."""
    return format_datetime(datetime.fromtimestamp(timestamp, UTC))


def _span(seconds: float) -> str:
    """'4 hours', '2 days', '30 minutes': how long a message has waited, in words."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return "less than a minute"
