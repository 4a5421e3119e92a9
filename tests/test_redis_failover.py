"""Redis failover: a replica promoted to primary, by hand or by real Sentinels (tests/redis_sentinel.py).

With ``store.redis_wait_replicas = 1`` a failover loses no acknowledged publish: the history
goes on in the same epoch and resumes stay exact. Without WAIT it may lose acknowledged writes,
and then every open stream is relabelled (a new epoch, its retained events kept) by its first
call on the new primary: a reader holding an id of the old epoch gets a reset ``epoch``, never a
silent gap nor a reused id. A primary restarted from its own AOF changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from server.core.ids import parse_id
from server.core.ports.store import StoreUnavailable
from server.core.replay import parse_start, plan_replay
from server.core.sse import SSEEvent
from server.store.redis import RedisStore, ReplicationFailed, open_redis_store
from tests.client import SSEClient, open_sse, request
from tests.redis_sentinel import MASTER, SYNC_AT_ONCE, SentinelGroup, acli, sentinel_group
from tests.redis_server import RedisServer
from tests.store_contract import UNLIMITED, ev
from tests.supervised import Supervised, supervisor

DEADLINE = 120.0  # seconds for a whole test: start, failover (~1-3 s), checks, on a busy machine
TIMEOUT = 2.0  # store.redis_timeout
ANSWER_WITHIN = 2 * TIMEOUT + 2  # a refused publish is answered within this, outage or not
BACKOFF = 0.05  # a publisher's pause before it retries a refused publish (a client's back-off)
PREFIX = "fo:"


def epoch_of(event_id: str) -> str:
    position = parse_id(event_id)
    assert position is not None, event_id
    return position.epoch


def seq_of(event_id: str) -> int:
    position = parse_id(event_id)
    assert position is not None, event_id
    return position.seq


@asynccontextmanager
async def store_on(group: SentinelGroup, wait_replicas: int) -> AsyncIterator[RedisStore]:
    """A store that finds the primary through the group's Sentinels."""
    async with open_redis_store(
        None,
        UNLIMITED,
        sentinels=group.addresses,
        master=MASTER,
        prefix=PREFIX,
        timeout=TIMEOUT,
        wait_replicas=wait_replicas,
    ) as store:
        yield store


@asynccontextmanager
async def store_at(server: RedisServer, wait_replicas: int = 0) -> AsyncIterator[RedisStore]:
    async with open_redis_store(
        server.url, UNLIMITED, prefix=PREFIX, timeout=TIMEOUT, wait_replicas=wait_replicas
    ) as store:
        yield store


async def replicated(replica: RedisServer, streams: dict[str, int]) -> None:
    """Wait until ``replica`` holds ``streams[s]`` events of each stream ``s`` (the caller bounds it)."""
    for stream, count in streams.items():
        while await acli(replica.port, "XLEN", f"{PREFIX}{{{stream}}}:log") != [str(count)]:
            await trio.sleep(0.02)  # polling an external process


# -- a replica promoted by hand ---------------------------------------------------------------------


async def test_a_promoted_replica_relabels_open_streams_keeping_their_events(tmp_path: Path) -> None:
    primary = RedisServer(tmp_path / "primary", tcp=True, args=SYNC_AT_ONCE)
    primary.start()
    replica = RedisServer(tmp_path / "replica", tcp=True, args=["--replicaof", "127.0.0.1", str(primary.port)])
    try:
        replica.start()
        with trio.fail_after(DEADLINE):
            async with store_at(primary) as store:
                written = (await store.append("a", [ev("1"), ev("2"), ev("3")])).ids
                keyed = (await store.append("k", [ev("once")], idempotency_key="key-1")).ids
                shut = await store.close_stream("shut")
            await replicated(replica, {"a": 3, "k": 1})
            assert await acli(replica.port, "REPLICAOF", "NO", "ONE") == ["OK"]
            old = epoch_of(written[0])
            async with store_at(replica, wait_replicas=1) as waiting:
                # with WAIT every acknowledged write reached the replica: nothing is relabelled
                assert [e.id for e in (await waiting.read("a", 0, 10)).events] == written
            async with store_at(replica) as store:
                page = await store.read("a", 0, 10)
                assert page.info is not None and page.info.epoch != old
                new = page.info.epoch
                assert [(e.seq, e.data) for e in page.events] == [(1, b"1"), (2, b"2"), (3, b"3")]
                plan = plan_replay(parse_start(written[-1], None, None), page.info)
                assert plan.reset is not None and (plan.reset.reason, plan.reset.earliest) == (
                    "epoch",
                    page.events[0].id,
                )
                assert (await store.info("a")) == page.info  # relabelled once
                after = await store.append("a", [ev("4")])
                assert (epoch_of(after.ids[0]), seq_of(after.ids[0])) == (new, 4)
                # a publisher's retry with its key finds the event it made, under the new epoch
                again = await store.append("k", [ev("once")], idempotency_key="key-1")
                assert again.duplicate and seq_of(again.ids[0]) == seq_of(keyed[0])
                assert epoch_of(again.ids[0]) != epoch_of(keyed[0])
                closed = await store.info("shut")  # a closed stream lost nothing after its close
                assert closed is not None and (closed.epoch, closed.closed) == (shut.epoch, True)
            replica.stop()
            replica.args = []  # a primary now
            replica.start()  # a restart from its own AOF: the same data, nothing relabelled
            async with store_at(replica) as store:
                assert epoch_of((await store.append("a", [ev("5")])).ids[0]) == new
    finally:
        replica.stop()
        primary.stop()


