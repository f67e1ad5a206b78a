"""Delivery status notices (SPEC §8, RFC 3464): the runner's decisions told to the sender.

When `decide()` says a message bounces (recipients failed for good, or expired) or
deserves its one delay warning, `Notifier.notify` builds the notice
(`bounce.build_notice`) and queues it through the queue's writer like any message:
from the null sender `<>` to the original envelope sender, so it is delivered
locally, through the aliases, or relayed - and never bounces itself (decision.py).
One log line per notice names the original message's id and the notice's own.

The notice is queued before the original message is moved: a crash in between
sends it twice at worst, never not at all.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.sender.bounce import DELAYED, FAILED, Action, FailedRecipient, build_notice
from services.sender.decision import Decision, Outcome, RetryPolicy, Status, expires_at
from shared.log import EventLog
from shared.metrics.figures import SenderFigures
from shared.queue import QueueFile, QueueWriteError, QueueWriter
from shared.smtp import Reply


class Notifier:
    """Queues the notices the runner's decisions call for (see the module docstring).

    It holds the queue's writer, not a connection: a notice is an ordinary message,
    so the sender's own loop delivers it, retries it and keeps it across restarts."""

    def __init__(self, writer: QueueWriter, hostname: str, policy: RetryPolicy,
                 log: EventLog, figures: SenderFigures) -> None:
        self.writer = writer
        self.hostname = hostname
        self.policy = policy  # for the time a delayed message is retried until
        self.log = log
        self.figures = figures

    def notify(self, queue_id: str, message: QueueFile, decision: Decision,
               origins: dict[str, str], arrival: float, now: float) -> None:
        """Queue what `decision` says the sender must hear (nothing for `<>`)."""
        if decision.bounce:
            self._send(FAILED, queue_id, message, decision.failed, origins, arrival, now)
        if decision.warn:
            later = [o for o in decision.outcomes
                     if o.status in (Status.DEFERRED, Status.WAITING)]
            self._send(DELAYED, queue_id, message, later, origins, arrival, now)

    def _send(self, action: Action, queue_id: str, message: QueueFile,
              outcomes: Sequence[Outcome], origins: dict[str, str], arrival: float,
              now: float) -> None:
        recipients = [FailedRecipient(
            o.recipient, _reply(o), reason=_reason(o), original=origins.get(o.recipient),
            remote_mta=_host(o.peer) if o.reply is not None else None,  # who answered
            last_attempt=now) for o in outcomes]
        notice = build_notice(action, hostname=self.hostname, queue_id=queue_id,
                              sender=message.sender, recipients=recipients,
                              original=message.data, arrival=arrival, now=now,
                              retry_until=expires_at(arrival, self.policy))
        if notice is None:
            return
        event = "bounce" if action == FAILED else "delay-warning"
        try:
            notice_id = self.writer.store("", [message.sender], notice)
        except QueueWriteError as err:
            self.log.error(event, id=queue_id, to=f"<{message.sender}>",
                           error=err.strerror or str(err))
            return
        self.log.ok(event, id=queue_id, notice=notice_id, to=f"<{message.sender}>",
                    rcpts=len(recipients))
        if action == FAILED:
            self.figures.bounced()


def _reply(outcome: Outcome) -> Reply | None:
    """The reply the notice quotes: the one received, or for an outcome decided here
    (an alias loop) a reply made of its status code and words."""
    if outcome.reply is not None or not outcome.enhanced:
        return outcome.reply
    code = 550 if outcome.enhanced.startswith("5") else 450
    return Reply(code, outcome.detail, outcome.enhanced)


def _reason(outcome: Outcome) -> str:
    """The words a notice gives when the reply alone does not say it all."""
    return outcome.detail if outcome.reply is None or "expired" in outcome.detail else ""


def _host(peer: str) -> str | None:
    """The relay's host name for Remote-MTA, from the peer of the log line
    (`host:port`, `[ipv6]:port`); None for local delivery."""
    if peer in ("local", "-", ""):
        return None
    host = peer.rsplit(":", 1)[0]
    return host.split("[", 1)[0] or host
