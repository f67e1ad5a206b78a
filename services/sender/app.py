"""The sender program: read the config, then run the queue runner until TERM.

Start-up problems (unusable queue folders, unreadable password file, bad CA file)
raise StartupError: one line, exit status 2 (SPEC §2). SIGTERM is recorded by the
StopFlag; the runner finishes (or, after a short grace, abandons) the transaction in
progress, sends QUIT, the finished messages' unlinks are flushed (Remover), and the
program exits 0.

One sender per queue (shared/queue/reader.py): a sender started while another holds
the queue lock delivers nothing. It logs once that it waits, tries the lock again
every second (or `poll_interval`, if shorter), and takes over when the other one
ends or dies - the kernel drops a dead process's flock. TERM ends the wait too
(exit 0). Only the owner serves the control socket (control.py), the `mailbag`
command's way to the runner.

HUP (shared/reload.py): between two passes the config is read again and the relay
settings (with the password and CA files), retry times, limits and local domains
are replaced; the relay session open then is ended with QUIT, a message in flight
is settled first. A bad new config is logged and the old one stays in force.

With `[metrics] listen` set, the sender that owns the queue counts its figures and
shares them with the receiver's endpoint (shared/metrics/share.py).
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Callable

from services.sender.control import ControlServer, control_path
from services.sender.decision import Backoff
from services.sender.local import LocalDelivery
from services.sender.relay import RelayConnection, RelaySettings, build_tls_context
from services.sender.relays import RelayPool, RelayRoute, RelayState
from services.sender.runner import PROGRAM, QueueRunner
from services.sender.watch import watch_queue
from shared.cli import EXIT_OK, EXIT_RUNTIME_ERROR, StartupError, open_log
from shared.config import Config, ConfigError, RouteConfig
from shared.dkim import DkimSigner
from shared.log import EventLog, shutdown_logging
from shared.queue import QueueReader
from shared.reload import RESTART_KEYS, reload_config
from shared.signals import ReloadFlag, StopFlag


def build_reader(config: Config) -> QueueReader:
    try:
        return QueueReader(config.queue.dir, config.queue.failed, config.queue.quarantine)
    except OSError as err:
        raise StartupError(
            f"queue folder {config.queue.dir} is not usable: {err.strerror or err}"
        ) from None


def read_password(route: RouteConfig) -> str:
    """A relay's password: the first line of its password_file (never the TOML)."""
    if not route.username:
        return ""
    assert route.password_file is not None  # the config checks this
    try:
        text = route.password_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        detail = getattr(err, "strerror", None) or str(err)
        raise StartupError(
            f"cannot read the password_file {route.password_file} of relay {route.address}: "
            f"{detail}") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise StartupError(f"the password_file {route.password_file} of relay "
                           f"{route.address} is empty")
    return password


def build_relays(config: Config, log: EventLog, stop: threading.Event) -> RelayPool:
    """The configured relays, in order, each with its session factory (none: no relay
    configured). StartupError (one line) for an unreadable password or CA file."""
    snd = config.sender
    routes = []
    for route in snd.routes():
        settings = RelaySettings.from_route(route, snd, config.hostname, read_password(route))
        context = None
        if settings.tls != "none":
            try:
                context = build_tls_context(settings)
            except (OSError, ssl.SSLError) as err:
                raise StartupError(f"cannot load the ca_file {settings.ca_file} of relay "
                                   f"{route.address}: {getattr(err, 'strerror', err)}") from None
        state = RelayState(Backoff(snd.retry_initial, snd.retry_max), snd.relay_retry)
        routes.append(RelayRoute(str(route.address), _factory(settings, log, stop, context),
                                 state))
    return RelayPool(routes)


def _factory(settings: RelaySettings, log: EventLog, stop: threading.Event,
             context: ssl.SSLContext | None) -> Callable[[], RelayConnection]:
    return lambda: RelayConnection(settings, log, stop, context)


LOCK_RETRY = 1.0  # seconds between tries of a standby sender, at most


