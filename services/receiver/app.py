"""The receiver program: build the servers from the config, run them, stop gracefully.

Start-up problems (port in use, unwritable queue, bad TLS key, unreadable users file)
raise StartupError: one line, exit status 2 (SPEC §2). SIGTERM is recorded by the
StopFlag; this main loop then stops accepting, lets DATA in progress finish, answers
421 to every other session, and returns 0 (SPEC §6).

HUP (shared/reload.py): the main loop reads the config again and builds the session
settings anew - the policy (hostname, limits, local domains), the connection and
time limits, `relay_networks`, the TLS certificate and the users file - and hands
them to the servers for the sessions that start from then on; open sessions keep
theirs. The listening addresses need a restart.

With `[metrics] listen` set the receiver counts, and serves the metrics endpoint
(services/monitoring/); a metrics port that cannot be had is one line, not a stop:
SMTP is the product, the endpoint only reports on it. A reload applies new health
limits (`relay_down_after`, `max_queue_age`); a new `listen` needs a restart.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from services.receiver.pool import SlotPool
from services.receiver.server import PROGRAM, ReceiverServer, ServerLimits
from services.receiver.session import SessionPolicy
from services.receiver.users import UserFileError, load_users, verify_password
from shared.cli import EXIT_OK, StartupError, open_log
from shared.config import Config, HostPort, IPNetwork
from shared.log import EventLog, shutdown_logging
from shared.metrics.figures import ReceiverFigures
from shared.queue import GroupCommit, MessageStore, QueueWriter
from shared.reload import RESTART_KEYS, reload_config
from shared.signals import ReloadFlag, StopFlag

if TYPE_CHECKING:
    from services.monitoring.endpoint import MetricsEndpoint

GRACE_SECONDS = 8.0  # how long a stop waits for DATA in progress (supervisor waits 15)


def build_queue(config: Config) -> QueueWriter:
    try:
        writer = QueueWriter(config.queue.dir)
        probe = writer.tmp_dir / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise StartupError(
            f"queue folder {config.queue.dir} is not usable: {err.strerror}"
        ) from None
    return writer


def message_store(config: Config, writer: QueueWriter) -> MessageStore:
    """How the sessions store messages: together (group commit) or each on its own."""
    return GroupCommit(writer) if config.queue.group_commit else writer


class _KeyHasPassphrase(Exception):
    pass


def _no_passphrase() -> bytes:
    """OpenSSL asks for a key's passphrase on the terminal unless told: never ask."""
    raise _KeyHasPassphrase


def build_tls_context(config: Config) -> ssl.SSLContext | None:
    rcv = config.receiver
    if not rcv.tls_cert or not rcv.tls_key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(rcv.tls_cert, rcv.tls_key, password=_no_passphrase)
    except _KeyHasPassphrase:
        raise StartupError(f"TLS key {rcv.tls_key}: has a passphrase; mailbag needs the "
                           "key without one (it never prompts)") from None
    except (OSError, ssl.SSLError) as err:
        detail = getattr(err, "strerror", None) or str(err)
        raise StartupError(
            f"cannot load TLS certificate {rcv.tls_cert} / key {rcv.tls_key}: {detail}"
        ) from None
    return context


def build_password_check(config: Config) -> Callable[[str, str], bool] | None:
    if not config.receiver.users_file:
        return None
    try:
        users = load_users(config.receiver.users_file)
    except UserFileError as err:
        raise StartupError(str(err)) from None
    return lambda username, password: verify_password(users, username, password)


# Keys the receiver cannot change while it runs (its listening sockets, its writer).
RECEIVER_RESTART_KEYS = (*RESTART_KEYS, "receiver.listen", "receiver.tls_listen",
                         "queue.group_commit")


