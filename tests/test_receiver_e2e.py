"""The receiver end to end: a real `python -m services.receiver` over loopback, real clients.

Every accepted message is checked BYTE FOR BYTE against SPEC §3's queue format
(`assert_queue_file`: the envelope lines, our Received: field, the client's data with
only what §8 adds), and found under the queue id the 250 reply names.
Clients: Python's smtplib, swaks and curl (Debian packages), and a raw socket for
pipelining, limits, timeouts and the graceful stop.
"""

from __future__ import annotations

import os
import resource
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from email import message_from_bytes, policy
from pathlib import Path

import pytest

from services.receiver import replies as R
from shared.config import Config, load_config
from shared.queue import QueueFile
from shared.smtp import Reply, ReplyParser
from tests.reply_match import fields, matches
from tests.support import REPO, MailbagProcess, free_port, tiny_tmpfs, wait_for_banner, write_config
from tests.trace_support import assert_queue_file, split_trace

pytestmark = pytest.mark.e2e

HOST = "mx.e2e.example"
LEFTOVER = "18ec0000000000000abcdef"
TIMEOUT = 10.0


# ---------------------------------------------------------------------------- helpers


def ready_files(config: Config) -> set[str]:
    """What the sender would see: the non-dot files directly in queue.dir."""
    return {e.name for e in os.scandir(config.queue.dir) if e.is_file() and e.name[0] != "."}


def tmp_files(config: Config) -> list[str]:
    return os.listdir(config.queue.dir / ".tmp")


def queue_id_of(reply: Reply) -> str:
    found = fields(reply, R.S250_QUEUED)
    assert found is not None, f"not a 'queued' reply: {reply}"
    return found["queue_id"]


def queue_id_in_output(output: str) -> str:
    """The queue id from a client's transcript (swaks `<-  250 ...`, curl `< 250 ...`)."""
    for line in output.splitlines():
        start = line.find("250 ")
        if start < 0:
            continue
        for reply in ReplyParser().feed(line[start:].encode() + b"\r\n"):
            if matches(reply, R.S250_QUEUED):
                return queue_id_of(reply)
    raise AssertionError(f"no 'queued as' reply in:\n{output}")


def queued(config: Config, queue_id: str) -> bytes:
    path = config.queue.dir / queue_id
    assert path.is_file(), f"the 250 named {queue_id}, but {path} does not exist"
    return path.read_bytes()


