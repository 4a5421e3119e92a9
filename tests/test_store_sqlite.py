"""The sqlite store beyond the shared contract: durability, restarts, group commit, failure."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from server.core.events import NewEvent
from server.core.ids import parse_id
from server.core.ports.store import Appended, AppendResult, IdempotencyKeyReused, Notice, Retention, StoreUnavailable
from server.store.sqlite import open_sqlite_store
from server.store.sqlite_schema import SCHEMA_VERSION, SchemaError
from tests.store_contract import DEADLINE, FakeClock

ROOT = Path(__file__).resolve().parents[1]


def ev(data: str) -> NewEvent:
    """A text event."""
    return NewEvent("message", data.encode())


async def test_reopen_keeps_epoch_events_closed_state_and_seqs(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with trio.fail_after(DEADLINE):
        async with open_sqlite_store(path) as store:
            first = await store.append("live", [ev("a"), NewEvent("bin", b"\x00\x01", binary=True)])
            await store.append("done", [ev("z")])
            closed = await store.close_stream("done")
            await store.close_stream("empty")
        async with open_sqlite_store(path) as store:
            page = await store.read("live", 0, 10)
            assert page.events == first.events
            assert await store.info("done") == closed
            empty = await store.info("empty")
            assert empty is not None and empty.closed and empty.length == 0
            more = await store.append("live", [ev("b")])
            assert more.events[0].epoch == first.events[0].epoch and more.events[0].seq == 3


async def test_seqs_continue_after_restart_even_when_everything_was_trimmed(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    retention = Retention(max_events=0, max_bytes=0, max_age=10)
    clock = FakeClock()
    with trio.fail_after(DEADLINE):
        async with open_sqlite_store(path, retention, clock=clock) as store:
            old = await store.append("s", [ev(str(i)) for i in range(5)], idempotency_key="k")
            clock.advance(11)
            assert await store.trim_expired() == 5
        async with open_sqlite_store(path, retention, clock=clock) as store:
            info = await store.info("s")
            assert info is not None and (info.first_seq, info.last_seq, info.length) == (0, 5, 0)
            retry = await store.append("s", [ev(str(i)) for i in range(5)], idempotency_key="k")
            assert retry.duplicate and retry.ids == old.ids
            new = await store.append("s", [ev("again")])
            assert new.events[0].seq == 6 and new.events[0].epoch == old.events[0].epoch


CHILD = """
import sys
import trio
from server.core.events import NewEvent
from server.store.sqlite import open_sqlite_store

async def appender(store, task):
    n = 0
    while True:
        result = await store.append("k9", [NewEvent("message", f"{task}:{n}".encode())])
        sys.stdout.write(f"{task} {result.ids[0]}\\n")
        sys.stdout.flush()
        n += 1

async def main():
    async with open_sqlite_store(sys.argv[1], sync=sys.argv[2]) as store:
        async with trio.open_nursery() as nursery:
            for task in range(4):
                nursery.start_soon(appender, store, task)

