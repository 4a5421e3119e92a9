"""One load process: a share of the subscriptions, or the publisher, driven by the coordinator
over a pipe.

Coordinator -> process: ``("storm",)`` drop every connection and reconnect at once;
``("go",)`` start publishing;
``("finish", expected, timeout)`` wait (up to ``timeout`` s) until every track has all of its
stream's ``expected`` events, then report; ``("stop",)`` report now.
Process -> coordinator: ``("tick", snapshot)`` every second and one ``("result", result)``.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import trio

from loadtest import hist
from loadtest.clients import TRANSPORTS, sse_h1
from loadtest.clients.common import Conn, Endpoint, Load, Session, keep_connected
from loadtest.publisher import Publisher, Schedule
from loadtest.sysinfo import raise_nofile
from loadtest.track import Track, Verdict

TICK = 1.0
POLL = 0.05
GO_TIMEOUT = 900.0
GO_POLL = 0.01


@dataclass
class SubPlan:
    """The subscriptions one process holds."""

    endpoint: Endpoint
    transport: str
    conns: list[tuple[int, list[str], str]]  # (index, streams, source address)
    limits: dict[str, float] = field(default_factory=dict)
    ramp: float = 0.0  # new connections per second at the start; 0 = as fast as they go


@dataclass
class PubPlan:
    """The publisher's work."""

    endpoint: Endpoint
    schedule: Schedule
    source: str = "127.0.0.1"
    timeout: float = 30.0
    start_delay: float = 0.0


def _snapshot(load: Load) -> dict[str, Any]:
    lat = hist.encode(hist.from_ns(load.latencies)) if load.latencies else ""
    load.latencies = []
    resumes, load.resumes = load.resumes, []
    return {
        "connected": load.connected, "connects": load.connects, "failures": load.connect_failures,
        "disconnects": load.disconnects, "reconnects": load.reconnects, "events": load.events,
        "heartbeats": load.heartbeats, "latency": lat, "resumes": resumes, "resume_max": load.resume_max,
    }


async def _subscribers(pipe: Connection, plan: SubPlan) -> None:
    load = Load(plan.endpoint, limits=plan.limits)
    session: Session = TRANSPORTS[plan.transport]
    conns = [Conn(i, [Track(s) for s in streams], source) for i, streams, source in plan.conns]
    expected: dict[str, int] = {}
    finish_by: float | None = None

    def complete() -> bool:
        return all(t.ended or t.complete(expected.get(t.stream, 0)) for c in conns for t in c.tracks)

    async with trio.open_nursery() as nursery:
        if plan.transport == "sse-h1":  # every connection's event stream is read by one task
            reader: sse_h1.Reader = await nursery.start(sse_h1.serve_reader)
            session = reader.session
        async def start_all() -> None:
            for i, conn in enumerate(conns):
                nursery.start_soon(keep_connected, load, conn, session)
                if plan.ramp and i % 50 == 49:
                    await trio.sleep(50 / plan.ramp)
        nursery.start_soon(start_all)
        next_tick = trio.current_time() + TICK
        while True:
            await trio.sleep(POLL)
            while pipe.poll():
                msg = pipe.recv()
                if msg[0] == "storm":
                    for conn in conns:
                        if conn.scope is not None and conn.is_up:
                            conn.dropped = True
                            conn.scope.cancel()
                elif msg[0] == "finish":
                    expected = msg[1]
                    finish_by = trio.current_time() + msg[2]
                elif msg[0] == "stop":
                    finish_by = trio.current_time()
            now = trio.current_time()
            if now >= next_tick:
                pipe.send(("tick", _snapshot(load)))
                next_tick += TICK
                gc.collect(0)
            if finish_by is not None and (now >= finish_by or complete()):
                break
        load.stopping = True
        nursery.cancel_scope.cancel()
    verdict = Verdict()
    for conn in conns:
        for track in conn.tracks:
            verdict.add(track, expected.get(track.stream, 0))
    result = _snapshot(load)
    result.update(verdict=asdict(verdict), errors=load.errors, tracks=sum(len(c.tracks) for c in conns),
                  conns=len(conns))
    pipe.send(("result", result))


async def _publisher(pipe: Connection, plan: PubPlan) -> None:
    pub = Publisher(plan.endpoint, plan.schedule, source=plan.source, timeout=plan.timeout)
    for _ in range(int(GO_TIMEOUT / GO_POLL)):  # started early, so its start-up is not in the measured window
        if pipe.poll() and pipe.recv()[0] == "go":
            break
        await trio.sleep(GO_POLL)
    done = False
    async with trio.open_nursery() as nursery:
        async def publish() -> None:
            nonlocal done
            await pub.run(trio.current_time() + plan.start_delay)
            done = True
        nursery.start_soon(publish)
        next_tick = trio.current_time() + TICK
        while not done:
            await trio.sleep(POLL)
            if pipe.poll() and pipe.recv()[0] == "stop":
                break
            if trio.current_time() >= next_tick:
                pipe.send(("tick", _pub_snapshot(pub)))
                next_tick += TICK
        nursery.cancel_scope.cancel()
    result = _pub_snapshot(pub)
    result["published"] = pub.stats.published
    result["complete"] = done
    pipe.send(("result", result))


def _pub_snapshot(pub: Publisher) -> dict[str, Any]:
    st = pub.stats
    lat = hist.encode(hist.from_ns(st.latencies)) if st.latencies else ""
    st.latencies = []
    return {"sent": sum(st.published.values()), "requests": st.requests, "retries": st.retries,
            "failures": dict(st.failures), "lag_max": st.lag_max, "closed": st.closed, "request_latency": lat,
            "transport": pub.schedule.transport}


def main(pipe: Connection, plan: SubPlan | PubPlan) -> None:
    """Entry point of a load process (multiprocessing target)."""
    raise_nofile()
    gc.set_threshold(100_000, 50, 100)  # many long-lived small objects: keep the collector quiet
    started = time.monotonic()
    try:
        if isinstance(plan, SubPlan):
            trio.run(_subscribers, pipe, plan)
        else:
            trio.run(_publisher, pipe, plan)
    except BaseException as exc:
        pipe.send(("crash", f"{type(exc).__name__}: {exc} after {time.monotonic() - started:.1f}s"))
        raise