def wait_for(condition, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class RawClient:
    """A plain socket that sends bytes and reads whole replies (ReplyParser)."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        self.parser = ReplyParser()
        self.replies: deque[Reply] = deque()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, count: int = 1, timeout: float = TIMEOUT) -> list[Reply]:
        deadline = time.monotonic() + timeout
        while len(self.replies) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"wanted {count} replies, have {list(self.replies)}")
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed by the server after {list(self.replies)}")
            self.replies.extend(self.parser.feed(data))
        return [self.replies.popleft() for _ in range(count)]

    def command(self, line: str) -> Reply:
        self.send(line.encode() + b"\r\n")
        return self.read()[0]

    def assert_closed(self, timeout: float = TIMEOUT) -> None:
        """The server closes: EOF, with nothing more said."""
        self.sock.settimeout(timeout)
        rest = b""
        for _ in range(100):
            data = self.sock.recv(65536)
            if not data:
                break
            rest += data
        assert rest == b"" and not self.replies, f"unexpected after close: {rest!r}"


def greet(client: RawClient, verb: str = "EHLO") -> None:
    assert matches(client.read()[0], R.S220_GREETING)
    assert client.command(f"{verb} client.example").code == 250


@pytest.fixture(scope="module")
def mailbag(tmp_path_factory) -> Iterator[Config]:
    """One receiver for the plain client tests (each finds its message by queue id)."""
    folder = tmp_path_factory.mktemp("receiver")
    # Room for the concurrent-clients test even while earlier sessions are still
    # closing; the limit itself is tested on its own receiver.
    path = write_config(folder, receiver={"max_connections": 20}, top={"hostname": HOST})
    config = load_config(path)
    # What a crashed receiver left half-written, two hours ago; start-up must clear it
    # away (a younger file may be a submission being written: it stays).
    (config.queue.dir / ".tmp").mkdir(parents=True)
    leftover = config.queue.dir / ".tmp" / LEFTOVER
    leftover.write_bytes(b"From: <a@b.example>\nTo: <c")
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    proc = MailbagProcess("receiver", path).start()
    try:
        wait_for_banner(config.receiver.listen.host, config.receiver.listen.port)
        yield config
    finally:
        assert proc.stop() == 0


def address(config: Config) -> tuple[str, int]:
    return config.receiver.listen.host, config.receiver.listen.port


# ---------------------------------------------------------------------------- clients


def test_leftover_temporary_files_are_removed_at_start(mailbag: Config) -> None:
    assert LEFTOVER not in tmp_files(mailbag)
    assert LEFTOVER not in ready_files(mailbag)


def test_smtplib(mailbag: Config) -> None:
    data = b"Subject: smtplib\r\n\r\n.starts with a dot\r\n..two dots\r\n.\r\nend"
    with smtplib.SMTP(*address(mailbag), local_hostname="client.example", timeout=TIMEOUT) as smtp:
        assert smtp.ehlo()[0] == 250
        assert smtp.has_extn("pipelining") and smtp.has_extn("8bitmime")
        assert smtp.has_extn("enhancedstatuscodes") and smtp.has_extn("help")
        assert int(smtp.esmtp_features["size"]) == mailbag.receiver.max_message_bytes
        assert smtp.mail("alice@example.com")[0] == 250
        assert smtp.rcpt("bob@example.org")[0] == 250
        assert smtp.rcpt("carol@example.net")[0] == 250
        code, text = smtp.data(data)
    reply = ReplyParser().feed(b"%d %s\r\n" % (code, text))[0]
    queue_id = queue_id_of(reply)
    # smtplib dot-stuffs and ends the last line; the receiver unstuffs.
    assert_queue_file(queued(mailbag, queue_id), queue_id,
                      "alice@example.com", ["bob@example.org", "carol@example.net"],
                      b"Subject: smtplib\r\n\r\n.starts with a dot\r\n..two dots\r\n.\r\nend\r\n")


def test_smtplib_null_sender(mailbag: Config) -> None:
    with smtplib.SMTP(*address(mailbag), local_hostname="client.example", timeout=TIMEOUT) as smtp:
        smtp.ehlo()
        assert smtp.mail("")[0] == 250  # MAIL FROM:<>
        assert smtp.rcpt("postmaster")[0] == 250
        code, text = smtp.data(b"Subject: bounce\r\n\r\nundeliverable\r\n")
    queue_id = queue_id_of(ReplyParser().feed(b"%d %s\r\n" % (code, text))[0])
    assert_queue_file(queued(mailbag, queue_id), queue_id,
                      "", ["postmaster"], b"Subject: bounce\r\n\r\nundeliverable\r\n")


@pytest.mark.parametrize("pipeline", [False, True], ids=["plain", "pipeline"])
def test_swaks(mailbag: Config, tmp_path: Path, pipeline: bool) -> None:
    message = tmp_path / "message.txt"
    # swaks sends LF as CRLF and ends the last line itself.
    message.write_bytes(b"Subject: swaks\n\n.line with a dot\nplain\n..two dots")
    host, port = address(mailbag)
    command = ["swaks", "--server", f"{host}:{port}", "--from", "alice@example.com",
               "--to", "bob@example.org,carol@example.net", "--data", f"@{message}",
               "--helo", "client.example"]
    if pipeline:
        command.append("--pipeline")
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    if pipeline:  # the four commands went out before the first reply came back
        assert result.stdout.index(" -> DATA") < result.stdout.index("<-  250 2.1.0")
    queue_id = queue_id_in_output(result.stdout)
    assert_queue_file(queued(mailbag, queue_id), queue_id,
                      "alice@example.com", ["bob@example.org", "carol@example.net"],
                      b"Subject: swaks\r\n\r\n.line with a dot\r\nplain\r\n..two dots\r\n",
    )


def test_curl(mailbag: Config, tmp_path: Path) -> None:
    data = b"Subject: curl\r\n\r\n.leading dot\r\nbody\r\n"
    message = tmp_path / "message.eml"
    message.write_bytes(data)
    host, port = address(mailbag)
    result = subprocess.run(
        ["curl", "-sS", "-v", f"smtp://{host}:{port}", "--mail-from", "alice@example.com",
         "--mail-rcpt", "bob@example.org", "--mail-rcpt", "carol@example.net",
         "--upload-file", str(message)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    queue_id = queue_id_in_output(result.stderr)
    assert_queue_file(queued(mailbag, queue_id), queue_id,
                      "alice@example.com", ["bob@example.org", "carol@example.net"], data)


def test_curl_with_bare_lf_file_is_refused_and_nothing_queued(mailbag: Config,
                                                              tmp_path: Path) -> None:
    """curl sends a file's bare LFs as they are: the receiver refuses, never guesses."""
    message = tmp_path / "message.txt"
    message.write_bytes(b"Subject: lf\n\nbody\n.\nMAIL FROM:<evil@example.com>\n")
    before = ready_files(mailbag)
    host, port = address(mailbag)
    result = subprocess.run(
        ["curl", "-sS", "-v", f"smtp://{host}:{port}", "--mail-from", "alice@example.com",
         "--mail-rcpt", "bob@example.org", "--upload-file", str(message)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode != 0
    assert f"< {R.S554_BARE_NEWLINE.code} {R.S554_BARE_NEWLINE.enhanced} " in result.stderr
    assert ready_files(mailbag) == before


# ---------------------------------------------------------------------------- raw socket


def test_pipelined_transaction_one_reply_per_command_in_order(mailbag: Config) -> None:
    with RawClient(*address(mailbag)) as client:
        greet(client)
        client.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\n"
                    b"RCPT TO:<carol@example.net>\r\nDATA\r\n")
        replies = client.read(4)
        for reply, template in zip(replies, (R.S250_SENDER_OK, R.S250_RECIPIENT_OK,
                                             R.S250_RECIPIENT_OK, R.S354_START_DATA),
                                   strict=True):
            assert matches(reply, template), replies
        assert fields(replies[2], R.S250_RECIPIENT_OK) == {"address": "carol@example.net"}
        client.send(b"Subject: pipelined\r\n\r\nhello\r\n.\r\nQUIT\r\n")
        stored, bye = client.read(2)
        assert matches(bye, R.S221_CLOSING)
        client.assert_closed()
    assert_queue_file(queued(mailbag, queue_id_of(stored)), queue_id_of(stored),
                      "alice@example.com", ["bob@example.org", "carol@example.net"],
                      b"Subject: pipelined\r\n\r\nhello\r\n")


def test_whole_session_in_one_write(mailbag: Config) -> None:
    """Even a client that never waits is answered one reply per command, in order."""
    with RawClient(*address(mailbag)) as client:
        client.send(b"HELO client.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<nobody>\r\n"
                    b"RCPT TO:<b@example.org>\r\nDATA\r\nline\r\n.\r\nNOOP\r\nQUIT\r\n")
        replies = client.read(9)
        expected = [R.S220_GREETING, R.S250_HELO, R.S250_SENDER_OK, R.S501_BAD_ADDRESS,
                    R.S250_RECIPIENT_OK, R.S354_START_DATA, R.S250_QUEUED, R.S250_OK,
                    R.S221_CLOSING]
        # After HELO (not EHLO) no enhanced codes are sent: compare code and text only.
        for reply, template in zip(replies, expected, strict=True):
            assert matches(reply, Reply(template.code, template.text)), replies
        client.assert_closed()
    queue_id = fields(replies[6], Reply(250, R.S250_QUEUED.text))["queue_id"]
    assert_queue_file(queued(mailbag, queue_id), queue_id,
                      "a@example.com", ["b@example.org"], b"line\r\n")


def test_unstorable_addresses_get_501_not_a_dropped_connection(mailbag: Config) -> None:
    with RawClient(*address(mailbag)) as client:
        greet(client)
        client.send(b'MAIL FROM:<"x<y"@b.example>\r\nMAIL FROM:<\xff@b.example>\r\n'
                    b'MAIL FROM:<a@example.com>\r\nRCPT TO:<"a>b"@example.org>\r\n'
                    b"RCPT TO:<b@\xfe.example>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
                    b"ok\r\n.\r\n")
        replies = client.read(8)
        assert [r.code for r in replies] == [501, 501, 250, 501, 501, 250, 354, 250], replies
        queue_id = queue_id_of(replies[7])
    assert_queue_file(queued(mailbag, queue_id), queue_id,
                      "a@example.com", ["b@example.org"], b"ok\r\n")


def test_body_lines_starting_with_dots(mailbag: Config) -> None:
    wire = b"..first\r\n..\r\n...\r\n.x\r\n.. two\r\nnormal.\r\n"
    with RawClient(*address(mailbag)) as client:
        greet(client)
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        assert client.read(3)[2].code == 354
        client.send(wire + b".\r\n")
        queue_id = queue_id_of(client.read()[0])
    assert_queue_file(queued(mailbag, queue_id), queue_id,
                      "a@example.com", ["b@example.org"],
                      b".first\r\n.\r\n..\r\nx\r\n. two\r\nnormal.\r\n")


def test_100_recipients_all_kept_101st_refused(mailbag: Config) -> None:
    recipients = [f"user{n:03d}@example.org" for n in range(101)]
    with RawClient(*address(mailbag)) as client:
        greet(client)
        client.send(b"MAIL FROM:<list@example.com>\r\n"
                    + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in recipients))
        replies = client.read(102)
        assert all(matches(r, R.S250_RECIPIENT_OK) for r in replies[1:101])
        assert matches(replies[101], R.S452_TOO_MANY_RECIPIENTS)
        assert client.command("DATA").code == 354
        client.send(b"Subject: many\r\n\r\nhi\r\n.\r\n")
        queue_id = queue_id_of(client.read()[0])
    assert_queue_file(queued(mailbag, queue_id), queue_id,
                      "list@example.com", recipients[:100], b"Subject: many\r\n\r\nhi\r\n")


def test_log_has_the_client_and_the_queue_id(mailbag: Config) -> None:
    with RawClient(*address(mailbag)) as client:
        greet(client)
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
                    b"x\r\n.\r\n")
        queue_id = queue_id_of(client.read(4)[3])

    def logged() -> list[str]:
        return [line for line in mailbag.log.file.read_text().splitlines() if queue_id in line]

    wait_for(logged, f"a log line with {queue_id}")
    line = logged()[0]
    timestamp, program, peer, *_ = line.split(" ")
    assert program == "R-SMTP"
    assert peer.startswith("127.0.0.1:")
    assert timestamp[:4].isdigit() and "T" in timestamp and timestamp[-6] in "+-"


