"""The store's floor: CPU per event of Sluice's own commit (``server.store.sqlite_ops.commit_batch``)
on this machine's disk, by group size, with no server around it.

``python -m loadtest.sqlite_floor [--dir DIR] [--events N] [--streams S]`` appends ``N`` events
round-robin over ``S`` streams (created first), ``B`` per transaction for ``B`` in 1, 4, 16, 64,
with ``store.sync = "full"`` and ``"normal"``, and prints user and system CPU per event and wall
time per event. The database files go to a fresh temporary directory under ``--dir`` (default:
the system's), removed at the end: put it on the disk the server will use.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from server.core.events import NewEvent
from server.core.ports.store import Retention
from server.store.sqlite_ops import AppendOp, WriterState, commit_batch
from server.store.sqlite_schema import open_writer

GROUPS = (1, 4, 16, 64)
DATA = b'{"n":1,"t":1796641269701976642,"pad":"xxxxxxxxxxxxxxxx"}'  # about what the load runs publish


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def measure(path: Path, sync: str, group: int, events: int, streams: int) -> tuple[float, float, float]:
    """(user, system, wall) microseconds per event for ``events`` appends in groups of ``group``."""
    conn = open_writer(path, 5.0, sync)
    try:
        state, retention, event = WriterState(), Retention(), (NewEvent("message", DATA),)
        for first in range(0, streams, 100):  # every stream exists, as in a long-running server
            ops = [AppendOp(f"t{k}", event) for k in range(first, min(first + 100, streams))]
            commit_batch(conn, ops, time.time(), retention, state)
        u0, s0 = _cpu()
        w0 = time.perf_counter()
        for done in range(0, events, group):
            ops = [AppendOp(f"t{(done + k) % streams}", event) for k in range(group)]
            commit_batch(conn, ops, time.time(), retention, state)
        u1, s1 = _cpu()
        w1 = time.perf_counter()
    finally:
        conn.close()
    return 1e6 * (u1 - u0) / events, 1e6 * (s1 - s0) / events, 1e6 * (w1 - w0) / events


def main(argv: Sequence[str] | None = None) -> None:
    """Print the table (see the module doc)."""
    parser = argparse.ArgumentParser(description="CPU per event of the SQLite store's commit, by group size")
    parser.add_argument("--dir", default=None, help="where the temporary database files go")
    parser.add_argument("--events", type=int, default=8000)
    parser.add_argument("--streams", type=int, default=5000)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sluice-sqlite-floor-", dir=args.dir))
    try:
        print("| store.sync | events per commit | user µs/event | system µs/event | wall µs/event |")
        print("|---|---|---|---|---|")
        for sync in ("full", "normal"):
            for group in GROUPS:
                user, system, wall = measure(work / f"{sync}-{group}.db", sync, group, args.events, args.streams)
                print(f"| {sync} | {group} | {user:.1f} | {system:.1f} | {wall:.1f} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
