"""Shared fixtures: a real receiver process on a private port with its own queue."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from loguru import logger

from shared.config import load_config
from tests.sender_support import Relay, Setup
from tests.support import MailbagProcess, wait_for_banner, write_config

# CI runs the property tests with a fixed seed, so a red run is reproducible and a
# green one means the same examples as last time; developers explore new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def receiver_factory(tmp_path: Path) -> Iterator:
    """Start receivers: `cfg, proc = receiver_factory(receiver={...})`; stopped at teardown."""
    started: list[MailbagProcess] = []

    def start(**sections):
        path = write_config(tmp_path, **sections)
        config = load_config(path)
        proc = MailbagProcess("receiver", path).start()
        started.append(proc)
        wait_for_banner(config.receiver.listen.host, config.receiver.listen.port)
        return config, proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def receiver(receiver_factory):
    """A receiver with the default settings on a private port."""
    return receiver_factory()[0]


@pytest.fixture
def setup(tmp_path: Path):
    """`env = setup(relay_address, **sender_keys)`: a runner on a real queue, fake clock."""
    made: list[Setup] = []

    def make(relay_address: str | list[str] | None, sections: dict | None = None,
             **sender) -> Setup:
        made.append(Setup(tmp_path, relay_address, sections, **sender))
        return made[-1]

    yield make
    for each in made:
        each.close()


@pytest.fixture
def log_lines():
    """Every log line this process writes during the test (EventLog renders the whole line)."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m).rstrip("\n")),
                      format="{extra[program]} {extra[peer]} {message}")
    yield lines
    logger.remove(sink)


@pytest.fixture
def make_app() -> Iterator:
    """A private appliance (tests/appliance_support.py) whose folder also holds what
    `make run|stop|status|reload` need; not started. Torn down whatever its state."""
    from tests.appliance_support import Appliance, with_make

    appliance = with_make(Appliance())
    yield appliance
    appliance.cleanup()


@pytest.fixture
def relay():
    """An aiosmtpd relay on a free loopback port, recording what it gets."""
    server = Relay().start()
    yield server
    server.stop()


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder another user can enter (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="mailbag-shared-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
