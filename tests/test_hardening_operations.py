"""Operations against what a hostile review found (each test failed before its fix):
the metrics endpoint and /healthz with real programs, and config values at their
edges, loaded from real files and given to real programs."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import ConfigError, load_config
from tests.appliance_support import wait_until
from tests.hardening_support import connect
from tests.metrics_support import answers, http_get, samples
from tests.support import REPO, write_config
from tests.test_metrics_e2e import Mailbag

pytestmark = pytest.mark.e2e


def test_a_queue_folder_that_is_gone_is_unhealthy_and_has_no_gauges(tmp_path: Path) -> None:
    """The receiver made the queue folder at its start; once it is gone (removed or
    renamed by mistake) every message gets 451, so /healthz must not say "ok" and
    the gauges must not say "an empty queue"; it comes back to 200 with the folder."""
    mailbag = Mailbag(tmp_path)
    try:
        mailbag.start_both()
        queue = mailbag.config.queue.dir
        away = queue.with_name("queue.away")
        queue.rename(away)
        body = mailbag.wait_health(503, "queue: cannot be read")
        assert str(queue) in body and "No such file or directory" in body
        status, exposition = http_get(mailbag.metrics_port, "/metrics")
        assert status == 200
        assert not any(name.startswith("mailbag_queue") for name, _ in samples(exposition))
        away.rename(queue)
        assert mailbag.wait_health(200) == "ok\n"
    finally:
        mailbag.stop()


# Every value in seconds: past about 292 years (2**63 ns) the waits they feed overflow.
SECONDS_KEYS = [
    ("receiver", "idle_timeout"), ("receiver", "session_deadline"),
    ("sender", "poll_interval"), ("sender", "relay_retry"), ("sender", "connect_timeout"),
    ("sender", "greeting_timeout"), ("sender", "command_timeout"),
    ("sender", "data_init_timeout"), ("sender", "data_block_timeout"),
    ("sender", "data_end_timeout"), ("sender", "retry_initial"), ("sender", "retry_max"),
    ("sender", "max_queue_lifetime"), ("bounce", "delay_warning"),
    ("metrics", "relay_down_after"), ("metrics", "max_queue_age"),
]


def _write(folder: Path, section: str, line: str) -> Path:
    path = folder / "mailbag.toml"
    path.write_text(f"[{section}]\n{line}\n")
    return path


@pytest.mark.parametrize(("section", "key"), SECONDS_KEYS)
@pytest.mark.parametrize("value", ["1e10", "nan", "inf"])
def test_a_time_beyond_any_wait_is_one_line_naming_the_key(
        tmp_path: Path, section: str, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as failure:
        load_config(_write(tmp_path, section, f"{key} = {value}"))
    assert f"{section}.{key}" in str(failure.value)
    assert "\n" not in str(failure.value)


@pytest.mark.parametrize(("section", "key"), SECONDS_KEYS)
def test_ten_years_is_still_a_time(tmp_path: Path, section: str, key: str) -> None:
    config = load_config(_write(tmp_path, section, f'{key} = "3650d"'
                                if section in ("bounce", "metrics") else f"{key} = 315360000"))
    assert getattr(getattr(config, section), key) == 315360000


@pytest.mark.parametrize("key", ["greeting_timeout", "command_timeout", "data_init_timeout",
                                 "data_block_timeout", "data_end_timeout"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_relay_timeout_of_zero_or_less_is_one_line_naming_the_key(
        tmp_path: Path, key: str, value: str) -> None:
    """Like connect_timeout: a timeout of 0 fails every relay session at once."""
    with pytest.raises(ConfigError, match=f"sender.{key}: must be greater than 0"):
        load_config(_write(tmp_path, "sender", f"{key} = {value}"))


def test_a_huge_poll_interval_stops_the_sender_at_start_with_one_line(tmp_path: Path) -> None:
    """Not a start, then a crash at the first wait on an empty queue (a restart loop
    under supervisord)."""
    path = write_config(tmp_path, sender={"poll_interval": 1e10})
    result = subprocess.run([sys.executable, "-m", "services.sender", "--config", str(path)],
                            cwd=REPO, capture_output=True, text=True, timeout=20, check=False)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "sender.poll_interval" in line


@pytest.mark.parametrize(("section", "key", "value"), [
    ("receiver", "listen", '"127.0.0.1:0"'), ("receiver", "tls_listen", '"[::1]:0"'),
    ("metrics", "listen", '"127.0.0.1:0"'), ("sender", "relay", '["relay.example.com:0"]'),
])
def test_port_zero_is_one_line_naming_the_key(tmp_path: Path, section: str, key: str,
                                              value: str) -> None:
    """Port 0 is "any free port" to bind(2): a listener nobody can be told about (the
    log, `make run` and Prometheus would all say :0), a relay nobody can reach."""
    with pytest.raises(ConfigError) as failure:
        load_config(_write(tmp_path, section, f"{key} = {value}"))
    assert f"{section}.{key}" in str(failure.value) and "port 0" in str(failure.value)


def test_a_metrics_port_of_zero_stops_the_receiver_with_one_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, metrics={"listen": "127.0.0.1:0"})
    result = subprocess.run([sys.executable, "-m", "services.receiver", "--config", str(path)],
                            cwd=REPO, capture_output=True, text=True, timeout=20, check=False)
    assert result.returncode == 2, (result.returncode, result.stderr)
    (line,) = result.stderr.strip().splitlines()
    assert "metrics.listen" in line and "port 0" in line


def test_a_stopping_receiver_no_longer_answers_healthz(tmp_path: Path) -> None:
    """TERM: the receiver refuses new sessions at once, while a DATA in progress may
    keep it alive for up to 8 s. Meanwhile /healthz must not answer as if mail were
    accepted (a load balancer would keep sending clients to it): the endpoint goes
    away with the SMTP listeners - no answer, "down", as documented."""
    mailbag = Mailbag(tmp_path)
    try:
        mailbag.start_receiver()
        wait_until(lambda: answers(mailbag.metrics_port), 5, "the endpoint to answer")
        with connect(mailbag.config) as client:
            assert client.command("EHLO client.example").code == 250
            assert client.command("MAIL FROM:<a@example.com>").code == 250
            assert client.command("RCPT TO:<b@example.org>").code == 250
            assert client.command("DATA").code == 354
            client.send(b"Subject: in flight\r\n\r\nstill coming\r\n")
            mailbag.receiver.signal(signal.SIGTERM)
            wait_until(lambda: answers(mailbag.metrics_port) is None, 5,
                       "the endpoint to stop answering")
            assert mailbag.receiver.proc.poll() is None  # DATA still keeps it running
            assert client.command(".").code == 250
        assert mailbag.receiver.stop() == 0
    finally:
        mailbag.stop()


def _signal_a_thread_other_than_main(pid: int, signum: int) -> None:
    """What the kernel may do with a process-directed signal: deliver it to any of
    the process's threads (tgkill(2) picks one here, one that is not the main)."""
    others = sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid)
    assert others, "the program runs threads besides its main one"
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.tgkill(pid, others[-1], signum) == 0, os.strerror(ctypes.get_errno())