def test_no_file_is_visible_before_the_data_is_complete(mailbag: Config) -> None:
    """Durability order: the file appears only with the 250, complete, never before."""
    half = b"".join(b"line %06d of a long message\r\n" % n for n in range(4000))
    before = ready_files(mailbag)
    with RawClient(*address(mailbag)) as client:
        greet(client)
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        assert client.read(3)[2].code == 354
        client.send(half)
        # Absence cannot be waited for: give the receiver a moment to take the bytes in.
        time.sleep(0.3)
        assert ready_files(mailbag) == before
        assert tmp_files(mailbag) == []
        client.send(half + b".\r\n")
        queue_id = queue_id_of(client.read()[0])
        assert ready_files(mailbag) == before | {queue_id}
    assert_queue_file(queued(mailbag, queue_id), queue_id,
                      "a@example.com", ["b@example.org"], half * 2)
    assert tmp_files(mailbag) == []


def test_client_vanishing_mid_data_leaves_nothing(mailbag: Config) -> None:
    before = ready_files(mailbag)
    with RawClient(*address(mailbag)) as client:
        greet(client)
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        assert client.read(3)[2].code == 354
        client.send(b"Subject: cut\r\n\r\nhalf a message\r\n")
        local_host, local_port = client.sock.getsockname()[:2]
        peer = f"{local_host}:{local_port}"
    # The receiver logs the close once it has seen the end of the connection.
    wait_for(lambda: f"R-SMTP {peer} close " in mailbag.log.file.read_text(),
             f"the close of {peer} to be logged")
    assert ready_files(mailbag) == before
    assert tmp_files(mailbag) == []


