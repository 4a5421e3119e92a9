"""Cross-worker delivery over the notice bus, with in-process workers sharing one sqlite file.

Each worker here is what ``server.app.serve`` builds: its own sqlite store (all on one file), its
own hub, its own bus socket in one peers directory, the store's listener feeding both. The last
test runs two full ``serve`` instances and a real SSE client.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import msgpack
import trio

from server.app import Worker, serve, store_listener
from server.bus.local import LocalBus, open_local_bus
from server.config import load_config
from server.core.encoding import EncodedEvent
from server.core.events import Event, NewEvent
from server.core.hub import Hub, Subscription
from server.core.ports.store import Appended, Retention
from server.core.replay import Reset, Start
from server.store.sqlite import SqliteStore, open_sqlite_store
from tests.client import open_sse, publish, wait_live

KEEP_ALL = Retention(max_events=0, max_bytes=0, max_age=0)

QUIET: dict[str, float] = {"reconcile_interval": 0.0, "rescan_interval": 3600.0}
"""Bus options that leave only the datagrams themselves: no reconciliation, no periodic rescans."""


@dataclass
class W:
    """One in-process worker."""

    store: SqliteStore
    hub: Hub
    bus: LocalBus


@asynccontextmanager
async def open_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """A store on the shared file, with no listener (a writer whose notices never reach anyone)."""
    async with open_sqlite_store(tmp_path / "sluice.db", KEEP_ALL) as store:
        yield store


@asynccontextmanager
async def open_worker(tmp_path: Path, ident: str, **bus_options: object) -> AsyncIterator[W]:
    """A worker ``ident`` on the shared store file and peers directory (``QUIET`` unless overridden)."""
    options: dict[str, object] = {**QUIET, "hello_timeout": 5.0, **bus_options}
    async with open_store(tmp_path) as store:
        hub = Hub(store, replay_page=50)
        store.set_listener(hub.on_notice)
        async with open_local_bus(tmp_path / "peers", hub, store, ident=ident, **options) as bus:  # type: ignore[arg-type]
            store.set_listener(store_listener(hub, bus))
            yield W(store, hub, bus)


@dataclass
class Recorder:
    """A sink recording what a client would see."""

    events: list[Event] = field(default_factory=list)
    resets: list[Reset] = field(default_factory=list)
    ended: bool = False
    changed: trio.Event = field(default_factory=trio.Event)

    @property
    def ids(self) -> list[str]:
        """The ids delivered, in order."""
        return [e.id for e in self.events]

    def _poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def deliver(self, enc: EncodedEvent) -> bool:
        self.events.append(enc.event)
        self._poke()
        return True

    def reset(self, reset: Reset) -> bool:
        self.resets.append(reset)
        self._poke()
        return True

    def end(self) -> None:
        self.ended = True
        self._poke()

    def idle(self) -> bool:
        return True

    async def drain(self) -> None:
        await trio.sleep(0)

    async def wait_for(self, n: int) -> None:
        """Wait until at least ``n`` events were delivered."""
        while len(self.events) < n:
            await self.changed.wait()

    async def wait_end(self) -> None:
        """Wait until the end of the stream was delivered."""
        while not self.ended:
            await self.changed.wait()


async def subscribe(nursery: trio.Nursery, hub: Hub, stream: str, rec: Recorder, start: str = "now") -> Subscription:
    """Run a subscription to ``stream`` in ``nursery``; return it once it is live."""

    async def run(task_status: trio.TaskStatus[Subscription]) -> None:
        async with hub.open_subscription(stream, Start("start" if start == "start" else "now")) as sub:
            task_status.started(sub)
            await sub.run(rec)

    sub: Subscription = await nursery.start(run)
    await wait_until(lambda: sub.live or sub.done)
    return sub


async def wait_until(condition: Callable[[], bool]) -> None:
    """Wait (polling) until ``condition()`` holds; callers bound it with ``trio.fail_after``."""
    while not condition():
        await trio.sleep(0.002)


# -- delivery ------------------------------------------------------------------------------------


async def test_publish_on_one_worker_reaches_a_subscriber_on_another(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_worker(tmp_path, "a") as a, open_worker(tmp_path, "b") as b, trio.open_nursery() as n:
            await a.store.append("s", [NewEvent("message", b"zero")])  # the stream exists: no epoch to learn
            rec = Recorder()
            await subscribe(n, b.hub, "s", rec)
            r1 = await a.store.append("s", [NewEvent("message", b"one")])
            r2 = await a.store.append("s", [NewEvent("tick", b"\x00\xff", binary=True), NewEvent("message", b"x")])
            await rec.wait_for(3)
            assert rec.events == r1.events + r2.events  # ids, types, data and binary flags intact
            assert b.hub.stats.replayed == 0  # all three came live, in datagrams
            assert b.bus.stats.received >= 1 and a.bus.stats.sent >= 1
            assert b.hub.stats.published == 0  # another worker's commits are not counted here
            n.cancel_scope.cancel()


async def test_interleaved_publishes_on_two_workers_reach_a_third_in_order(tmp_path: Path) -> None:
    with trio.fail_after(15):
        async with (
            open_worker(tmp_path, "a") as a,
            open_worker(tmp_path, "b") as b,
            open_worker(tmp_path, "c") as c,
            trio.open_nursery() as n,
        ):
            early, late, on_a, on_b = Recorder(), Recorder(), Recorder(), Recorder()
            await subscribe(n, c.hub, "s", early, "start")
            await subscribe(n, a.hub, "s", on_a, "start")
            await subscribe(n, b.hub, "s", on_b, "start")
            published: list[Event] = []

            async def producer(w: W, tag: str) -> None:
                for i in range(40):
                    batch = [NewEvent("message", f"{tag}{i}.{k}".encode()) for k in range(1 + i % 3)]
                    published.extend((await w.store.append("s", batch)).events)

            async with trio.open_nursery() as producers:
                producers.start_soon(producer, a, "a")
                producers.start_soon(producer, b, "b")
                await early.wait_for(10)
                await subscribe(n, c.hub, "s", late, "start")  # joins while both are publishing
            expected = sorted(published, key=lambda e: e.seq)
            assert [e.seq for e in expected] == list(range(1, len(expected) + 1))
            for rec in (early, late, on_a, on_b):
                await rec.wait_for(len(expected))
                assert rec.events == expected
                assert rec.resets == []
            assert c.bus.stats.bad == 0
            n.cancel_scope.cancel()


async def test_close_and_delete_reach_other_workers(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_worker(tmp_path, "a") as a, open_worker(tmp_path, "b") as b, trio.open_nursery() as n:
            rec = Recorder()
            await subscribe(n, b.hub, "s", rec)
            await a.store.append("s", [NewEvent("message", b"1")])
            await a.store.close_stream("s")
            await rec.wait_end()
            assert len(rec.events) == 1
            await a.store.delete("s")
            again = Recorder()
            await subscribe(n, b.hub, "s", again)
            fresh = await a.store.append("s", [NewEvent("message", b"new epoch")])
            await again.wait_for(1)
            assert again.events == fresh.events
            n.cancel_scope.cancel()


# -- loss and its repair -------------------------------------------------------------------------


async def test_a_notice_that_never_arrives_is_repaired_by_reconciliation(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with (
            open_store(tmp_path) as silent,
            open_worker(tmp_path, "b", reconcile_interval=0.02) as b,
            trio.open_nursery() as n,
        ):
            await silent.append("s", [NewEvent("message", b"before")])
            rec = Recorder()
            await subscribe(n, b.hub, "s", rec)
            lost = await silent.append("s", [NewEvent("message", b"nobody was told")])
            await rec.wait_for(1)
            assert rec.events == lost.events
            assert b.bus.stats.repairs >= 1 and b.bus.stats.received == 0
            lost_close = await silent.close_stream("s")
            await rec.wait_end()  # a missed close is found too (the head says closed)
            assert lost_close.closed and len(rec.events) == 1
            n.cancel_scope.cancel()


async def test_a_full_peer_queue_is_repaired_with_hints(tmp_path: Path) -> None:
    qlen = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
    with trio.fail_after(15):
        async with (
            open_store(tmp_path) as silent,
            open_worker(tmp_path, "a", max_datagram=2048) as a,
            open_worker(tmp_path, "b", max_datagram=2048) as b,
            trio.open_nursery() as n,
        ):
            await a.store.append("s", [NewEvent("message", b"zero")])
            rec = Recorder()
            await subscribe(n, b.hub, "s", rec)  # live after seq 1: only what b is told moves it
            count = min(qlen, 1000) + 30
            result = await silent.append("s", [NewEvent("message", bytes([65 + i % 26]) * 1500) for i in range(count)])
            # As if a's store had committed them one by one in one scheduling pass: each notice
            # fills a datagram, so b's queue overflows before b runs again.
            for event in result.events:
                a.bus.publish(Appended([event]))
            assert a.bus.stats.send_failures > 0
            await rec.wait_for(count)
            assert rec.events == result.events
            assert a.bus.stats.hints_sent >= 1 and b.bus.stats.hints_received >= 1
            assert b.bus.stats.reconciles == 0  # repaired by the owed hint alone
            n.cancel_scope.cancel()


async def test_an_event_too_big_for_a_datagram_travels_as_a_hint(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with (
            open_worker(tmp_path, "a", max_datagram=2048) as a,
            open_worker(tmp_path, "b", max_datagram=2048) as b,
            trio.open_nursery() as n,
        ):
            await a.store.append("s", [NewEvent("message", b"zero")])
            rec = Recorder()
            await subscribe(n, b.hub, "s", rec)
            small = NewEvent("message", b"small")
            big = NewEvent("message", b"B" * 10_000)
            published: list[Event] = []
            published += (await a.store.append("s", [small])).events
            published += (await a.store.append("s", [big])).events
            published += (await a.store.append("s", [small, NewEvent("message", b"m" * 900), big, small])).events
            published += (await a.store.append("s", [small])).events
            await rec.wait_for(len(published))
            assert rec.events == published
            assert a.bus.stats.hints_sent >= 2 and b.bus.stats.hints_received >= 2
            assert b.bus.stats.bad == 0
            n.cancel_scope.cancel()


async def test_undecodable_datagrams_are_counted_and_trigger_a_reconciliation(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_worker(tmp_path, "a") as a, open_worker(tmp_path, "b") as b, trio.open_nursery() as n:
            rec = Recorder()
            await subscribe(n, b.hub, "s", rec)
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as junk:
                junk.sendto(b"\xc1 not msgpack", b.bus.path)
                junk.sendto(msgpack.packb([99, [0]]), b.bus.path)  # a future version
            await wait_until(lambda: b.bus.stats.bad == 2)
            await wait_until(lambda: b.bus.stats.reconciles >= 1)  # even with periodic passes off
            published = await a.store.append("s", [NewEvent("message", b"still fine")])
            await rec.wait_for(1)
            assert rec.events == published.events
            n.cancel_scope.cancel()


# -- peers coming and going ----------------------------------------------------------------------


async def test_a_new_worker_is_known_at_once_through_its_hello(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_worker(tmp_path, "a") as a:  # no rescans: only hello can introduce b
            assert a.bus.peer_paths() == []
            async with open_worker(tmp_path, "b") as b, trio.open_nursery() as n:
                assert a.bus.peer_paths() == [b.bus.path]  # b waited for a's welcome
                assert b.bus.peer_paths() == [a.bus.path]
                await a.store.append("s", [NewEvent("message", b"zero")])
                rec = Recorder()
                await subscribe(n, b.hub, "s", rec)
                published = await a.store.append("s", [NewEvent("message", b"hi")])
                await rec.wait_for(1)
                assert rec.events == published.events and b.hub.stats.replayed == 0
                n.cancel_scope.cancel()
            await wait_until(lambda: a.bus.peer_paths() == [])  # b said bye
            assert a.bus.stats.peers == 0 and a.bus.stats.peers_lost == 0
            assert not Path(b.bus.path).exists()


async def test_vanished_and_dead_peers_are_forgotten_and_do_not_break_sends(tmp_path: Path) -> None:
    peers = tmp_path / "peers"
    peers.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(peers / "worker-stale.sock"))
    stale.close()  # the file stays, as after a kill -9
    with trio.fail_after(10):
        async with open_worker(tmp_path, "a") as a, open_worker(tmp_path, "b") as b, trio.open_nursery() as n:
            assert a.bus.peer_paths() == [b.bus.path]  # the hello to the stale socket was refused
            a.bus.rescan()
            assert a.bus.peer_paths() == [b.bus.path]  # and it is not added back
            ghost_path = str(peers / "worker-ghost.sock")
            ghost = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            ghost.bind(ghost_path)
            a.bus.rescan()
            assert sorted(a.bus.peer_paths()) == sorted([b.bus.path, ghost_path])
            ghost.close()  # dies without a bye
            rec = Recorder()
            await subscribe(n, b.hub, "s", rec)
            published = await a.store.append("s", [NewEvent("message", b"1")])
            await rec.wait_for(1)
            assert rec.events == published.events
            assert a.bus.peer_paths() == [b.bus.path]
            lost = a.bus.stats.peers_lost
            assert lost >= 2 and a.bus.stats.send_failures >= 1
            Path(b.bus.path).unlink()  # b's socket file vanishes
            a.bus.rescan()
            assert a.bus.peer_paths() == [] and a.bus.stats.peers_lost == lost + 1
            await a.store.append("s", [NewEvent("message", b"2")])  # nobody to tell: fine
            n.cancel_scope.cancel()


# -- the whole worker ----------------------------------------------------------------------------


async def test_serve_with_peers_dir_delivers_across_workers_over_sse(tmp_path: Path) -> None:
    overrides: dict[str, dict[str, object]] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "store": {"path": str(tmp_path / "sluice.db")},
        "bus": {"reconcile_interval": 0.5},
    }
    config = load_config(overrides, environ={})
    peers_dir = str(tmp_path / "peers")
    with trio.fail_after(15):
        async with trio.open_nursery() as n:
            one: Worker = await n.start(partial(serve, config, peers_dir=peers_dir))
            two: Worker = await n.start(partial(serve, config, peers_dir=peers_dir))
            assert one.bus is not None and two.bus is not None
            assert one.bus.peer_paths() == [two.bus.path]
            port1, port2 = one.listeners[0].getsockname()[1], two.listeners[0].getsockname()[1]
            async with open_sse(port2, "/v1/streams/chat") as sse:
                await wait_live(two.ctx, "chat")
                ids = [await publish(port1, "chat", f"m{i}") for i in range(3)]
                got = await sse.take(3)
                assert [ev.id for ev in got] == ids and [ev.data for ev in got] == ["m0", "m1", "m2"]
            assert one.bus.stats.sent >= 1 and two.bus.stats.received >= 1
            n.cancel_scope.cancel()
