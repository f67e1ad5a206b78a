"""Helpers for the metrics endpoint's tests: HTTP requests, the exposition, and a real
Prometheus (Debian's `prometheus`) on a free loopback port scraping mailbag.

Every wait is bounded; `Prometheus.stop()` ends the server it started and its
temporary folder (config and TSDB) goes with the test's tmp_path.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.appliance_support import wait_until
from tests.support import free_port

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"


def have_prometheus() -> bool:
    return bool(shutil.which(PROMETHEUS) and shutil.which(PROMTOOL))


def http_get(port: int, path: str, timeout: float = 5.0,
             headers: dict[str, str] | None = None) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def answers(port: int, path: str = "/healthz") -> tuple[int, str] | None:
    """The endpoint's answer, or None while nothing listens."""
    try:
        return http_get(port, path, timeout=2.0)
    except OSError:
        return None


def samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a text exposition: (name, sorted labels) -> value."""
    found = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(port: int, name: str, **labels: str) -> float | None:
    """One sample from the endpoint's /metrics (None when it is not there)."""
    status, body = http_get(port, "/metrics")
    assert status == 200, body
    return samples(body).get((name, tuple(sorted(labels.items()))))


class Prometheus:
    """A real Prometheus scraping one target every `interval`, TSDB in `folder`.

    `drop`: a regular expression of metric names it throws away at each scrape
    (its `metric_relabel_configs`); what is left then is only its own per-scrape
    series (`up`, `scrape_*`)."""

    def __init__(self, folder: Path, target: str, interval: str = "250ms",
                 drop: str = "") -> None:
        self.folder = folder
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "prometheus.yml"
        relabel = ("    metric_relabel_configs:\n"
                   "      - source_labels: [__name__]\n"
                   f"        regex: '{drop}'\n"
                   "        action: drop\n") if drop else ""
        self.config.write_text(
            "global:\n"
            f"  scrape_interval: {interval}\n"
            f"  scrape_timeout: {interval}\n"
            "scrape_configs:\n"
            "  - job_name: mailbag\n"
            "    static_configs:\n"
            f"      - targets: ['{target}']\n" + relabel)
        self.log = folder / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config}",
                 f"--storage.tsdb.path={self.folder / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        wait_until(self._ready, 30.0, "Prometheus to be ready", step=0.1)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {self.log.read_text()[-2000:]}")
        answer = answers(self.port, "/-/ready")
        return answer is not None and answer[0] == 200

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def query(self, expr: str) -> dict[str, Any]:
        """GET /api/v1/query?query=expr: the decoded answer, errors included."""
        path = "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        _, body = http_get(self.port, path, timeout=10.0)
        return json.loads(body)

    def scalar(self, expr: str) -> float | None:
        """The value of a query with one result, None while it has none."""
        answer = self.query(expr)
        assert answer["status"] == "success", answer
        result = answer["data"]["result"]
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def wait_for(self, expr: str, expected: float, timeout: float = 20.0) -> None:
        wait_until(lambda: self.scalar(expr) == expected, timeout,
                   f"Prometheus: {expr} == {expected} (last: {self.scalar(expr)})", step=0.1)

    def target_health(self) -> str:
        _, body = http_get(self.port, "/api/v1/targets")
        targets = json.loads(body)["data"]["activeTargets"]
        return targets[0]["health"] if targets else "none"


def wait_for_value(port: int, name: str, expected: float, timeout: float = 10.0,
                   **labels: str) -> None:
    wait_until(lambda: value(port, name, **labels) == expected, timeout,
               f"{name}{labels} == {expected} at the endpoint")


def timed(call: Any) -> tuple[float, Any]:
    started = time.monotonic()
    result = call()
    return time.monotonic() - started, result
