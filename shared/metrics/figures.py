"""Every metric mailbag exports: its name, its meaning, and what counts it (SPEC §9).

The names are an interface (dashboards and alerts use them): extend, never rename.

    counted by the receiver          mailbag_received_total, mailbag_rejected_total{code}
    counted by the sender            mailbag_delivered_total{route}, mailbag_deferred_total,
                                     mailbag_failed_total, mailbag_bounces_total,
                                     mailbag_delivery_seconds (histogram), mailbag_relay_up,
                                     mailbag_relay_down_since_timestamp_seconds
    computed by the endpoint         mailbag_queue_messages{state}, mailbag_queue_oldest_seconds,
      at each scrape                 mailbag_sessions_active, mailbag_program_up{program}

Each program counts through one object: `ReceiverFigures` / `SenderFigures` count
nothing (metrics off); their `Counting...` subclasses (counting.py) count into a
prometheus_client registry. The programs call the same methods either way, so
"metrics off" costs a method call that returns at once - and no import of
prometheus_client at start.

Recipients or messages: `received` and `deferred` count messages (one per 250, one
per attempt of a message that ended in a temporary failure), `delivered` and
`failed` count recipients (a message to three relayed recipients is three
deliveries, as in Postfix's log), `bounces` counts notices queued.
"""

from __future__ import annotations

RECEIVED = "mailbag_received_total"
REJECTED = "mailbag_rejected_total"
DELIVERED = "mailbag_delivered_total"
DEFERRED = "mailbag_deferred_total"
FAILED = "mailbag_failed_total"
BOUNCES = "mailbag_bounces_total"
DELIVERY_SECONDS = "mailbag_delivery_seconds"
RELAY_UP = "mailbag_relay_up"
RELAY_DOWN_SINCE = "mailbag_relay_down_since_timestamp_seconds"
QUEUE_MESSAGES = "mailbag_queue_messages"
QUEUE_OLDEST = "mailbag_queue_oldest_seconds"
SESSIONS_ACTIVE = "mailbag_sessions_active"
PROGRAM_UP = "mailbag_program_up"

HELP = {
    RECEIVED: "Messages acknowledged with 250 by the receiver (one per message).",
    REJECTED: "Commands and connections the receiver refused, by reply code (4xx, 5xx).",
    DELIVERED: "Recipients delivered: route=relay (the relay's 250) or route=local (Maildir).",
    DEFERRED: "Delivery attempts of a message that ended in a temporary failure.",
    FAILED: "Recipients that failed for good (a 5xx, or expired in the queue).",
    BOUNCES: "Bounce notices (RFC 3464) queued to the senders of failed mail.",
    DELIVERY_SECONDS: "Seconds from a message's arrival in the queue to the relay's 250.",
    RELAY_UP: "1 when the last relay session succeeded, 0 when it failed; "
              "absent before the first.",
    RELAY_DOWN_SINCE: "Unix time of the first failed relay session since the last one "
                      "that succeeded; absent while the relay is up.",
    QUEUE_MESSAGES: "Messages in the queue by state (as `mailbag queue` lists them): "
                    "ready, deferred, held, and failed (in the failed folder).",
    QUEUE_OLDEST: "Age in seconds of the oldest message waiting for delivery (ready or "
                  "deferred; held ones are left out); 0 when none waits.",
    SESSIONS_ACTIVE: "SMTP sessions the receiver is serving now.",
    PROGRAM_UP: "1 while the program runs, 0 while it does not (program=receiver|sender).",
}

ROUTES = ("relay", "local")
# queued -> relay's 250: milliseconds on an idle queue, up to days for deferred mail.
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)


class ReceiverFigures:
    """What the receiver counts. This base class counts nothing (metrics off)."""

    def received(self) -> None:
        """A message acknowledged with 250."""

    def rejected(self, code: int) -> None:
        """A command or a connection refused with reply `code`."""


class SenderFigures:
    """What the sender counts. This base class counts nothing (metrics off)."""

    def delivered(self, route: str, recipients: int) -> None:
        """`recipients` delivered on `route` ("relay" or "local")."""

    def deferred(self) -> None:
        """One attempt of one message ended in a temporary failure."""

    def failed(self, recipients: int) -> None:
        """`recipients` failed for good."""

    def delivery_time(self, seconds: float) -> None:
        """A message reached the relay `seconds` after its arrival in the queue."""

    def bounced(self) -> None:
        """A bounce notice was queued."""

    def relay_session(self, ok: bool, at: float) -> None:
        """A relay session succeeded (opened) or failed (could not open, or broke) at `at`."""
