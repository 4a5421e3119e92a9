"""The promises every notice bus (:class:`server.core.ports.bus.Bus`) keeps, written once.

Each test runs against every implementation: the Unix-datagram bus, on real sockets in a
temporary runtime directory, and the Redis PUB/SUB bus, against a real ``redis-server`` (one per
session; each test under its own key and channel prefix). The workers are in-process buses sharing
one memory store (what their repairs read); each bus's receiver is a :class:`Watching`, which
stands in for a hub: it watches the streams a test says and records what it is told. For the
Unix-datagram bus the clock is trio's mock clock, jumping whenever every task waits, so deadlines
and intervals cost no time and a bus that hangs fails at once; the Redis bus waits on another
process, so it runs on the real clock, every test under the same deadline.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from server.bus import local_wire as wire
from server.bus.local import LocalBus, open_local_bus
from server.bus.local_send import MAX_OWED
from server.bus.redis import Connect, RedisBus, open_redis_bus
from server.core.events import NewEvent
from server.core.ports.bus import Bus, InterestListener, Receiver
from server.core.ports.store import Appended, Closed, Deleted, Notice, Retention, Store
from server.store.memory import MemoryStore
from server.store.redis_client import open_client
from tests.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]

KEEP_ALL = Retention(max_events=0, max_bytes=0, max_age=0)


class Watching:
    """A receiver standing in for a worker's hub: the streams it watches and what it was told."""

    def __init__(self, *streams: str) -> None:
        self.watched: set[str] = set(streams)
        self.notices: list[Notice] = []
        self.hints: list[tuple[str, str, int, bool]] = []
        self._listener: InterestListener | None = None
        self._changed = trio.Event()

    def watch(self, *streams: str) -> None:
        """Start watching ``streams``: the bus hears of it as the hub's interest listener would."""
        for stream in streams:
            if stream not in self.watched:
                self.watched.add(stream)
                if self._listener is not None:
                    self._listener(stream, True)

    def unwatch(self, *streams: str) -> None:
        """Stop watching ``streams``."""
        for stream in streams:
            if stream in self.watched:
                self.watched.discard(stream)
                if self._listener is not None:
                    self._listener(stream, False)

    def head(self, stream: str) -> int:
        """The newest seq of ``stream`` this receiver was told of, by a notice or a hint (0: none)."""
        seqs = [seq for s, _, seq, _ in self.hints if s == stream]
        for notice in self.notices:
            if isinstance(notice, Appended) and notice.events and notice.events[0].stream == stream:
                seqs.append(notice.events[-1].seq)
        return max(seqs, default=0)

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds, re-checking whenever this receiver is told something."""
        while not condition():
            await self._changed.wait()

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- Receiver -------------------------------------------------------------------------------

    def on_notice(self, notice: Notice, *, remote: bool = False) -> None:
        assert remote
        self.notices.append(notice)
        self._poke()

    def on_hint(self, stream: str, epoch: str, last_seq: int, closed: bool = False) -> bool:
        self.hints.append((stream, epoch, last_seq, closed))
        self._poke()
        return True

    def watcher_count(self, stream: str) -> int:
        return int(stream in self.watched)

    def streams(self) -> list[str]:
        return sorted(self.watched)

    def set_interest_listener(self, listener: InterestListener | None) -> None:
        self._listener = listener


OpenBus = Callable[[Path, str, Receiver, Store, float], AbstractAsyncContextManager[Bus]]
"""``open(runtime_dir, name, receiver, store, repair_interval)``: worker ``name`` joins the bus
(``repair_interval``: seconds between its repairs from the store; 0: only those a loss it
noticed asks for)."""


@dataclass(frozen=True)
class Implementation:
    """How this suite runs one bus implementation: the interface, plus what a test must do to
    a worker from outside it (kill it) or see of its insides (what it holds, what it took in)."""

    name: str
    open: OpenBus
    kill: Callable[[Bus], None]
    """The worker dies at once, as under ``kill -9``: it takes in and sends nothing more, says no goodbye."""
    held: Callable[[Bus], int]
    """How much the bus holds for the peers that cannot take what it sends (items, streams)."""
    bound: int
    """The most :attr:`held` may reach, however much is published."""
    arrived: Callable[[Bus], int]
    """How many messages the worker's end has taken in from the others."""
    settle: Callable[[], Awaitable[None]]
    """Wait until everything the buses sent each other so far has been handled."""
    mock_clock: bool = True
    """Whether the tests run on trio's autojumping mock clock (else on the real one)."""


