"""`mailbag-sendmail -bs`: SMTP on stdin/stdout (what PHP mailers such as Symfony's
call by default), a thin loop around the receiver's sans-I/O `ServerSession`.

The local user is trusted like a relay client (Postfix: "mail relaying and other
access controls are disabled"): no TLS, no AUTH, any recipient. Each message is
prepared and stored exactly as a piped one (submission.py, app.store): the same
Received:, added fields, Bcc: removal and durable write, and it is answered 250
only once durable. The session ends at QUIT (221) or at the end of stdin.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime

from services.receiver.session import (
    NEED_DATA,
    CloseConnection,
    MessageReady,
    SendReply,
    ServerSession,
    SessionPolicy,
)
from services.sendmail.spool import SubmitLog, store
from services.sendmail.submission import SubmissionError, Submitter, prepare
from shared.config import Config
from shared.queue import new_queue_id
from shared.smtp import Reply

READ_SIZE = 64 * 1024
CLIENT_NAME = "local"  # in the EHLO reply, where a network client's IP would be
S451_NOT_QUEUED = Reply(451, "{detail}", "4.3.0")
S554_NOT_QUEUED = Reply(554, "{detail}", "5.6.0")
# Failures a client may retry later (the disk, the queue's permissions being fixed).
_TEMPORARY = frozenset({os.EX_TEMPFAIL, os.EX_CANTCREAT, os.EX_IOERR})


def serve_stdio(config: Config, submitter: Submitter, log: SubmitLog) -> int:
    """Run one SMTP session on fds 0 and 1; exit status 0 (errors are replies)."""
    session = ServerSession(_policy(config), CLIENT_NAME, may_relay=True)
    _write(session.greeting().data)
    while True:
        event = session.next_event()
        if event is NEED_DATA:
            chunk = os.read(sys.stdin.fileno(), READ_SIZE)
            if not chunk:
                return os.EX_OK
            session.receive_data(chunk)
        elif isinstance(event, SendReply):
            _write(event.data)
        elif isinstance(event, MessageReady):
            _store(event, config, submitter, log, session)
        elif isinstance(event, CloseConnection):
            return os.EX_OK
        # AuthRequest and StartTLS never come: the policy offers neither.


def _policy(config: Config) -> SessionPolicy:
    rcv = config.receiver
    return SessionPolicy(hostname=config.hostname, max_message_bytes=rcv.max_message_bytes,
                         max_recipients=rcv.max_recipients,
                         max_bad_commands=rcv.max_bad_commands,
                         local_domains=frozenset(config.local.domains))


def _store(event: MessageReady, config: Config, submitter: Submitter, log: SubmitLog,
           session: ServerSession) -> None:
    envelope = event.envelope
    queue_id = new_queue_id()
    try:
        submission = prepare(b"".join(event.chunks), recipients=envelope.rcpt_tos,
                             extract=False,
                             sender=envelope.mail_from or "<>", full_name=None,
                             submitter=submitter, queue_id=queue_id,
                             now=datetime.now().astimezone())
        store(config, submission, queue_id)
    except SubmissionError as err:
        log.failed(err)
        reply = S451_NOT_QUEUED if err.exit_code in _TEMPORARY else S554_NOT_QUEUED
        session.message_not_stored(reply.format(detail=str(err)))
        return
    log.queued(queue_id, submission)
    session.message_stored(queue_id)


def _write(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(sys.stdout.fileno(), view):]
