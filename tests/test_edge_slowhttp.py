"""Slow clients: headers trickled (slowloris) and bodies trickled (R-U-Dead-Yet).

The first tests trickle by hand on a mock clock (``autojump_clock``): ``header_timeout`` and
``body_timeout`` are deadlines for the whole head and the whole body, so sending a little now
and then never extends them. The ``slow`` tests run the real ``slowhttptest`` against a worker
with 2-second timeouts, for a few seconds of wall time each, while a bystander is served, and
check afterwards that the worker holds no connection any more.
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

from server.http.base import HttpLimits
from tests.client import Running, open_sse, publish, request, start_sluice, wait_live
from tests.http_helpers import connect, read_until_eof, running_server

SLOWHTTPTEST = shutil.which("slowhttptest") or "/usr/bin/slowhttptest"


async def test_trickled_head_is_cut_at_header_timeout(autojump_clock: trio.testing.MockClock) -> None:
    limits = HttpLimits(header_timeout=5.0)
    with trio.fail_after(60):
        async with running_server(limits=limits) as (server, port, _app):
            sock = await connect(port)
            start = trio.current_time()
            await sock.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n")

            async def trickle() -> None:
                for i in range(100):  # one header line a second, forever as far as the server cares
                    await trio.sleep(1)
                    try:
                        await sock.send(b"X-a%d: b\r\n" % i)
                    except OSError:
                        return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                reply = await read_until_eof(sock)
                nursery.cancel_scope.cancel()
            assert reply.startswith(b"HTTP/1.1 408 ")
            assert 5.0 <= trio.current_time() - start < 6.0
            while server.connections:
                await trio.sleep(0.1)


async def test_trickled_body_is_408_at_body_timeout(autojump_clock: trio.testing.MockClock) -> None:
    limits = HttpLimits(body_timeout=3.0)
    with trio.fail_after(60):
        async with running_server(limits=limits) as (server, port, _app):
            sock = await connect(port)
            await sock.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
            start = trio.current_time()

            async def trickle() -> None:
                for _ in range(999):  # one byte every half second: 1000 bytes would take 500 s
                    await trio.sleep(0.5)
                    try:
                        await sock.send(b"x")
                    except OSError:
                        return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                reply = await read_until_eof(sock)
                nursery.cancel_scope.cancel()
            assert reply.startswith(b"HTTP/1.1 408 ")
            assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"] == "timeout"
            assert 3.0 <= trio.current_time() - start < 4.0
            while server.connections:
                await trio.sleep(0.1)


# -- slowhttptest -----------------------------------------------------------------------------


async def _run_slowhttptest(s: Running, tmp_path: Path, mode: str, url: str) -> tuple[str, list[dict[str, str]]]:
    """Run slowhttptest in ``mode`` (-H or -B) while a bystander is served; return its output and
    its per-second CSV rows (``Seconds, Closed, Pending, Connected, Service Available``)."""
    prefix = tmp_path / f"slow{mode.strip('-')}"
    argv = [
        SLOWHTTPTEST, mode, "-c", "200", "-r", "100", "-i", "1", "-l", "8", "-p", "3",
        "-x", "16", "-s", "8192", "-g", "-o", str(prefix), "-u", url,
    ]  # fmt: skip
    served = 0
    log = tmp_path / f"slow{mode.strip('-')}.out"
    async with open_sse(s.port, "/v1/streams/bystander") as sse:
        await wait_live(s.ctx, "bystander")
        with log.open("wb") as out:
            async with trio.open_nursery() as nursery:
                proc: trio.Process = await nursery.start(
                    lambda task_status: trio.run_process(
                        argv, stdout=out, stderr=out, check=False, task_status=task_status
                    )
                )
                while proc.returncode is None:  # the bystander, once in a while, while the attack runs
                    with trio.fail_after(5):
                        eid = await publish(s.port, "bystander", f"still here {served}")
                        ev = await sse.next()
                        assert ev.id == eid
                        assert (await request(s.port, "GET", "/healthz")).status == 200
                    served += 1
                    with trio.move_on_after(0.5):
                        await proc.wait()
    output = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", log.read_text(errors="replace"))
    assert proc.returncode == 0, output
    assert served >= 3, served
    with Path(f"{prefix}.csv").open() as f:
        rows = list(csv.DictReader(f))
    return output, rows


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
        output, rows = await _run_slowhttptest(s, tmp_path, mode, f"http://127.0.0.1:{s.port}{path}")
        verdicts = re.findall(r"service available:\s*(\w+)", output)
        assert verdicts and set(verdicts) == {"YES"}, output[-2000:]
        assert "No open connections left" in output  # the server closed every slow connection
        available = _column(rows, "service available")
        closed = [int(v) for v in _column(rows, "closed")]
        assert rows and all(v != "0" for v in available), available  # the probe was answered every second
        assert max(closed) >= 150, closed  # the server cut the slow connections (2 s timeouts)
        while s.worker.http.connections:  # nothing left behind
            await trio.sleep(0.05)