# -- Sentinel, through the store --------------------------------------------------------------------


@dataclass
class Publisher:
    """Appends ``e0``, ``e1``... to one stream, each with its own idempotency key, retrying a
    refused one (with the same key) until it is acknowledged."""

    acked: list[tuple[str, str]] = field(default_factory=list)  # (id, data) in order
    refused: int = 0
    stop: trio.Event = field(default_factory=trio.Event)
    _news: trio.Event = field(default_factory=trio.Event)

    async def acked_at_least(self, n: int) -> None:
        while len(self.acked) < n:
            await self._news.wait()

    def _ack(self, event_id: str, data: str) -> None:
        self.acked.append((event_id, data))
        self._news.set()
        self._news = trio.Event()

    async def run_on_store(self, store: RedisStore, stream: str) -> None:
        i = 0
        while not self.stop.is_set():
            data = f"e{i}"
            while True:
                with trio.fail_after(ANSWER_WITHIN):
                    try:
                        result = await store.append(stream, [ev(data)], idempotency_key=f"{stream}-{i}")
                        break
                    except StoreUnavailable:
                        self.refused += 1
                await trio.sleep(BACKOFF)
            self._ack(result.ids[0], data)
            i += 1

    async def run_over_http(self, port: int, stream: str) -> None:
        i = 0
        while not self.stop.is_set():
            data = f"e{i}"
            while True:
                with trio.fail_after(ANSWER_WITHIN):
                    resp = await request(
                        port,
                        "POST",
                        f"/v1/streams/{stream}",
                        data.encode(),
                        {"content-type": "text/plain", "idempotency-key": f"{stream}-{i}"},
                    )
                if resp.status == 201:
                    break
                assert resp.status == 503 and resp.json()["error"] == "store_unavailable", (resp.status, resp.body)
                self.refused += 1
                await trio.sleep(BACKOFF)
            self._ack(str(resp.json()["id"]), data)
            i += 1


@pytest.mark.slow
async def test_with_wait_replicas_a_sentinel_failover_loses_no_acknowledged_append(tmp_path: Path) -> None:
    with sentinel_group(tmp_path) as group, trio.fail_after(DEADLINE):
        async with store_on(group, wait_replicas=1) as store:
            publisher = Publisher()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(publisher.run_on_store, store, "s")
                await publisher.acked_at_least(20)
                group.kill_primary()
                killed_at = len(publisher.acked)
                await group.wait_promoted(group.replica)
                # the new primary has no replica until the old one is back: publishes fail its WAIT
                await group.rejoin(group.primary, group.replica)
                await publisher.acked_at_least(killed_at + 20)
                publisher.stop.set()
            assert publisher.refused > 0  # the outage was seen, each refusal within ANSWER_WITHIN
            page = (await store.read("s", 0, 10_000)).events
            # every acknowledged event once, in order, in one epoch: nothing lost, nothing relabelled
            assert [(e.id, e.data.decode()) for e in page] == publisher.acked
            assert [e.seq for e in page] == list(range(1, len(page) + 1))
            last_before = publisher.acked[killed_at - 1][0]
            plan = plan_replay(parse_start(last_before, None, None), (await store.read("s", 0, 0)).info)
            assert plan.reset is None and plan.after_seq == seq_of(last_before)
            rest = await store.read("s", plan.after_seq, 1000)
            assert [(e.id, e.data.decode()) for e in rest.events] == publisher.acked[killed_at:]


