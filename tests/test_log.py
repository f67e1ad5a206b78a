"""The ONE shared logfile (SPEC §5): line format, escaping, and rotation across processes.

The rotation test runs what the appliance runs: two independent Python processes
(not forks of the test), each with several threads, logging through
`shared.log.setup_logging` (loguru, `SharedFileSink`) into one file
with a tiny rotation size. Afterwards every line must be present exactly once across
`mailbag.log*`, and every line must be whole: a torn or interleaved line fails the
strict full-line pattern.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.config import LogConfig, load_config
from shared.log import Timestamps, escape
from tests.support import REPO, write_config

TIMESTAMP = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}[+-]\d{2}:\d{2}"

# One writer process: waits for the go-file (so both processes overlap), then
# THREADS threads each log LINES numbered lines whose padding length varies, so a line
# cut short or glued to another cannot match the pattern below.
WRITER = r"""
import sys, threading, time
from pathlib import Path
from shared.config import load_config
from shared.log import EventLog, setup_logging, shutdown_logging

config_path, program, tag, threads, lines, go = sys.argv[1:7]
threads, lines = int(threads), int(lines)
log = setup_logging(load_config(Path(config_path)).log, program)
deadline = time.monotonic() + 20
while not Path(go).exists() and time.monotonic() < deadline:
    time.sleep(0.01)

def work(t):
    peer = log.with_peer(f"127.0.0.{t + 1}:{40000 + t}")
    for n in range(lines):
        pad = "x" * (1 + (n * 7 + t) % 61)
        peer.info("line", tag=tag, t=t, n=n, pad=pad, len=len(pad))

workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
shutdown_logging()
"""

LINE = re.compile(
    TIMESTAMP + r" (?P<program>R-SMTP|S-SMTP) 127\.0\.0\.(?P<peer>\d+):(?P<port>\d+) "
    r"line info tag=(?P<tag>[AB]) t=(?P<t>\d+) n=(?P<n>\d+) pad=(?P<pad>x+) len=(?P<len>\d+)"
)


def log_files(log_path: Path) -> list[Path]:
    return sorted(log_path.parent.glob(log_path.name + "*"))


def read_lines(log_path: Path) -> list[str]:
    lines: list[str] = []
    for path in log_files(log_path):
        if path.name.endswith(".lock"):
            continue
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"{path.name} ends in a partial line"
        lines.extend(data.decode().splitlines())
    return lines


def run_writers(config_path: Path, tmp_path: Path, threads: int, lines: int) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(config_path), program, tag,
             str(threads), str(lines), str(go)],
            cwd=REPO,
            stderr=subprocess.PIPE,
        )
        for program, tag in (("R-SMTP", "A"), ("S-SMTP", "B"))
    ]
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode(errors="replace")
        assert b"Logging error" not in err, err.decode(errors="replace")


def test_two_processes_many_threads_rotate_without_losing_or_tearing_a_line(tmp_path):
    threads, lines = 4, 5000
    config_path = write_config(tmp_path, log={"rotation": "64 KB", "retention": 1000})
    log_path = load_config(config_path).log.file

    run_writers(config_path, tmp_path, threads, lines)

    rotated = [p for p in log_files(log_path) if re.fullmatch(r".*\.log\.\d+", p.name)]
    assert len(rotated) >= 20, "the test must go through many rotations"
    assert len(rotated) < 1000, "retention must not have dropped any file"
    seen: dict[tuple[str, int, int], int] = {}
    for line in read_lines(log_path):
        match = LINE.fullmatch(line)
        assert match, f"torn or interleaved line: {line[:200]!r}"
        assert len(match["pad"]) == int(match["len"]), f"line lost bytes: {line!r}"
        assert int(match["peer"]) == int(match["t"]) + 1
        assert (match["program"] == "R-SMTP") == (match["tag"] == "A")
        key = (match["tag"], int(match["t"]), int(match["n"]))
        seen[key] = seen.get(key, 0) + 1
    duplicates = {k: v for k, v in seen.items() if v != 1}
    assert not duplicates, f"{len(duplicates)} lines written more than once"
    expected = {(tag, t, n) for tag in "AB" for t in range(threads) for n in range(lines)}
    missing = expected - seen.keys()
    assert not missing, f"{len(missing)} lines lost, e.g. {sorted(missing)[:5]}"
    # Rotation keeps files near the configured size: nobody rotated too late.
    biggest = max(p.stat().st_size for p in rotated)
    assert biggest < 64_000 + 64 * 1024, biggest


def test_retention_keeps_only_the_configured_number_of_old_files(tmp_path):
    config_path = write_config(tmp_path, log={"rotation": "8 KB", "retention": 3})
    log_path = load_config(config_path).log.file

    run_writers(config_path, tmp_path, threads=2, lines=500)

    names = sorted(p.name for p in log_files(log_path) if not p.name.endswith(".lock"))
    assert names == ["mailbag.log", "mailbag.log.1", "mailbag.log.2", "mailbag.log.3"]
    for line in read_lines(log_path):
        assert LINE.fullmatch(line), f"torn or interleaved line: {line[:200]!r}"


WIRE_WRITER = r"""
import sys
from pathlib import Path
from shared.config import load_config
from shared.log import setup_logging, shutdown_logging

