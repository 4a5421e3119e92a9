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

from tests.client import request
from tests.resilient import (
    NET_ERRORS,
    Goal,
    Probe,
    Transcript,
    longpoll_client,
    sse_h1_client,
    sse_h2_client,
    ws_client,
)
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
        key = f"pub-{i}"
        for _attempt in range(50):
            try:
                r = await request(
                    port,
                    "POST",
                    f"/v1/streams/{stream}",
                    f"event {i}".encode(),
                    {"content-type": "text/plain", "idempotency-key": key},
                )
            except (*NET_ERRORS, trio.TooSlowError, AssertionError):  # the killed worker cut it
                await trio.sleep(0.05)
                continue
            if r.status == 201:
                published[stream].append(r.json()["id"])
                break
            await trio.sleep(0.05)
        else:
            raise AssertionError(f"publish {i} never succeeded")
        await trio.sleep(interval)


async def test_rolling_restarts_and_a_worker_kill_lose_nothing(tmp_path: Path) -> None:
    published: dict[str, list[str]] = {s: [] for s in STREAMS}
    transcripts: list[Transcript] = []
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

            def client(kind: str, fn, stream_arg, *fn_args) -> None:  # type: ignore[no-untyped-def]
                streams = stream_arg if isinstance(stream_arg, list) else [stream_arg]
                t = Transcript(f"{kind}-{len(transcripts)}", streams)
                transcripts.append(t)
                nursery.start_soon(fn, port, stream_arg, *fn_args, goal, t)

            async with trio.open_nursery() as nursery:
                for i in range(120):
                    client("sse-h1", sse_h1_client, STREAMS[i % 3])
                for _ in range(20):
                    client("sse-h2", sse_h2_client, STREAMS)
                for i in range(40):
                    client("ws", ws_client, STREAMS, "json" if i % 2 else "msgpack")
                for i in range(30):
                    client("poll", longpoll_client, STREAMS[i % 3])
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
                goal.want = {s: len(ids) for s, ids in published.items()}
                goal.done_publishing.set()
                stop_probe.set()
                with trio.move_on_after(30):  # clients finish by themselves once complete
                    while not all(goal.reached(t) for t in transcripts):
                        await trio.sleep(0.1)
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
    for t in transcripts:
        assert t.resets == [], (t.name, t.resets)
        for stream, ids in t.got.items():
            assert ids == published[stream], (t.name, stream, len(ids), len(published[stream]))
        assert set(t.got) == set(t.streams) and t.complete(goal.want), t.name
    assert reconnects >= len(transcripts)  # every client was moved at least once