@pytest.mark.parametrize("program", ["receiver", "sender"])
def test_term_taken_by_another_thread_still_stops_the_program(tmp_path: Path,
                                                              program: str) -> None:
    """Python runs signal handlers in the main thread only, and a main thread that
    sleeps on a lock (the receiver's main loop, the sender's idle wait of up to
    poll_interval) is not woken when the signal lands in another thread: the stop
    waited for an unrelated event, and supervisord's KILL came first."""
    mailbag = Mailbag(tmp_path)
    try:
        mailbag.start_both()
        proc = getattr(mailbag, program)
        _signal_a_thread_other_than_main(proc.proc.pid, signal.SIGTERM)
        try:
            assert proc.proc.wait(5) == 0
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the {program} ignored TERM") from None
    finally:
        mailbag.stop()


@pytest.mark.parametrize("program", ["receiver", "sender"])
def test_hup_taken_by_another_thread_still_reloads(tmp_path: Path, program: str) -> None:
    mailbag = Mailbag(tmp_path)
    try:
        mailbag.start_both()
        proc = getattr(mailbag, program)
        _signal_a_thread_other_than_main(proc.proc.pid, signal.SIGHUP)
        tag = "R-SMTP" if program == "receiver" else "S-SMTP"
        wait_until(lambda: f"{tag} - reload ok" in mailbag.config.log.file.read_text(), 5,
                   f"the {program}'s reload")
    finally:
        mailbag.stop()
