"""mailbag's benchmark: the receiver and sender side by side with aiosmtpd and Postfix.

    .venv/bin/python bench/run.py            # full run (a few minutes)
    .venv/bin/python bench/run.py --short    # smoke run, under a minute
    .venv/bin/python bench/run.py --strace   # durability check of the receiver
    .venv/bin/python bench/run.py --only metrics   # the metrics' cost: on/off, a scrape (~6 min)

Everything runs as real processes on 127.0.0.1 with private ports, in a temporary
folder under /tmp (the same disk as the checkout on the reference machine). The load
is Postfix's own `smtp-source`; the upstream of the sender is Postfix's `smtp-sink`.
The peers: `bench/aiosmtpd_peer.py`, aiosmtpd storing one fsynced file per message
and fsyncing the folder before its 250 - the same promise mailbag makes; and, for
the receive figures, `bench/postfix_peer.py`, a private Postfix instance on the same
filesystem that queues (fsyncs) each message before its 250 and delivers nothing.

Each line is one figure: mailbag's value, each peer's, and the ratios mailbag/peer.
Throughput: higher is better; CPU, memory and latency: lower is better. Throughput
and CPU are the median of `repeat` runs, mailbag and peer run back to back each time
so that both see the same background load. CPU is utime+stime of the server process
from /proc/<pid>/stat (all its threads); RSS is the highest VmRSS seen while loaded.

This is a benchmark, not a test: nothing here fails on a number. It fails only if
a run is wrong (a message missing from the queue, a program that does not start).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import postfix_peer  # noqa: E402
from shared.queue import DeliveryState, QueueWriter, StateStore, new_queue_id  # noqa: E402
from shared.smtp import ReplyParser  # noqa: E402
from tests.support import free_port, wait_for_banner, write_config  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
PEER_SCRIPT = Path(__file__).resolve().parent / "aiosmtpd_peer.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")
RUN_TIMEOUT = 180.0  # seconds any one load run may take before the benchmark gives up
SENDER_ADDRESS = "bench@example.com"
RECIPIENT = "rcpt@example.org"

# From the issue (#6): Postfix on the reference machine, for the lines with no live peer.
POSTFIX_DRAIN = 1480.0  # msgs/s, 2,000 queued 1 KiB messages into smtp-sink


@dataclass(frozen=True)
class Mode:
    """How much work each figure does."""

    repeat: int
    small: int  # 1 KiB messages per run
    large: int  # 100 KiB messages per run
    many_sessions: int  # 1 KiB messages over 50 sessions
    per_connection: int  # 1 KiB messages, one per connection
    latency: int  # transactions timed one by one
    drain: int  # queued messages the sender drains
    upstream: int  # messages timed from 250 to upstream arrival
    idle_seconds: float
    disk_ops: int
    metrics_rounds: int  # interleaved off/on pairs of the metrics' A/B runs
    metrics_drain: int  # queued messages each of its drains takes
    scrape_queue: int  # queued messages a timed scrape counts


FULL = Mode(3, 3000, 600, 3000, 1000, 500, 2000, 30, 3.0, 1000, 10, 5000, 100_000)
SHORT = Mode(1, 1000, 200, 1000, 300, 100, 2000, 10, 1.5, 300, 2, 2000, 20_000)


# ---------------------------------------------------------------------- processes


class Server:
    """A server process: its port, CPU seconds and memory, read from /proc."""

    def __init__(self, name: str, argv: Sequence[str], port: int, workdir: Path,
                 store: Path | None) -> None:
        self.name = name
        self.port = port
        self.store = store  # the folder its messages land in
        self.log_path = workdir / f"{name}.stderr"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            list(argv), cwd=REPO, stdout=subprocess.DEVNULL, stderr=self._log,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self) -> None:
        try:
            wait_for_banner("127.0.0.1", self.port, timeout=15.0)
        except TimeoutError:
            self.stop()
            detail = self.log_path.read_text()[-800:]
            raise SystemExit(f"{self.name} did not start: {detail}") from None

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            # The whole process group: under --strace the server is strace's child.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (every thread), in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


class RssSampler:
    """The highest VmRSS of a process while the `with` block runs (sampled every 20 ms);
    `rss` reads it (in KiB), None: nothing is sampled (peak stays 0)."""

    def __init__(self, rss: Callable[[], int] | None) -> None:
        self.rss = rss
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while self.rss is not None and not self._done.wait(0.02):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> RssSampler:
        if self.rss is not None:
            self.peak = self.rss()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.rss is not None:
            self._done.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())


def start_receiver(workdir: Path, *, wrapper: Sequence[str] = (), level: str = "INFO",
                   sender: dict | None = None, queue: dict | None = None,
                   name: str = "mailbag", metrics: dict | None = None) -> Server:
    """mailbag's receiver as supervisord runs it, with room for 50 sessions."""
    port = free_port()
    folder = workdir / name
    folder.mkdir(exist_ok=True)
    config = write_config(
        folder,
        receiver={"listen": f"127.0.0.1:{port}", "max_connections": 100},
        log={"level": level},
        sender=sender or {"poll_interval": 60},
        queue=queue or {},
        metrics=metrics or {},
    )
    argv = [*wrapper, sys.executable, "-m", "services.receiver", "--config", str(config)]
    server = Server(name, argv, port, workdir, folder / "var" / "queue")
    server.config = config  # type: ignore[attr-defined]
    server.wait_ready()
    return server