def test_oversize_message_over_the_wire_is_read_to_its_end_then_552(mailbag: Config) -> None:
    limit = mailbag.receiver.max_message_bytes
    line = b"o" * 1022 + b"\r\n"
    before = ready_files(mailbag)
    with RawClient(*address(mailbag)) as client:
        greet(client)
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        assert client.read(3)[2].code == 354
        client.send(line * (limit // len(line) + 64) + b".\r\n")
        reply = client.read()[0]
        assert matches(reply, R.S552_TOO_BIG), reply
        assert fields(reply, R.S552_TOO_BIG) == {"limit": str(limit)}
        assert matches(client.command("NOOP"), R.S250_OK)  # the session goes on
    assert ready_files(mailbag) == before


def test_concurrent_clients_each_get_their_own_exact_file(mailbag: Config) -> None:
    results: dict[tuple[int, int], str] = {}
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            with smtplib.SMTP(*address(mailbag), local_hostname=f"c{n}.example",
                              timeout=TIMEOUT) as smtp:
                assert smtp.ehlo()[0] == 250
                for k in range(5):
                    assert smtp.mail(f"sender{n}@example.com")[0] == 250
                    assert smtp.rcpt(f"rcpt{k}@example.org")[0] == 250
                    code, text = smtp.data(b"Subject: %d/%d\r\n\r\nbody %d %d\r\n" % (n, k, n, k))
                    reply = ReplyParser().feed(b"%d %s\r\n" % (code, text))[0]
                    results[(n, k)] = queue_id_of(reply)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 3)
    assert not errors, errors
    assert len(set(results.values())) == 25
    for (n, k), queue_id in results.items():
        assert_queue_file(queued(mailbag, queue_id), queue_id,
                          f"sender{n}@example.com", [f"rcpt{k}@example.org"],
                          b"Subject: %d/%d\r\n\r\nbody %d %d\r\n" % (n, k, n, k))


# ---------------------------------------------------------------------------- trace (SPEC §8)


def test_the_trace_names_the_client_the_server_and_the_queue_id(mailbag: Config) -> None:
    """One Received: field first (RFC 5321 §4.4), that a mail reader parses; a
    loopback client may relay, so its missing Date: and Message-ID: are added."""
    sent = b"Subject: trace\r\nX-Marker: trace-e2e\r\n\r\nbody\r\n"
    with smtplib.SMTP(*address(mailbag), local_hostname="client.example", timeout=TIMEOUT) as smtp:
        assert smtp.ehlo()[0] == 250
        assert smtp.mail("alice@example.com")[0] == 250
        assert smtp.rcpt("bob@example.org")[0] == 250
        code, text = smtp.data(sent)
    queue_id = queue_id_of(ReplyParser().feed(b"%d %s\r\n" % (code, text))[0])
    raw = queued(mailbag, queue_id)
    assert_queue_file(raw, queue_id, "alice@example.com", ["bob@example.org"], sent)
    data = QueueFile.from_bytes(raw).data
    trace, _ = split_trace(data)
    assert (trace["helo"], trace["ip"], trace["host"], trace["protocol"]) == (
        b"client.example", b"127.0.0.1", HOST.encode(), b"ESMTP")
    parsed = message_from_bytes(data, policy=policy.default)
    assert parsed["Message-ID"] == f"<{queue_id}@{HOST}>"
    assert f"id {queue_id}" in parsed["Received"] and parsed["X-Marker"] == "trace-e2e"


def test_a_client_that_may_not_relay_gets_the_trace_and_nothing_added(receiver_factory) -> None:
    config, _ = receiver_factory(receiver={"relay_networks": ["127.0.0.1/32"]})
    listen = config.receiver.listen
    sent = b"Subject: from outside\r\n\r\nbody\r\n"
    with smtplib.SMTP(listen.host, listen.port, source_address=("127.0.0.2", 0),
                      local_hostname="outside.example", timeout=TIMEOUT) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@example.com")[0] == 250
        assert smtp.rcpt("b@localhost")[0] == 250
        code, text = smtp.data(sent)
    queue_id = queue_id_of(ReplyParser().feed(b"%d %s\r\n" % (code, text))[0])
    assert_queue_file(queued(config, queue_id), queue_id, "a@example.com", ["b@localhost"],
                      sent, trusted=False)


def test_more_received_fields_than_max_hops_is_refused_after_the_dot(receiver_factory) -> None:
    config, _ = receiver_factory(receiver={"max_hops": 3})
    hops = b"Received: from a\r\n\tby b; Tue, 1 Dec 2026 10:00:00 +0000\r\n"
    with RawClient(*address(config)) as client:
        greet(client)
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n"
                    + hops * 4 + b"Subject: loop\r\n\r\nbody\r\n.\r\n")
        refused = client.read(4)[3]
        assert refused == R.S554_TOO_MANY_HOPS.format(hops=4, limit=3)
        assert (refused.code, refused.enhanced) == (554, "5.4.6")
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n"
                    + hops * 3 + b"Subject: three hops\r\n\r\nbody\r\n.\r\n")
        queue_id = queue_id_of(client.read(4)[3])
    assert ready_files(config) == {queue_id}


