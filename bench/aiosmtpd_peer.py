"""The benchmark's peer: an aiosmtpd server that stores each message durably.

Run as its own process (so that its CPU and memory can be read from /proc)::

    python bench/aiosmtpd_peer.py --listen 127.0.0.1:2526 --dir /tmp/peer-queue

Its handler does what mailbag's receiver promises, the plain way aiosmtpd users
write it: for each message, create a file in `<dir>/.tmp`, write the envelope and
the data, fsync it, rename it into `<dir>`, fsync the folder, and only then return
"250". The work is done inside the handler, on the event loop (as aiosmtpd's own
examples do), so the 250 is never sent before the message is durable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session


class DurableFileHandler:
    """One fsynced file per message, folder fsynced before the 250."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.tmp = folder / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        name = f"{time.time_ns():016x}{secrets.token_hex(3)}"
        head = [f"From: <{envelope.mail_from}>\n".encode()]
        head += [f"To: <{rcpt}>\n".encode() for rcpt in envelope.rcpt_tos]
        head.append(b"\n")
        content = envelope.original_content or b""
        tmp_path = self.tmp / name
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.write(fd, b"".join(head) + content)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp_path, self.folder / name)
        os.fsync(self.dir_fd)
        return f"250 2.0.0 Ok: queued as {name}"


async def serve(host: str, port: int, folder: Path) -> None:
    handler = DurableFileHandler(folder)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="peer.localdomain", ident="aiosmtpd-peer"),
        host=host,
        port=port,
        backlog=128,
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="host:port")
    parser.add_argument("--dir", required=True, type=Path, help="folder for the message files")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    asyncio.run(serve(host, int(port), args.dir))


if __name__ == "__main__":
    main()
