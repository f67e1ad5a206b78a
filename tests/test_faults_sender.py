"""No lost mail on the sender's side (issue 5 §5, SPEC §6), with real processes.

- `kill -9` of the sender while the relay is answering the final dot: nothing is
  lost; after a restart everything is delivered; at most the message in flight is
  delivered twice (at-least-once, as Postfix).
- A full disk under the Maildir (a 256 KiB tmpfs): the delivery is deferred, no
  partial file is left in the Maildir, and it is delivered once space is freed.
"""

from __future__ import annotations

import signal

import pytest

from shared.config import load_config
from shared.queue import QueueWriter
from tests.hardening_support import ready_files, wait_for
from tests.sender_support import RecordingHandler, Relay
from tests.support import MailbagProcess, tiny_tmpfs, write_config

pytestmark = pytest.mark.e2e


def test_kill_9_of_the_sender_mid_relay_loses_nothing(tmp_path):
    handler = RecordingHandler(data_delay=1.0)  # the final dot waits: we kill meanwhile
    relay = Relay(handler).start()
    path = write_config(tmp_path, sender={"relay": relay.address, "poll_interval": 1,
                                          "retry_initial": 1})
    config = load_config(path)
    writer = QueueWriter(config.queue.dir)
    markers = [f"kill-sender-{n}".encode() for n in range(4)]
    for marker in markers:
        writer.store("a@localhost", ["far@other.example"], b"Subject: x\r\n\r\n" + marker + b"\r\n")
    sender = MailbagProcess("sender", path).start()
    restarted = None
    try:
        wait_for(handler.in_data.is_set, timeout=15, what="the sender inside DATA")
        sender.proc.send_signal(signal.SIGKILL)
        sender.proc.wait(10)
        # Nothing acknowledged yet, nothing lost: all four are still on disk somewhere.
        on_disk = ready_files(config.queue.dir)
        assert len(on_disk) == len(markers), on_disk
        handler.data_delay = 0.0

        restarted = MailbagProcess("sender", path).start()

        def all_delivered_and_queue_empty():
            with handler.lock:
                got = [m.content for m in handler.messages]
            delivered = all(any(marker in c for c in got) for marker in markers)
            return delivered and not ready_files(config.queue.dir)

        wait_for(all_delivered_and_queue_empty, timeout=20, what="every message delivered")
        with handler.lock:
            contents = [m.content for m in handler.messages]
        copies = {marker: sum(marker in c for c in contents) for marker in markers}
        assert all(n >= 1 for n in copies.values()), copies
        assert sum(copies.values()) <= len(markers) + 1, copies  # at most one duplicate
        assert restarted.stop() == 0
    finally:
        sender.stop()
        if restarted is not None:
            restarted.stop()
        relay.stop()


@pytest.fixture
def small_disk(tmp_path):
    with tiny_tmpfs(tmp_path / "small", "256k") as mount_point:
        yield mount_point


def test_full_maildir_disk_defers_leaves_nothing_partial_and_recovers(tmp_path, small_disk):
    maildir = small_disk / "mail"
    path = write_config(tmp_path, local={"domains": ["localhost"], "maildir": str(maildir)},
                        sender={"poll_interval": 1, "retry_initial": 0.3, "retry_max": 0.5})
    config = load_config(path)
    writer = QueueWriter(config.queue.dir)
    bodies = [b"Subject: big %d\r\n\r\n" % n + (b"%d" % n * 998 + b"\r\n") * 150
              for n in range(2)]
    for body in bodies:
        writer.store("a@localhost", ["bob@localhost"], body)
    sender = MailbagProcess("sender", path).start()
    box = maildir / "bob"
    try:
        def one_delivered_one_deferred():
            new = list((box / "new").iterdir()) if (box / "new").exists() else []
            text = config.log.file.read_text() if config.log.file.exists() else ""
            return len(new) == 1 and " defer " in text

        wait_for(one_delivered_one_deferred, timeout=15, what="a delivery and a deferral")
        # The deferred one is still queued (ready or being retried), nothing partial;
        # the delivered one's file goes at the end of the pass (unlinked behind).
        wait_for(lambda: len(ready_files(config.queue.dir)) == 1, timeout=5,
                 what="the delivered message's file gone")
        wait_for(lambda: not list((box / "tmp").iterdir()), timeout=5,
                 what="an empty Maildir tmp/")
        [delivered] = list((box / "new").iterdir())
        content = delivered.read_bytes()
        assert any(content.endswith(b.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n"))
                   for b in bodies)
        delivered.unlink()  # the user read it: space again

        def second_delivered():
            return (len(list((box / "new").iterdir())) == 1
                    and not ready_files(config.queue.dir))

        wait_for(second_delivered, timeout=15, what="the deferred message delivered")
        assert not list((box / "tmp").iterdir())
        assert sender.stop() == 0
    finally:
        sender.stop()