def test_a_header_section_over_a_megabyte_gets_the_trace_and_the_fields(mailbag: Config) -> None:
    fields = b"".join(b"X-Filler-%05d: %s\r\n" % (n, b"y" * 80) for n in range(12_000))
    sent = fields + b"\r\nbody after a huge header\r\n"
    with RawClient(*address(mailbag)) as client:
        greet(client)
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n"
                    + sent + b".\r\n")
        queue_id = queue_id_of(client.read(4)[3])
    assert len(fields) > 1024 * 1024
    assert_queue_file(queued(mailbag, queue_id), queue_id, "a@example.com", ["b@localhost"],
                      sent)


# ---------------------------------------------------------------------------- own processes


def test_ipv6_listen(receiver_factory) -> None:
    try:
        port = free_port("::1")
    except OSError as err:
        pytest.skip(f"no ::1 on this machine: {err}")
    config, _proc = receiver_factory(receiver={"listen": f"[::1]:{port}"}, top={"hostname": HOST})
    with smtplib.SMTP("::1", port, local_hostname="client.example", timeout=TIMEOUT) as smtp:
        smtp.ehlo()
        assert smtp.mail("alice@example.com")[0] == 250
        assert smtp.rcpt("bob@example.org")[0] == 250  # ::1/128 may relay by default
        code, text = smtp.data(b"Subject: v6\r\n\r\nhi\r\n")
    queue_id = queue_id_of(ReplyParser().feed(b"%d %s\r\n" % (code, text))[0])
    assert_queue_file(queued(config, queue_id), queue_id,
                      "alice@example.com", ["bob@example.org"], b"Subject: v6\r\n\r\nhi\r\n")
    wait_for(lambda: "R-SMTP [::1]:" in config.log.file.read_text(), "an R-SMTP [::1] line")


