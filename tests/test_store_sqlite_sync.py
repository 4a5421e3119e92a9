"""The sqlite store with ``sync = "normal"``: commits on the event loop's thread, never sleeping in
sqlite (another connection's write lock is waited for with trio), WAL checkpoints of its own."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from server.core.events import NewEvent
from server.core.ports.store import AppendResult, StoreUnavailable
from server.store.sqlite import SqliteStore, open_sqlite_store
from tests.store_contract import DEADLINE


def ev(data: str) -> NewEvent:
    """A text event."""
    return NewEvent("message", data.encode())


@contextmanager
def write_lock_held(path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection (as another worker would) holding ``path``'s write lock until it commits."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


async def busy_waits_reach(store: SqliteStore, count: int) -> None:
    """Return once the store's writer has waited for the write lock ``count`` times; the event loop
    keeps running meanwhile, or this would never return."""
    while store.stats.busy_waits < count:
        await trio.sleep(0.001)


async def test_normal_writer_settings(tmp_path: Path) -> None:
    with trio.fail_after(DEADLINE):
        async with open_sqlite_store(tmp_path / "n.db", sync="normal") as store:

            def pragmas() -> tuple[object, ...]:
                conn = store._writer
                return tuple(
                    conn.execute(f"PRAGMA {name}").fetchone()[0]
                    for name in ("journal_mode", "synchronous", "wal_autocheckpoint", "busy_timeout")
                )

            assert await trio.to_thread.run_sync(pragmas) == ("wal", 1, 0, 0)


@pytest.mark.parametrize("sync", ["full", "normal"])
async def test_commits_run_on_the_event_loop_thread_only_with_normal(tmp_path: Path, sync: str) -> None:
    threads: set[int] = set()
    with trio.fail_after(DEADLINE):
        async with open_sqlite_store(tmp_path / "t.db", sync=sync) as store:
            store._writer.set_trace_callback(lambda _statement: threads.add(threading.get_ident()))
            for n in range(5):
                await store.append("s", [ev(str(n))])
            await store.close_stream("s")
            store._writer.set_trace_callback(None)
    on_loop = threads == {threading.get_ident()}
    assert threads and on_loop == (sync == "normal"), threads


async def test_trims_and_deletes_still_commit_in_a_thread(tmp_path: Path) -> None:
    loop_thread = threading.get_ident()
    by_statement: dict[str, set[int]] = {}

    def trace(statement: str) -> None:
        by_statement.setdefault(statement.split(maxsplit=1)[0], set()).add(threading.get_ident())

    with trio.fail_after(DEADLINE):
        async with open_sqlite_store(tmp_path / "d.db", sync="normal") as store:
            await store.append("s", [ev("x")])
            store._writer.set_trace_callback(trace)
            await store.trim_expired()
            assert await store.delete("s")
            store._writer.set_trace_callback(None)
    assert by_statement["DELETE"] and loop_thread not in by_statement["DELETE"], by_statement


async def test_another_connections_write_lock_is_waited_for_without_blocking_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    results: list[AppendResult] = []
    with trio.fail_after(DEADLINE):
        async with open_sqlite_store(path, sync="normal") as store:
            await store.append("s", [ev("before")])
            commits = store.stats.commits

            async def publish(n: int) -> None:
                results.append(await store.append("s", [ev(str(n))]))

            async with trio.open_nursery() as nursery:
                with write_lock_held(path) as other:
                    nursery.start_soon(publish, 0)
                    await busy_waits_reach(store, 1)
                    for n in range(1, 11):
                        nursery.start_soon(publish, n)
                    waited = store.stats.busy_waits
                    await busy_waits_reach(store, waited + 2)  # the writer took them in meanwhile
                    assert results == []
                    other.execute("INSERT INTO streams VALUES ('x', 'e', 0, 0, 0, 0, 0, 0.0)")
                    other.execute("COMMIT")
            # all eleven waited together and went in one transaction, after the other's commit
            assert store.stats.commits == commits + 1 and store.stats.largest_batch == 11
            assert sorted(r.events[0].seq for r in results) == list(range(2, 13))
            assert await store.info("x") is not None
            page = await store.read("s", 0, 100)
            assert sorted(e.data for e in page.events[1:]) == sorted(str(n).encode() for n in range(11))


async def test_a_write_lock_held_past_busy_timeout_fails_the_batch_and_the_store_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with trio.fail_after(DEADLINE):
        async with open_sqlite_store(path, sync="normal", busy_timeout=0.05) as store:
            with write_lock_held(path):
                with pytest.raises(StoreUnavailable, match="locked"):
                    await store.append("s", [ev("refused")])
                assert store.stats.failed_commits == 1 and store.stats.busy_waits >= 1
            ok = await store.append("s", [ev("later")])
            assert ok.events[0].seq == 1


async def test_the_store_checkpoints_the_wal_itself(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    with trio.fail_after(DEADLINE):
        async with open_sqlite_store(path, sync="normal", checkpoint_commits=5, checkpoint_interval=60) as store:
            for n in range(5):
                await store.append("s", [ev(str(n))])
            while store.stats.checkpoints < 1:
                await trio.sleep(0.001)
            assert store.stats.checkpoint_failures == 0
            # the database file alone (without its WAL) now holds every committed event
            copy = tmp_path / "main-only.db"
            shutil.copyfile(path, copy)
            conn = sqlite3.connect(copy)
            try:
                assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 5
            finally:
                conn.close()


async def test_an_unknown_sync_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sync"):
        async with open_sqlite_store(tmp_path / "u.db", sync="off"):
            pass
