"""What the supervisor tracks: worker slots and their worker processes."""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass, field

import trio

from server.config import Config
from server.process.backoff import SlotBackoff


def resolve_workers(config: Config) -> int:
    """The number of worker slots: ``server.workers``, or for 0 one per usable CPU (1 with the
    memory store, whose history lives in one process)."""
    if config.server.workers > 0:
        return config.server.workers
    if config.store.backend == "memory":
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def describe_exit(returncode: int | None) -> str:
    """``exited with status 3`` / ``was killed by SIGKILL`` for a process's return code."""
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


@dataclass(eq=False)
class WorkerProcess:
    """One worker process in a slot, as the supervisor tracks it."""

    slot: int
    process: trio.Process
    status: trio.socket.SocketType
    started_at: float
    ready: trio.Event = field(default_factory=trio.Event)
    exited: trio.Event = field(default_factory=trio.Event)
    settled: trio.Event = field(default_factory=trio.Event)  # ready or exited
    retiring: bool = False  # asked to stop: its exit is not a crash

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self.process.pid


@dataclass(eq=False)
class Slot:
    """A worker slot: its listening socket(s), its current worker and its crash history."""

    index: int
    sockets: list[socket.socket]
    owned: bool  # bound by the supervisor (may be closed and bound again), not systemd's
    backoff: SlotBackoff
    current: WorkerProcess | None = None
    failed: bool = False  # gave up after too many crashes; retried on the next reload
    lock: trio.Lock = field(default_factory=trio.Lock)  # held while a worker is started in the slot
