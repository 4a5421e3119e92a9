"""Slow clients: headers trickled (slowloris) and bodies trickled (R-U-Dead-Yet).

The first tests trickle by hand on a mock clock (``autojump_clock``): ``header_timeout`` and
``body_timeout`` are deadlines for the whole head and the whole body, so sending a little now
and then never extends them. A bystander runs on the same mock clock, pausing between rounds so
that the clock can advance (its latencies are in virtual seconds, so about zero). The ``slow``
tests run the real ``slowhttptest`` against a worker in this process with 2-second timeouts, for
a few seconds of wall time each, while a bystander is served (a whole round while the worker holds
at least 50 of the slow connections), and check afterwards that the worker holds no connection
any more. Every test bounds this process's RSS growth (the worker's) during the attack by 50 MiB.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.abuse_helpers import Bystander, MemoryWatch, bystander, check_memory, read_to_eof
from tests.client import Running, request, start_sluice

SLOWHTTPTEST = shutil.which("slowhttptest") or "/usr/bin/slowhttptest"
PAUSE = 0.25  # seconds between bystander rounds on the mock clock, so that it can advance
HELD = 50  # slow connections the worker holds (of slowhttptest's 200) when the bystander is checked


async def _trickle(stream: trio.SocketStream, pieces: list[bytes], interval: float) -> None:
    """Send one piece every ``interval`` seconds until done or the server closes."""
    for piece in pieces:
        await trio.sleep(interval)
        try:
            await stream.send_all(piece)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def test_trickled_head_is_cut_at_header_timeout(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    s = await start_sluice(nursery, tmp_path, "memory", http={"header_timeout": 5})
    with trio.fail_after(60):
        async with bystander(s, pause=PAUSE) as by:
            watch = MemoryWatch()
            stream = await trio.open_tcp_stream("127.0.0.1", s.port)
            async with stream:
                start = trio.current_time()
                await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
                async with trio.open_nursery() as trickler:
                    # one header line a second, forever as far as the server cares
                    trickler.start_soon(_trickle, stream, [b"X-a%d: b\r\n" % i for i in range(100)], 1.0)
                    await by.fresh_round()
                    reply = await read_to_eof(stream)
                    elapsed = trio.current_time() - start
                    trickler.cancel_scope.cancel()
            assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
            assert 5.0 <= elapsed < 6.0, elapsed
        await no_connections(s)
    check_memory("trickled head (mock clock)", watch, by)


async def test_trickled_body_is_408_at_body_timeout(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    s = await start_sluice(nursery, tmp_path, "memory", http={"body_timeout": 3})
    with trio.fail_after(60):
        async with bystander(s, pause=PAUSE) as by:
            watch = MemoryWatch()
            stream = await trio.open_tcp_stream("127.0.0.1", s.port)
            async with stream:
                await stream.send_all(
                    b"POST /v1/streams/trickle HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: 1000\r\n\r\n"
                )
                start = trio.current_time()
                async with trio.open_nursery() as trickler:
                    # one byte every half second: 1000 bytes would take 500 s
                    trickler.start_soon(_trickle, stream, [b"x"] * 999, 0.5)
                    await by.fresh_round()
                    reply = await read_to_eof(stream)
                    elapsed = trio.current_time() - start
                    trickler.cancel_scope.cancel()
            assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
            assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"] == "timeout"
            assert 3.0 <= elapsed < 4.0, elapsed
        await no_connections(s)
        info = await request(s.port, "GET", "/v1/streams/trickle/info")
        assert info.status == 404 or info.json()["length"] == 0
    check_memory("trickled body (mock clock)", watch, by)


async def no_connections(s: Running) -> None:
    """Wait (the caller bounds it) until the worker holds no connection."""
    while s.worker.http.connections:
        await trio.sleep(0.1)


# -- slowhttptest -----------------------------------------------------------------------------


async def _run_slowhttptest(
    s: Running, tmp_path: Path, mode: str, url: str
) -> tuple[str, list[dict[str, str]], Bystander]:
    """Run slowhttptest in ``mode`` (-H or -B) while a bystander is served and this process's
    memory (the worker's) is watched; return its output, its per-second CSV rows (``Seconds,
    Closed, Pending, Connected, Service Available``) and what the bystander saw."""
    prefix = tmp_path / f"slow{mode.strip('-')}"
    argv = [
        SLOWHTTPTEST, mode, "-c", "200", "-r", "100", "-i", "1", "-l", "8", "-p", "3",
        "-x", "16", "-s", "8192", "-g", "-o", str(prefix), "-u", url,
    ]  # fmt: skip
    log = tmp_path / f"slow{mode.strip('-')}.out"
    async with bystander(s, pause=0.05) as by:
        watch = MemoryWatch()
        with log.open("wb") as out:
            async with trio.open_nursery() as nursery:
                proc: trio.Process = await nursery.start(
                    lambda task_status: trio.run_process(
                        argv, stdout=out, stderr=out, check=False, task_status=task_status
                    )
                )
                # while the worker holds the slow connections, a whole round is served
                while len(s.worker.http.connections) < HELD and proc.returncode is None:
                    await trio.sleep(0.01)
                assert proc.returncode is None, "slowhttptest ended before the worker held its connections"
                await by.fresh_round()
                held = len(s.worker.http.connections)
                await proc.wait()
    output = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", log.read_text(errors="replace"))
    assert proc.returncode == 0, output
    print(f"slowhttptest {mode}: the worker held {held} connections after a bystander round")
    check_memory(f"slowhttptest {mode}", watch, by)
    with Path(f"{prefix}.csv").open() as f:
        rows = list(csv.DictReader(f))
    return output, rows, by


def _column(rows: list[dict[str, str]], name: str) -> list[str]:
    key = next(k for k in rows[0] if k.strip().lower() == name)
    return [row[key].strip() for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "path"), [("-H", "/healthz"), ("-B", "/v1/streams/slowbody")], ids=["slowloris", "slow-body"]
)
async def test_slowhttptest(nursery: trio.Nursery, tmp_path: Path, mode: str, path: str) -> None:
    s = await start_sluice(nursery, tmp_path, "memory", http={"header_timeout": 2, "body_timeout": 2})
    with trio.fail_after(20):
        output, rows, by = await _run_slowhttptest(s, tmp_path, mode, f"http://127.0.0.1:{s.port}{path}")
        verdicts = re.findall(r"service available:\s*(\w+)", output)
        assert verdicts and set(verdicts) == {"YES"}, f"{by.summary()}\n{output[-2000:]}"
        assert "No open connections left" in output  # the server closed every slow connection
        available = _column(rows, "service available")
        closed = [int(v) for v in _column(rows, "closed")]
        assert rows and all(v != "0" for v in available), available  # the probe was answered every second
        assert max(closed) >= 150, closed  # the server cut the slow connections (2 s timeouts)
        while s.worker.http.connections:  # nothing left behind
            await trio.sleep(0.05)
