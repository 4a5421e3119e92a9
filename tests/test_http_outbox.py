"""The outbox on a real socket pair: direct sends, queueing, order, the cap, drain and flush."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from server.http.base import HttpLimits
from server.http.outbox import SLOW_CONSUMER, Outbox
from server.http.stats import HttpStats


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return a, b


async def _read_exactly(sock: socket.socket, size: int) -> bytes:
    tsock = trio.socket.from_stdlib_socket(sock)
    data = bytearray()
    while len(data) < size:
        chunk = await tsock.recv(65536)
        assert chunk
        data += chunk
    return bytes(data)


async def test_direct_send_needs_no_writer_task() -> None:
    a, b = _pair()
    deaths: list[str] = []
    with a, b:
        async with trio.open_nursery() as nursery:
            outbox = Outbox(a, HttpLimits(), HttpStats(), deaths.append)
            outbox.attach(nursery)
            assert outbox.write(b"hello")
            assert outbox.buffered == 0
            await trio.testing.wait_all_tasks_blocked()
            assert len(nursery.child_tasks) == 0  # the writer was never started
            assert await _read_exactly(b, 5) == b"hello"
        assert deaths == []


async def test_queue_preserves_order_and_flushes() -> None:
    a, b = _pair()
    payload = bytes(range(256)) * 2000  # 512000 bytes, far beyond the socket buffers
    with a, b:
        async with trio.open_nursery() as nursery:
            outbox = Outbox(a, HttpLimits(), HttpStats(), lambda _: None)
            outbox.attach(nursery)
            for start in range(0, len(payload), 1000):
                assert outbox.write(payload[start : start + 1000])
            assert outbox.buffered > 0
            received = await _read_exactly(b, len(payload))
            await outbox.flush()
            assert outbox.buffered == 0
            assert received == payload
            nursery.cancel_scope.cancel()


async def test_overflow_kills_and_counts() -> None:
    a, b = _pair()
    deaths: list[str] = []
    stats = HttpStats()
    limits = HttpLimits(send_buffer=50_000, send_low_water=10_000)
    with a, b:
        async with trio.open_nursery() as nursery:
            outbox = Outbox(a, limits, stats, deaths.append)
            outbox.attach(nursery)
            results = [outbox.write(b"x" * 10_000) for _ in range(20)]
            assert False in results
            assert results.index(False) <= 6
            assert deaths == [SLOW_CONSUMER]
            assert stats.slow_consumers == 1
            assert outbox.buffered == 0  # the queue was dropped
            assert not outbox.write(b"more")
            with pytest.raises(trio.BrokenResourceError):
                await outbox.drain()


async def test_drain_waits_for_low_water() -> None:
    a, b = _pair()
    limits = HttpLimits(send_buffer=1_000_000, send_low_water=20_000)
    with a, b:
        async with trio.open_nursery() as nursery:
            outbox = Outbox(a, limits, HttpStats(), lambda _: None)
            outbox.attach(nursery)
            outbox.write(b"y" * 300_000)
            assert outbox.buffered > limits.send_low_water
            drained = trio.Event()

            async def drainer() -> None:
                await outbox.drain()
                drained.set()

            nursery.start_soon(drainer)
            await trio.testing.wait_all_tasks_blocked()
            assert not drained.is_set()
            await _read_exactly(b, 300_000 - limits.send_low_water)
            await drained.wait()
            assert outbox.buffered <= limits.send_low_water
            nursery.cancel_scope.cancel()


async def test_pull_source_is_called_once_per_wake_up() -> None:
    a, b = _pair()
    pulls: list[int] = []
    chunks = [b"one", b"two", b"three"]

    def pull() -> bytes:
        pulls.append(1)
        data = b"".join(chunks)
        chunks.clear()
        return data

    with a, b:
        async with trio.open_nursery() as nursery:
            outbox = Outbox(a, HttpLimits(), HttpStats(), lambda _: None)
            outbox.attach(nursery)
            outbox.set_pull(pull)
            for _ in range(10):
                outbox.request_pull()
            assert pulls == []
            await trio.testing.wait_all_tasks_blocked()
            assert pulls == [1]
            assert await _read_exactly(b, 11) == b"onetwothree"
            nursery.cancel_scope.cancel()
