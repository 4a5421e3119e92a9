"""Draining a whole worker: paced SSE ends with a fresh retry:, lossless resume on the worker that
takes over the same listening socket, /readyz, queued connections, in-flight requests."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import h11
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, open_websocket_url

from server.app import Worker, serve
from server.config import Config, load_config
from server.core.sse import SSEEvent, SSEParser
from server.process.drain import drain_worker
from tests.client import data_of, publish, start_sluice, wait_live
from tests.h2client import open_h2
from tests.http_helpers import read_response, read_until_eof


@dataclass
class Transcript:
    """Everything one SSE client saw until its response ended."""

    status: int = 0
    events: list[SSEEvent] = field(default_factory=list)
    parser: SSEParser = field(default_factory=SSEParser)
    clean_end: bool = False  # the chunked terminator arrived (h11 EndOfMessage)
    ended_at: float | None = None  # trio.current_time() when the end arrived


class SSEReader:
    """An SSE request over HTTP/1.1 read with h11 (which only reports the end of a chunked body
    when its terminator arrived) and the reference parser."""

    def __init__(self, sock: trio.SocketStream) -> None:
        self.sock = sock
        self.h = h11.Connection(h11.CLIENT)
        self.t = Transcript()

    async def _next(self) -> object:
        while True:
            event = self.h.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h.receive_data(await self.sock.receive_some(65536))

    async def start(self, port: int, path: str, headers: Mapping[str, str]) -> None:
        hdrs = [("host", f"127.0.0.1:{port}"), ("accept", "text/event-stream"), *headers.items()]
        await self.sock.send_all(self.h.send(h11.Request(method="GET", target=path, headers=hdrs)))
        await self.sock.send_all(self.h.send(h11.EndOfMessage()))
        head = await self._next()
        assert isinstance(head, h11.Response), head
        self.t.status = head.status_code

    async def read_and_close(self) -> None:
        """Read until the response ends, then close the connection."""
        await self.read()
        await self.sock.aclose()

    async def read(self, until_events: int | None = None) -> None:
        """Read until ``until_events`` events arrived, or (``None``) until the response ends."""
        t = self.t
        while until_events is None or len(t.events) < until_events:
            event = await self._next()
            if isinstance(event, h11.Data):
                t.events += t.parser.feed(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                t.clean_end = True
                t.ended_at = trio.current_time()
                return
            else:
                pytest.fail(f"unexpected {event!r}")


@asynccontextmanager
async def sse(port: int, path: str, headers: Mapping[str, str] | None = None) -> AsyncIterator[SSEReader]:
    """An open SSE request (its head received); the connection closes on exit."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as sock:
        reader = SSEReader(sock)
        await reader.start(port, path, headers or {})
        yield reader


def config_for(tmp_path: Path, backend: str, **sections: Mapping[str, object]) -> Config:
    """The configuration :func:`tests.client.start_sluice` would use."""
    overrides: dict[str, dict[str, object]] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "store": {"backend": backend, "path": str(tmp_path / "sluice.db")},
    }
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_config(overrides, environ={})


async def raw_socket(port: int) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await sock.connect(("127.0.0.1", port))
    return sock


def ids_of(events: list[SSEEvent]) -> list[str]:
    return [e.id for e in events if not e.event.startswith("sluice.")]