@pytest.mark.slow
async def test_with_wait_replicas_a_write_that_missed_its_wait_is_relabelled_after_a_failover(tmp_path: Path) -> None:
    with sentinel_group(tmp_path) as group, trio.fail_after(DEADLINE):
        async with store_on(group, wait_replicas=1) as store:
            calm = (await store.append("calm", [ev("c1")])).ids[0]
            before = (await store.append("x", [ev("x1")])).ids[0]
            group.cut_replication()
            with pytest.raises(ReplicationFailed, match="0 of 1 replicas"):
                await store.append("x", [ev("seen, then lost")])  # subscribers were told of it
            group.kill_primary()
            group.thaw_replica()
            await group.wait_promoted(group.replica)
            await group.rejoin(group.primary, group.replica)  # a replica again, for WAIT
            while True:  # until the store reaches the new primary (the key makes a retry safe)
                try:
                    relabelled = (await store.append("x", [ev("x2")], idempotency_key="x2")).ids[0]
                    break
                except StoreUnavailable:
                    await trio.sleep(BACKOFF)
            # seq 2 was issued to the lost event: the stream goes on under a new epoch, never reusing it
            assert epoch_of(relabelled) != epoch_of(before) and seq_of(relabelled) == 2
            on = (await store.append("calm", [ev("c2")])).ids[0]
            assert (epoch_of(on), seq_of(on)) == (epoch_of(calm), 2)  # acknowledged by WAIT: exact
            again = (await store.append("x", [ev("x3")])).ids[0]
            assert (epoch_of(again), seq_of(again)) == (epoch_of(relabelled), 3)  # relabelled once


# -- Sentinel, through `sluice serve` ---------------------------------------------------------------


def serve_flags(group: SentinelGroup, *more: str) -> list[str]:
    return [
        "--store",
        "redis",
        "--workers",
        "1",
        "--set",
        f"store.redis_sentinels={','.join(group.addresses)}",
        "--set",
        f"store.redis_master={MASTER}",
        "--set",
        f"store.redis_prefix={PREFIX}",
        "--set",
        f"store.redis_timeout={TIMEOUT}",
        *more,
    ]


@asynccontextmanager
async def serving(tmp_path: Path, name: str, flags: list[str]) -> AsyncIterator[Supervised]:
    (tmp_path / name).mkdir()
    env = {"RUNTIME_DIRECTORY": str(tmp_path / name)}
    async with supervisor(tmp_path / name, *flags, db=False, name=name, env=env) as s:
        await s.ready()
        yield s


@asynccontextmanager
async def sse_when_served(port: int, path: str, headers: dict[str, str] | None = None) -> AsyncIterator[SSEClient]:
    """An SSE response, retried while the store is unavailable (503) until it is 200."""
    while True:
        async with open_sse(port, path, headers) as sse:
            if sse.status == 200:
                yield sse
                return
            assert sse.status == 503, sse.status
        await trio.sleep(BACKOFF)


async def collect(sse: SSEClient, into: list[SSEEvent]) -> None:
    while True:
        into.append(await sse.next())


@pytest.mark.slow
async def test_sluice_serve_with_wait_replicas_keeps_every_acknowledged_publish_through_a_failover(
    tmp_path: Path,
) -> None:
    with sentinel_group(tmp_path) as group, trio.fail_after(DEADLINE):
        async with serving(tmp_path, "a", serve_flags(group, "--set", "store.redis_wait_replicas=1")) as a:
            async with open_sse(a.port, "/v1/streams/room?from=start") as live, trio.open_nursery() as reading:
                assert live.status == 200
                seen: list[SSEEvent] = []
                reading.start_soon(collect, live, seen)
                publisher = Publisher()
                async with trio.open_nursery() as publishing:
                    publishing.start_soon(publisher.run_over_http, a.port, "room")
                    await publisher.acked_at_least(20)
                    group.kill_primary()
                    killed_at = len(publisher.acked)
                    await group.wait_promoted(group.replica)
                    await group.rejoin(group.primary, group.replica)
                    await publisher.acked_at_least(killed_at + 20)
                    publisher.stop.set()
                while len(seen) < len(publisher.acked):  # the open subscriber stayed connected
                    await trio.sleep(0.02)  # polling what the reading task received
                reading.cancel_scope.cancel()
            assert publisher.refused > 0  # 503s while no primary answered, each within ANSWER_WITHIN
            # exactly the acknowledged events, once each, in order: no reset, no gap, no duplicate
            assert [(e.event, e.id, e.data) for e in seen] == [("message", i, d) for i, d in publisher.acked]
            last_before = publisher.acked[killed_at - 1][0]
            async with open_sse(a.port, "/v1/streams/room", {"last-event-id": last_before}) as resumed:
                rest = await resumed.take(len(publisher.acked) - killed_at)
                assert [(e.event, e.id, e.data) for e in rest] == [
                    ("message", i, d) for i, d in publisher.acked[killed_at:]
                ]


