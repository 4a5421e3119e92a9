"""`sluice serve` as a real process on sqlite: kill -9, restart, resume exactly; a wiped store resets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from tests.client import open_sse, publish, request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def sluice_process(db: Path, port: int, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """Start `sluice serve` on ``port`` (``extra``: more flags); SIGKILL it on exit if it is still running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--db", str(db)]
        + list(extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "SLUICE_CONFIG": ""},
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s child processes (its workers)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


async def wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    while True:
        assert proc.poll() is None, "server exited"
        try:
            if (await request(port, "GET", "/readyz")).status == 200:
                return
        except OSError:
            await trio.sleep(0.05)


async def test_kill_9_with_sync_normal_loses_no_acknowledged_publish(tmp_path: Path) -> None:
    """With ``store.sync = "normal"`` nothing is fsynced at commit, yet the commit is in the OS's
    page cache before the 201: killing every process right after the acks loses none of them."""
    db = tmp_path / "var" / "sluice.db"
    normal = ("--set", "store.sync=normal")
    port = free_port()
    with trio.fail_after(60):
        with sluice_process(db, port, *normal) as proc:
            await wait_ready(port, proc)
            ids = [await publish(port, "dur", f"e{i}") for i in range(50)]
            workers = children(proc.pid)
            assert workers
            for pid in [proc.pid, *workers]:  # every process at once: none gets to close the store
                os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=10)
        port = free_port()
        with sluice_process(db, port, *normal) as proc:
            await wait_ready(port, proc)
            async with open_sse(port, "/v1/streams/dur?from=start") as sse:
                stored = await sse.take(50)
            assert [e.id for e in stored] == ids
            assert [e.data for e in stored] == [f"e{i}" for i in range(50)]
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=15) == 0


async def test_kill_9_loses_no_acknowledged_publish(tmp_path: Path) -> None:
    db = tmp_path / "var" / "sluice.db"
    port = free_port()
    with trio.fail_after(60):
        with sluice_process(db, port) as proc:
            await wait_ready(port, proc)
            ids = [await publish(port, "dur", f"e{i}") for i in range(20)]
            async with open_sse(port, "/v1/streams/dur?from=start") as sse:
                seen = await sse.take(8)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        port = free_port()
        with sluice_process(db, port) as proc:
            await wait_ready(port, proc)
            more = await publish(port, "dur", "after restart")
            assert more > ids[-1] and more.split("-")[0] == ids[0].split("-")[0]
            async with open_sse(port, "/v1/streams/dur", {"last-event-id": seen[-1].id}) as sse:
                rest = await sse.take(13)
            assert [e.id for e in rest] == ids[8:] + [more]
            assert [e.data for e in rest][:2] == ["e8", "e9"]
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        # the store is wiped: the stream's history is gone, and an old id gets reset "epoch"
        for f in db.parent.iterdir():
            f.unlink()
        port = free_port()
        with sluice_process(db, port) as proc:
            await wait_ready(port, proc)
            fresh = await publish(port, "dur", "new history")
            async with open_sse(port, "/v1/streams/dur", {"last-event-id": ids[-1]}) as sse:
                reset, event = await sse.take(2)
            assert reset.event == "sluice.reset"
            assert '"reason":"epoch"' in reset.data and event.id == fresh