# -- the Unix-datagram bus -------------------------------------------------------------------------


def _open_local(
    directory: Path, name: str, receiver: Receiver, store: Store, repair: float
) -> AbstractAsyncContextManager[Bus]:
    return open_local_bus(
        directory, receiver, store, ident=name, reconcile_interval=repair, rescan_interval=3600.0, hello_timeout=5.0
    )


def _kill_local(bus: Bus) -> None:
    assert isinstance(bus, LocalBus)
    bus._closed = True  # sends nothing more, no bye
    os.unlink(bus.path)  # what a killed worker leaves: a socket file that nobody reads, which refuses
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dead:
        dead.bind(bus.path)


def _held_local(bus: Bus) -> int:
    assert isinstance(bus, LocalBus)
    return max((len(p.owed) + p.resync for p in bus._peers.values()), default=0)


def _arrived_local(bus: Bus) -> int:
    assert isinstance(bus, LocalBus)
    return bus.stats.received


LOCAL = Implementation(
    name="local",
    open=_open_local,
    kill=_kill_local,
    held=_held_local,
    bound=MAX_OWED,
    arrived=_arrived_local,
    # A datagram is in its receiver's queue when sendto returns, and trio polls the sockets before
    # it calls every task blocked: once all are, every datagram sent has been handled.
    settle=trio.testing.wait_all_tasks_blocked,
)


# -- the Redis PUB/SUB bus -------------------------------------------------------------------------


def connector(url: str, timeout: float = 2.0) -> Connect:
    """How a worker's bus opens its client for ``url`` (what the composition root gives it)."""
    return partial(open_client, url, (), None, timeout, 4)


def redis_implementation(url: str) -> Implementation:
    """The Redis bus on the server at ``url``; the buses a test opens are kept to settle them."""
    opened: list[RedisBus] = []
    markers: dict[int, int] = {}  # id(bus) -> settle markers it took in

    def _open(
        directory: Path, name: str, receiver: Receiver, store: Store, repair: float
    ) -> AbstractAsyncContextManager[Bus]:
        @asynccontextmanager
        async def joined() -> AsyncIterator[Bus]:
            prefix = f"bus-{directory.parent.name[-40:]}:"
            async with open_redis_bus(
                receiver, store, connect=connector(url), prefix=prefix, reconcile_interval=repair
            ) as bus:
                assert bus.connected
                opened.append(bus)
                try:
                    yield bus
                finally:
                    opened.remove(bus)

        return joined()

    def _kill(bus: Bus) -> None:
        assert isinstance(bus, RedisBus)
        bus._closed = True  # takes in and sends nothing more, no goodbye

    async def _settle() -> None:
        # Every bus idle (nothing queued, published or subscribed in flight), then one marker on
        # the control channel: Redis delivers in the order it ran the PUBLISHes, so a bus that
        # took the marker in has taken in everything published before it.
        while not all(bus.idle for bus in opened):
            await trio.sleep(0.001)
        live = [bus for bus in opened if not bus._closed]
        if not live:
            return
        before = {id(bus): bus.stats.received for bus in live}
        await live[0]._client.publish(live[0].control, b"settle!!" + wire.datagram([]))
        while any(bus.stats.received == before[id(bus)] for bus in live):
            await trio.sleep(0.001)
        for bus in live:
            markers[id(bus)] = markers.get(id(bus), 0) + 1

    def _held(bus: Bus) -> int:
        assert isinstance(bus, RedisBus)
        return bus.held

    def _arrived(bus: Bus) -> int:
        assert isinstance(bus, RedisBus)
        return bus.stats.received - markers.get(id(bus), 0)

    return Implementation(
        name="redis",
        open=_open,
        kill=_kill,
        held=_held,
        bound=MAX_OWED + 1,
        arrived=_arrived,
        settle=_settle,
        mock_clock=False,
    )


