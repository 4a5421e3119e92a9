"""The shared store contract, run against every local backend, and a model check of the memory store."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from server.core.events import NewEvent
from server.core.ids import format_id
from server.core.ports.store import (
    Appended,
    Closed,
    Deleted,
    IdempotencyKeyReused,
    Notice,
    Retention,
    Store,
    StreamClosed,
)
from server.store.memory import MemoryStore
from server.store.redis import open_redis_store
from server.store.sqlite import open_sqlite_store
from tests.redis_server import RedisServer, redis_server
from tests.store_contract import FakeClock, OpenStore, StoreContract

__all__ = ["redis_server"]  # the session's redis-server, a fixture the redis backend asks for

PREFIXES = itertools.count()


@asynccontextmanager
async def open_memory_store(retention: Retention, clock: FakeClock) -> AsyncIterator[Store]:
    """A fresh memory store, closed on exit."""
    store = MemoryStore(retention, clock)
    try:
        yield store
    finally:
        await store.aclose()


class TestStoreContract(StoreContract):
    """Every :class:`StoreContract` test, once per backend."""

    @pytest.fixture(params=["memory", "sqlite-full", "sqlite-normal", "redis"])
    def open_store(self, request: pytest.FixtureRequest, tmp_path: Path) -> OpenStore:
        if request.param == "memory":
            return open_memory_store
        counter = itertools.count()
        if request.param == "redis":
            server: RedisServer = request.getfixturevalue("redis_server")

            def open_redis(retention: Retention, clock: FakeClock) -> AbstractAsyncContextManager[Store]:
                prefix = f"t{next(PREFIXES)}:"  # a fresh, empty store on the session's server
                return open_redis_store(server.url, retention, prefix=prefix, clock=clock, timeout=5.0)

            return open_redis
        sync = request.param.removeprefix("sqlite-")

        def open_sqlite(retention: Retention, clock: FakeClock) -> AbstractAsyncContextManager[Store]:
            return open_sqlite_store(tmp_path / f"store{next(counter)}.db", retention, clock=clock, sync=sync)

        return open_sqlite


# -- model check -------------------------------------------------------------------------------------

STREAMS = ("a", "b")


@dataclass
class ModelStream:
    """What the store should hold for one stream: retained (seq, data, stamp), never-trimmed facts."""

    epoch: str
    last_seq: int = 0
    closed: bool = False
    retained: list[tuple[int, bytes, float]] = field(default_factory=list)


@dataclass
class Model:
    """A reference implementation of the store rules, plain and slow."""

    retention: Retention
    streams: dict[str, ModelStream] = field(default_factory=dict)
    keys: dict[str, tuple[str, str, list[str], float, tuple[bytes, ...]]] = field(default_factory=dict)
    issued: dict[str, set[int]] = field(default_factory=dict)
    epochs: dict[str, set[str]] = field(default_factory=dict)

    def expire(self, stream: ModelStream, now: float) -> int:
        if self.retention.max_age <= 0:
            return 0
        keep = [r for r in stream.retained if r[2] >= now - self.retention.max_age]
        dropped = len(stream.retained) - len(keep)
        stream.retained = keep
        return dropped

    def enforce(self, stream: ModelStream, now: float) -> None:
        self.expire(stream, now)
        r = self.retention
        while len(stream.retained) > 1 and (
            (r.max_events and len(stream.retained) > r.max_events)
            or (r.max_bytes and sum(len(d) for _, d, _ in stream.retained) > r.max_bytes)
        ):
            stream.retained.pop(0)

    def key_live(self, key: str, now: float) -> tuple[str, list[str], tuple[bytes, ...]] | None:
        """The live record of ``key``: its stream, the ids and the data it appended."""
        found = self.keys.get(key)
        if found is None:
            return None
        stream, epoch, ids, ts, data = found
        if stream not in self.streams or epoch != self.streams[stream].epoch:
            return None
        window = self.retention.idempotency_window
        return (stream, ids, data) if window <= 0 or now - ts < window else None


async def _check_against_model(retention: Retention, ops: list[tuple[object, ...]]) -> None:
    clock = FakeClock()
    store = MemoryStore(retention, clock)
    heard: list[Notice] = []
    store.set_listener(heard.append)
    model = Model(retention)
    for op in ops:
        heard.clear()
        kind, now = op[0], clock.now
        if kind == "append":
            name, sizes, key = op[1], op[2], op[3]
            assert isinstance(name, str) and isinstance(sizes, list) and (key is None or isinstance(key, str))
            batch = [NewEvent("message", bytes([65 + i % 26]) * size) for i, size in enumerate(sizes)]
            found = model.key_live(key, now) if key is not None else None
            state = model.streams.get(name)
            if found is not None and (found[0], found[2]) != (name, tuple(e.data for e in batch)):
                with pytest.raises(IdempotencyKeyReused):
                    await store.append(name, batch, idempotency_key=key)
                assert heard == []
            elif found is not None:
                result = await store.append(name, batch, idempotency_key=key)
                assert result.duplicate and result.ids == found[1] and result.events == [] and heard == []
            elif state is not None and state.closed:
                with pytest.raises(StreamClosed):
                    await store.append(name, batch, idempotency_key=key)
                assert heard == []
            else:
                result = await store.append(name, batch, idempotency_key=key)
                if state is None:
                    epoch = result.events[0].epoch
                    assert epoch not in model.epochs.setdefault(name, set()), "an epoch came back"
                    model.epochs[name].add(epoch)
                    state = model.streams[name] = ModelStream(epoch)
                got = [e.seq for e in result.events]
                issued = model.issued.setdefault(state.epoch, set())
                assert got == list(range(state.last_seq + 1, state.last_seq + 1 + len(batch)))
                assert not issued.intersection(got) and all(s > max(issued, default=0) for s in got)
                issued.update(got)
                assert result.ids == [format_id(state.epoch, s) for s in got]
                assert heard == [Appended(result.events)]
                state.last_seq = got[-1]
                state.retained += [(s, e.data, now) for s, e in zip(got, batch, strict=True)]
                model.enforce(state, now)
                assert state.retained and state.retained[-1][0] == state.last_seq
                if key is not None:
                    model.keys[key] = (name, state.epoch, result.ids, now, tuple(e.data for e in batch))
        elif kind == "close":
            name = str(op[1])
            info = await store.close_stream(name)
            state = model.streams.get(name)
            if state is None:
                state = model.streams[name] = ModelStream(info.epoch)
            assert heard == ([] if state.closed else [Closed(name, state.epoch, state.last_seq)])
            state.closed = True
        elif kind == "delete":
            name = str(op[1])
            existed = model.streams.pop(name, None) is not None
            assert await store.delete(name) is existed
            assert heard == ([Deleted(name)] if existed else [])
        elif kind == "advance":
            assert isinstance(op[1], float)
            clock.advance(op[1])
        else:
            expected = sum(model.expire(s, now) for s in model.streams.values())
            assert await store.trim_expired() == expected
        await _compare(store, model)


async def _compare(store: MemoryStore, model: Model) -> None:
    r = model.retention
    for name in STREAMS:
        state = model.streams.get(name)
        page = await store.read(name, 0, 10_000)
        if state is None:
            assert page.info is None and page.events == []
            continue
        info = page.info
        assert info is not None
        want_seqs = [s for s, _, _ in state.retained]
        assert [e.seq for e in page.events] == want_seqs
        assert [e.data for e in page.events] == [d for _, d, _ in state.retained]
        assert (info.epoch, info.last_seq, info.closed, info.length) == (
            state.epoch,
            state.last_seq,
            state.closed,
            len(want_seqs),
        )
        assert info.first_seq == (want_seqs[0] if want_seqs else 0)
        if want_seqs:
            assert want_seqs == list(range(want_seqs[0], state.last_seq + 1))
        if r.max_events:
            assert info.length <= r.max_events
        if r.max_bytes and info.length > 1:
            assert sum(len(e.data) for e in page.events) <= r.max_bytes


_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("append"),
            st.sampled_from(STREAMS),
            st.lists(st.integers(0, 40), min_size=1, max_size=4),
            st.sampled_from([None, "k1", "k1", "k2"]),
        ),
        st.tuples(st.just("close"), st.sampled_from(STREAMS)),
        st.tuples(st.just("delete"), st.sampled_from(STREAMS)),
        st.tuples(st.just("advance"), st.sampled_from([1.0, 5.0, 10.0, 15.0])),
        st.tuples(st.just("trim")),
    ),
    max_size=40,
)
_retentions = st.builds(
    Retention,
    max_events=st.sampled_from([0, 1, 3, 5]),
    max_bytes=st.sampled_from([0, 30, 100]),
    max_age=st.sampled_from([0.0, 10.0, 30.0]),
    idempotency_window=st.sampled_from([0.0, 15.0]),
)


@settings(max_examples=300, deadline=None)
@given(retention=_retentions, ops=_ops)
def test_memory_store_matches_the_model(retention: Retention, ops: list[tuple[object, ...]]) -> None:
    """Random appends, closes, deletes, clock moves and sweeps keep every invariant of the model."""
    trio.run(_check_against_model, retention, ops)