def start_peer(workdir: Path) -> Server:
    port = free_port()
    store = workdir / "aiosmtpd"
    argv = [sys.executable, str(PEER_SCRIPT), "--listen", f"127.0.0.1:{port}", "--dir", str(store)]
    server = Server("aiosmtpd", argv, port, workdir, store)
    server.wait_ready()
    return server


def stored_files(folder: Path) -> list[Path]:
    return [Path(e.path) for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")]


def stored_count(server: Server | postfix_peer.PostfixPeer) -> int:
    """Messages in the server's folder. Nothing is deleted between runs: on ext4 a
    file created soon after many deletions pays for skipping the recently freed
    inodes (`recently_deleted` in perf), which would tax whichever server runs next."""
    assert server.store is not None
    return len(stored_files(server.store))


# ---------------------------------------------------------------------- load


@dataclass(frozen=True)
class Load:
    label: str
    size: int  # bytes of message payload (smtp-source -l)
    sessions: int  # smtp-source -s
    count: int  # smtp-source -m
    reuse: bool  # smtp-source -d: many messages per connection


@dataclass
class LoadResult:
    rate: float  # msgs/s
    cpu_per_1000: float  # CPU seconds per 1,000 messages
    rss_kib: int


def drive(server: Server | postfix_peer.PostfixPeer, load: Load) -> LoadResult:
    """Run smtp-source against a server; check that every message was stored."""
    before = stored_count(server)
    argv = [SMTP_SOURCE, "-s", str(load.sessions), "-m", str(load.count), "-l", str(load.size),
            "-f", SENDER_ADDRESS, "-t", RECIPIENT, "-M", "bench.example"]
    if load.reuse:
        argv.append("-d")
    argv.append(f"127.0.0.1:{server.port}")
    cpu_before = server.cpu_seconds()
    with RssSampler(getattr(server, "rss_kib", None)) as rss:
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, timeout=RUN_TIMEOUT)
        elapsed = time.perf_counter() - started
    cpu = server.cpu_seconds() - cpu_before
    if done.returncode != 0:
        raise SystemExit(f"smtp-source failed against {server.name}: {done.stderr.decode()[-500:]}")
    stored = stored_count(server) - before
    if stored != load.count:
        raise SystemExit(f"{server.name}: {stored} of {load.count} messages stored ({load.label})")
    return LoadResult(load.count / elapsed, cpu / load.count * 1000, rss.peak)