IMPLEMENTATIONS = ["local", "redis"]


# -- the suite -------------------------------------------------------------------------------------


@dataclass
class Host:
    """The workers of one host on one bus, in-process, sharing one store."""

    impl: Implementation
    directory: Path
    store: Store
    stack: AsyncExitStack

    async def join(self, name: str, *streams: str, repair: float = 0.0) -> tuple[Bus, Watching]:
        """Worker ``name`` joins, watching ``streams``; returns its bus and receiver."""
        receiver = Watching(*streams)
        bus = await self.stack.enter_async_context(self.impl.open(self.directory, name, receiver, self.store, repair))
        await self.impl.settle()
        return bus, receiver

    async def commit(self, bus: Bus, stream: str, *data: bytes) -> Appended:
        """Commit events to the store as ``bus``'s worker would, and publish the notice on ``bus``."""
        notice = Appended((await self.store.append(stream, [NewEvent("message", d) for d in data])).events)
        bus.publish(notice)
        return notice


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> Implementation:
    """Each implementation in turn."""
    if request.param == "local":
        return LOCAL
    server: RedisServer = request.getfixturevalue("redis_server")
    return redis_implementation(server.url)


@pytest.fixture
def bus_clock(impl: Implementation) -> trio.testing.MockClock | None:
    """The autojumping mock clock for an implementation that runs on it, else none (the real one)."""
    return trio.testing.MockClock(autojump_threshold=0) if impl.mock_clock else None


@asynccontextmanager
async def open_host(impl: Implementation, tmp_path: Path, seconds: float = 30.0) -> AsyncIterator[Host]:
    """A host with no worker yet; its workers leave when the block exits. ``seconds`` bounds the
    test: with the mock clock a bus that hangs reaches it at once."""
    store = MemoryStore(KEEP_ALL)
    with trio.fail_after(seconds):
        async with AsyncExitStack() as stack:
            yield Host(impl, tmp_path / "run", store, stack)
    await store.aclose()


async def test_a_notice_reaches_every_interested_peer_and_not_its_sender(
    impl: Implementation, tmp_path: Path, bus_clock: trio.testing.MockClock | None
) -> None:
    async with open_host(impl, tmp_path) as host:
        a, mine = await host.join("a", "s")
        _, b = await host.join("b", "s")
        _, c = await host.join("c", "s")
        appended = await host.commit(a, "s", b"one", b"two")
        closed = Closed("s", appended.events[0].epoch, 2)
        a.publish(closed)
        a.publish(Deleted("s"))
        for receiver in (b, c):
            await receiver.until(lambda r=receiver: len(r.notices) == 3)
            assert receiver.notices == [appended, closed, Deleted("s")]  # whole, in order
        await host.impl.settle()
        assert mine.notices == [] and mine.hints == []


async def test_an_uninterested_peer_is_sent_nothing(
    impl: Implementation, tmp_path: Path, bus_clock: trio.testing.MockClock | None
) -> None:
    async with open_host(impl, tmp_path) as host:
        a, _ = await host.join("a")
        b_bus, b = await host.join("b", "s")
        c_bus, c = await host.join("c", "t")
        before = host.impl.arrived(c_bus)
        notice = await host.commit(a, "s", b"for b")
        await b.until(lambda: len(b.notices) == 1)
        assert b.notices == [notice]
        await host.impl.settle()
        assert host.impl.arrived(c_bus) == before  # not even sent
        assert c.notices == [] and c.hints == []
        other = await host.commit(a, "t", b"for c")
        await c.until(lambda: len(c.notices) == 1)
        assert c.notices == [other] and b.notices == [notice]
        assert host.impl.arrived(b_bus) >= 1


