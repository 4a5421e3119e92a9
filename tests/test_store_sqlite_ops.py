"""The sqlite store's transactions as plain functions: one connection, no threads, no trio."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from server.core.events import NewEvent
from server.core.ports.store import Appended, AppendResult, Retention
from server.store.sqlite_ops import AppendOp, WriterState, commit_batch
from server.store.sqlite_schema import open_writer

NO_LIMITS = Retention(max_events=0, max_bytes=0, max_age=0, idempotency_window=0)


def ev(data: str) -> NewEvent:
    """A text event."""
    return NewEvent("message", data.encode())


def rows(conn: sqlite3.Connection, stream: str) -> list[tuple[int, bytes]]:
    """The stored events of ``stream``: ``(seq, data)``, in order."""
    return conn.execute("SELECT seq, data FROM events WHERE stream = ? ORDER BY seq", (stream,)).fetchall()


def counting(conn: sqlite3.Connection) -> list[str]:
    """Record every statement ``conn`` runs from now on."""
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    return seen


def test_an_op_that_raises_midway_is_undone_alone(tmp_path: Path) -> None:
    conn = open_writer(tmp_path / "o.db", 1.0)
    # the stream row is written after the events: the failing op has already inserted its events
    conn.execute(
        "CREATE TEMP TRIGGER refuse BEFORE INSERT ON streams WHEN NEW.name = 'bad'"
        " BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    ops = [AppendOp("a", (ev("a1"),)), AppendOp("bad", (ev("x"),)), AppendOp("c", (ev("c1"), ev("c2")), "k")]
    out = commit_batch(conn, ops, 100.0, NO_LIMITS, WriterState())
    assert isinstance(out[0].value, AppendResult) and isinstance(out[2].value, AppendResult)
    assert isinstance(out[1].error, sqlite3.IntegrityError) and not out[1].notices
    assert [type(n) for o in out for n in o.notices] == [Appended, Appended]
    assert rows(conn, "a") == [(1, b"a1")]
    assert rows(conn, "c") == [(1, b"c1"), (2, b"c2")]
    assert rows(conn, "bad") == []
    assert conn.execute("SELECT name FROM streams ORDER BY name").fetchall() == [("a",), ("c",)]
    assert not conn.in_transaction
    # the next batch goes through as usual, and the key written in the retried batch holds
    again = commit_batch(conn, [AppendOp("c", (ev("c1"), ev("c2")), "k")], 101.0, NO_LIMITS)
    assert again[0].value == AppendResult(ids=out[2].value.ids, duplicate=True)


def test_a_plain_batch_runs_no_savepoints_and_four_statements_per_keyed_append(tmp_path: Path) -> None:
    conn = open_writer(tmp_path / "n.db", 1.0)
    retention = Retention(max_age=3600.0, idempotency_window=3600.0)
    state = WriterState()
    commit_batch(conn, [AppendOp(f"s{i}", (ev("first"),), f"k{i}") for i in range(3)], 100.0, retention, state)
    seen = counting(conn)
    ops = [AppendOp(f"s{i}", (ev("again"),), f"j{i}") for i in range(3)]
    commit_batch(conn, ops, 100.5, retention, state)
    assert not [s for s in seen if "SAVEPOINT" in s or "RELEASE" in s]
    # BEGIN, 3 x (row and key, events, row, key), COMMIT: the oldest stamps are known, and the
    # expired keys were swept less than a second ago
    assert len(seen) == 2 + 3 * 4, seen


def test_max_age_is_enforced_at_append_across_batches_with_a_remembered_oldest_stamp(tmp_path: Path) -> None:
    conn = open_writer(tmp_path / "m.db", 1.0)
    retention = Retention(max_events=0, max_bytes=0, max_age=10.0, idempotency_window=0)
    state = WriterState()
    for t, data in ((0.0, "t0"), (5.0, "t5"), (9.0, "t9")):
        commit_batch(conn, [AppendOp("s", (ev(data),))], t, retention, state)
    assert [d for _, d in rows(conn, "s")] == [b"t0", b"t5", b"t9"]
    assert state.oldest_ts["s"] == 0.0
    seen = counting(conn)
    commit_batch(conn, [AppendOp("s", (ev("t12"),))], 12.0, retention, state)  # cutoff 2: t0 expires
    assert any("+ts >=" in s for s in seen)
    assert [d for _, d in rows(conn, "s")] == [b"t5", b"t9", b"t12"]
    assert state.oldest_ts["s"] == 5.0
    seen.clear()
    commit_batch(conn, [AppendOp("s", (ev("t14"),))], 14.0, retention, state)  # cutoff 4: nothing older
    assert not any("+ts >=" in s for s in seen)
    assert [d for _, d in rows(conn, "s")] == [b"t5", b"t9", b"t12", b"t14"]
    commit_batch(conn, [AppendOp("s", (ev("t40"),))], 40.0, retention, state)  # all but the newest expire
    assert [d for _, d in rows(conn, "s")] == [b"t40"]
    assert state.oldest_ts["s"] == 40.0


def test_another_writer_cannot_make_a_remembered_oldest_stamp_wrong(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    mine, theirs = open_writer(path, 1.0), open_writer(path, 1.0)
    retention = Retention(max_events=0, max_bytes=0, max_age=10.0, idempotency_window=0)
    state = WriterState()
    commit_batch(mine, [AppendOp("s", (ev("a"),))], 0.0, retention, state)
    # the other worker deletes the stream and it is created again later: newer stamps only
    theirs.execute("DELETE FROM events")
    theirs.execute("DELETE FROM streams")
    theirs.commit()
    commit_batch(theirs, [AppendOp("s", (ev("b"),))], 8.0, retention)
    commit_batch(mine, [AppendOp("s", (ev("c"),))], 9.0, retention, state)
    commit_batch(mine, [AppendOp("s", (ev("d"),))], 19.0, retention, state)  # cutoff 9: b expires
    assert [d for _, d in rows(mine, "s")] == [b"c", b"d"]
