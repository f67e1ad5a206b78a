"""A hostile or broken relay must not crash the sender nor lose mail (issue 5 §5, §6).

A tiny scripted SMTP server answers what no RFC allows (250 to DATA, 354 to MAIL,
334 to RCPT, garbage after the dot). The real sender process must log the
problem, keep the message queued for a later try (never fail it for good on
nonsense, never call it delivered), and keep running.
"""

from __future__ import annotations

import socket

import pytest

from shared.config import load_config
from shared.queue import QueueWriter
from tests.hardening_support import ready_files, wait_for
from tests.sender_support import LoopbackRelay
from tests.support import MailbagProcess, write_config

pytestmark = pytest.mark.e2e

NORMAL = {
    b"EHLO": b"250-hostile.test\r\n250 8BITMIME\r\n",
    b"HELO": b"250 hostile.test\r\n",
    b"MAIL": b"250 ok\r\n",
    b"RCPT": b"250 ok\r\n",
    b"DATA": b"354 go ahead\r\n",
    b".": b"250 queued\r\n",
    b"RSET": b"250 ok\r\n",
    b"NOOP": b"250 ok\r\n",
    b"QUIT": b"221 bye\r\n",
}


class ScriptedRelay(LoopbackRelay):
    """Answers each command line by its verb from a script; records the verbs seen."""

    def __init__(self, script: dict[bytes, bytes]) -> None:
        self.script = {**NORMAL, **script}
        self.seen: list[bytes] = []
        super().__init__()

    def session(self, conn: socket.socket) -> None:
        self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        conn.sendall(b"220 hostile.test ESMTP\r\n")
        in_data = False
        for line in self.lines(conn):
            if in_data:
                if line != b".":
                    continue
                in_data = False
            verb = line.split(b" ")[0].upper()
            self.seen.append(verb)
            reply = self.script.get(verb, b"500 what\r\n")
            if not reply:
                return  # hang up without a word
            conn.sendall(reply)
            if verb == b"DATA" and reply.startswith(b"354"):
                in_data = True
            if verb == b"QUIT":
                return


HOSTILE = {
    "250-to-DATA": ({b"DATA": b"250 sure\r\n"}, b"DATA"),
    "354-to-MAIL": ({b"MAIL": b"354 go\r\n"}, b"MAIL"),
    "334-to-RCPT": ({b"RCPT": b"334 what\r\n"}, b"RCPT"),
    "garbage-after-dot": ({b".": b"hello, I am not SMTP\r\n"}, b"."),
    "close-after-dot": ({b".": b""}, b"."),
}


@pytest.mark.parametrize("script,trigger", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_relay_defers_and_the_sender_lives_on(tmp_path, script, trigger):
    relay = ScriptedRelay(script)
    path = write_config(tmp_path, sender={"relay": f"127.0.0.1:{relay.port}",
                                          "poll_interval": 1, "retry_initial": 60,
                                          "command_timeout": 3, "data_end_timeout": 3})
    config = load_config(path)
    queue_id = QueueWriter(config.queue.dir).store(
        "a@localhost", ["far@other.example"], b"Subject: hostile\r\n\r\nbody\r\n"
    )
    sender = MailbagProcess("sender", path).start()
    try:
        wait_for(lambda: trigger in relay.seen, timeout=15, what="the relay to be tried")

        def deferred_in_log():
            text = config.log.file.read_text() if config.log.file.exists() else ""
            return any(queue_id in line and " defer" in line for line in text.splitlines())

        wait_for(deferred_in_log, timeout=15, what="the deferral in the log")
        assert sender.proc.poll() is None, "the sender died"
        wait_for(lambda: [p.name for p in ready_files(config.queue.dir)] == [queue_id],
                 timeout=10, what="the message back in the queue")
        assert not list(config.queue.failed.glob(f"{queue_id}*"))
        sender.signal()
        assert sender.proc.wait(15) == 0
        assert "Traceback" not in sender.stderr_text()
    finally:
        sender.stop()
        relay.close()
