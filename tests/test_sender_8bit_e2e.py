"""8-bit mail through the real sender to Postfix's smtp-sink, with and without 8BITMIME.

`smtp-sink -8` does not announce 8BITMIME (RFC 6152): what reaches it must be 7 bit,
and decode to what was queued; a message that cannot be converted fails for good
with 5.6.3 instead of being sent as it is. Without `-8` the same data goes unchanged
with `BODY=8BITMIME`.
"""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest

from shared.config import load_config
from shared.queue import QueueWriter
from tests.sender_support import SmtpSink
from tests.support import MailbagProcess, write_config
from tests.test_sender_e2e import FAST, log_text, queued, wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not SmtpSink.available(), reason="postfix smtp-sink not installed"),
]



@pytest.fixture
def sender():
    started: list[MailbagProcess] = []
    yield lambda path: started.append(MailbagProcess("sender", path).start())
    for proc in started:
        assert proc.stop() == 0

PLAIN_8BIT = "Subject: cron output\r\n\r\nBackup done: 3 Dateien, 12 Größen, 10 €\r\n".encode()
MULTIPART_8BIT = (
    b"MIME-Version: 1.0\r\nSubject: report\r\n"
    b"Content-Type: multipart/mixed; boundary=\"sep\"\r\n\r\n"
    b"--sep\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    b"\r\n" + "naïve café\r\n".encode() +
    b"--sep\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
    b"\r\nAAECAwQF\r\n--sep--\r\n"
)
HEADER_8BIT = "Subject: Grüße\r\n\r\nbody\r\n".encode()


def sink_messages(sink: SmtpSink, count: int) -> list[email.message.Message]:
    """What smtp-sink got: its X-Mail-Args etc. lines, then the message (LF line ends)."""
    wait_until(lambda: len(sink.dumps()) >= count, what=f"{count} dumps at smtp-sink")
    dumps = [dump.read_bytes() for dump in sink.dumps()]
    assert len(dumps) == count
    return [email.message_from_bytes(dump, policy=email.policy.compat32) for dump in dumps]


def by_subject(messages: list[email.message.Message]) -> dict[str, email.message.Message]:
    return {str(message["Subject"]): message for message in messages}


def leaves(message: email.message.Message) -> list[bytes]:
    return [part.get_payload(decode=True).rstrip(b"\n")
            for part in message.walk() if not part.is_multipart()]


def run_sender(tmp_path: Path, sink: SmtpSink, sender, bodies: list[bytes]):
    path = write_config(tmp_path, sender={**FAST, "relay": sink.address})
    config = load_config(path)
    writer = QueueWriter(config.queue.dir)
    for body in bodies:
        writer.store("cron@example.com", ["admin@example.org"], body)
    sender(path)
    wait_until(lambda: queued(config) == [], what="the queue to empty")
    return config


def test_8bit_mail_to_a_relay_without_8bitmime_arrives_in_7bit_or_fails_5_6_3(
    tmp_path: Path, sender
) -> None:
    sink = SmtpSink(tmp_path / "sink", extra=("-8",)).start()
    try:
        config = run_sender(tmp_path, sink, sender,
                            [PLAIN_8BIT, MULTIPART_8BIT, HEADER_8BIT])
        arrived = by_subject(sink_messages(sink, 3))
    finally:
        sink.stop()
    # The third is the bounce of the one that could not be converted, 7 bit itself.
    bounce = arrived.pop("Undelivered Mail Returned to Sender")
    assert bounce["X-Mail-Args"] == "<>" and "Status: 5.6.3" in bounce.as_string()
    assert sorted(arrived) == ["cron output", "report"]
    for message in [*arrived.values(), bounce]:
        assert "BODY=" not in message["X-Mail-Args"]
        assert message.as_bytes().isascii()
    assert leaves(arrived["cron output"]) == [PLAIN_8BIT.split(b"\r\n\r\n")[1].rstrip()]
    assert leaves(arrived["report"]) == ["naïve café".encode(), b"\x00\x01\x02\x03\x04\x05"]
    # The one with an 8-bit header failed for good, with the reason kept and logged.
    reasons = [p.read_text() for p in config.queue.failed.iterdir() if p.suffix == ".reason"]
    assert len(reasons) == 1 and "5.6.3" in reasons[0] and "8-bit data in a header" in reasons[0]
    assert "5.6.3" in log_text(config)


def test_8bit_mail_to_a_relay_with_8bitmime_goes_unchanged_with_body_8bitmime(
    tmp_path: Path, sender
) -> None:
    sink = SmtpSink(tmp_path / "sink").start()
    try:
        run_sender(tmp_path, sink, sender, [PLAIN_8BIT, HEADER_8BIT])
        arrived = sink_messages(sink, 2)
    finally:
        sink.stop()
    (message,) = [m for m in arrived if m["Subject"] == "cron output"]
    assert message["X-Mail-Args"] == "<cron@example.com> BODY=8BITMIME"
    assert PLAIN_8BIT.replace(b"\r\n", b"\n") in message.as_bytes()  # byte for byte
    (header_8bit,) = [m for m in arrived if m is not message]
    assert header_8bit["X-Mail-Args"] == "<cron@example.com> BODY=8BITMIME"
    assert "Subject: Grüße\n".encode() in header_8bit.as_bytes()
