"""Clients that behave like real ones across deploys: on any disconnect they reconnect and resume
from the last id they saw, recording every event's id per stream (the transcript).

Each client runs until its ``stop`` event is set and it has seen ``want`` events on every stream.
Disconnects are counted, never fatal; a ``sluice.reset`` is recorded (the tests expect none).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field

import h11
import msgpack
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from server.core.sse import SSEParser
from tests.client import request
from tests.h2client import open_h2

NET_ERRORS = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    EOFError,
    h11.ProtocolError,
    ConnectionClosed,
    HandshakeError,
)


@dataclass
class Transcript:
    """What one client saw."""

    name: str
    streams: list[str]
    got: dict[str, list[str]] = field(default_factory=dict)
    resets: list[object] = field(default_factory=list)
    reconnects: int = 0
    errors: list[str] = field(default_factory=list)

    def last(self, stream: str) -> str | None:
        ids = self.got.get(stream)
        return ids[-1] if ids else None

    def add(self, stream: str, eid: str) -> None:
        self.got.setdefault(stream, []).append(eid)

    def complete(self, want: dict[str, int]) -> bool:
        """Whether every stream of this client has at least ``want[stream]`` events."""
        return all(len(self.got.get(s, [])) >= want.get(s, 0) for s in self.streams)


@dataclass
class Goal:
    """Shared among clients: when to stop."""

    streams: list[str]
    want: dict[str, int] = field(default_factory=dict)  # filled once publishing is over
    done_publishing: trio.Event = field(default_factory=trio.Event)

    def reached(self, t: Transcript) -> bool:
        return self.done_publishing.is_set() and t.complete(self.want)


async def _backoff() -> None:
    await trio.sleep(0.05 + random.random() * 0.2)


async def sse_h1_client(port: int, stream: str, goal: Goal, t: Transcript) -> None:
    """One SSE subscription over HTTP/1.1, reconnecting with Last-Event-ID."""
    while not goal.reached(t):
        try:
            sock = await trio.open_tcp_stream("127.0.0.1", port)
            async with sock:
                conn = h11.Connection(h11.CLIENT)
                headers = [("host", "x"), ("accept", "text/event-stream")]
                last = t.last(stream)
                if last:
                    headers.append(("last-event-id", last))
                target = f"/v1/streams/{stream}" + ("" if last else "?from=start")
                await sock.send_all(conn.send(h11.Request(method="GET", target=target, headers=headers)))
                await sock.send_all(conn.send(h11.EndOfMessage()))
                parser = SSEParser()
                while not goal.reached(t):
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        with trio.move_on_after(0.5):
                            data = await sock.receive_some(65536)
                            conn.receive_data(data)
                            if not data:
                                break
                        continue
                    if isinstance(event, h11.Response):
                        assert event.status_code == 200, event
                    elif isinstance(event, h11.Data):
                        for ev in parser.feed(bytes(event.data)):
                            if ev.event == "sluice.reset":
                                t.resets.append(ev.data)
                            elif not ev.event.startswith("sluice."):
                                t.add(stream, ev.id)
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        break
        except NET_ERRORS as exc:
            t.errors.append(type(exc).__name__)
        if not goal.reached(t):
            t.reconnects += 1
            await _backoff()


async def sse_h2_client(port: int, streams: list[str], goal: Goal, t: Transcript) -> None:
    """Several SSE subscriptions multiplexed on one HTTP/2 connection, reconnecting as a whole."""
    while not goal.reached(t):
        try:
            c = await open_h2(port)
            async with c.sock:
                sids: dict[int, str] = {}
                for s in streams:
                    last = t.last(s)
                    sid = await c.get(
                        f"/v1/streams/{s}" + ("" if last else "?from=start"), {"last-event-id": last} if last else None
                    )
                    sids[sid] = s
                seen = {sid: 0 for sid in sids}
                while not goal.reached(t) and not c.closed and c.goaway is None:
                    with trio.move_on_after(0.5):
                        await c.pump()
                    for sid, s in sids.items():
                        st = c.streams[sid]
                        for ev in st.events[seen[sid] :]:
                            if ev.event == "sluice.reset":
                                t.resets.append(ev.data)
                            elif not ev.event.startswith("sluice."):
                                t.add(s, ev.id)
                        seen[sid] = len(st.events)
                    if any(c.streams[sid].ended or c.streams[sid].reset is not None for sid in sids):
                        break  # a drained stream: reconnect everything (simplest correct client)
        except NET_ERRORS as exc:
            t.errors.append(type(exc).__name__)
        if not goal.reached(t):
            t.reconnects += 1
            await _backoff()


async def ws_client(port: int, streams: list[str], fmt: str, goal: Goal, t: Transcript) -> None:
    """A WebSocket subscribed to several streams, resubscribing after a reconnect."""
    proto = f"sluice.{fmt}.v1"
    while not goal.reached(t):
        try:
            async with open_websocket_url(f"ws://127.0.0.1:{port}/v1/ws", subprotocols=[proto]) as ws:
                for s in streams:
                    last = t.last(s)
                    msg = {"op": "subscribe", "stream": s, **({"last_event_id": last} if last else {"from": "start"})}
                    await ws.send_message(json.dumps(msg) if fmt == "json" else msgpack.packb(msg))
                while not goal.reached(t):
                    with trio.move_on_after(0.5):
                        raw = await ws.get_message()
                        m = json.loads(raw) if fmt == "json" else msgpack.unpackb(raw, raw=False)
                        if m["op"] == "event":
                            t.add(m["stream"], m["id"])
                        elif m["op"] == "reset":
                            t.resets.append(m)
                        elif m["op"] == "error":
                            t.errors.append(m["code"])
        except NET_ERRORS as exc:
            t.errors.append(type(exc).__name__)
        if not goal.reached(t):
            t.reconnects += 1
            await _backoff()


async def longpoll_client(port: int, stream: str, goal: Goal, t: Transcript) -> None:
    """Long-poll in a loop, passing back ``next``; new connection per poll, as browsers often do."""
    nxt: str | None = None
    while not goal.reached(t):
        query = f"last_event_id={nxt}" if nxt else "from=start"
        try:
            with trio.fail_after(10):
                sock = await trio.open_tcp_stream("127.0.0.1", port)
                async with sock:
                    conn = h11.Connection(h11.CLIENT)
                    target = f"/v1/streams/{stream}/poll?{query}&timeout=1"
                    await sock.send_all(
                        conn.send(
                            h11.Request(method="GET", target=target, headers=[("host", "x"), ("connection", "close")])
                        )
                    )
                    await sock.send_all(conn.send(h11.EndOfMessage()))
                    body = bytearray()
                    status = 0
                    while True:
                        event = conn.next_event()
                        if event is h11.NEED_DATA:
                            conn.receive_data(await sock.receive_some(65536))
                        elif isinstance(event, h11.Response):
                            status = event.status_code
                        elif isinstance(event, h11.Data):
                            body += event.data
                        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                            break
            if status != 200:
                t.errors.append(f"status {status}")
                t.reconnects += 1
                await _backoff()
                continue
            r = json.loads(body)
            if r["reset"] is not None:
                t.resets.append(r["reset"])
            for ev in r["events"]:
                t.add(stream, ev["id"])
            nxt = r["next"] or nxt
        except (*NET_ERRORS, trio.TooSlowError) as exc:
            t.errors.append(type(exc).__name__)
            t.reconnects += 1
            await _backoff()


class Probe:
    """Opens a new connection for every /healthz, all along; can be held still around a kill."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.failures: list[tuple[float, str]] = []  # (when, what) of each exchange that failed
        self.open = trio.Event()
        self.open.set()
        self.in_flight = 0

    async def run(self, port: int, stop: trio.Event) -> None:
        while not stop.is_set():
            await self.open.wait()
            self.in_flight += 1
            try:
                r = await request(port, "GET", "/healthz")
                self.outcomes["ok" if r.status == 200 else f"status {r.status}"] += 1
            except Exception as exc:
                self.outcomes[type(exc).__name__] += 1
                self.failures.append((trio.current_time(), repr(exc)))
            finally:
                self.in_flight -= 1
            await trio.sleep(0.005)

    async def hold(self) -> None:
        """Stop starting exchanges and wait until none is in flight."""
        self.open = trio.Event()
        while self.in_flight:
            await trio.sleep(0.001)

    def release(self) -> None:
        self.open.set()


