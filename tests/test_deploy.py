"""A deploy costs no client a single event: 3 workers, ~330 subscribers on every transport, a
steady publisher, two rolling restarts (SIGHUP) and a ``kill -9`` of a worker in the middle.

Every subscriber's transcript must equal the published sequence of its stream exactly (nothing
lost, nothing repeated, in order), with no ``sluice.reset``; a probe opening new connections all
along sees no refusal and no reset.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import pytest
import trio

from tests.resilient import Goal, Probe, assert_exact, finish, publish_acknowledged, start_clients
from tests.supervised import STOP_WITHIN, supervisor

pytestmark = pytest.mark.slow

STREAMS = ["deploy:a", "deploy:b", "deploy:c"]
EVENTS_PER_STREAM = 150
RATE = 60.0  # publishes per second, over all streams


async def publisher(port: int, published: dict[str, list[str]]) -> None:
    """Publish round-robin at RATE; retry a failed publish with the same Idempotency-Key."""
    interval = 1.0 / RATE
    for i in range(EVENTS_PER_STREAM * len(STREAMS)):
        stream = STREAMS[i % len(STREAMS)]
        published[stream].append(await publish_acknowledged(port, stream, i, attempts=50))
        await trio.sleep(interval)


async def test_rolling_restarts_and_a_worker_kill_lose_nothing(tmp_path: Path) -> None:
    published: dict[str, list[str]] = {s: [] for s in STREAMS}
    goal = Goal(STREAMS)
    probe = Probe()
    stop_probe = trio.Event()
    args = [
        "--workers",
        "3",
        "--set",
        "drain.window=1.0",
        "--set",
        "drain.deadline=6",
        "--set",
        "sse.retry_ms=100",
        "--set",
        "sse.retry_jitter_ms=300",
    ]
    with trio.fail_after(120):
        async with supervisor(tmp_path, *args) as sup:
            await sup.ready()
            port = sup.port

            async with trio.open_nursery() as nursery:
                transcripts = start_clients(nursery, port, goal, sse_h1=120, sse_h2=20, ws=40, poll=30)
                for _ in range(2):
                    nursery.start_soon(probe.run, port, stop_probe)

                async with trio.open_nursery() as ops:
                    ops.start_soon(publisher, port, published)
                    await trio.sleep(1.5)
                    print(f"reload 1 at {trio.current_time():.1f}")
                    os.kill(sup.proc.pid, signal.SIGHUP)
                    reloading = await sup.notes.wait("RELOADING=1")
                    done = await sup.ready(reloading)
                    before = len(sup.started())
                    await probe.hold()
                    victim = sup.started()[-1]
                    print(f"kill at {trio.current_time():.1f}")
                    os.kill(victim, signal.SIGKILL)
                    probe.release()
                    while len(sup.started()) == before:  # the slot's replacement
                        await trio.sleep(0.05)
                    print(f"reload 2 at {trio.current_time():.1f}")
                    os.kill(sup.proc.pid, signal.SIGHUP)
                    again = await sup.notes.wait("RELOADING=1", done)
                    await sup.ready(again)
                print(f"published {sum(map(len, published.values()))} at {trio.current_time():.1f}")
                stop_probe.set()
                await finish(goal, transcripts, published)
                nursery.cancel_scope.cancel()

            os.kill(sup.proc.pid, signal.SIGTERM)
            assert await sup.exit_code(STOP_WITHIN) == 0

    assert len(sup.started()) >= 3 + 3 + 1 + 3
    assert probe.outcomes["ok"] > 100 and set(probe.outcomes) == {"ok"}, probe.outcomes
    kinds = Counter(
        t.name.split("-")[0] + "-" + t.name.split("-")[1] if t.name.startswith("sse") else t.name.split("-")[0]
        for t in transcripts
    )
    reconnects = sum(t.reconnects for t in transcripts)
    print(f"subscribers {dict(kinds)}; reconnects {reconnects}; probe {dict(probe.outcomes)}")
    assert_exact(transcripts, published, goal)
    assert reconnects >= len(transcripts)  # every client was moved at least once