log = setup_logging(load_config(Path(sys.argv[1])).log, "R-SMTP")
peer = log.with_peer("10.0.0.1:25\r\n2026-01-01T00:00:00.000+00:00 S-SMTP forged")
peer.fail("reject", command="MAIL FROM:<a@b>\r\nfake line\x1b[31mred\x00", reply=501)
peer.info("bytes", data=b"\xff\xfe\r\n\x1b", quote='say "hi"\\')
shutdown_logging()
"""


def test_cr_lf_esc_and_control_bytes_from_the_wire_are_escaped(tmp_path):
    config_path = write_config(tmp_path)
    log_path = load_config(config_path).log.file
    subprocess.run([sys.executable, "-c", WIRE_WRITER, str(config_path)],
                   cwd=REPO, check=True, timeout=30, capture_output=True)

    data = log_path.read_bytes()
    lines = data.decode().splitlines()
    assert len(lines) == 2, data  # one record, one line: nobody can forge a line
    for byte in (b"\r", b"\x1b", b"\x00"):
        assert byte not in data
    reject, raw = lines
    assert re.fullmatch(TIMESTAMP + r' R-SMTP "[^"]*" reject fail .*', reject), reject
    assert r"\x0d\x0a" in reject and r"\x1b[31mred\x00" in reject
    assert "S-SMTP forged" in reject.split(" reject fail ")[0]  # inside the escaped peer
    assert r"data=\xff\xfe\x0d\x0a\x1b" in raw
    assert r'quote="say \"hi\"\\"' in raw


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", "plain"),
        ("two words", '"two words"'),
        ("", '""'),
        ("a\r\nb", r"a\x0d\x0ab"),
        ("\x1b[0m", r"\x1b[0m"),
        ("del\x7f", r"del\x7f"),
        (b"\xc3\xa9\xff", r"é\xff"),
        ('q"\\', r'q\"\\'),
        ("csi\x9b31m", r"csi\x9b31m"),
        ("line\u2028sep\u2029", r"line\u2028sep\u2029"),
        ("café", "café"),
    ],
)
def test_escape(value, expected):
    assert escape(value) == expected


def test_log_section_defaults_rotate_and_retain():
    config = LogConfig()
    assert config.rotation_bytes == 10_000_000
    assert config.retention == 5


def test_timestamps_are_iso_8601_with_milliseconds_and_the_zone(monkeypatch) -> None:
    clock = [1764374400.9996]  # 2025-11-29 00:00:00.9996 UTC
    stamps = Timestamps(clock=lambda: clock[0])
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        assert stamps.now() == "2025-11-29T00:00:00.999+00:00"  # truncated, never .1000
        clock[0] += 1.5
        assert stamps.now() == "2025-11-29T00:00:02.499+00:00"  # the next second re-rendered
        monkeypatch.setenv("TZ", "America/St_Johns")  # a zone with minutes
        time.tzset()
        clock[0] += 1
        assert stamps.now() == "2025-11-28T20:30:03.499-03:30"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
