"""Who may have a session, and which thread runs it.

- `SlotPool`: the session slots of the whole receiver, `max_connections` in all
  and `max_connections_per_ip` for one client address; taking one never waits; a
  reload resizes it.
- `Slot`: one session's slot, given back exactly once, whoever is first: the
  session before its last reply, or its thread when the session ends.
- `SessionThreads`: threads that run one session after another. The accepting
  thread hands each connection to an idle one and starts a new thread only when
  none is idle, so a connection costs no thread start (a clone, a stack, and a
  handshake with the new thread, with the GIL held).
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Callable


class SlotPool:
    """The session slots of the whole receiver: `max_connections` in all, and at most
    `max_connections_per_ip` for one client address (0 = no per-address limit).
    `resize` (a reload) changes the limits for the sessions to come; sessions over a
    lowered limit go on until they end."""

    def __init__(self, max_connections: int, max_per_ip: int = 0) -> None:
        self._max = max_connections
        self._max_per_ip = max_per_ip
        self._taken = 0
        self._per_ip: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, ip: str) -> bool:
        """A slot for this client, or False at once (never waits)."""
        with self._lock:
            if self._taken >= self._max:
                return False
            if self._max_per_ip and self._per_ip.get(ip, 0) >= self._max_per_ip:
                return False
            self._taken += 1
            self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        return True

    def give_back(self, ip: str) -> None:
        with self._lock:
            self._taken -= 1
            left = self._per_ip.get(ip, 1) - 1
            if left:
                self._per_ip[ip] = left
            else:
                self._per_ip.pop(ip, None)

    def resize(self, max_connections: int, max_per_ip: int) -> None:
        with self._lock:
            self._max = max_connections
            self._max_per_ip = max_per_ip


class Slot:
    """One session's slot; given back once, by whichever comes first: the session
    before its last reply, or its thread when the session ends."""

    __slots__ = ("_pool", "_ip")

    def __init__(self, pool: SlotPool, ip: str) -> None:
        self._pool: SlotPool | None = pool
        self._ip = ip

    def give_back(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.give_back(self._ip)


class SessionThreads:
    """Threads that run one session after another.

    `submit` hands a connection to an idle thread, or starts a new one when none is
    idle (at most `max_threads`; past that the connection waits for the next thread
    to come free). A thread stays for the next connection when its session ends.
    """

    def __init__(self, run: Callable[[socket.socket, tuple], None], max_threads: int) -> None:
        self._run = run
        self._max_threads = max_threads
        self._jobs: queue.SimpleQueue[tuple[socket.socket, tuple] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a job, not yet promised one
        self._threads = 0

    def submit(self, request: socket.socket, client_address: tuple) -> None:
        with self._lock:
            start = not self._idle and self._threads < self._max_threads
            if start:
                self._threads += 1
            elif self._idle:
                self._idle -= 1
        self._jobs.put((request, client_address))
        if start:
            threading.Thread(target=self._work, name="session", daemon=True).start()

    def resize(self, max_threads: int) -> None:
        """A new limit (a reload); threads over a lowered one stay until `close`."""
        with self._lock:
            self._max_threads = max_threads

    def close(self) -> None:
        """End every thread once it is idle (sessions in progress run to their end)."""
        with self._lock:
            count = self._threads
        for _ in range(count):
            self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._run(*job)
            job = None  # the connection is closed: do not keep it while idle
            with self._lock:
                self._idle += 1
        with self._lock:
            self._threads -= 1
