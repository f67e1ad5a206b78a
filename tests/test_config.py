"""shared/config.py and the receiver's start-up errors: one line, exit status 2 (SPEC §2)."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.config import (
    DEFAULT_CONFIG_PATH,
    ENV_VAR,
    ConfigError,
    HostPort,
    load_config,
    resolve_config_path,
)
from tests.support import REPO, free_port, write_config

# ---------------------------------------------------------------------------- loading


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mailbag.toml"
    path.write_text(text)
    return path


def test_empty_file_gives_the_spec_defaults(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, ""))
    rcv = config.receiver
    assert config.hostname == "mailbag.localdomain"
    assert rcv.listen == HostPort("127.0.0.1", 2525)
    assert (rcv.max_connections, rcv.max_message_bytes, rcv.idle_timeout) == (5, 10485760, 300)
    assert rcv.relay_networks == (ipaddress.ip_network("127.0.0.0/8"),
                                  ipaddress.ip_network("::1/128"))
    assert config.sender.relay == () and config.sender.tls == "none"
    assert config.sender.poll_interval == 60
    assert config.local.domains == ("localhost",)
    # Default relative paths are relative to the config's folder, not the cwd.
    assert config.queue.dir == tmp_path / "var/queue"
    assert config.local.maildir == tmp_path / "var/mail"
    assert config.log.file == tmp_path / "var/log/mailbag.log"


def test_repository_default_config_loads() -> None:
    config = load_config(DEFAULT_CONFIG_PATH)
    assert config.receiver.listen == HostPort("127.0.0.1", 2525)
    assert config.queue.dir == DEFAULT_CONFIG_PATH.parent / "var/queue"


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    path = _write(folder, '[queue]\ndir = "spool/q"\n[log]\nfile = "/abs/mail.log"\n'
                          '[local]\nmaildir = "../mail"\n')
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    config = load_config(path)
    assert config.queue.dir == folder / "spool/q"
    assert config.log.file == Path("/abs/mail.log")
    assert config.local.maildir == folder / "../mail"
    assert config.queue.failed == folder / "spool/failed"


def test_values_are_read(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, (
        'hostname = "mx.example.org"\n[receiver]\nlisten = "[::1]:2600"\nmax_connections = 7\n'
        'idle_timeout = 1\nrelay_networks = ["10.0.0.0/8"]\n[local]\ndomains = ["Example.ORG"]\n'
    )))
    assert config.hostname == "mx.example.org"
    assert config.receiver.listen == HostPort("::1", 2600)
    assert config.receiver.max_connections == 7
    assert config.receiver.idle_timeout == 1.0
    assert config.receiver.relay_networks == (ipaddress.ip_network("10.0.0.0/8"),)
    assert config.local.domains == ("example.org",)


BAD_CONFIGS = [
    ("unknown-top", "colour = 1\n", "colour"),
    ("unknown-section", "[mystery]\nx = 1\n", "mystery"),
    ("unknown-key", "[receiver]\nlisten_on = \"1.2.3.4:25\"\n", "listen_on"),
    ("misspelt-key", "[receiver]\nmax_conections = 3\n",
     "unknown key 'max_conections' in [receiver]; did you mean 'max_connections'?"),
    ("misspelt-section", "[reciever]\nlisten = \"127.0.0.1:2525\"\n",
     "unknown key 'reciever' at the top level of mailbag.toml; did you mean 'receiver'?"),
    ("misspelt-aliases", "[aliasses]\nroot = \"admin\"\n",
     "unknown key 'aliasses' at the top level of mailbag.toml; did you mean 'aliases'?"),
    ("key-in-another-section", "[receiver]\nrelay = \"smtp.example.com:587\"\n",
     "unknown key 'relay' in [receiver]; it belongs in [sender]"),
    ("wrong-type-int", "[receiver]\nmax_connections = \"5\"\n", "receiver.max_connections"),
    ("bool-for-int", "[receiver]\nmax_connections = true\n", "receiver.max_connections"),
    ("wrong-type-list", "[local]\ndomains = \"localhost\"\n", "local.domains"),
    ("wrong-type-path", "[queue]\ndir = 5\n", "queue.dir"),
    ("section-not-table", "receiver = 5\n", "receiver"),
    ("listen-no-port", "[receiver]\nlisten = \"localhost\"\n", "receiver.listen"),
    ("listen-port-range", "[receiver]\nlisten = \"127.0.0.1:99999\"\n", "receiver.listen"),
    ("listen-v6-no-brackets", "[receiver]\nlisten = \"::1:2525\"\n", "receiver.listen"),
    ("listen-number", "[receiver]\nlisten = 2525\n", "receiver.listen"),
    ("bad-network", "[receiver]\nrelay_networks = [\"10.0.0.300/8\"]\n", "receiver.relay_networks"),
    ("zero-connections", "[receiver]\nmax_connections = 0\n", "receiver.max_connections"),
    ("negative-timeout", "[receiver]\nidle_timeout = -1\n", "receiver.idle_timeout"),
    ("bad-tls-mode", "[sender]\ntls = \"maybe\"\n", "sender.tls"),
    ("bad-hostname", "hostname = \"mx example\"\n", "hostname"),
    ("invalid-toml", "[receiver\nlisten = \n", "invalid TOML"),
    ("bad-service-user", "[service]\nuser = \"root:root\"\n", "service.user"),
    ("service-user-number", "[service]\nuser = 1000\n", "service.user"),
    ("aliases-not-table", "aliases = 5\n", "[aliases]"),
    ("alias-number", "[aliases]\nroot = 5\n", "aliases.root"),
    ("alias-list-of-numbers", "[aliases]\nroot = [1]\n", "aliases.root"),
    ("alias-empty", "[aliases]\nroot = \"\"\n", "'root' expands to nothing"),
    ("alias-empty-list", "[aliases]\nops = []\n", "'ops' expands to nothing"),
    ("alias-loop", "[aliases]\na = \"b\"\nb = [\"x@example.org\", \"a\"]\n",
     "alias loop: a -> b -> a"),
    ("alias-postmaster-loop", "[aliases]\nroot = \"postmaster\"\n", "alias loop"),
    ("alias-bad-target", "[aliases]\nroot = \"a@@b\"\n", "'root'"),
    ("rewrite-unknown-key", "[rewrite]\nsender = \"a@b.org\"\n", "sender"),
    ("rewrite-envelope-not-address", "[rewrite]\nenvelope_sender = \"me\"\n",
     "rewrite.envelope_sender"),
    ("rewrite-envelope-domain-only", "[rewrite]\nenvelope_sender = \"@example.com\"\n",
     "rewrite.envelope_sender"),
    ("rewrite-senders-not-table", "[rewrite]\nsenders = \"x\"\n", "rewrite.senders"),
    ("rewrite-senders-value-type", "[rewrite]\nsenders = {\"@a.org\" = 1}\n",
     "rewrite.senders.@a.org"),
    ("rewrite-senders-bad-key", "[rewrite]\nsenders = {\"root\" = \"a@b.org\"}\n",
     "rewrite.senders.'root'"),
    ("rewrite-senders-bad-value", "[rewrite]\nsenders = {\"@a.org\" = \"b.org\"}\n",
     "rewrite.senders.'@a.org'"),
    ("bounce-bad-duration", "[bounce]\ndelay_warning = \"4 fortnights\"\n",
     "bounce.delay_warning"),
    ("bounce-zero-duration", "[bounce]\ndelay_warning = 0\n", "bounce.delay_warning"),
    ("bounce-bool-duration", "[bounce]\ndelay_warning = true\n", "bounce.delay_warning"),
    ("dkim-partial", "[dkim]\ndomain = \"example.com\"\n", "dkim: domain, selector"),
    ("dkim-no-domain", "[dkim]\nselector = \"s\"\nkey_file = \"k.pem\"\n", "dkim: domain"),
    ("dkim-bad-domain", "[dkim]\ndomain = \"exa mple.com\"\nselector = \"s\"\n"
     "key_file = \"k\"\n", "dkim.domain"),
    ("dkim-bad-selector", "[dkim]\ndomain = \"example.com\"\nselector = \"s/1\"\n"
     "key_file = \"k\"\n", "dkim.selector"),
    ("dkim-keys-unknown", "[[dkim.keys]]\ndomain = \"a.org\"\nfile = \"k\"\n",
     "dkim.keys[0]"),
    ("dkim-keys-partial", "[[dkim.keys]]\ndomain = \"a.org\"\n", "dkim.keys[0]"),
    ("dkim-keys-not-list", "[dkim]\nkeys = 1\n", "dkim.keys"),
    ("dkim-duplicate-domain", "[dkim]\ndomain = \"a.org\"\nselector = \"s\"\n"
     "key_file = \"k\"\n[[dkim.keys]]\ndomain = \"A.org\"\nselector = \"t\"\n"
     "key_file = \"k2\"\n", "dkim.keys[0].domain: 'A.org' has a key already"),
    ("dkim-keys-bad-selector", "[dkim]\ndomain = \"a.org\"\nselector = \"s\"\n"
     "key_file = \"k\"\n[[dkim.keys]]\ndomain = \"b.org\"\nselector = \"t t\"\n"
     "key_file = \"k2\"\n", "dkim.keys[0].selector"),
    ("metrics-bad-listen", "[metrics]\nlisten = \"9325\"\n", "metrics.listen"),
    ("metrics-listen-is-smtp", "[receiver]\nlisten = \"127.0.0.1:2600\"\n[metrics]\n"
     "listen = \"127.0.0.1:2600\"\n", "metrics.listen: 127.0.0.1:2600 is an SMTP listen"),
    ("metrics-empty-duration", "[metrics]\nrelay_down_after = \"\"\n",
     "metrics.relay_down_after"),
    ("metrics-bool-duration", "[metrics]\nmax_queue_age = false\n", "metrics.max_queue_age"),
    ("metrics-unknown", "[metrics]\nport = 9325\n", "unknown key 'port' in [metrics]"),
]


def test_service_user_is_empty_by_default_and_a_name_when_set(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "")).service.user == ""
    assert load_config(_write(tmp_path, '[service]\nuser = "mailbag"\n')).service.user == (
        "mailbag")


@pytest.mark.parametrize(("text", "named"), [pytest.param(t, n, id=i) for i, t, n in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_the_problem(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError) as failure:
        load_config(_write(tmp_path, text))
    message = str(failure.value)
    assert named in message
    assert "\n" not in message


def test_new_sections_default(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, ""))
    assert dict(config.aliases) == {}
    assert config.rewrite.envelope_sender == "" and dict(config.rewrite.senders) == {}
    assert config.bounce.delay_warning == 4 * 3600
    assert config.dkim.all_keys == ()
    assert config.metrics.listen is None  # off: nothing counted, nothing served
    assert (config.metrics.relay_down_after, config.metrics.max_queue_age) == (600, 3600)
    assert config.metrics_dir == tmp_path / "var" / "metrics"  # next to var/queue


def test_new_sections_are_read(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, (
        '[aliases]\nroot = "ops@example.org"\nops = ["a", "b@example.com"]\n"*" = "root"\n'
        '[rewrite]\nenvelope_sender = "me@example.com"\n'
        'senders = {"root@localhost" = "alerts@example.com", "@localhost" = "@example.com"}\n'
        '[bounce]\ndelay_warning = ""\n'
        '[dkim]\ndomain = "example.com"\nselector = "s1"\nkey_file = "keys/a.pem"\n'
        '[[dkim.keys]]\ndomain = "example.org"\nselector = "s2"\nkey_file = "/k/b.pem"\n'
        '[metrics]\nlisten = "[::1]:9325"\nrelay_down_after = "5m"\nmax_queue_age = 7200\n'
    )))
    assert config.metrics.listen == HostPort("::1", 9325)
    assert (config.metrics.relay_down_after, config.metrics.max_queue_age) == (300, 7200)
    assert dict(config.aliases) == {"root": ("ops@example.org",), "ops": ("a", "b@example.com"),
                                    "*": ("root",)}
    assert config.rewrite.envelope_sender == "me@example.com"
    assert dict(config.rewrite.senders) == {"root@localhost": "alerts@example.com",
                                            "@localhost": "@example.com"}
    assert config.bounce.delay_warning is None
    assert [(k.domain, k.selector, k.key_file) for k in config.dkim.all_keys] == [
        ("example.com", "s1", tmp_path / "keys/a.pem"), ("example.org", "s2", Path("/k/b.pem"))]


@pytest.mark.parametrize(("text", "seconds"), [
    ('"30m"', 1800), ('"4h"', 14400), ('"2d"', 172800), ('"90"', 90), ("90", 90),
    ('"1.5h"', 5400), ('" 45 s "', 45), ("0.5", 0.5),
])
def test_delay_warning_durations(tmp_path: Path, text: str, seconds: float) -> None:
    config = load_config(_write(tmp_path, f"[bounce]\ndelay_warning = {text}\n"))
    assert config.bounce.delay_warning == seconds


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


# ---------------------------------------------------------------------------- which file


@pytest.fixture
def no_env(monkeypatch) -> Iterator[None]:
    monkeypatch.delenv(ENV_VAR, raising=False)
    yield


def test_config_option_wins_over_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env.toml"))
    assert resolve_config_path(str(tmp_path / "cli.toml")) == tmp_path / "cli.toml"
    assert resolve_config_path(None) == tmp_path / "env.toml"


def test_default_is_the_repository_file(no_env) -> None:
    assert resolve_config_path(None) == DEFAULT_CONFIG_PATH == REPO / "mailbag.toml"


def test_relative_config_path_is_made_absolute(tmp_path: Path, monkeypatch, no_env) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("sub/m.toml") == tmp_path / "sub/m.toml"


# ---------------------------------------------------------------------------- the program


def run_receiver(args: list[str], env: dict[str, str] | None = None,
                 timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """Run `python -m services.receiver ARGS` expecting it to stop at start-up."""
    full_env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "services.receiver", *args],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout, check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *named: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in named:
        assert text in lines[0], lines[0]


@pytest.mark.parametrize(
    ("text", "named"),
    [pytest.param(t, n, id=i) for i, t, n in BAD_CONFIGS
     if i in ("misspelt-key", "wrong-type-int", "listen-no-port", "invalid-toml")],
)
def test_bad_config_stops_the_receiver_with_one_line(tmp_path: Path, text: str, named: str) -> None:
    path = _write(tmp_path, text)
    assert_one_line_error(run_receiver(["--config", str(path)]), named)


def test_config_option_wins_over_environment_in_the_program(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    bad = _write(tmp_path, "[receiver]\nmystery_key = 1\n")
    env = {ENV_VAR: str(write_config(good))}
    assert_one_line_error(run_receiver(["--config", str(bad)], env), "mystery_key")
    env_bad = {ENV_VAR: str(bad)}
    assert_one_line_error(run_receiver([], env_bad), "mystery_key")


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run_receiver(["--config", str(tmp_path / "absent.toml")]),
                          "absent.toml")


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        path = write_config(tmp_path, receiver={"listen": f"127.0.0.1:{port}"})
        assert_one_line_error(run_receiver(["--config", str(path)]), str(port))


@pytest.mark.parametrize("kind", ["file-in-the-way", "under-a-file"])
def test_unusable_queue_dir_is_one_line(tmp_path: Path, kind: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    queue_dir = blocker if kind == "file-in-the-way" else blocker / "queue"
    path = write_config(tmp_path, queue={"dir": str(queue_dir)})
    assert_one_line_error(run_receiver(["--config", str(path)]), "queue")


def test_read_only_queue_dir_is_one_line(tmp_path: Path) -> None:
    """Root ignores permissions, but not a read-only filesystem."""
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs",
                              str(mount_point)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    try:
        path = write_config(tmp_path, queue={"dir": str(mount_point)})
        assert_one_line_error(run_receiver(["--config", str(path)]), "queue", "ead-only")
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_unusable_log_file_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    path = write_config(tmp_path, log={"file": str(blocker / "mailbag.log")})
    assert_one_line_error(run_receiver(["--config", str(path)]), "log file")


def test_config_path_that_is_a_folder_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run_receiver(["--config", str(tmp_path)]), str(tmp_path))
