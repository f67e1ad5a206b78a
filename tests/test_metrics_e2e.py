"""The metrics endpoint end to end: the receiver and the sender started by hand (no
supervisord: liveness comes from the programs), a real relay (aiosmtpd), real SMTP
clients and raw HTTP over loopback (SPEC §9, its bad input)."""

from __future__ import annotations

import smtplib
import socket
import threading
import time
from pathlib import Path

import pytest

from shared.config import load_config
from shared.queue import QueueWriter, new_queue_id
from tests.appliance_support import wait_until
from tests.metrics_support import answers, http_get, samples, timed, value, wait_for_value
from tests.sender_support import Relay
from tests.support import MailbagProcess, free_port, wait_for_banner, write_config
from tests.test_reload import hup_and_wait

pytestmark = pytest.mark.e2e

MESSAGE = b"Subject: metrics\r\n\r\nhello\r\n"


class Mailbag:
    """A receiver and a sender on one config with the metrics endpoint on."""

    def __init__(self, folder: Path, **sections: dict) -> None:
        self.metrics_port = free_port()
        metrics = {"listen": f"127.0.0.1:{self.metrics_port}", **sections.pop("metrics", {})}
        self.config_path = write_config(folder, metrics=metrics, **sections)
        self.config = load_config(self.config_path)
        self.receiver = MailbagProcess("receiver", self.config_path)
        self.sender = MailbagProcess("sender", self.config_path)

    @property
    def smtp(self) -> tuple[str, int]:
        return self.config.receiver.listen.host, self.config.receiver.listen.port

    def start_receiver(self) -> None:
        self.receiver.start()
        wait_for_banner(*self.smtp)

    def start_sender(self) -> None:
        self.sender = MailbagProcess("sender", self.config_path).start()

    def start_both(self) -> None:
        """Both programs, until /healthz says they run."""
        self.start_receiver()
        self.start_sender()
        self.wait_health(200)

    def send(self, to: str = "you@example.org", count: int = 1) -> None:
        with smtplib.SMTP(*self.smtp, timeout=10) as client:
            for _ in range(count):
                client.sendmail("me@example.com", [to], MESSAGE)

    def health(self) -> tuple[int, str] | None:
        return answers(self.metrics_port)

    def wait_health(self, status: int, text: str = "", timeout: float = 10.0) -> str:
        def reached() -> str | None:
            answer = self.health()
            return answer[1] if answer and answer[0] == status and text in answer[1] else None

        return wait_until(reached, timeout, f"/healthz {status} {text!r} (last: {self.health()})")

    def stop(self) -> None:
        for proc in (self.sender, self.receiver):
            if proc.proc is not None:
                proc.stop()


def test_healthz_follows_the_sender_and_the_relay_and_the_counters_follow_the_mail(
        tmp_path: Path, relay: Relay) -> None:
    mailbag = Mailbag(tmp_path, sender={"relay": relay.address, "relay_retry": 0.3,
                                        "retry_initial": 0.3},
                      metrics={"relay_down_after": "1s"})
    try:
        mailbag.start_receiver()
        mailbag.start_sender()
        assert mailbag.wait_health(200) == "ok\n"
        mailbag.send(count=3)
        relay.handler.wait_for(3)
        port = mailbag.metrics_port
        wait_for_value(port, "mailbag_delivered_total", 3, route="relay")
        assert value(port, "mailbag_received_total") == 3
        assert value(port, "mailbag_relay_up") == 1
        assert value(port, "mailbag_delivery_seconds_count") == 3
        # The program that does not serve the endpoint stops: 503, and back.
        mailbag.sender.stop()
        assert mailbag.wait_health(503) == "sender: not running\n"
        assert value(port, "mailbag_program_up", program="sender") == 0
        assert value(port, "mailbag_delivered_total", route="relay") is None  # not served
        mailbag.start_sender()
        mailbag.wait_health(200)
        # The relay goes away while mail waits: 503 past relay_down_after, and back.
        relay.stop()
        mailbag.send(count=2)
        wait_for_value(port, "mailbag_relay_up", 0)
        body = mailbag.wait_health(503, "relay: down for")
        assert "2 messages waiting" in body and "relay_down_after 1s" in body
        assert value(port, "mailbag_queue_messages", state="deferred") == 2
        assert value(port, "mailbag_queue_oldest_seconds") >= 1.0
        relay.start()
        mailbag.wait_health(200)
        relay.handler.wait_for(5)
        wait_for_value(port, "mailbag_queue_messages", 0, state="deferred")
        # The new sender counts from 0 (a reset), and its figures lag by up to a second.
        wait_for_value(port, "mailbag_delivered_total", 2, route="relay")
        assert value(port, "mailbag_relay_up") == 1
        assert value(port, "mailbag_received_total") == 5
    finally:
        mailbag.stop()