def wait_for_queue(reader: QueueReader, log: EventLog, stop: threading.Event,
                   interval: float) -> bool:
    """Block until this process owns the queue (True) or is stopped (False)."""
    if reader.try_lock():
        return True
    log.info("standby", queue=reader.dir, reason="another sender holds the queue lock")
    while not stop.wait(interval):
        if reader.try_lock():
            log.ok("takeover", queue=reader.dir, pid=os.getpid())
            return True
    return False


def start_control(config: Config, runner: QueueRunner, log: EventLog) -> ControlServer | None:
    """Serve the control socket; without it (e.g. a queue folder where the socket
    cannot be made) the sender still delivers, and the `mailbag` command says it
    cannot reach it."""
    try:
        return ControlServer(config.queue.dir, runner.request, log)
    except OSError as err:
        log.error("control", socket=control_path(config.queue.dir),
                  error=err.strerror or str(err))
        return None


def reloader(config: Config, runner: QueueRunner, log: EventLog, stop: threading.Event,
             reload: ReloadFlag) -> Callable[[], None]:
    """The runner's `before_pass`: a HUP since the last pass re-reads the config."""
    def apply(new: Config) -> None:
        relays = build_relays(new, EventLog(PROGRAM, "-"), stop)
        signer = DkimSigner.from_config(new.dkim)  # the key files, read again
        relays.keep_state_of(runner.relays)
        runner.reconfigure(new, relays, signer)

    def before_pass() -> None:
        if reload.take():
            reload_config(config, log, RESTART_KEYS, apply)

    return before_pass


def main(config: Config, stop: StopFlag, reload: ReloadFlag) -> int:
    reader = build_reader(config)
    try:
        relays = build_relays(config, EventLog(PROGRAM, "-"), stop.event)
        signer = DkimSigner.from_config(config.dkim)  # ConfigError: one line, exit 2
    except (StartupError, ConfigError):
        reader.close()
        raise
    try:
        log = open_log(config, PROGRAM)
    except StartupError:
        reader.close()
        raise
    if not wait_for_queue(reader, log, stop.event, min(LOCK_RETRY, config.sender.poll_interval)):
        reader.close()  # stopped while on standby: nothing was ours
        log.ok("exit", signal=stop.signal_name or "-", status=EXIT_OK)
        shutdown_logging()
        return EXIT_OK
    cleaned = LocalDelivery(config.local.maildir).clean_stale_tmp(time.time())
    if cleaned:
        log.info("maildir-clean", removed=len(cleaned), maildir=config.local.maildir)
    wake = threading.Event()
    # The runner waits on `wake`; a stop or a reload must wake it too.
    stop.wake_also(wake)
    reload.wake_also(wake)
    # Only the sender that owns the queue counts and shares: a standby one has
    # nothing to say, and must not overwrite the owner's figures.
    sharing = None
    if config.metrics.listen:  # only then: prometheus_client costs a tenth of a second
        from shared.metrics.share import start_sharing

        sharing = start_sharing(config.metrics_dir, log)
    runner = QueueRunner(
        config, reader, log, relays=relays, signer=signer,
        local=LocalDelivery(config.local.maildir), stop=stop.event,
        figures=sharing.figures if sharing else None,
    )
    runner.before_pass = reloader(config, runner, log, stop.event, reload)
    observer = watch_queue(config.queue.dir, wake, ignore=runner.settler.is_own_move)
    control = start_control(config, runner, log)
    log.ok(
        "start",
        relay=",".join(map(str, config.sender.relay)) or "none",
        tls=config.sender.tls,
        queue=config.queue.dir,
        pid=os.getpid(),
    )
    status = EXIT_OK
    try:
        runner.run(wake)
    except Exception as err:  # a bug: say it in one line; the queue keeps the mail
        log.error("crash", exc=err)
        status = EXIT_RUNTIME_ERROR
    finally:
        if control is not None:
            control.close()
        runner.close_relay()
        observer.stop()
        observer.join(timeout=5)
        runner.settler.report_unfinished(reader.close())
        if sharing is not None:
            sharing.stop()
    if status == EXIT_OK:
        log.ok("exit", signal=stop.signal_name or "-", status=status)
    else:
        log.error("exit", signal=stop.signal_name or "-", status=status)
    shutdown_logging()
    return status