def transaction_latencies(port: int, count: int, size: int = 1024) -> list[float]:
    """Time MAIL .. 250-after-dot of `count` transactions on one connection (seconds)."""
    body = (b"Subject: latency\r\n\r\n" + b"x" * 76 + b"\r\n") * max(1, size // 78)
    parser = ReplyParser()
    pending: list = []

    def reply(sock: socket.socket) -> int:
        while not pending:
            data = sock.recv(65536)
            if not data:
                raise SystemExit("server closed the connection during the latency run")
            pending.extend(parser.feed(data))
        return pending.pop(0).code

    def expect(sock: socket.socket, code: int) -> None:
        got = reply(sock)
        if got != code:
            raise SystemExit(f"latency run: expected {code}, got {got}")

    times = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        expect(sock, 220)
        sock.sendall(b"EHLO bench.example\r\n")
        expect(sock, 250)
        for _ in range(count):
            started = time.perf_counter()
            sock.sendall(f"MAIL FROM:<{SENDER_ADDRESS}>\r\n".encode())
            expect(sock, 250)
            sock.sendall(f"RCPT TO:<{RECIPIENT}>\r\n".encode())
            expect(sock, 250)
            sock.sendall(b"DATA\r\n")
            expect(sock, 354)
            sock.sendall(body + b".\r\n")
            expect(sock, 250)
            times.append(time.perf_counter() - started)
        sock.sendall(b"QUIT\r\n")
        expect(sock, 221)
    return times


def idle_cpu(pid: int, seconds: float) -> float:
    """Percent of one core a process uses while nothing happens."""
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / seconds * 100


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


# ---------------------------------------------------------------------- raw disk


class LeaderFolderSync:
    """A user-space group commit of one folder's fsync, kept here as the alternative
    the receiver was measured against (it used this until the raw-disk lines showed
    plain concurrent fsyncs, which the kernel merges, to be faster).

    `sync()` returns only after an fsync of the folder that *started after* the call
    began: whatever the caller renamed into the folder before calling is durable.
    While one thread runs the fsync, later callers wait; the next leader's fsync then
    covers all of them at once.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._cond = threading.Condition()
        self._requested = 0  # tickets handed out
        self._done = 0  # every ticket <= _done is durable
        self._running = False

    def sync(self) -> None:
        with self._cond:
            self._requested += 1
            ticket = self._requested
            while self._done < ticket:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                covered = self._requested
                synced = False
                self._cond.release()
                try:
                    os.fsync(self._fd)
                    synced = True
                finally:
                    self._cond.acquire()
                    self._running = False
                    if synced:
                        self._done = max(self._done, covered)
                    self._cond.notify_all()

    def close(self) -> None:
        os.close(self._fd)


def raw_disk_rate(folder: Path, threads: int, ops: int, shared_sync: bool = False) -> float:
    """write 1 KiB + fsync + rename + fsync folder, per thread: the disk's wall (ops/s).

    `shared_sync`: the folder fsyncs go through `LeaderFolderSync` (one leader
    fsyncs for every waiting thread) instead of each thread's own fsync. The files
    are left in place: deleting them would slow the next file creations nearby
    (see `creation_cost_us`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".tmp").mkdir(exist_ok=True)
    per_thread = max(1, ops // threads)
    group = LeaderFolderSync(folder) if shared_sync else None

    def work(tag: int) -> None:
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(per_thread):
                tmp = folder / ".tmp" / f"{tag}-{i}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
                os.write(fd, b"x" * 1024)
                os.fsync(fd)
                os.close(fd)
                os.rename(tmp, folder / f"{tag}-{i}")
                if group is not None:
                    group.sync()
                else:
                    os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    if group is not None:
        group.close()
    return per_thread * threads / elapsed


def creation_cost_us(folder: Path, files: int = 200) -> float:
    """CPU microseconds the kernel spends creating one empty file in `folder`.

    On this ext4 (no journal), a file created in a block group where many inodes were
    deleted in the last minutes pays for skipping each of them (`recently_deleted`
    in perf): we saw ~0.7 ms per file in /tmp right after a test-suite run, against
    ~20 us in a quiet folder. It slows mailbag and the peer alike and shrinks every
    ratio, so the header shows it.
    """
    probe = folder / "creation-probe"
    probe.mkdir()
    started = time.thread_time()
    for n in range(files):
        os.close(os.open(probe / str(n), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
    return (time.thread_time() - started) / files * 1e6


# ---------------------------------------------------------------------- output


class Report:
    """One line per figure: mailbag, each peer with mailbag/peer, and the target."""

    HEADER = (f"{'figure':<58} {'mailbag':>9} {'aiosmtpd':>9} {'ratio':>6} "
              f"{'postfix':>9} {'ratio':>6}  target")

    def __init__(self) -> None:
        print(self.HEADER, flush=True)

    def line(self, figure: str, ours: float | None, peer: float | None, target: str = "",
             digits: int = 0, postfix: float | None = None) -> None:
        def show(value: float | None) -> str:
            return "-" if value is None else f"{value:,.{digits}f}"

        def ratio(other: float | None) -> str:
            return f"{ours / other:.2f}x" if ours is not None and other else "-"

        print(f"{figure:<58} {show(ours):>9} {show(peer):>9} {ratio(peer):>6} "
              f"{show(postfix):>9} {ratio(postfix):>6}  {target}", flush=True)

    def note(self, text: str) -> None:
        print(f"# {text}", flush=True)


# ---------------------------------------------------------------------- the benchmark

ReceiveServer = Server | postfix_peer.PostfixPeer


def start_postfix(workdir: Path) -> postfix_peer.PostfixPeer | None:
    """The private Postfix instance, or None (and why) where it cannot run."""
    why_not = postfix_peer.available()
    if why_not:
        print(f"# postfix peer skipped: {why_not}")
        return None
    peer = postfix_peer.PostfixPeer.start(workdir / "postfix", free_port())
    try:
        wait_for_banner("127.0.0.1", peer.port, timeout=15.0)
    except TimeoutError:
        peer.stop()
        raise SystemExit(f"postfix did not answer: {peer.log_tail()}") from None
    return peer


def receive_figures(report: Report, workdir: Path, mode: Mode,
                    stack: ExitStack) -> tuple[Server, Server]:
    """The receive figures; mailbag's receiver and the aiosmtpd peer stay up (and are
    stopped by `stack`) for the latency and idle figures."""
    loads = [
        (Load("1 KiB, 5 sessions, -d", 1024, 5, mode.small, True), "≥3x, ≥2,000/s"),
        (Load("100 KiB, 5 sessions, -d", 100 * 1024, 5, mode.large, True), "≥2.5x"),
        (Load("1 KiB, 50 sessions, -d", 1024, 50, mode.many_sessions, True), "≥2x"),
        (Load("1 KiB, 5 sessions, 1 msg/connection", 1024, 5, mode.per_connection, False),
         "≥1.5x, ≥ postfix"),
    ]
    cpu_targets = {loads[0][0].label: "< aiosmtpd", loads[3][0].label: "< aiosmtpd"}
    mailbag = start_receiver(workdir)
    stack.callback(mailbag.stop)
    peer = start_peer(workdir)
    stack.callback(peer.stop)
    results: dict[str, dict[str, list[LoadResult]]] = {}
    with ExitStack() as loads_only:
        postfix = start_postfix(workdir)
        if postfix is not None:
            loads_only.callback(postfix.stop)
        # The same receiver with each session fsyncing its own file (no group commit),
        # on 1 KiB messages with and without reuse: the design choice, measured in
        # every run.
        per_session = start_receiver(workdir, queue={"group_commit": False}, name="per-session")
        loads_only.callback(per_session.stop)
        for index, (load, _) in enumerate(loads):
            servers: list[ReceiveServer] = [mailbag, per_session, peer] if index in (0, 3) \
                else [mailbag, peer]
            if postfix is not None:
                servers.append(postfix)
            runs = results[load.label] = {server.name: [] for server in servers}
            for _ in range(mode.repeat):
                for server in servers:
                    runs[server.name].append(drive(server, load))

    def median(runs: dict[str, list[LoadResult]], name: str, field: str) -> float | None:
        if name not in runs:
            return None
        return statistics.median(getattr(r, field) for r in runs[name])

    for load, target in loads:
        runs = results[load.label]
        report.line(f"receive {load.label} (msgs/s)", median(runs, "mailbag", "rate"),
                    median(runs, "aiosmtpd", "rate"), target,
                    postfix=median(runs, "postfix", "rate"))
        if "per-session" in runs:
            report.line("  same, queue.group_commit = false (msgs/s)",
                        median(runs, "per-session", "rate"), median(runs, "aiosmtpd", "rate"),
                        postfix=median(runs, "postfix", "rate"))
    for load, _ in loads:
        runs = results[load.label]
        report.line(f"CPU s/1,000 msgs, {load.label}", median(runs, "mailbag", "cpu_per_1000"),
                    median(runs, "aiosmtpd", "cpu_per_1000"), cpu_targets.get(load.label, ""),
                    digits=2, postfix=median(runs, "postfix", "cpu_per_1000"))
        if "per-session" in runs:
            report.line("  same, queue.group_commit = false",
                        median(runs, "per-session", "cpu_per_1000"),
                        median(runs, "aiosmtpd", "cpu_per_1000"), digits=2,
                        postfix=median(runs, "postfix", "cpu_per_1000"))
    for load, _ in loads[1:3]:
        runs = results[load.label]
        rss = {name: max(r.rss_kib for r in rs) / 1024 for name, rs in runs.items()}
        report.line(f"RSS under load, {load.label} (MiB)", rss["mailbag"], rss["aiosmtpd"],
                    digits=1)
    return mailbag, peer


def latency_figures(report: Report, mailbag: Server, peer: Server, mode: Mode) -> None:
    times = {s.name: transaction_latencies(s.port, mode.latency) for s in (mailbag, peer)}
    for label, fraction in (("p50", 0.5), ("p99", 0.99)):
        report.line(
            f"one transaction MAIL..250, 1 KiB, {label} (ms)",
            percentile(times["mailbag"], fraction) * 1000,
            percentile(times["aiosmtpd"], fraction) * 1000,
            digits=2,
        )


def idle_figures(report: Report, mailbag: Server, peer: Server, mode: Mode) -> None:
    time.sleep(0.5)  # let the last session's close settle
    usage = {s.name: idle_cpu(s.pid, mode.idle_seconds) for s in (mailbag, peer)}
    report.line(f"receiver CPU while idle, {mode.idle_seconds:g} s (% of a core)",
                usage["mailbag"], usage["aiosmtpd"], digits=2)


def fill_queue(queue_dir: Path, count: int, size: int = 1024) -> None:
    """Put `count` messages in the queue the way the receiver does (QueueWriter)."""
    writer = QueueWriter(queue_dir)
    data = (b"Subject: drain\r\n\r\n" + b"x" * 76 + b"\r\n") * max(1, size // 78)
    per_thread = count // 5

    def work(n: int) -> None:
        for _ in range(n):
            writer.store(SENDER_ADDRESS, [RECIPIENT], data)

    workers = [threading.Thread(target=work, args=(per_thread + (count % 5 if t == 0 else 0),))
               for t in range(5)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def messages_in_queue(queue_dir: Path) -> int:
    """Messages left: the ready ones (the sender reads them in place; dot names are
    not messages), plus any in an older sender version's `.work/<pid>/` folders."""
    count = len(stored_files(queue_dir))
    work_root = queue_dir / ".work"
    if work_root.is_dir():
        for entry in os.scandir(work_root):
            if entry.is_dir():
                count += len(stored_files(Path(entry.path)))
    return count


class SinkCounter:
    """Arrivals at `smtp-sink -c`, timed as they happen.

    With -c smtp-sink writes `sess=.. quit=.. mesg=N\\r` to its stdout, unbuffered, as
    it accepts each message; a reader thread blocks on that pipe and stamps each
    count. The drain is timed from these stamps, so the benchmark does not poll the
    queue folder while the sender works (a scandir of 2,000 files every few ms took
    a core's share away from the sender on a 2-core machine).
    """

    def __init__(self, stream: object) -> None:
        self._stream = stream
        self._cond = threading.Condition()
        self.count = 0
        self.stamps: dict[int, float] = {}  # message number -> perf_counter
        self.on_count: dict[int, Callable[[], None]] = {}  # called at that number
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buffer = b""
        while chunk := self._stream.read1(4096):  # type: ignore[attr-defined]
            now = time.perf_counter()
            buffer += chunk
            *items, buffer = buffer.split(b"\r")
            for item in items:
                match = re.search(rb"mesg=(\d+)", item)
                if not match:
                    continue
                number = int(match.group(1))
                if number in self.on_count:
                    self.on_count[number]()
                with self._cond:
                    self.count = number
                    self.stamps[number] = now
                    self._cond.notify_all()

    def wait_for(self, number: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.count >= number, timeout)


@contextmanager
def smtp_sink(workdir: Path) -> Iterator[tuple[int, SinkCounter]]:
    port = free_port()
    argv = [SMTP_SINK, "-c", "-u", "nobody", f"127.0.0.1:{port}", "256"]
    if os.geteuid() != 0:
        argv[2:4] = []
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        counter = SinkCounter(proc.stdout)
        wait_for_banner("127.0.0.1", port)
        yield port, counter
    finally:
        proc.terminate()
        proc.wait(10)


def start_sender(config: Path, workdir: Path) -> subprocess.Popen:
    log = open(workdir / "sender.stderr", "ab")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(
        [sys.executable, "-m", "services.sender", "--config", str(config)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
    )


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def drain_figures(report: Report, workdir: Path, mode: Mode) -> None:
    """The sender drains a pre-filled queue into smtp-sink (median of `repeat` runs)."""
    if not (REPO / "services" / "sender" / "__main__.py").exists():
        report.note("sender: services/sender is not there yet - drain figures skipped")
        return
    runs = [drain_once(workdir / f"drain{n}", workdir, mode.drain) for n in range(mode.repeat)]
    if any(run is None for run in runs):
        report.note(f"sender did not drain the queue; see {workdir / 'sender.stderr'}")
        return
    rates, cpus, rss = zip(*runs, strict=True)  # type: ignore[misc]
    report.line(f"sender drain of {mode.drain} x 1 KiB into smtp-sink (msgs/s)",
                statistics.median(rates), None, "≥5,000/s; postfix: the issue's figure",
                postfix=POSTFIX_DRAIN)
    report.line("sender CPU s/1,000 msgs (drain)", statistics.median(cpus), None, digits=2)
    report.line("sender RSS during drain (MiB)", max(rss) / 1024, None, digits=1)


def drain_once(folder: Path, workdir: Path, count: int,
               metrics: dict | None = None) -> tuple[float, float, int] | None:
    """One drain: msgs/s, CPU s per 1,000 msgs, peak RSS (KiB); None if it failed.

    Timed by smtp-sink's own arrival counter from the first message to the last
    (start-up is not counted); the queue must be empty afterwards.
    """
    folder.mkdir()
    with smtp_sink(workdir) as (sink_port, arrivals):
        config = write_config(folder, sender={"relay": f"127.0.0.1:{sink_port}",
                                              "poll_interval": 60}, metrics=metrics or {})
        queue_dir = folder / "var" / "queue"
        fill_queue(queue_dir, count)
        sender = start_sender(config, workdir)
        cpu_at: dict[int, float] = {}
        for number in (1, count):
            arrivals.on_count[number] = lambda n=number: cpu_at.setdefault(
                n, cpu_seconds(sender.pid))
        try:
            with RssSampler(lambda: rss_kib(sender.pid)) as rss:
                arrived = arrivals.wait_for(count, RUN_TIMEOUT)
            # Every message arrived; the queue must now empty (delivered files are
            # removed behind the deliveries). Checked after the timing, not during it.
            deadline = time.monotonic() + 15
            while messages_in_queue(queue_dir) and time.monotonic() < deadline:
                time.sleep(0.05)
            left = messages_in_queue(queue_dir)
        finally:
            stop_process(sender)
    if not arrived or left:
        print(f"# drain: {arrivals.count} of {count} arrived, {left} still queued")
        return None
    timed = count - 1  # the messages after the first, over the time after it
    elapsed = arrivals.stamps[count] - arrivals.stamps[1]
    cpu = cpu_at.get(count, 0.0) - cpu_at.get(1, 0.0)
    return timed / max(elapsed, 1e-6), cpu / timed * 1000, rss.peak


# ---------------------------------------------------------------------- the metrics


def get(port: int, path: str) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


SCRAPE_INTERVAL = 5.0  # seconds: a third of the usual 15 s; what one scrape costs is its own line


class Scraper:
    """GET /metrics every `interval` seconds while a load runs, as Prometheus does."""

    def __init__(self, port: int, interval: float = SCRAPE_INTERVAL) -> None:
        self.port = port
        self.interval = interval
        self.scrapes = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:  # one at once, then every interval: a short run is scraped too
            status, _ = get(self.port, "/metrics")
            if status != 200:
                raise SystemExit(f"/metrics answered {status}")
            self.scrapes += 1
            if self._done.wait(self.interval):
                return

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def metrics_figures(report: Report, workdir: Path, mode: Mode) -> None:
    """The metrics' cost: receive and drain with `[metrics] listen` off and on
    (scraped every SCRAPE_INTERVAL), in pairs run back to back, the order swapped
    every other pair (off-on, on-off, ...) so that a drifting background load favours
    neither; the figure is the median of the pairs' on/off ratios. Then what one
    scrape of a large queue takes."""
    load = Load("1 KiB, 5 sessions, -d", 1024, 5, mode.small, True)
    metrics_port = free_port()
    off = start_receiver(workdir, name="metrics-off")
    on = start_receiver(workdir, name="metrics-on",
                        metrics={"listen": f"127.0.0.1:{metrics_port}"})

    def receive(name: str, n: int) -> tuple[float, float]:
        if name == "off":
            result = drive(off, load)
        else:
            with Scraper(metrics_port):
                result = drive(on, load)
        return result.rate, result.cpu_per_1000

    try:
        received = paired(mode.metrics_rounds, receive)
    finally:
        off.stop()
        on.stop()

    def drain(name: str, n: int) -> tuple[float, float]:
        metrics = {"listen": f"127.0.0.1:{free_port()}"} if name == "on" else {}
        run = drain_once(workdir / f"metrics-drain-{name}{n}", workdir, mode.metrics_drain,
                         metrics)
        if run is None:
            raise SystemExit(f"sender did not drain the queue; see {workdir / 'sender.stderr'}")
        return run[0], run[1]

    drained = paired(mode.metrics_rounds, drain)
    report.note("metrics: the mailbag column is metrics on, the aiosmtpd column metrics off")
    for label, pairs in ((f"receive {load.label}", received),
                         (f"sender drain of {mode.metrics_drain} x 1 KiB", drained)):
        rates = [(on_[0], off_[0]) for off_, on_ in pairs]
        cpus = [(on_[1], off_[1]) for off_, on_ in pairs]
        report.line(f"{label}, metrics on vs off (msgs/s)",
                    statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates),
                    "within 5%")
        report.line("  on/off, median of the pairs' ratios: msgs/s",
                    statistics.median(a / b for a, b in rates), None, digits=3)
        report.line("  on/off, median of the pairs' ratios: CPU per message",
                    statistics.median(a / b for a, b in cpus), None, digits=3)
        report.note(f"{label} pairs on/off (msgs/s): " +
                    " ".join(f"{a:.0f}/{b:.0f}" for a, b in rates))
    counting_figures(report)
    scrape_figures(report, workdir, mode.scrape_queue)


def counting_figures(report: Report, calls: int = 200_000) -> None:
    """What counting one message costs in each program (the calls they make per
    message with metrics on), in this process: free of the load's noise."""
    from prometheus_client import CollectorRegistry

    from shared.metrics.counting import CountingReceiverFigures, CountingSenderFigures

    receiver = CountingReceiverFigures(CollectorRegistry())
    sender = CountingSenderFigures(CollectorRegistry())

    def per_call(work: Callable[[], None]) -> float:
        started = time.thread_time()
        for _ in range(calls):
            work()
        return (time.thread_time() - started) / calls * 1e6

    report.line("counting one message, receiver (us of CPU)", per_call(receiver.received), None,
                digits=1)
    arrival = time.time() - 0.003

    def relayed() -> None:  # the runner's fast path: delivered, and the time to the relay
        sender.delivered("relay", 1)
        sender.delivery_time(time.time() - arrival)

    report.line("counting one message, sender (us of CPU)", per_call(relayed), None, digits=1)


def paired(rounds: int, run: Callable[[str, int], tuple[float, float]]
           ) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """`rounds` pairs of (off, on) results, run back to back, in swapped order every
    other round."""
    pairs = []
    for n in range(rounds):
        order = ("off", "on") if n % 2 == 0 else ("on", "off")
        results = {name: run(name, n) for name in order}
        pairs.append((results["off"], results["on"]))
    return pairs


def scrape_figures(report: Report, workdir: Path, count: int) -> None:
    """A scrape of a queue of `count` messages, through the receiver's endpoint: all
    ready (no state files), then all deferred (a state file each). Timed: the first
    scrape (every state file parsed), one with nothing changed, one after a message
    arrived (the queue folder is listed again), one after a state changed (every
    state file is stat'ed again)."""
    folder = workdir / "scrape"
    queue_dir = folder / "var" / "queue"
    queue_dir.mkdir(parents=True)
    data = b"From: <bench@example.com>\nTo: <rcpt@example.org>\n\n" + b"x" * 1024
    start_ns = time.time_ns() - count * 1_000_000
    names = [new_queue_id(start_ns + n * 1_000_000) for n in range(count)]
    for name in names:  # the scrape reads names only: no fsync needed to make them
        fd = os.open(queue_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, data)
        os.close(fd)
    metrics_port = free_port()
    receiver = start_receiver(folder, name="scrape-receiver",
                              queue={"dir": str(queue_dir)},
                              metrics={"listen": f"127.0.0.1:{metrics_port}"})
    store = StateStore(queue_dir)
    later = DeliveryState(attempts=1, next_attempt=time.time() + 3600, last_reply="451 busy")

    def arrive() -> None:
        fd = os.open(queue_dir / new_queue_id(), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, data)
        os.close(fd)

    try:
        time_scrapes(report, receiver, metrics_port, f"{count:,} ready", arrive, None)
        for name in names:
            store.save(name, later)
        time_scrapes(report, receiver, metrics_port, f"{count:,} deferred", arrive,
                     lambda: store.save(names[0], replace(later, attempts=2)))
    finally:
        receiver.stop()


def time_scrapes(report: Report, receiver: Server, port: int, label: str,
                 arrive: Callable[[], None], state_change: Callable[[], None] | None) -> None:
    def scrape() -> tuple[float, float]:
        time.sleep(0.1)  # FolderStamp trusts a folder whose last change is 50 ms old
        cpu = receiver.cpu_seconds()
        started = time.perf_counter()
        status, _ = get(port, "/metrics")
        if status != 200:
            raise SystemExit(f"/metrics answered {status}")
        return (time.perf_counter() - started) * 1000, (receiver.cpu_seconds() - cpu) * 1000

    steps = [("first", lambda: None), ("nothing changed", lambda: None),
             ("a message arrived", arrive)]
    if state_change is not None:
        steps.append(("a state changed", state_change))
    for what, change in steps:
        change()
        wall, cpu = scrape()
        report.line(f"scrape, {label}, {what} (ms)", wall, None, f"receiver CPU {cpu:.0f} ms")
    started = time.perf_counter()
    get(port, "/healthz")
    report.line(f"/healthz, {label} (ms)", (time.perf_counter() - started) * 1000, None)


def upstream_figures(report: Report, workdir: Path, mode: Mode) -> None:
    """250 at the receiver -> arrival at the upstream, one message at a time, idle queue."""
    if not (REPO / "services" / "sender" / "__main__.py").exists():
        return
    from aiosmtpd.controller import Controller

    arrivals: dict[str, float] = {}
    arrived = threading.Condition()

    class Upstream:
        async def handle_DATA(self, server, session, envelope) -> str:  # noqa: ANN001
            match = re.search(rb"X-Bench-Id: (\d+)", envelope.original_content or b"")
            with arrived:
                if match:
                    arrivals[match.group(1).decode()] = time.monotonic()
                arrived.notify_all()
            return "250 2.0.0 Ok"

    upstream_port = free_port()
    controller = Controller(Upstream(), hostname="127.0.0.1", port=upstream_port)
    controller.start()
    folder = workdir / "upstream"
    folder.mkdir()
    try:
        receiver = start_receiver(folder, sender={"relay": f"127.0.0.1:{upstream_port}",
                                                  "poll_interval": 60})
        config = receiver.config  # type: ignore[attr-defined]
        sender = start_sender(config, workdir)
        try:
            delays = send_and_time(receiver.port, arrivals, arrived, mode.upstream)
            idle = idle_cpu(sender.pid, mode.idle_seconds) if sender.poll() is None else None
        finally:
            stop_process(sender)
            receiver.stop()
    finally:
        controller.stop()
    if not delays:
        report.note("no message reached the upstream; see sender.stderr")
        return
    report.line(f"250 -> upstream arrival, idle queue, p50 (ms, n={len(delays)})",
                percentile(delays, 0.5) * 1000, None, "< 50 ms", digits=1)
    report.line("250 -> upstream arrival, idle queue, p99 (ms)",
                percentile(delays, 0.99) * 1000, None, digits=1)
    report.line(f"sender CPU while idle, {mode.idle_seconds:g} s (% of a core)", idle, None,
                digits=2)


def send_and_time(port: int, arrivals: dict[str, float], arrived: threading.Condition,
                  count: int) -> list[float]:
    import smtplib

    delays = []
    time.sleep(0.5)  # let the sender reach its idle wait
    for number in range(count):
        key = str(number)
        message = f"Subject: upstream\r\nX-Bench-Id: {key}\r\n\r\nhello\r\n"
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail(SENDER_ADDRESS, [RECIPIENT], message)
            acked = time.monotonic()  # sendmail returns on the 250 after the dot
            with arrived:
                arrived.wait_for(lambda key=key: key in arrivals, timeout=10)
        if key not in arrivals:
            break
        delays.append(arrivals[key] - acked)
        time.sleep(0.05)
    return delays


# ---------------------------------------------------------------------- strace mode

STRACE_CALLS = "trace=openat,close,fsync,fdatasync,syncfs,rename,renameat,renameat2,sendto"
_STRACE_LINE = re.compile(
    r"^(?P<pid>\d+)\s+(?P<ts>\d+\.\d+)\s+"
    r"(?:(?P<name>\w+)\((?P<args>.*?)"
    r"(?: <unfinished \.\.\.>$|\)\s+=\s+(?P<ret>-?\d+).*<(?P<dur>[\d.]+)>$)"
    r"|<\.\.\. (?P<rname>\w+) resumed>(?P<rargs>.*?)\)\s+=\s+"
    r"(?P<rret>-?\d+).*<(?P<rdur>[\d.]+)>$)"
)


@dataclass
class Call:
    name: str
    args: str
    start: float
    end: float
    ret: int


def parse_strace(path: Path) -> list[Call]:
    """strace -f -ttt -T -y output -> completed calls, with their start and end times."""
    calls: list[Call] = []
    open_calls: dict[tuple[str, str], tuple[float, str]] = {}
    for line in path.read_text(errors="replace").splitlines():
        match = _STRACE_LINE.match(line)
        if not match:
            continue
        pid, ts = match["pid"], float(match["ts"])
        if match["rname"]:
            begun = open_calls.pop((pid, match["rname"]), None)
            if begun is None:
                continue
            start, args = begun
            calls.append(Call(match["rname"], args + match["rargs"], start,
                              start + float(match["rdur"]), int(match["rret"])))
        elif match["ret"] is None:
            open_calls[(pid, match["name"])] = (ts, match["args"])
        else:
            calls.append(Call(match["name"], match["args"], ts, ts + float(match["dur"]),
                              int(match["ret"])))
    return calls


def check_durability(calls: list[Call], queue_dir: Path) -> dict[str, int]:
    """Per acknowledged message: its file made durable - its own fsync, or a syncfs of
    the queue's filesystem that began after the file was written and closed - then
    renamed, then a folder fsync that began after the rename and ended before the 250
    was sent."""
    queue = str(queue_dir)
    tmp = f"{queue}/.tmp/"
    file_synced: dict[str, float] = {}  # queue id -> end of its own fsync
    closed: dict[str, float] = {}  # queue id -> end of the close after writing it
    renamed: dict[str, tuple[float, float]] = {}
    acked: dict[str, float] = {}
    folder_syncs: list[tuple[float, float]] = []
    filesystem_syncs: list[tuple[float, float]] = []
    for call in calls:
        if call.ret < 0:
            continue
        target = re.match(r"\d+<(.*)>", call.args)
        path = target.group(1) if target else ""
        if call.name in ("fsync", "fdatasync"):
            if path.startswith(tmp):
                file_synced[path[len(tmp):]] = call.end
            elif path == queue:
                folder_syncs.append((call.start, call.end))
        elif call.name == "syncfs" and path.startswith(queue):
            filesystem_syncs.append((call.start, call.end))
        elif call.name == "close" and path.startswith(tmp):
            closed[path[len(tmp):]] = call.end
        elif call.name.startswith("rename"):
            names = re.findall(r'"([^"]*)"', call.args)
            if len(names) == 2 and names[0].startswith(tmp):
                renamed[names[0][len(tmp):]] = (call.start, call.end)
        elif call.name == "sendto":
            for queue_id in re.findall(r"queued as ([0-9a-f]+)", call.args):
                acked[queue_id] = call.start

    def durable_before_rename(queue_id: str) -> bool:
        rename_start = renamed[queue_id][0]
        if file_synced.get(queue_id, float("inf")) <= rename_start:
            return True
        written = closed.get(queue_id)
        return written is not None and any(
            start >= written and end <= rename_start for start, end in filesystem_syncs)

    bad = 0
    for queue_id, ack in acked.items():
        ok = (
            queue_id in renamed and durable_before_rename(queue_id)
            and renamed[queue_id][1] <= ack
            and any(start >= renamed[queue_id][1] and end <= ack for start, end in folder_syncs)
        )
        bad += not ok
    return {
        "messages acknowledged (250 queued as)": len(acked),
        "file fsyncs (.tmp files)": len(file_synced),
        "syncfs calls (group commits)": len(filesystem_syncs),
        "renames .tmp -> queue": len(renamed),
        "folder fsyncs": len(folder_syncs),
        "250s NOT preceded by file sync + rename + folder fsync": bad,
    }


def strace_mode(workdir: Path, count: int) -> int:
    if not shutil.which("strace"):
        print("strace is not installed (apt-get install strace)")
        return 1
    trace = workdir / "receiver.strace"
    wrapper = ["strace", "-f", "-ttt", "-T", "-y", "-s", "160", "-o", str(trace), "-e",
               STRACE_CALLS]
    receiver = start_receiver(workdir, wrapper=wrapper)
    assert receiver.store is not None
    try:
        argv = [SMTP_SOURCE, "-s", "5", "-m", str(count), "-l", "1024", "-d",
                "-f", SENDER_ADDRESS, "-t", RECIPIENT, "-M", "bench.example",
                f"127.0.0.1:{receiver.port}"]
        subprocess.run(argv, check=True, capture_output=True, timeout=RUN_TIMEOUT)
        stored = len(stored_files(receiver.store))
    finally:
        receiver.stop()
    counts = check_durability(parse_strace(trace), receiver.store)
    print(f"durability check: strace -f -e {STRACE_CALLS}, smtp-source -s 5 -m {count} -d")
    print(f"{'messages stored in the queue':<58} {stored:>6}")
    for label, value in counts.items():
        print(f"{label:<58} {value:>6}")
    acked = counts["messages acknowledged (250 queued as)"]
    bad = counts["250s NOT preceded by file sync + rename + folder fsync"]
    ok = acked == count == stored and bad == 0
    print("durable: every 250 came after its file's sync (fsync or syncfs), its rename "
          "and a folder fsync"
          if ok else "NOT DURABLE or incomplete run: see the counts above")
    return 0 if ok else 1


# ---------------------------------------------------------------------- main


def check_tools() -> None:
    missing = [tool for tool in (SMTP_SOURCE, SMTP_SINK) if not os.access(tool, os.X_OK)]
    if missing:
        raise SystemExit(
            f"missing {', '.join(missing)}: apt-get install postfix (see bench/README.md)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="mailbag benchmark (see bench/README.md)")
    parser.add_argument("--short", action="store_true", help="smoke run, under a minute")
    parser.add_argument("--strace", action="store_true", help="durability check of the receiver")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--only", default="",
                        help="comma list: disk,receive,sender,metrics")
    parser.add_argument("--dir", default="/tmp", type=Path,
                        help="parent of the temporary folder (default /tmp)")
    args = parser.parse_args(argv)
    check_tools()
    mode = SHORT if args.short else FULL
    workdir = Path(tempfile.mkdtemp(prefix="mailbag-bench-", dir=args.dir))
    try:
        if args.strace:
            return strace_mode(workdir, 200)
        return run_all(workdir, mode, set(filter(None, args.only.split(","))))
    finally:
        if args.keep:
            print(f"# kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run_all(workdir: Path, mode: Mode, only: set[str]) -> int:
    def wanted(part: str) -> bool:
        return not only or part in only

    started = time.perf_counter()
    print(f"# mailbag {git_version()} benchmark ({'short' if mode is SHORT else 'full'}): "
          f"{os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}, work folder {workdir} "
          f"(on {filesystem_of(workdir)}); median of {mode.repeat} run(s)")
    creation = creation_cost_us(workdir)
    print(f"# file creation in the work folder: {creation:.0f} us of CPU each"
          + (" - recently deleted inodes nearby slow both servers; use --dir elsewhere "
             "or wait a few minutes" if creation > 100 else " (quiet)"))
    report = Report()
    if wanted("disk"):
        for threads, shared in ((1, False), (5, False), (5, True)):
            rate = raw_disk_rate(workdir / f"disk{threads}{shared}", threads, mode.disk_ops,
                                 shared)
            how = "leader-synced dir fsync" if shared else "dir fsync"
            report.line(f"raw disk 1 KiB: fsync+rename+{how}, {threads} thr (ops/s)",
                        rate, None)
    if wanted("receive"):
        with ExitStack() as stack:
            mailbag, peer = receive_figures(report, workdir, mode, stack)
            latency_figures(report, mailbag, peer, mode)
            idle_figures(report, mailbag, peer, mode)
    if wanted("sender"):
        drain_figures(report, workdir, mode)
        upstream_figures(report, workdir, mode)
    if "metrics" in only:  # its own A/B runs take minutes: only when asked for
        metrics_figures(report, workdir, mode)
    report.note(f"done in {time.perf_counter() - started:.0f} s")
    return 0


def git_version() -> str:
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return done.stdout.strip() or "?"


def filesystem_of(path: Path) -> str:
    best = ("?", "")
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            device, mount_point, fstype = line.split()[:3]
            if str(path).startswith(mount_point) and len(mount_point) >= len(best[1]):
                best = (f"{device} {fstype}", mount_point)
    return best[0]


if __name__ == "__main__":
    sys.exit(main())
