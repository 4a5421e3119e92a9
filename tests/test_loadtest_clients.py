"""The load-test transports against an in-process Sluice: complete, exactly-once, in-order delivery
with latencies, end of stream, resume after an id, resets, and reconnection after the server
closes the connection. SSE over HTTP/1.1 reads through a shared reader, as in a load process."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import trio

from loadtest import payload
from loadtest.clients import longpoll, sse_h1, sse_h2, ws
from loadtest.clients.common import Conn, Endpoint, Load, Session, keep_connected
from loadtest.track import Track
from tests.client import Running, publish, request, start_sluice

# name -> (session, tracks per connection); "sse-h1" runs through the test's shared reader,
# "sse-h1-alone" is the same session reading its own socket (no reader)
TRANSPORTS: dict[str, tuple[Session, int]] = {
    "sse-h1": (sse_h1.session, 1),
    "sse-h1-alone": (sse_h1.session, 1),
    "sse-h2": (sse_h2.session, 2),
    "ws-json": (ws.session_json, 2),
    "ws-msgpack": (ws.session_msgpack, 2),
    "longpoll": (longpoll.session, 1),
}
FAST_RETRY = {"retry_ms": 20, "retry_jitter_ms": 0}
LIMITS = {"reconnect_jitter": 0.1, "timeout": 5.0}
SOURCE = "127.0.0.2"  # any loopback address: open_socket binds it


async def publish_seq(port: int, stream: str, seqs: Iterable[int]) -> list[str]:
    """Publish harness events numbered ``seqs``; their ids."""
    return [await publish(port, stream, payload.encode(seq, time.monotonic_ns())) for seq in seqs]


async def close_stream(port: int, stream: str) -> None:
    assert (await request(port, "POST", f"/v1/streams/{stream}/close")).status == 204


@pytest.fixture
async def sse_reader(nursery: trio.Nursery) -> sse_h1.Reader:
    """A shared SSE-over-HTTP/1.1 reader in the test's nursery."""
    reader: sse_h1.Reader = await nursery.start(sse_h1.serve_reader)
    return reader