def test_a_busy_metrics_port_is_one_line_and_mail_still_flows(tmp_path: Path) -> None:
    mailbag = Mailbag(tmp_path)
    squatter = socket.create_server(("127.0.0.1", mailbag.metrics_port))
    try:
        mailbag.start_receiver()
        mailbag.start_sender()
        mailbag.send(to="you@localhost", count=2)
        maildir = mailbag.config.local.maildir / "you" / "new"
        wait_until(lambda: maildir.exists() and len(list(maildir.iterdir())) == 2, 10.0,
                   "local delivery")
    finally:
        mailbag.stop()
        squatter.close()
    assert mailbag.receiver.proc.returncode == 0
    errors = mailbag.receiver.stderr_text().strip().splitlines()
    assert errors == [f"receiver: metrics: cannot listen on 127.0.0.1:{mailbag.metrics_port}: "
                      "Address already in use; SMTP goes on without the metrics endpoint"]
    log = mailbag.config.log.file.read_text()
    assert "R-SMTP - metrics fail listen=" in log and "Traceback" not in log


# Each with the start of its answer. Requests without an HTTP/1.x version get the
# HTTP/0.9 form (no status line: an error page, or the page itself), as http.server does.
BAD_REQUESTS = [
    (b"\x00\x01\x02\xff garbage\r\n\r\n", b"<!DOCTYPE HTML>", b"Error code: 400"),
    (b"GET /metrics HTTP/1.1\r\nX: " + b"y" * 70_000 + b"\r\n\r\n", b"HTTP/1.0 431", b""),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.0\r\n\r\n", b"HTTP/1.0 414", b""),
    (b"BREW /metrics HTCPCP/1.0\r\n\r\n", b"<!DOCTYPE HTML>", b"Error code: 400"),
    (b"GET /healthz HTTP/9.9\r\n\r\n", b"<!DOCTYPE HTML>", b"Error code: 505"),
    (b"POST /metrics HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello", b"HTTP/1.0 501", b""),
    (b"GET /nothing-here HTTP/1.0\r\n\r\n", b"HTTP/1.0 404", b""),
    (b"GET /metrics\r\n\r\n", b"# HELP mailbag_", b""),
]