@pytest.mark.slow
async def test_sluice_serve_without_wait_announces_lost_writes_as_an_epoch_reset(tmp_path: Path) -> None:
    with sentinel_group(tmp_path) as group, trio.fail_after(DEADLINE):
        async with serving(tmp_path, "a", serve_flags(group)) as a, serving(tmp_path, "b", serve_flags(group)) as b:
            lost = [await publish_ok(a.port, "lost", d) for d in ("1", "2", "3")]
            calm = [await publish_ok(a.port, "calm", d) for d in ("c1", "c2")]
            await replicated(group.replica, {"lost": 3, "calm": 2})
            every: dict[str, str] = {}  # id -> data, of every event any subscriber got
            async with open_sse(a.port, "/v1/streams/lost?from=start") as live:
                assert [e.data for e in note(every, await live.take(3))] == ["1", "2", "3"]
                group.cut_replication()
                lost += [await publish_ok(a.port, "lost", d) for d in ("4", "5", "6", "7")]  # acknowledged
                assert [e.id for e in note(every, await live.take(4))] == lost[3:]
                group.kill_primary()
                group.thaw_replica()
                await group.wait_promoted(group.replica)  # it holds 1..3 of "lost": 4..7 are gone
                # resuming beyond what the new primary holds, before any new write: a reset, then what it holds
                async with sse_when_served(b.port, "/v1/streams/lost", {"last-event-id": lost[-1]}) as resumed:
                    reset, *replay = note(every, await resumed.take(4))
                    assert reset.event == "sluice.reset", reset
                    body = json.loads(reset.data)
                    assert (body["reason"], body["requested"]) == ("epoch", lost[-1])
                    new = epoch_of(body["earliest"])
                    assert new != epoch_of(lost[0]) and body["earliest"] == replay[0].id
                    assert [(epoch_of(e.id), seq_of(e.id), e.data) for e in replay] == [
                        (new, 1, "1"),
                        (new, 2, "2"),
                        (new, 3, "3"),
                    ]
                    # a new publish starts after what the new primary holds, under the new epoch
                    fresh = await publish_ok(a.port, "lost", "8")
                    assert (epoch_of(fresh), seq_of(fresh)) == (new, 4)
                    [next_one] = note(every, await resumed.take(1))
                    assert (next_one.id, next_one.data) == (fresh, "8")
                # the subscriber that saw 4..7 is told too, then gets the history as it now is
                reset, *replay = note(every, await live.take(5))
                assert reset.event == "sluice.reset" and json.loads(reset.data)["reason"] == "epoch"
                assert [(epoch_of(e.id), e.data) for e in replay] == [(new, "1"), (new, "2"), (new, "3"), (new, "8")]
            # a stream the lost writes did not touch is relabelled as well, keeping its events
            async with sse_when_served(b.port, "/v1/streams/calm", {"last-event-id": calm[-1]}) as other:
                reset, *replay = note(every, await other.take(3))
                assert reset.event == "sluice.reset" and json.loads(reset.data)["reason"] == "epoch"
                assert [e.data for e in replay] == ["c1", "c2"] and epoch_of(replay[0].id) != epoch_of(calm[0])
            info = await request(a.port, "GET", "/v1/streams/lost/info")
            assert info.status == 200 and info.json()["last_id"] == fresh


def note(every: dict[str, str], events: list[SSEEvent]) -> list[SSEEvent]:
    """Record each event's id and data in ``every``, failing if an id ever came with other data."""
    for e in events:
        if e.event != "sluice.reset":
            assert every.setdefault(e.id, e.data) == e.data, f"id {e.id} reused: {every[e.id]!r}, then {e.data!r}"
    return events


async def publish_ok(port: int, stream: str, data: str) -> str:
    """Publish ``data`` (its own idempotency key), retrying while the store is unavailable (503),
    until it is acknowledged."""
    headers = {"content-type": "text/plain", "idempotency-key": f"{stream}-{data}"}
    while True:
        with trio.fail_after(ANSWER_WITHIN):
            resp = await request(port, "POST", f"/v1/streams/{stream}", data.encode(), headers)
        if resp.status == 201:
            return str(resp.json()["id"])
        assert resp.status == 503, (resp.status, resp.body)
        await trio.sleep(BACKOFF)