async def test_interest_changes_are_honoured(
    impl: Implementation, tmp_path: Path, bus_clock: trio.testing.MockClock | None
) -> None:
    async with open_host(impl, tmp_path) as host:
        a, _ = await host.join("a")
        b_bus, b = await host.join("b")
        b.watch("s")
        await host.impl.settle()
        first = await host.commit(a, "s", b"1")
        await b.until(lambda: len(b.notices) == 1)
        assert b.notices == [first]
        b.unwatch("s")
        await host.impl.settle()
        before = host.impl.arrived(b_bus)
        await host.commit(a, "s", b"2")
        await host.impl.settle()
        assert host.impl.arrived(b_bus) == before and b.notices == [first]
        b.watch("s")
        await host.impl.settle()
        third = await host.commit(a, "s", b"3")
        await b.until(lambda: b.head("s") == 3)
        assert b.notices[-1] == third


async def test_a_commit_made_before_the_peers_knew_of_a_new_interest_still_arrives(
    impl: Implementation, tmp_path: Path, bus_clock: trio.testing.MockClock | None
) -> None:
    async with open_host(impl, tmp_path) as host:
        a, _ = await host.join("a")
        _, b = await host.join("b")
        await host.commit(a, "s", b"0")  # nobody watches: sent to nobody
        result = await host.store.append("s", [NewEvent("message", b"1")])
        b.watch("s")
        a.publish(Appended(result.events))  # in the same pass: a cannot know of b's interest yet
        await b.until(lambda: b.head("s") == 2)  # told of the head, read once the peers knew


async def test_a_peer_that_goes_away_does_not_block_the_sender(
    impl: Implementation, tmp_path: Path, bus_clock: trio.testing.MockClock | None
) -> None:
    async with open_host(impl, tmp_path) as host:
        a, _ = await host.join("a", "s")
        _, b = await host.join("b", "s")
        c_bus, _ = await host.join("c", "s")
        async with host.impl.open(host.directory, "d", Watching("s"), host.store, 0.0):
            await host.impl.settle()
            host.impl.kill(c_bus)  # dies without a word
        # and d left properly
        sent = [await host.commit(a, "s", str(i).encode()) for i in range(20)]  # to b, c and d
        await b.until(lambda: len(b.notices) == 20)
        assert b.notices == sent


async def test_what_is_held_for_a_peer_that_cannot_keep_up_is_bounded(
    impl: Implementation, tmp_path: Path, bus_clock: trio.testing.MockClock | None
) -> None:
    streams = [f"s{i}" for i in range(2 * impl.bound)]
    async with open_host(impl, tmp_path) as host:
        a, _ = await host.join("a")
        _, b = await host.join("b", "big", *streams)
        for stream in ["big", *streams]:
            await host.store.append(stream, [NewEvent("message", b"x")])  # b is told of it only by a repair
        burst = [await host.store.append("big", [NewEvent("message", bytes(60_000))]) for _ in range(200)]
        burst += [await host.store.append(stream, [NewEvent("message", bytes(200))]) for stream in streams]
        heads = {result.events[0].stream: result.events[-1].seq for result in burst}
        # In one scheduling pass, so b takes nothing in meanwhile: big notices fill what b can
        # take, then one notice for each of many streams finds no room.
        held = []
        for result in burst:
            a.publish(Appended(result.events))
            held.append(impl.held(a))
        assert max(held) <= impl.bound
        assert held[-1] >= 1  # b could not take it all
        await b.until(lambda: all(b.head(s) >= seq for s, seq in heads.items()))  # repaired
        assert b.head("big") == 201


async def test_a_lost_notice_is_repaired_from_the_store_within_two_intervals(
    impl: Implementation, tmp_path: Path, bus_clock: trio.testing.MockClock | None
) -> None:
    interval = 1.0
    async with open_host(impl, tmp_path) as host:
        await host.join("a")
        _, b = await host.join("b", "s", repair=interval)
        await host.store.append("s", [NewEvent("message", b"never published")])
        lost = trio.current_time()
        await b.until(lambda: b.head("s") == 1)
        assert trio.current_time() - lost <= 2 * interval + 0.5