def whole_answer(port: int, request: bytes) -> bytes:
    """Send `request`, read until the endpoint closes (bounded by the socket timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_malformed_http_never_disturbs_smtp(tmp_path: Path) -> None:
    mailbag = Mailbag(tmp_path)
    try:
        mailbag.start_receiver()
        port = mailbag.metrics_port
        wait_until(lambda: mailbag.health() is not None, 10.0, "the endpoint")
        for request, start, inside in BAD_REQUESTS:
            answer = whole_answer(port, request)  # answered, and the connection closed
            assert answer.startswith(start) and inside in answer, (request[:40], answer[:200])
        # Connections that never finish their request, more than the endpoint serves at
        # once: SMTP goes on meanwhile, and so does the endpoint once they are dropped.
        stalled = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
        try:
            for sock in stalled:
                sock.sendall(b"GET /metr")
            elapsed, _ = timed(lambda: mailbag.send(to="you@localhost", count=5))
            assert elapsed < 2.0
        finally:
            for sock in stalled:
                sock.close()
        wait_until(lambda: mailbag.health() is not None, 10.0, "the endpoint again")
        assert value(port, "mailbag_received_total") == 5
    finally:
        mailbag.stop()
    assert mailbag.receiver.stderr_text() == ""
    assert "Traceback" not in mailbag.config.log.file.read_text()


def test_a_scrape_during_a_burst_of_50_sessions_answers_within_a_second(
        tmp_path: Path) -> None:
    mailbag = Mailbag(tmp_path, receiver={"max_connections": 60})
    stop = threading.Event()
    sent = [0] * 50
    opened = threading.Barrier(51, timeout=20)

    def session(index: int) -> None:
        with smtplib.SMTP(*mailbag.smtp, timeout=20) as client:
            opened.wait()
            for _ in range(200):  # bounded; the scrapes below end it sooner
                if stop.is_set():
                    break
                client.sendmail("me@example.com", ["you@localhost"], MESSAGE)
                sent[index] += 1

    try:
        mailbag.start_receiver()
        wait_until(lambda: mailbag.health() is not None, 10.0, "the endpoint")
        clients = [threading.Thread(target=session, args=(i,)) for i in range(50)]
        for client in clients:
            client.start()
        opened.wait()
        times, active = [], []
        for _ in range(3):
            time.sleep(0.2)
            elapsed, (status, body) = timed(lambda: http_get(mailbag.metrics_port, "/metrics"))
            times.append(elapsed)
            active.append(samples(body)[("mailbag_sessions_active", ())])
            elapsed, answer = timed(mailbag.health)
            times.append(elapsed)
        stop.set()
        for client in clients:
            client.join(30)
        assert max(times) < 1.0, times
        assert max(active) == 50
        wait_for_value(mailbag.metrics_port, "mailbag_received_total", sum(sent))
        assert sum(sent) >= 50
    finally:
        stop.set()
        mailbag.stop()


def test_a_reload_applies_new_health_limits_and_names_a_new_listen(tmp_path: Path) -> None:
    mailbag = Mailbag(tmp_path)  # no relay: remote mail waits
    try:
        mailbag.start_receiver()
        mailbag.start_sender()
        queue_id = QueueWriter(mailbag.config.queue.dir).store(
            "me@example.com", ["you@example.org"], MESSAGE,
            queue_id=new_queue_id(time.time_ns() - 600 * 10**9))  # arrived 10 minutes ago
        assert mailbag.wait_health(200) == "ok\n"
        text = mailbag.config_path.read_text()
        text = text.replace("[metrics]\n", '[metrics]\nmax_queue_age = "5m"\n')
        moved = f"127.0.0.1:{free_port()}"
        mailbag.config_path.write_text(text.replace(
            f'listen = "127.0.0.1:{mailbag.metrics_port}"', f'listen = "{moved}"'))
        lines = hup_and_wait(mailbag.receiver, mailbag.config.log.file, "R-SMTP")
        assert any("needs_restart=metrics.listen" in line for line in lines), lines
        body = mailbag.wait_health(503)  # the new limit; the endpoint stays where it was
        assert body == ("queue: the oldest waiting message is 10m old "
                        "(max_queue_age 5m)\n"), body
        assert queue_id in {p.name for p in mailbag.config.queue.dir.iterdir()}
    finally:
        mailbag.stop()


def test_refusals_are_counted_by_reply_code(tmp_path: Path) -> None:
    mailbag = Mailbag(tmp_path, receiver={"max_connections": 1})
    try:
        mailbag.start_receiver()
        port = mailbag.metrics_port
        wait_until(lambda: mailbag.health() is not None, 10.0, "the endpoint")
        wait_for_value(port, "mailbag_sessions_active", 0)  # the start-up check's is over
        with smtplib.SMTP(*mailbag.smtp, timeout=10) as client:
            client.ehlo("metrics.test")
            assert client.rcpt("you@example.org")[0] == 503  # RCPT before MAIL
            client.mail("me@example.com")
            assert client.rcpt("no-domain")[0] == 501
            with socket.create_connection(mailbag.smtp, timeout=5) as over:
                assert over.recv(100).startswith(b"421")  # over max_connections
        wait_for_value(port, "mailbag_rejected_total", 1, code="421")
        assert value(port, "mailbag_rejected_total", code="501") == 1
        assert value(port, "mailbag_rejected_total", code="503") == 1
        assert value(port, "mailbag_received_total") == 0
    finally:
        mailbag.stop()