@dataclass(frozen=True)
class SessionSettings:
    """What the servers give each new session (built at start and on a reload)."""

    policy: SessionPolicy
    limits: ServerLimits
    relay_networks: tuple[IPNetwork, ...]
    tls_context: ssl.SSLContext | None
    check_password: Callable[[str, str], bool] | None

    def as_arguments(self) -> dict[str, Any]:
        """As ReceiverServer's and its reconfigure's keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def session_settings(config: Config) -> SessionSettings:
    """What the servers give each new session, built from `config` (at start and on
    a reload); StartupError if a file it names cannot be used."""
    rcv = config.receiver
    tls_context = build_tls_context(config)
    check_password = build_password_check(config)
    policy = SessionPolicy(
        hostname=config.hostname,
        max_message_bytes=rcv.max_message_bytes,
        max_recipients=rcv.max_recipients,
        max_bad_commands=rcv.max_bad_commands,
        max_hops=rcv.max_hops,
        local_domains=frozenset(config.local.domains),
        tls_available=tls_context is not None,
        auth_available=check_password is not None,
        require_auth=rcv.require_auth,
    )
    limits = ServerLimits(
        idle_timeout=rcv.idle_timeout,
        session_deadline=rcv.session_deadline,
        max_connections=rcv.max_connections,
        max_connections_per_ip=rcv.max_connections_per_ip,
    )
    return SessionSettings(policy, limits, rcv.relay_networks, tls_context, check_password)


def build_servers(config: Config, queue: MessageStore,
                  figures: ReceiverFigures) -> list[ReceiverServer]:
    rcv = config.receiver
    settings = session_settings(config)
    slots = SlotPool(rcv.max_connections, rcv.max_connections_per_ip)  # for all listeners
    listens: list[tuple[HostPort, bool]] = [(rcv.listen, False)]
    if rcv.tls_listen:
        listens.append((rcv.tls_listen, True))
    servers = []
    for listen, implicit in listens:
        try:
            servers.append(
                ReceiverServer(
                    (listen.host, listen.port),
                    queue=queue,
                    implicit_tls=implicit,
                    slots=slots,
                    figures=figures,
                    **settings.as_arguments(),
                )
            )
        except OSError as err:
            for server in servers:
                server.server_close()
            raise StartupError(f"cannot listen on {listen}: {err.strerror}") from None
    return servers


def reconfigure(servers: list[ReceiverServer], config: Config,
                endpoint: MetricsEndpoint | None) -> None:
    """A reload: build the new settings first (StartupError: nothing changed), then
    hand them to every server for the sessions to come, and the health limits to
    the metrics endpoint."""
    settings = session_settings(config)
    if settings.tls_context is None and any(server.implicit_tls for server in servers):
        raise StartupError("receiver.tls_listen stays open until a restart, and needs "
                           "receiver.tls_cert and receiver.tls_key until then")
    for server in servers:
        server.reconfigure(**settings.as_arguments())
    if endpoint is not None:
        endpoint.monitor.reconfigure(config)


def serve_until_stopped(servers: list[ReceiverServer], config: Config, log: EventLog,
                        stop: StopFlag, reload: ReloadFlag,
                        endpoint: MetricsEndpoint | None) -> None:
    """The main loop: sleeps until TERM, reloading on each HUP meanwhile."""
    wake = threading.Event()
    stop.wake_also(wake)
    reload.wake_also(wake)
    while not stop.is_set:
        wake.wait()
        wake.clear()
        if reload.take() and not stop.is_set:
            reload_config(config, log, RECEIVER_RESTART_KEYS,
                          lambda new: reconfigure(servers, new, endpoint))


def main(config: Config, stop: StopFlag, reload: ReloadFlag) -> int:
    writer = build_queue(config)
    registry, figures = None, ReceiverFigures()
    if config.metrics.listen:  # only then: prometheus_client costs a tenth of a second
        from prometheus_client import CollectorRegistry

        from shared.metrics.counting import CountingReceiverFigures
        registry = CollectorRegistry()
        figures = CountingReceiverFigures(registry)
    servers = build_servers(config, message_store(config, writer), figures)
    try:
        log = open_log(config, PROGRAM)
    except StartupError:
        for server in servers:
            server.server_close()
        raise
    removed = writer.clean_leftovers()
    if removed:
        log.info("cleanup", removed_tmp_files=len(removed))
    threads = [
        threading.Thread(target=server.serve_forever, daemon=True)
        for server in servers
    ]
    for thread in threads:
        thread.start()
    endpoint = None
    if registry is not None:
        from services import monitoring

        endpoint = monitoring.start(config, registry,
                                    lambda: sum(s.session_count() for s in servers), log)
    log.ok(
        "start",
        listen=",".join(f"{s.server_address[0]}:{s.server_address[1]}" for s in servers),
        queue=config.queue.dir,
        pid=os.getpid(),
    )
    serve_until_stopped(servers, config, log, stop, reload, endpoint)
    log.info("stop", signal=stop.signal_name, sessions=sum(s.session_count() for s in servers))
    for server in servers:
        server.begin_shutdown()
    deadline = time.monotonic() + GRACE_SECONDS  # one grace for every listener
    if endpoint is not None:
        # With the listeners: mail is no longer accepted, so /healthz no longer
        # answers (down), though a DATA in progress keeps the process for its grace.
        endpoint.stop()
    clean = True
    for server in servers:
        clean &= server.wait_for_sessions(max(0.0, deadline - time.monotonic()))
    log.ok("exit", clean=clean)
    shutdown_logging()
    return EXIT_OK