def _refused_at_once(host: str, port: int) -> bytes:
    """Connect; return everything the server says before it closes."""
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        said = b""
        for _ in range(100):
            data = sock.recv(4096)
            if not data:
                return said
            said += data
    raise AssertionError("the server kept talking")


def _greeted_client(host: str, port: int) -> RawClient:
    """A session that got 220, waiting (bounded) while the server frees a slot.

    A slot is given back when the session's thread ends, a moment after its 221 (e.g.
    the start-up probe's QUIT), so a 421 in that moment is retried, never accepted.
    """
    deadline = time.monotonic() + TIMEOUT
    while True:
        client = RawClient(host, port)
        reply = client.read()[0]
        if reply.code == 220:
            return client
        client.sock.close()
        assert reply.code == 421, reply
        assert time.monotonic() < deadline, "no slot came free"
        time.sleep(0.02)


def test_max_connections(receiver_factory) -> None:
    config, _proc = receiver_factory(receiver={"max_connections": 5}, top={"hostname": HOST})
    host, port = address(config)
    unavailable = R.S421_UNAVAILABLE.format(hostname=HOST).to_bytes()
    clients: list[RawClient] = []
    try:
        for _ in range(5):
            clients.append(_greeted_client(host, port))
        for client in clients:
            assert client.command("EHLO client.example").code == 250
        # The sixth: accepted, told 421 at once, closed.
        assert _refused_at_once(host, port) == unavailable
        for client in clients:  # the refusal touched none of the five sessions
            assert client.command("NOOP").code == 250
        assert matches(clients[0].command("QUIT"), R.S221_CLOSING)
        clients[0].assert_closed()
        clients[0].sock.close()
        # The seventh gets 220 once the quitting session's slot is back.
        clients[0] = _greeted_client(host, port)
        assert clients[0].command("EHLO client.example").code == 250
        assert _refused_at_once(host, port) == unavailable  # five sessions again
    finally:
        for client in clients:
            client.sock.close()


def test_idle_timeout(receiver_factory) -> None:
    """An idle session, and one stalled in the middle of DATA, both get 421 and close."""
    config, _proc = receiver_factory(receiver={"idle_timeout": 1}, top={"hostname": HOST})
    timeout_reply = R.S421_TIMEOUT.format(hostname=HOST)
    with RawClient(*address(config)) as idle, RawClient(*address(config)) as stalled:
        greet(idle)
        started = time.monotonic()
        greet(stalled)
        stalled.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
                     b"Subject: stalled\r\n\r\nhalf\r\n")
        assert stalled.read(3)[2].code == 354
        reply = idle.read(timeout=TIMEOUT)[0]
        waited = time.monotonic() - started
        assert matches(reply, timeout_reply), reply
        idle.assert_closed()
        assert matches(stalled.read(timeout=TIMEOUT)[0], timeout_reply)
        stalled.assert_closed()
    assert 0.9 <= waited < 5, waited
    assert ready_files(config) == set()
    assert tmp_files(config) == []


