"""The HTTP endpoint at `[metrics] listen`: `/metrics` and `/healthz` (SPEC §9).

It runs inside the receiver, on its own thread, and must never disturb SMTP:

- at most `MAX_CLIENTS` requests at once; a connection beyond that is closed at
  once, so a flood of connections cannot pile up threads in the receiver;
- a client has `REQUEST_TIMEOUT` seconds to send its whole request (one deadline,
  not one per read: a request that trickles in a byte at a time is cut), and as
  long for each write of the answer;
- a malformed request gets the standard library's 400 (or 414, 501) and the
  connection closes; nothing is logged per request, and a bug while answering is
  one log line and a 500, never a traceback on stderr.

`/metrics` is made by prometheus_client (`choose_encoder`: the text format, or
OpenMetrics when the scraper asks for it); `/healthz` is "ok" with 200, or the
reasons, one per line, with 503 (services/monitoring/health.py).
"""

from __future__ import annotations

import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from services.monitoring.look import Monitor
from shared.config import HostPort
from shared.log import EventLog

MAX_CLIENTS = 8  # requests answered at once; Prometheus sends one per scrape
REQUEST_TIMEOUT = 5.0  # seconds per read or write of one request


class MetricsEndpoint(ThreadingHTTPServer):
    """The endpoint's server: `start()` serves on a daemon thread, `stop()` ends it."""

    daemon_threads = True
    block_on_close = False  # a stop never waits for a client that stalls
    allow_reuse_address = True
    request_queue_size = 16

    def __init__(self, listen: HostPort, registry: CollectorRegistry, monitor: Monitor,
                 log: EventLog) -> None:
        self.address_family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        self.registry = registry  # the receiver's counters, and `monitor` in it
        self.monitor = monitor
        self.log = log
        self._clients = threading.BoundedSemaphore(MAX_CLIENTS)
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="metrics-endpoint", daemon=True)
        super().__init__((listen.host, listen.port), EndpointHandler)  # OSError: port busy

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.shutdown()
            self._thread.join(timeout=5)
        self.server_close()

    def process_request(self, request: socket.socket, client_address: tuple) -> None:  # type: ignore[override]
        if not self._clients.acquire(blocking=False):
            self.shutdown_request(request)  # busy: the scraper retries at its next interval
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._clients.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: tuple) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._clients.release()

    def handle_error(self, request: object, client_address: tuple) -> None:  # type: ignore[override]
        """A client that went away mid-answer is normal; say anything else in one line."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            self.log.error("metrics", peer=client_address[0], exc=exc)


class EndpointHandler(BaseHTTPRequestHandler):
    server: MetricsEndpoint
    timeout = REQUEST_TIMEOUT
    server_version = "mailbag"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        # The socket timeout bounds each read; this bounds the request as a whole.
        self._deadline = threading.Timer(REQUEST_TIMEOUT, self._cut)
        self._deadline.daemon = True
        self._deadline.start()

    def _cut(self) -> None:
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def finish(self) -> None:
        self._deadline.cancel()
        super().finish()

    def do_GET(self) -> None:  # noqa: N802 - the http.server protocol
        self._deadline.cancel()  # the request is in: answering may take its time
        path = urlsplit(self.path).path
        try:
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._answer(200, encoder(self.server.registry), content_type)
            elif path == "/healthz":
                reasons = self.server.monitor.health()
                body = "\n".join(reasons or ["ok"]) + "\n"
                self._answer(503 if reasons else 200, body.encode(), "text/plain; charset=utf-8")
            else:
                self._answer(404, b"not found: try /metrics or /healthz\n", "text/plain")
        except OSError:
            raise  # the client went away: handle_error keeps quiet
        except Exception as exc:  # noqa: BLE001 - a bug of ours: a 500 and one log line
            self.server.log.error("metrics", path=path, exc=exc)
            self._answer(500, b"internal error\n", "text/plain")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Requests are not logged: a scrape every few seconds would bury the mail log."""