async def test_drain_spreads_sse_ends_over_the_window(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    n, window = 200, 10.0
    s = await start_sluice(nursery, tmp_path, "memory", drain={"window": window, "deadline": 30.0})
    with trio.fail_after(120):
        first = await publish(s.port, "paced", "before")
        readers: list[SSEReader] = []
        async with trio.open_nursery() as clients:
            for _ in range(n):
                reader = SSEReader(await trio.open_tcp_stream("127.0.0.1", s.port))
                await reader.start(s.port, "/v1/streams/paced?from=start", {})
                readers.append(reader)
            for reader in readers:
                await reader.read(until_events=1)
            await wait_live(s.ctx, "paced", n)
            started = trio.current_time()
            for reader in readers:
                clients.start_soon(reader.read_and_close)
            await drain_worker(s.worker, window=window, deadline=30.0)
            assert trio.current_time() - started <= window + 0.5  # all gone well before the deadline
    assert not s.worker.http.connections and s.worker.http.stats.drain_aborted == 0
    ends = []
    for reader in readers:
        t = reader.t
        assert t.status == 200 and t.clean_end and t.ended_at is not None
        assert [e.id for e in t.events] == [first]
        assert len(t.parser.retries) == 2  # the first bytes, and a fresh one right before the end
        assert t.parser.last_event_id == first
        ends.append(t.ended_at - started)
    assert min(ends) >= 0
    assert max(ends) <= window + 0.5
    tenths = [0] * 10
    for end in ends:
        tenths[min(int(end * 10 / window), 9)] += 1
    assert all(n // 20 <= count <= n // 5 for count in tenths), tenths


async def test_drain_is_lossless_and_the_queue_waits_for_the_next_worker(nursery: trio.Nursery, tmp_path: Path) -> None:
    drain = {"window": 0.3, "deadline": 10.0}
    a = await start_sluice(nursery, tmp_path, "sqlite", drain=drain)
    with trio.fail_after(30):
        sent = [await publish(a.port, "s", f"e{i}") for i in range(3)]
        # A keep-alive connection with a request head under way, and a publish whose body is
        # still coming, when the drain starts.
        ready = await raw_socket(a.port)
        await ready.send(b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n")
        buf = bytearray()
        assert (await read_response(ready, buf))[0] == 200
        await ready.send(b"GET /readyz HTTP/1.1\r\nHost: t\r\n")
        pub = await raw_socket(a.port)
        head = b"POST /v1/streams/s HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\n"
        await pub.send(head + b"in-")
        async with trio.open_nursery() as clients:
            readers = []
            for _ in range(5):
                reader = SSEReader(await trio.open_tcp_stream("127.0.0.1", a.port))
                await reader.start(a.port, "/v1/streams/s?from=start", {})
                await reader.read(until_events=3)
                readers.append(reader)
            await wait_live(a.ctx, "s", 5)
            await trio.testing.wait_all_tasks_blocked()
            drained = trio.Event()

            async def run_drain() -> None:
                await drain_worker(a.worker, window=drain["window"], deadline=drain["deadline"])
                drained.set()

            nursery.start_soon(run_drain)
            await trio.testing.wait_all_tasks_blocked()
            assert a.ctx.draining and not a.worker.http.accepting
            # A client connecting now waits in the listen queue (A accepts no more).
            queued = await raw_socket(a.port)
            await queued.send(b"POST /v1/streams/s HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\nqueued")
            # The started request is answered, by a draining worker; the connection ends in its turn.
            await ready.send(b"\r\n")
            status, _, body = await read_response(ready, buf)
            assert (status, json.loads(body)) == (503, {"status": "draining"})
            assert await read_until_eof(ready) == b""
            ready.close()
            # The publish in flight completes.
            await pub.send(b"flight")
            status, _, body = await read_response(pub, bytearray())
            assert status == 201
            sent.append(json.loads(body)["id"])
            pub.close()
            for reader in readers:
                clients.start_soon(reader.read_and_close)
        for reader in readers:
            t = reader.t
            assert t.clean_end and len(t.parser.retries) == 2
        await drained.wait()
        assert not a.worker.http.connections
        # The replacement worker takes over the same listening socket and the same database.
        b: Worker = await nursery.start(
            partial(serve, config_for(tmp_path, "sqlite", drain=drain), listeners=a.worker.listeners)
        )
        status, _, body = await read_response(queued, bytearray())
        assert status == 201, body  # accepted from the queue, not reset
        sent.append(json.loads(body)["id"])
        port = b.listeners[0].getsockname()[1]
        assert port == a.port
        sent += [await publish(port, "s", f"after{i}") for i in range(2)]
        for reader in readers:
            last = reader.t.parser.last_event_id
            have = ids_of(reader.t.events)
            assert last == have[-1] and have == sent[: len(have)]
            async with sse(port, "/v1/streams/s", {"last-event-id": last}) as again:
                await again.read(until_events=len(sent) - len(have))
                assert ids_of(again.t.events) == sent[len(have) :]  # nothing lost, nothing twice
        queued.close()


async def test_sse_without_events_yet_resumes_exactly(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    s = await start_sluice(nursery, tmp_path, "memory")
    with trio.fail_after(30):
        await publish(s.port, "quiet", "old")
        async with sse(s.port, "/v1/streams/quiet?from=now") as reader:
            await wait_live(s.ctx, "quiet")
            s.worker.http.request_close_all()
            await reader.read()
        t = reader.t
        assert t.clean_end and not t.events
        missed = await publish(s.port, "quiet", "while away")
        # the end carried the position as an id: the reconnect resumes right after "old"
        async with sse(s.port, "/v1/streams/quiet", {"last-event-id": t.parser.last_event_id}) as again:
            await again.read(until_events=1)
        assert [(e.id, e.data) for e in again.t.events] == [(missed, "while away")]


async def test_longpoll_answers_at_once(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    s = await start_sluice(nursery, tmp_path, "memory")
    with trio.fail_after(30):
        last = await publish(s.port, "lp", "one")
        sock = await raw_socket(s.port)
        await sock.send(f"GET /v1/streams/lp/poll?last_event_id={last}&timeout=25 HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        await wait_live(s.ctx, "lp")
        started = trio.current_time()
        async with trio.open_nursery() as inner:
            inner.start_soon(partial(drain_worker, s.worker, window=0.0, deadline=5.0))
            status, _, body = await read_response(sock, bytearray())
            assert trio.current_time() - started < 0.1
        assert status == 200
        assert json.loads(body) == {"events": [], "next": last, "reset": None, "end": False}
        sock.close()


async def test_running_connections_rotate_at_their_age(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    s = await start_sluice(nursery, tmp_path, "memory", http={"max_connection_age": 60.0})
    with trio.fail_after(300):
        first = await publish(s.port, "rot", "e1")
        async with sse(s.port, "/v1/streams/rot?from=start") as reader:
            opened = trio.current_time()
            await reader.read()
        t = reader.t
        assert t.ended_at is not None and 54.0 <= t.ended_at - opened <= 66.0
        assert t.clean_end and len(t.parser.retries) == 2
        assert data_of(t.events) == ["e1"] and t.parser.last_event_id == first
        assert s.worker.http.stats.connections_rotated >= 1
        missed = await publish(s.port, "rot", "e2")
        async with sse(s.port, "/v1/streams/rot", {"last-event-id": first}) as again:
            await again.read(until_events=1)
        assert [e.id for e in again.t.events] == [missed]


async def test_websocket_gets_1012_and_its_subscriptions_end(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    s = await start_sluice(nursery, tmp_path, "memory")
    with trio.fail_after(30):
        async with open_websocket_url(f"ws://127.0.0.1:{s.port}/v1/ws", subprotocols=["sluice.json.v1"]) as ws:
            for name in ("w1", "w2"):
                await ws.send_message(json.dumps({"op": "subscribe", "stream": name}))
                await wait_live(s.ctx, name)
            async with trio.open_nursery() as inner:
                inner.start_soon(partial(drain_worker, s.worker, window=1.0, deadline=5.0))
                with pytest.raises(ConnectionClosed) as info:
                    while True:  # past the subscriptions' subscribed and live markers
                        await ws.get_message()
                assert info.value.reason is not None and info.value.reason.code == 1012
        assert s.ctx.hub.watcher_count("w1") == s.ctx.hub.watcher_count("w2") == 0
        assert not s.worker.http.connections and s.worker.http.stats.drain_aborted == 0


async def test_http2_sse_streams_end_with_retry_then_goaway(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    s = await start_sluice(nursery, tmp_path, "memory")
    with trio.fail_after(30):
        first = await publish(s.port, "h2d", "one")
        c = await open_h2(s.port)
        sids = [await c.get("/v1/streams/h2d?from=start") for _ in range(2)]
        await c.until(lambda: all(len(c.streams[sid].events) == 1 for sid in sids))
        await wait_live(s.ctx, "h2d", 2)
        async with trio.open_nursery() as inner:
            inner.start_soon(partial(drain_worker, s.worker, window=1.0, deadline=5.0))
            await c.until(lambda: c.goaway is not None)
            await c.sock.aclose()
        assert c.goaway is not None and c.goaway.error_code == 0
        for sid in sids:
            st = c.streams[sid]
            assert st.ended and st.reset is None
            assert [e.id for e in st.events] == [first] and len(st.parser.retries) == 2


async def test_drain_ends_as_soon_as_every_client_has_gone(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Pacing is for connections still open: a drain whose clients all left returns at once."""
    s = await start_sluice(nursery, tmp_path, "memory")
    with trio.fail_after(60):
        socks = []
        for _ in range(20):
            sock = await raw_socket(s.port)
            await sock.send(b"GET /v1/streams/gone HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n")
            socks.append(sock)
        await wait_live(s.ctx, "gone", 20)
        started = trio.current_time()
        async with trio.open_nursery() as inner:
            inner.start_soon(partial(drain_worker, s.worker, window=10.0, deadline=30.0))
            await trio.sleep(0.3)
            for sock in socks:
                sock.close()
        assert trio.current_time() - started < 2.0  # not the 10 s window
        assert s.worker.http.stats.drain_aborted == 0