def _never_greeted(host: str, port: int) -> bool:
    """After TERM a new connection is refused, or told 421, or closed; never 220."""
    try:
        said = _refused_at_once(host, port)
    except ConnectionError:
        return True
    return not said.startswith(b"220")


def test_term_lets_data_in_progress_finish(receiver_factory) -> None:
    config, proc = receiver_factory(top={"hostname": HOST})
    host, port = address(config)
    first = b"Subject: in flight\r\n\r\n" + b"part one\r\n" * 1000
    rest = b"part two\r\n" * 1000
    with RawClient(host, port) as busy, RawClient(host, port) as idle:
        greet(busy)
        greet(idle)
        busy.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        assert busy.read(3)[2].code == 354
        busy.send(first)
        proc.signal(signal.SIGTERM)
        # The idle session is told at once; that proves the stop has begun.
        assert matches(idle.read()[0], R.S421_SHUTDOWN.format(hostname=HOST))
        idle.assert_closed()
        assert _never_greeted(host, port), "a new session was greeted after TERM"
        busy.send(rest + b".\r\n")
        stored, goodbye = busy.read(2)
        assert matches(goodbye, R.S421_SHUTDOWN.format(hostname=HOST))
        busy.assert_closed()
    assert_queue_file(queued(config, queue_id_of(stored)), queue_id_of(stored),
                      "a@example.com", ["b@example.org"], first + rest)
    assert proc.proc is not None and proc.proc.wait(TIMEOUT) == 0


def test_terms_that_keep_coming_while_it_exits_still_end_in_exit_0(receiver_factory) -> None:
    """One TERM stops; more TERMs, down to the program's last instant (an impatient
    operator, or supervisord's stop arriving after the test's own), change nothing:
    Python's finalization would put TERM's default action (death) back in place."""
    _config, proc = receiver_factory()
    assert proc.proc is not None
    deadline = time.monotonic() + TIMEOUT
    while proc.proc.poll() is None and time.monotonic() < deadline:
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.0005)
    assert proc.proc.wait(TIMEOUT) == 0


@pytest.fixture
def tiny_queue_dir(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs for queue.dir: a full disk that even root cannot write past."""
    with tiny_tmpfs(tmp_path / "tiny-queue", "64k") as mount_point:
        yield mount_point


def _send_too_much_then_a_small_one(config: Config, failure: Reply, size: int) -> None:
    """The big message gets `failure` and leaves nothing; the same session goes on."""
    with RawClient(*address(config)) as client:
        greet(client)
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        assert client.read(3)[2].code == 354
        client.send(b"".join(b"x" * 998 + b"\r\n" for _ in range(size // 1000)) + b".\r\n")
        assert matches(client.read()[0], failure)
        assert ready_files(config) == set()
        assert tmp_files(config) == []
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
                    b"small\r\n.\r\n")
        queue_id = queue_id_of(client.read(4)[3])
        assert client.command("QUIT").code == 221
    assert_queue_file(queued(config, queue_id), queue_id,
                      "a@example.com", ["b@example.org"], b"small\r\n")


def test_disk_full_gives_452_nothing_behind_session_goes_on(receiver_factory,
                                                            tiny_queue_dir: Path) -> None:
    config, _proc = receiver_factory(queue={"dir": str(tiny_queue_dir)}, top={"hostname": HOST})
    _send_too_much_then_a_small_one(config, R.S452_NO_SPACE, 200_000)


def test_write_error_gives_451_nothing_behind_session_goes_on(tmp_path: Path) -> None:
    """A file-size limit (which root cannot bypass) makes the write fail with EFBIG."""
    path = write_config(tmp_path, top={"hostname": HOST})
    config = load_config(path)
    limit = 256 * 1024

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.Popen(  # noqa: S603 - our own program
        [sys.executable, "-m", "services.receiver", "--config", str(path)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=limit_file_size,
    )
    try:
        wait_for_banner(*address(config))
        _send_too_much_then_a_small_one(config, R.S451_LOCAL_ERROR, 2 * limit)
    finally:
        proc.terminate()
        assert proc.wait(TIMEOUT) == 0