def start_clients(
    nursery: trio.Nursery, port: int, goal: Goal, *, sse_h1: int, sse_h2: int, ws: int, poll: int
) -> list[Transcript]:
    """Start that many clients of each kind on ``port`` in ``nursery``, over ``goal.streams``:
    an SSE/HTTP1 or long-poll client on one stream each (round robin), an SSE/HTTP2 connection or a
    WebSocket (JSON and msgpack in turn) on all of them; their transcripts, filled as they run."""
    streams = goal.streams
    transcripts: list[Transcript] = []

    def client(kind: str, fn, stream_arg, *fn_args) -> None:  # type: ignore[no-untyped-def]
        t = Transcript(f"{kind}-{len(transcripts)}", stream_arg if isinstance(stream_arg, list) else [stream_arg])
        transcripts.append(t)
        nursery.start_soon(fn, port, stream_arg, *fn_args, goal, t)

    for i in range(sse_h1):
        client("sse-h1", sse_h1_client, streams[i % len(streams)])
    for _ in range(sse_h2):
        client("sse-h2", sse_h2_client, streams)
    for i in range(ws):
        client("ws", ws_client, streams, "json" if i % 2 else "msgpack")
    for i in range(poll):
        client("poll", longpoll_client, streams[i % len(streams)])
    return transcripts


async def publish_acknowledged(port: int, stream: str, i: int, attempts: int = 100) -> str:
    """Publish ``event i`` to ``stream`` until it is acknowledged (``201``), retrying a cut or
    refused attempt with the same Idempotency-Key; its id."""
    for _attempt in range(attempts):
        try:
            r = await request(
                port,
                "POST",
                f"/v1/streams/{stream}",
                f"event {i}".encode(),
                {"content-type": "text/plain", "idempotency-key": f"pub-{i}"},
            )
        except (*NET_ERRORS, trio.TooSlowError, AssertionError):  # a killed worker or host cut it
            await trio.sleep(0.05)
            continue
        if r.status == 201:
            return str(r.json()["id"])
        await trio.sleep(0.05)
    raise AssertionError(f"publish {i} never succeeded")


async def finish(goal: Goal, transcripts: list[Transcript], published: dict[str, list[str]]) -> None:
    """Publishing is over: tell the clients what to expect, and wait (up to 30 s) until they all
    have it; they stop by themselves once complete."""
    goal.want = {s: len(ids) for s, ids in published.items()}
    goal.done_publishing.set()
    with trio.move_on_after(30):
        while not all(goal.reached(t) for t in transcripts):
            await trio.sleep(0.1)


def assert_exact(transcripts: list[Transcript], published: dict[str, list[str]], goal: Goal) -> None:
    """Every transcript holds exactly its streams' published ids, in order, with no reset."""
    for t in transcripts:
        assert t.resets == [], (t.name, t.resets)
        for stream, ids in t.got.items():
            assert ids == published[stream], (t.name, stream, len(ids), len(published[stream]))
        assert set(t.got) == set(t.streams) and t.complete(goal.want), t.name
