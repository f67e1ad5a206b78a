"""A real Prometheus (Debian's `prometheus` and `promtool`) against a real appliance.

The appliance runs under supervisord from the repository's own supervisord.conf (a
private instance, tests/appliance_support.py) with `[metrics] listen` on a free port;
Prometheus scrapes it every 250 ms from a free loopback port, its TSDB in the test's
tmp_path. Mail goes in over SMTP, out to a real relay (aiosmtpd) and a Maildir, and
the counters Prometheus stored must match what was sent. The raw exposition passes
`promtool check metrics`. Every expression of the Grafana dashboard runs through
`/api/v1/query`: it must parse, find series in this Prometheus, and find none in a
second one that scrapes the same endpoint but drops every `mailbag_*` name - so it
names metrics mailbag exports and nothing else (not even Prometheus's own `up`).
The alert rules pass `promtool check rules` and their unit tests (`promtool test
rules`).
"""

from __future__ import annotations

import json
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.appliance_support import Appliance, Upstream, wait_until
from tests.metrics_support import PROMTOOL, Prometheus, have_prometheus, http_get
from tests.support import REPO, free_port

pytestmark = pytest.mark.skipif(
    not have_prometheus(), reason="needs Debian's prometheus package (.ci/run installs it)")

ALERTS = REPO / "contrib" / "prometheus" / "alerts.yml"
ALERT_TESTS = REPO / "contrib" / "prometheus" / "alerts-test.yml"
DASHBOARD = REPO / "contrib" / "grafana" / "mailbag.json"
RELAYED, LOCAL = 6, 2


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def test_the_alert_rules_are_valid_and_pass_their_tests() -> None:
    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout
    tested = promtool("test", "rules", str(ALERT_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def expressions(node: Any) -> Iterator[str]:
    """Every PromQL expression in a Grafana dashboard (targets' "expr", at any depth)."""
    if isinstance(node, dict):
        for key, item in node.items():
            if key == "expr" and isinstance(item, str):
                yield item
            else:
                yield from expressions(item)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


@pytest.mark.e2e
def test_a_real_prometheus_scrapes_mailbag_and_the_counters_match(tmp_path: Path) -> None:
    metrics_port = free_port()
    with Upstream() as upstream:
        appliance = Appliance(sender={"relay": upstream.address},
                              metrics={"listen": f"127.0.0.1:{metrics_port}"})
        prometheus = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{metrics_port}")
        control = Prometheus(tmp_path / "control", f"127.0.0.1:{metrics_port}",
                             drop="mailbag_.*")
        try:
            # Prometheus first: it hands its first targets to the scraper only after
            # its discovery interval (5 s), which the appliance's start-up then overlaps.
            prometheus.start()
            control.start()
            appliance.start()
            appliance.wait_running()
            wait_until(appliance.answers_220, 15.0, "the receiver's 220")
            with smtplib.SMTP(*appliance.listen, timeout=10) as client:
                for n in range(RELAYED):
                    client.sendmail("me@example.com", [f"r{n}@example.org"], b"Subject: x\r\n")
                for _ in range(LOCAL):
                    client.sendmail("me@example.com", ["you@localhost"], b"Subject: y\r\n")
                client.mail("me@example.com")
                refused, _ = client.rcpt("no-domain")  # a 501, counted by its code
                assert refused == 501
            wait_until(lambda: len(upstream.messages) == RELAYED, 15.0, "the relay's messages")
            prometheus.wait_for("mailbag_received_total", RELAYED + LOCAL)
            prometheus.wait_for("mailbag_delivered_total{route=\"relay\"}", RELAYED)
            prometheus.wait_for("mailbag_delivered_total{route=\"local\"}", LOCAL)
            prometheus.wait_for("mailbag_rejected_total{code=\"501\"}", 1)
            prometheus.wait_for("mailbag_delivery_seconds_count", RELAYED)
            prometheus.wait_for("sum(mailbag_queue_messages)", 0)
            prometheus.wait_for("count(mailbag_queue_messages)", 4)  # every state, at 0
            assert prometheus.scalar("mailbag_relay_up") == 1
            assert prometheus.target_health() == "up"
            # A rate() needs two samples in its window.
            for server in (prometheus, control):
                wait_until(lambda s=server: (s.scalar("count_over_time(up[1m])") or 0) >= 2,
                           10.0, "a second scrape")
            assert prometheus.scalar("mailbag_queue_oldest_seconds") == 0

            status, exposition = http_get(metrics_port, "/metrics")
            assert status == 200
            linted = promtool("check", "metrics", stdin=exposition)
            assert linted.returncode == 0, linted.stdout + linted.stderr

            dashboard = json.loads(DASHBOARD.read_text())
            found = list(expressions(dashboard))
            assert len(found) >= 10
            for expr in found:
                answer = prometheus.query(expr)
                assert answer["status"] == "success", (expr, answer)
                assert answer["data"]["result"], f"no series for {expr!r}"
                without_mailbag = control.query(expr)
                assert without_mailbag["status"] == "success", (expr, without_mailbag)
                assert without_mailbag["data"]["result"] == [], f"{expr!r} needs no mailbag_*"
        finally:
            control.stop()
            prometheus.stop()
            appliance.cleanup()
