"""services/monitoring/health.py: the /healthz rules, from a table."""

from __future__ import annotations

import pytest

from services.monitoring.health import Limits, Look, problems

NOW = 1_764_600_000.0  # 2025-12-01T14:40:00Z
LIMITS = Limits(relay_down_after=600.0, max_queue_age=3600.0)
MINUTE = 60.0


def look(**changes: object) -> Look:
    values: dict[str, object] = {"at": NOW, "sender_running": True}
    values.update(changes)
    return Look(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(("seen", "reasons"), [
    (look(), []),
    (look(relay_up=True, waiting=3, oldest_waiting=NOW - 50 * MINUTE), []),
    (look(sender_running=False), ["sender: not running"]),
    # The relay: down long enough AND mail waiting long enough.
    (look(relay_up=False, relay_down_since=NOW - 11 * MINUTE, waiting=2,
          oldest_waiting=NOW - 11 * MINUTE),
     ["relay: down for 11m (since 2025-12-01T14:29:00+00:00), 2 messages waiting "
      "(relay_down_after 10m)"]),
    (look(relay_up=False, relay_down_since=NOW - 9 * MINUTE, waiting=2,
          oldest_waiting=NOW - 50 * MINUTE), []),  # not down for long yet
    (look(relay_up=False, relay_down_since=NOW - 60 * MINUTE, waiting=1,
          oldest_waiting=NOW - 1 * MINUTE), []),  # down long, but the mail just came
    (look(relay_up=False, relay_down_since=NOW - 60 * MINUTE), []),  # nothing waits
    (look(relay_up=True, relay_down_since=None, waiting=1,
          oldest_waiting=NOW - 20 * MINUTE), []),
    # The oldest waiting message (held ones are not counted as waiting).
    (look(waiting=1, oldest_waiting=NOW - 61 * MINUTE),
     ["queue: the oldest waiting message is 1h01m old (max_queue_age 1h00m)"]),
    (look(queue_error="Permission denied"), ["queue: cannot be read: Permission denied"]),
    # Everything at once: one line each.
    (look(sender_running=False, relay_up=False, relay_down_since=NOW - 2 * 3600.0, waiting=1,
          oldest_waiting=NOW - 3 * 3600.0),
     ["sender: not running",
      "relay: down for 2h00m (since 2025-12-01T12:40:00+00:00), 1 message waiting "
      "(relay_down_after 10m)",
      "queue: the oldest waiting message is 3h00m old (max_queue_age 1h00m)"]),
])
def test_health_rules(seen: Look, reasons: list[str]) -> None:
    assert problems(seen, LIMITS) == reasons