async def wait_for(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await trio.sleep(0.01)


class Client:
    """One connection's tracks, driven by ``keep_connected`` in the test's nursery."""

    def __init__(
        self, s: Running, name: str, reader: sse_h1.Reader | None = None, *, tracks: int | None = None
    ) -> None:
        self.session, per_conn = TRANSPORTS[name]
        if name == "sse-h1":
            assert reader is not None, "sse-h1 reads through a shared reader"
            self.session = reader.session
        self.streams = [f"lt:{name}:{i}" for i in range(tracks or per_conn)]
        self.tracks = [Track(stream) for stream in self.streams]
        self.load = Load(Endpoint("127.0.0.1", s.port), limits=LIMITS)
        self.conn = Conn(0, self.tracks, SOURCE)
        self.returned = trio.Event()

    async def run(self) -> None:
        await keep_connected(self.load, self.conn, self.session)
        self.returned.set()

    def complete(self, n: int) -> bool:
        return all(t.complete(n) for t in self.tracks)

    def assert_clean(self, n: int) -> None:
        for t in self.tracks:
            assert (t.received, t.lost(n), t.dups, t.disorder, t.foreign) == (n, 0, 0, 0, 0), t.stream
        assert self.load.events == n * len(self.tracks)
        assert len(self.load.latencies) == self.load.events
        assert all(0 < lat < 10**10 for lat in self.load.latencies)
        assert not self.load.errors, self.load.errors


@pytest.mark.parametrize("name", list(TRANSPORTS))
async def test_delivers_everything_then_ends(
    name: str, nursery: trio.Nursery, tmp_path: Path, sse_reader: sse_h1.Reader
) -> None:
    s = await start_sluice(nursery, tmp_path, "memory", sse=FAST_RETRY)
    with trio.fail_after(20):
        c = Client(s, name, sse_reader)
        for stream in c.streams:
            await publish_seq(s.port, stream, range(5))
        async with trio.open_nursery() as inner:
            inner.start_soon(c.run)
            await wait_for(lambda: c.complete(5))  # history
            assert c.load.connected == 1 and c.conn.is_up
            for stream in c.streams:
                await publish_seq(s.port, stream, range(5, 8))
            await wait_for(lambda: c.complete(8))  # live
            for stream in c.streams:
                await close_stream(s.port, stream)
            await c.returned.wait()  # every track ended: keep_connected returns by itself
        assert all(t.ended for t in c.tracks)
        c.assert_clean(8)
        assert c.load.connects == 1 and c.load.reconnects == 0 and c.load.connect_failures == 0
        assert c.load.connected == 0 and not c.conn.is_up


@pytest.mark.parametrize("name", list(TRANSPORTS))
async def test_resumes_after_last_id(
    name: str, nursery: trio.Nursery, tmp_path: Path, sse_reader: sse_h1.Reader
) -> None:
    s = await start_sluice(nursery, tmp_path, "memory", sse=FAST_RETRY)
    with trio.fail_after(20):
        c = Client(s, name, sse_reader)
        for stream, track in zip(c.streams, c.tracks, strict=True):
            ids = await publish_seq(s.port, stream, range(6))
            track.last_id = ids[2]
            await close_stream(s.port, stream)
        async with trio.open_nursery() as inner:
            inner.start_soon(c.run)
            await c.returned.wait()
        for track in c.tracks:
            assert track.ended and track.resets == 0
            assert not any(track.seen[:3])  # nothing at or before the id resumed after
            assert (track.received, track.lost(6), track.dups, track.disorder) == (3, 3, 0, 0)
        assert not c.load.errors


@pytest.mark.parametrize("name", list(TRANSPORTS))
async def test_stale_id_is_reset_then_everything(
    name: str, nursery: trio.Nursery, tmp_path: Path, sse_reader: sse_h1.Reader
) -> None:
    s = await start_sluice(nursery, tmp_path, "memory", sse=FAST_RETRY)
    with trio.fail_after(20):
        c = Client(s, name, sse_reader)
        for stream, track in zip(c.streams, c.tracks, strict=True):
            await publish_seq(s.port, stream, range(4))
            track.last_id = "0123456789-0000000000000001"  # from another epoch
            await close_stream(s.port, stream)
        async with trio.open_nursery() as inner:
            inner.start_soon(c.run)
            await c.returned.wait()
        for track in c.tracks:
            assert track.ended and track.resets == 1
        c.assert_clean(4)


@pytest.mark.parametrize("name", list(TRANSPORTS))
async def test_reconnects_and_resumes_when_the_server_closes(
    name: str, nursery: trio.Nursery, tmp_path: Path, sse_reader: sse_h1.Reader
) -> None:
    s = await start_sluice(nursery, tmp_path, "memory", sse=FAST_RETRY)
    with trio.fail_after(20):
        c = Client(s, name, sse_reader)
        for stream in c.streams:
            await publish_seq(s.port, stream, range(5))
        async with trio.open_nursery() as inner:
            inner.start_soon(c.run)
            await wait_for(lambda: c.complete(5))
            s.worker.http.request_close_all()  # what a drain or a connection rotation does
            for stream in c.streams:  # while the client is (or soon will be) away
                await publish_seq(s.port, stream, range(5, 10))
            await wait_for(lambda: c.load.reconnects >= 1)
            for stream in c.streams:
                await publish_seq(s.port, stream, range(10, 15))
            await wait_for(lambda: c.complete(15))
            for stream in c.streams:
                await close_stream(s.port, stream)
            await c.returned.wait()
        assert all(t.ended for t in c.tracks)
        assert c.load.disconnects >= 1 and c.load.resumes
        for t in c.tracks:
            assert (t.received, t.dups, t.disorder, t.foreign) == (15, 0, 0, 0), t.stream
        # a connection cut between two polls may count a send error; nothing else is expected
        assert all(
            key.startswith(("BrokenResourceError", "OSError", "ConnectionResetError", "BrokenPipeError"))
            for key in c.load.errors
        ), c.load.errors


@pytest.mark.parametrize("name", ["longpoll", "ws-msgpack"])
async def test_binary_events_arrive_as_bytes(name: str, nursery: trio.Nursery, tmp_path: Path) -> None:
    s = await start_sluice(nursery, tmp_path, "memory")
    with trio.fail_after(20):
        c = Client(s, name, tracks=1)
        for seq in range(3):
            body = payload.encode(seq, time.monotonic_ns())
            resp = await request(
                s.port, "POST", f"/v1/streams/{c.streams[0]}", body, {"content-type": "application/octet-stream"}
            )
            assert resp.status == 201
        await close_stream(s.port, c.streams[0])
        async with trio.open_nursery() as inner:
            inner.start_soon(c.run)
            await c.returned.wait()
        assert c.tracks[0].ended
        c.assert_clean(3)


async def test_sse_h2_sets_retry_and_wide_windows(nursery: trio.Nursery, tmp_path: Path) -> None:
    s = await start_sluice(nursery, tmp_path, "memory", sse={"retry_ms": 1234, "retry_jitter_ms": 0})
    with trio.fail_after(20):
        c = Client(s, "sse-h2")
        big = 100_000  # more than HTTP/2's default 64 KiB window, on each of the two streams
        for stream in c.streams:
            await publish_seq(s.port, stream, range(3))
            await publish(s.port, stream, payload.encode(3, time.monotonic_ns(), big))
            await close_stream(s.port, stream)
        async with trio.open_nursery() as inner:
            inner.start_soon(c.run)
            await c.returned.wait()
        assert c.conn.retry_ms == 1234
        c.assert_clean(4)