trio.run(main)
"""


@pytest.mark.parametrize("sync", ["full", "normal"])
async def test_kill_9_loses_no_acknowledged_append(tmp_path: Path, sync: str) -> None:
    path = tmp_path / "k9.db"
    wanted = 300
    acked: dict[int, list[str]] = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with trio.fail_after(DEADLINE):
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", CHILD, str(path), sync], stdout=subprocess.PIPE, env=env, cwd=ROOT
        )
        try:
            assert proc.stdout is not None
            buffer, count = b"", 0
            while count < wanted:
                chunk = await proc.stdout.receive_some(65536)
                assert chunk, "the appending process ended early"
                *lines, buffer = (buffer + chunk).split(b"\n")
                for line in lines:
                    task_no, event_id = line.decode().split()
                    acked.setdefault(int(task_no), []).append(event_id)
                    count += 1
            proc.kill()
            assert await proc.wait() == -signal.SIGKILL
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
                if proc.stdout is not None:
                    await proc.stdout.aclose()

        async with open_sqlite_store(path, sync=sync) as store:
            page = await store.read("k9", 0, 10_000)
            stored = [e.id for e in page.events]
            seqs = [e.seq for e in page.events]
            assert seqs == list(range(1, len(seqs) + 1))
            assert len(stored) >= wanted
            by_id = {e.id: e.data for e in page.events}
            for task, ids in acked.items():
                assert set(ids) <= by_id.keys(), "an acknowledged append was lost"
                positions = [parse_id(i) for i in ids]
                assert all(p is not None for p in positions)
                task_seqs = [p.seq for p in positions if p is not None]
                assert task_seqs == sorted(task_seqs) and len(set(task_seqs)) == len(task_seqs)
                assert [by_id[i] for i in ids] == [f"{task}:{n}".encode() for n in range(len(ids))]
            after = await store.append("k9", [ev("after")])
            assert after.events[0].seq == seqs[-1] + 1 and after.events[0].epoch == page.events[0].epoch


async def test_concurrent_appends_are_group_committed(tmp_path: Path) -> None:
    heard: list[Notice] = []
    results: dict[int, AppendResult] = {}
    with trio.fail_after(DEADLINE):
        async with open_sqlite_store(tmp_path / "g.db") as store:
            store.set_listener(heard.append)

            async def publish(n: int) -> None:
                results[n] = await store.append("g", [ev(str(n))])

            async with trio.open_nursery() as nursery:
                for n in range(200):
                    nursery.start_soon(publish, n)
            stats = store.stats
            assert stats.requests == 200 and stats.events == 200 and stats.failed_commits == 0
            assert stats.commits < 50
            assert stats.largest_batch > 1
            seqs = sorted(r.events[0].seq for r in results.values())
            assert seqs == list(range(1, 201))
            heard_seqs = [e.seq for n in heard if isinstance(n, Appended) for e in n.events]
            assert heard_seqs == list(range(1, 201))
            for n, r in results.items():
                assert r.events[0].data == str(n).encode()


async def test_a_closed_stream_fails_only_its_own_request_in_a_batch(tmp_path: Path) -> None:
    with trio.fail_after(DEADLINE):
        async with open_sqlite_store(tmp_path / "b.db") as store:
            await store.close_stream("shut")
            outcomes: dict[str, object] = {}

            async def publish(stream: str) -> None:
                try:
                    outcomes[stream] = await store.append(stream, [ev(stream)])
                except Exception as exc:
                    outcomes[stream] = exc

            commits = store.stats.commits
            async with trio.open_nursery() as nursery:
                for stream in ("a", "shut", "b", "c"):
                    nursery.start_soon(publish, stream)
            assert store.stats.commits - commits < 4
            assert type(outcomes.pop("shut")).__name__ == "StreamClosed"
            assert all(isinstance(r, AppendResult) for r in outcomes.values())
            for stream in ("a", "b", "c"):
                info = await store.info(stream)
                assert info is not None and info.length == 1


async def test_two_stores_on_one_file_share_the_log(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    with trio.fail_after(DEADLINE):
        async with open_sqlite_store(path) as one, open_sqlite_store(path) as two:
            a = await one.append("s", [ev("from one")])
            b = await two.append("s", [ev("from two")])
            assert (a.events[0].seq, b.events[0].seq) == (1, 2)
            assert a.events[0].epoch == b.events[0].epoch
            assert [e.data for e in (await one.read("s", 0, 10)).events] == [b"from one", b"from two"]


async def test_aclose_commits_what_is_queued_then_refuses(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    results: list[AppendResult] = []
    with trio.fail_after(DEADLINE):
        async with open_sqlite_store(path) as store:

            async def publish(n: int) -> None:
                results.append(await store.append("s", [ev(str(n))]))

            async with trio.open_nursery() as nursery:
                for n in range(20):
                    nursery.start_soon(publish, n)
                await trio.testing.wait_all_tasks_blocked()
                await store.aclose()
            assert len(results) == 20
            with pytest.raises(StoreUnavailable):
                await store.append("s", [ev("late")])
            with pytest.raises(StoreUnavailable):
                await store.read("s", 0, 10)
        async with open_sqlite_store(path) as store:
            info = await store.info("s")
            assert info is not None and info.last_seq == 20


async def test_writer_failure_fails_callers_and_the_block(tmp_path: Path) -> None:
    with trio.fail_after(DEADLINE), pytest.raises(sqlite3.ProgrammingError):
        async with open_sqlite_store(tmp_path / "w.db") as store:
            await store.append("s", [ev("ok")])
            await trio.to_thread.run_sync(store._writer.close)
            with pytest.raises(StoreUnavailable):
                await store.append("s", [ev("lost")])
            with pytest.raises(StoreUnavailable):
                await store.append("s", [ev("after")])
            await trio.sleep_forever()


async def test_durability_settings(tmp_path: Path) -> None:
    with trio.fail_after(DEADLINE):
        async with open_sqlite_store(tmp_path / "d.db") as store:

            def pragmas() -> tuple[str, int, int]:
                conn = store._writer
                return (
                    conn.execute("PRAGMA journal_mode").fetchone()[0],
                    conn.execute("PRAGMA synchronous").fetchone()[0],
                    conn.execute("PRAGMA user_version").fetchone()[0],
                )

            assert await trio.to_thread.run_sync(pragmas) == ("wal", 2, SCHEMA_VERSION)


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with trio.fail_after(DEADLINE), pytest.raises(SchemaError):
        async with open_sqlite_store(path):
            pass


V1_SCHEMA = """
CREATE TABLE streams (name TEXT NOT NULL PRIMARY KEY, epoch TEXT NOT NULL, last_seq INTEGER NOT NULL,
    first_seq INTEGER NOT NULL, length INTEGER NOT NULL, bytes INTEGER NOT NULL, closed INTEGER NOT NULL,
    last_ts REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE events (stream TEXT NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL, data BLOB NOT NULL,
    binary INTEGER NOT NULL, ts REAL NOT NULL, PRIMARY KEY (stream, seq)) WITHOUT ROWID;
CREATE INDEX events_by_ts ON events (ts);
CREATE TABLE idempotency (stream TEXT NOT NULL, key TEXT NOT NULL, epoch TEXT NOT NULL,
    first_seq INTEGER NOT NULL, count INTEGER NOT NULL, ts REAL NOT NULL, PRIMARY KEY (stream, key)) WITHOUT ROWID;
CREATE INDEX idempotency_by_ts ON idempotency (ts);
INSERT INTO streams VALUES ('s', '0123456789', 2, 1, 2, 2, 0, 999990.0);
INSERT INTO events VALUES ('s', 1, 'message', X'61', 0, 999990.0), ('s', 2, 'message', X'62', 0, 999990.0);
INSERT INTO idempotency VALUES ('s', 'old', '0123456789', 1, 2, 999990.0);
PRAGMA user_version=1;
"""


async def test_a_version_1_file_is_migrated_and_its_keys_still_replay(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA)
    conn.close()
    with trio.fail_after(DEADLINE):
        async with open_sqlite_store(path, clock=FakeClock()) as store:
            info = await store.info("s")
            assert info is not None and (info.epoch, info.first_seq, info.last_seq) == ("0123456789", 1, 2)
            page = await store.read("s", 0, 10)
            assert [e.data for e in page.events] == [b"a", b"b"]
            # A key written without a fingerprint matches any events on its own stream ...
            retry = await store.append("s", [ev("anything")], idempotency_key="old")
            assert retry.duplicate and retry.ids == [e.id for e in page.events]
            # ... but not another stream.
            with pytest.raises(IdempotencyKeyReused):
                await store.append("t", [ev("a")], idempotency_key="old")
            new = await store.append("s", [ev("c")], idempotency_key="new")
            assert new.events[0].seq == 3
            with pytest.raises(IdempotencyKeyReused):
                await store.append("s", [ev("d")], idempotency_key="new")

            def version() -> int:
                return int(store._writer.execute("PRAGMA user_version").fetchone()[0])

            assert await trio.to_thread.run_sync(version) == SCHEMA_VERSION
        async with open_sqlite_store(path, clock=FakeClock()) as store:
            assert (await store.append("s", [ev("c")], idempotency_key="new")).ids == new.ids


async def test_exceptions_from_the_block_are_not_wrapped(tmp_path: Path) -> None:
    with trio.fail_after(DEADLINE), pytest.raises(KeyError):
        async with open_sqlite_store(tmp_path / "e.db"):
            raise KeyError("mine")


async def test_bad_parameters_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        async with open_sqlite_store(tmp_path / "p.db", queue_size=0):
            pass


def test_workers_opening_a_new_file_at_once_all_succeed(tmp_path: Path) -> None:
    """Several processes' writers create and configure one new database file at the same moment."""
    import threading

    from server.store.sqlite_schema import open_writer

    for attempt in range(20):
        path = tmp_path / f"race-{attempt}.db"
        barrier = threading.Barrier(6)
        errors: list[BaseException] = []

        def opener(
            path: Path = path, barrier: threading.Barrier = barrier, errors: list[BaseException] = errors
        ) -> None:
            barrier.wait()
            try:
                open_writer(path, 5.0).close()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=opener) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert errors == [], (attempt, errors)
