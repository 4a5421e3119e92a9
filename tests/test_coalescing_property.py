"""Coalescing, end to end on a real socket: events that pile up while a subscriber's socket has
not drained (and while a stream waits for its next fan-out pass) join one write, and the client
still reads every event once, in order; a client that stops reading is cut at its cap, having
read an exact prefix."""

from __future__ import annotations

import re
import socket

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.core.encoding import EncodedEvent, EventBatch
from server.core.events import NewEvent
from server.core.hub import Hub
from server.core.ports.store import Retention
from server.core.replay import Reset, Start
from server.http.base import HttpLimits
from server.http.outbox import Outbox
from server.http.stats import HttpStats
from server.store.memory import MemoryStore

ID_LINE = re.compile(rb"^id: [0-9a-f]+-([0-9a-f]{16})$", re.M)


class OutboxSink:
    """SSE frames into a connection's outbox, as the SSE transport does."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.writes = 0

    def deliver(self, enc: EncodedEvent) -> bool:
        self.writes += 1
        return self.outbox.write(enc.sse.raw)

    def deliver_batch(self, batch: EventBatch) -> bool:
        self.writes += 1
        return self.outbox.write(batch.sse.raw)

    def reset(self, reset: Reset) -> bool:
        raise AssertionError("no reset expected")

    def end(self) -> None:
        pass

    def idle(self) -> bool:
        return True

    async def drain(self) -> None:
        await self.outbox.drain()


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    bursts=st.lists(
        st.tuples(st.integers(1, 6), st.integers(0, 6000), st.sampled_from([0.0, 0.005, 0.05])), min_size=1, max_size=25
    ),
    coalesce=st.sampled_from([0.0, 0.02]),
    cap=st.sampled_from([8 * 1024, 1024 * 1024]),
    size=st.sampled_from([10, 700]),
)
async def test_property_every_event_once_in_order_or_an_exact_prefix_and_cut(
    bursts: list[tuple[int, int, float]], coalesce: float, cap: int, size: int, autojump_clock: trio.abc.Clock
) -> None:
    """Each burst: publish n events, let the client read up to ``read`` bytes, let ``pause`` pass."""
    store = MemoryStore(Retention(max_events=0, max_bytes=0, max_age=0))
    hub = Hub(store, coalesce=coalesce, reorder_window=0.05)
    store.set_listener(hub.on_notice)
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    limits = HttpLimits(send_buffer=cap, send_low_water=cap // 4, send_timeout=3600)
    received = bytearray()
    published = 0
    with a, b, trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.run)
            outbox = Outbox(a, limits, HttpStats(), lambda _: None)
            outbox.attach(nursery)
            sink = OutboxSink(outbox)
            ready = trio.Event()

            subs = []

            async def subscriber() -> None:
                async with hub.open_subscription("s", Start("start")) as sub:
                    subs.append(sub)
                    ready.set()
                    await sub.run(sink)

            nursery.start_soon(subscriber)
            await ready.wait()
            for n, to_read, pause in bursts:
                for _ in range(n):
                    published += 1
                    await store.append("s", [NewEvent("message", b"%d:" % published + b"x" * size)])
                await trio.testing.wait_all_tasks_blocked()
                left = to_read
                while left > 0:
                    try:
                        chunk = b.recv(min(left, 65536))
                    except BlockingIOError:
                        break
                    received += chunk
                    left -= len(chunk)
                await trio.sleep(pause)
            await trio.sleep(1)  # past every coalescing window
            # now read everything: until the subscription delivered the last event and the outbox
            # handed it all to the kernel, or the connection was cut
            while outbox.alive and not (subs[0].last_seq == published and not outbox.buffered):
                try:
                    chunk = b.recv(65536)
                except BlockingIOError:
                    await trio.sleep(0.01)
                    continue
                received += chunk
            received += _rest(b)
            nursery.cancel_scope.cancel()
    seqs = [int(m, 16) for m in ID_LINE.findall(bytes(received))]
    assert seqs == list(range(1, len(seqs) + 1))  # in order, nothing twice, nothing skipped
    if outbox.alive:
        assert len(seqs) == published
        assert sink.writes <= published
    else:
        assert outbox.fell_behind  # cut at its cap, not for anything else


def _rest(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except (BlockingIOError, ConnectionError):
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk
