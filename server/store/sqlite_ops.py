"""The sqlite store's transactions, as plain blocking functions (run in worker threads, or on the
event loop's thread when the connection cannot block for long: see :mod:`server.store.sqlite`).

:func:`commit_batch` applies a group of write requests in one ``BEGIN IMMEDIATE`` transaction,
each under its own savepoint, so one failing request (a closed stream) never undoes the others;
it raises :class:`WriteLockBusy` when another connection holds the write lock past the
connection's busy timeout. :func:`checkpoint` copies the WAL into the database file.
:func:`read_page` and :func:`read_info` read one consistent snapshot. Nothing here touches trio.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from server.core.events import Event, StreamInfo
from server.core.ids import format_id, new_epoch
from server.core.ports.store import (
    Appended,
    AppendResult,
    Closed,
    Deleted,
    Head,
    IdempotencyKeyReused,
    Page,
    Retention,
    StreamClosed,
)
from server.store.fingerprint import fingerprint
from server.store.writes import AppendOp, CloseOp, DeleteOp, OpValue, Outcome

__all__ = ["AppendOp", "CloseOp", "DeleteOp", "OpValue", "Outcome", "TrimOp", "WriteOp"]  # with the functions below


@dataclass(frozen=True, slots=True)
class TrimOp:
    """Drop expired events and idempotency keys in every stream."""


WriteOp = AppendOp | CloseOp | DeleteOp | TrimOp


FORGET_KEYS_INTERVAL = 1.0
"""Seconds between sweeps of expired idempotency keys by :func:`commit_batch` (an expired key
is ignored when looked up, so the sweep only reclaims space)."""

OLDEST_TS_ENTRIES = 65_536
"""Most streams :class:`WriterState` remembers a lower bound of the oldest event's stamp for."""


@dataclass(slots=True)
class WriterState:
    """What one writing connection remembers between batches, to skip statements; owned by the
    one thread that commits on that connection.

    ``oldest_ts[stream]`` is a stamp no retained event of ``stream`` is older than. It stays true
    whatever any writer does later: appends stamp events no older than the stream's newest, trims
    drop the oldest, and a stream created again stamps its events with the time of its creation
    (a wall clock stepping back only delays an expiry, which :func:`trim_expired` sweeps).
    """

    oldest_ts: dict[str, float] = field(default_factory=dict)
    keys_forgotten_at: float = float("-inf")

    def learn(self, stream: str, ts: float) -> None:
        """Remember that no retained event of ``stream`` is older than ``ts``."""
        if len(self.oldest_ts) >= OLDEST_TS_ENTRIES and stream not in self.oldest_ts:
            self.oldest_ts.clear()
        self.oldest_ts[stream] = ts


class BatchFailed(Exception):
    """The batch's transaction could not be committed and was rolled back: none of it happened."""


class WriteLockBusy(BatchFailed):
    """Another connection held the write lock (past the busy timeout): none of the batch happened,
    and the same batch may simply be committed again later."""


def _begin(conn: sqlite3.Connection) -> None:
    """``BEGIN IMMEDIATE``; :class:`WriteLockBusy` if the write lock stayed taken."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:
            raise WriteLockBusy(str(exc)) from exc
        raise


@dataclass(slots=True)
class _Row:
    epoch: str
    last_seq: int = 0
    first_seq: int = 0
    length: int = 0
    nbytes: int = 0
    closed: bool = False
    last_ts: float = 0.0

    def info(self, stream: str) -> StreamInfo:
        return StreamInfo(stream, self.epoch, self.first_seq, self.last_seq, self.closed, self.length)


def _load(conn: sqlite3.Connection, stream: str) -> _Row | None:
    r = conn.execute(
        "SELECT epoch, last_seq, first_seq, length, bytes, closed, last_ts FROM streams WHERE name = ?", (stream,)
    ).fetchone()
    return None if r is None else _row(r)


def _row(r: Sequence[Any]) -> _Row:
    """A stream row from ``epoch, last_seq, first_seq, length, bytes, closed, last_ts``."""
    return _Row(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6])


@dataclass(frozen=True, slots=True)
class _KeyRecord:
    """One ``idempotency`` row; ``fingerprint`` is ``None`` for a row written before schema 2."""

    stream: str
    epoch: str
    first_seq: int
    count: int
    ts: float
    fingerprint: bytes | None


def _load_keyed(conn: sqlite3.Connection, stream: str, key: str) -> tuple[_Row | None, list[_KeyRecord]]:
    """The stream's row and every record of the idempotency key ``key`` (on any stream), in one
    statement (one record, but files written before keys were global may hold one per stream)."""
    rows = conn.execute(
        "SELECT s.epoch, s.last_seq, s.first_seq, s.length, s.bytes, s.closed, s.last_ts,"
        " k.stream, k.epoch, k.first_seq, k.count, k.ts, k.fingerprint"
        " FROM (SELECT ? AS name, ? AS key) AS q"
        " LEFT JOIN streams AS s ON s.name = q.name"
        " LEFT JOIN idempotency AS k ON k.key = q.key",
        (stream, key),
    ).fetchall()
    first = rows[0]
    row = None if first[0] is None else _row(first)
    records = [_KeyRecord(r[7], r[8], r[9], r[10], r[11], r[12]) for r in rows if r[7] is not None]
    return row, records


def _replay(op: AppendOp, row: _Row | None, records: list[_KeyRecord], now: float, window: float) -> Outcome | None:
    """The outcome of an append whose key has ``records``: the original ids for the same request,
    :class:`IdempotencyKeyReused` for another one, or ``None`` when no record is live (append)."""
    stream = op.stream
    live = [k for k in records if _key_live(k.ts, now, window)]
    # A record of this stream from an earlier epoch (the stream was dropped since) is dead.
    own = [k for k in live if k.stream == stream and row is not None and k.epoch == row.epoch]
    if own:
        k = own[0]
        if k.fingerprint is not None and k.fingerprint != fingerprint(op.events):
            return Outcome(error=IdempotencyKeyReused(op.key))
        return Outcome(AppendResult(ids=[format_id(k.epoch, k.first_seq + i) for i in range(k.count)], duplicate=True))
    if any(k.stream != stream for k in live):
        return Outcome(error=IdempotencyKeyReused(op.key))
    return None


def _save(conn: sqlite3.Connection, stream: str, row: _Row) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO streams (name, epoch, last_seq, first_seq, length, bytes, closed, last_ts)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (stream, row.epoch, row.last_seq, row.first_seq, row.length, row.nbytes, int(row.closed), row.last_ts),
    )


def _key_live(ts: float, now: float, window: float) -> bool:
    return window <= 0 or now - ts < window


def _drop_before(conn: sqlite3.Connection, stream: str, row: _Row, cut: int) -> None:
    """Drop the retained events of ``stream`` with ``seq < cut`` and update ``row`` to match."""
    if row.length == 0 or cut <= row.first_seq:
        return
    count, nbytes = conn.execute(
        "SELECT count(*), total(length(data)) FROM events WHERE stream = ? AND seq < ?", (stream, cut)
    ).fetchone()
    conn.execute("DELETE FROM events WHERE stream = ? AND seq < ?", (stream, cut))
    row.length -= count
    row.nbytes -= int(nbytes)
    row.first_seq = cut if row.length else 0


def _enforce(
    conn: sqlite3.Connection, stream: str, row: _Row, now: float, retention: Retention, *, state: WriterState
) -> None:
    """Apply the retention limits to ``stream`` after an append; its newest event always stays."""
    cutoff = now - retention.max_age
    if retention.max_age > 0 and state.oldest_ts.get(stream, cutoff) <= cutoff:
        # Stamps never decrease within a stream, so the expired events are a prefix. The unary
        # plus keeps the planner on the primary key instead of the global ts index.
        r = conn.execute(
            "SELECT seq, ts FROM events WHERE stream = ? AND +ts >= ? ORDER BY seq LIMIT 1", (stream, cutoff)
        ).fetchone()
        _drop_before(conn, stream, row, row.last_seq if r is None else r[0])
        state.learn(stream, row.last_ts if r is None else r[1])
    if 0 < retention.max_events < row.length:
        _drop_before(conn, stream, row, row.last_seq - retention.max_events + 1)
    if 0 < retention.max_bytes < row.nbytes and row.length > 1:
        excess, cut = row.nbytes - retention.max_bytes, row.first_seq
        cur = conn.execute(
            "SELECT seq, length(data) FROM events WHERE stream = ? AND seq < ? ORDER BY seq", (stream, row.last_seq)
        )
        try:
            for seq, size in cur:
                if excess <= 0:
                    break
                excess -= size
                cut = seq + 1
        finally:
            cur.close()
        _drop_before(conn, stream, row, cut)


def _append(conn: sqlite3.Connection, op: AppendOp, now: float, retention: Retention, state: WriterState) -> Outcome:
    stream = op.stream
    if op.key is None:
        row = _load(conn, stream)
    else:
        row, records = _load_keyed(conn, stream, op.key)
        replay = _replay(op, row, records, now, retention.idempotency_window)
        if replay is not None:
            return replay
    if row is None:
        row = _Row(new_epoch(), last_ts=now)
    elif row.closed:
        return Outcome(error=StreamClosed(stream))
    stamp = max(now, row.last_ts)
    first_seq = row.last_seq + 1
    events = [Event(stream, row.epoch, first_seq + i, e.type, e.data, e.binary) for i, e in enumerate(op.events)]
    conn.executemany(
        "INSERT INTO events (stream, seq, type, data, binary, ts) VALUES (?, ?, ?, ?, ?, ?)",
        [(stream, e.seq, e.type, e.data, int(e.binary), stamp) for e in events],
    )
    if row.length == 0:
        row.first_seq = first_seq
    row.last_seq = events[-1].seq
    row.last_ts = stamp
    row.length += len(events)
    row.nbytes += sum(len(e.data) for e in events)
    _enforce(conn, stream, row, now, retention, state=state)
    _save(conn, stream, row)
    if op.key is not None:
        conn.execute(
            "INSERT OR REPLACE INTO idempotency (stream, key, epoch, first_seq, count, ts, fingerprint)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (stream, op.key, row.epoch, first_seq, len(events), now, fingerprint(op.events)),
        )
    return Outcome(AppendResult(ids=[e.id for e in events], events=events), notices=[Appended(events)])


def _close(conn: sqlite3.Connection, op: CloseOp, now: float) -> Outcome:
    row = _load(conn, op.stream)
    if row is None:
        row = _Row(new_epoch(), closed=True, last_ts=now)
        _save(conn, op.stream, row)
    elif row.closed:
        return Outcome(row.info(op.stream))
    else:
        row.closed = True
        conn.execute("UPDATE streams SET closed = 1 WHERE name = ?", (op.stream,))
    return Outcome(row.info(op.stream), notices=[Closed(op.stream, row.epoch, row.last_seq)])


def _delete(conn: sqlite3.Connection, op: DeleteOp) -> Outcome:
    if conn.execute("DELETE FROM streams WHERE name = ?", (op.stream,)).rowcount == 0:
        return Outcome(False)
    conn.execute("DELETE FROM events WHERE stream = ?", (op.stream,))
    conn.execute("DELETE FROM idempotency WHERE stream = ?", (op.stream,))
    return Outcome(True, notices=[Deleted(op.stream)])


def _forget_keys(conn: sqlite3.Connection, now: float, window: float) -> None:
    if window > 0:
        conn.execute("DELETE FROM idempotency WHERE ts <= ?", (now - window,))


def _trim(conn: sqlite3.Connection, now: float, retention: Retention) -> Outcome:
    _forget_keys(conn, now, retention.idempotency_window)
    if retention.max_age <= 0:
        return Outcome(0)
    cutoff = now - retention.max_age
    # Per stream the expired events are a prefix (stamps never decrease), so the new first_seq
    # is one past the newest expired seq, unless nothing is left.
    per_stream = conn.execute(
        "SELECT stream, count(*), total(length(data)), max(seq) FROM events INDEXED BY events_by_ts"
        " WHERE ts < ? GROUP BY stream",
        (cutoff,),
    ).fetchall()
    conn.executemany(
        "UPDATE streams SET length = length - ?1, bytes = bytes - ?2,"
        " first_seq = CASE WHEN length > ?1 THEN ?3 + 1 ELSE 0 END WHERE name = ?4",
        [(count, int(nbytes), max_seq, stream) for stream, count, nbytes, max_seq in per_stream],
    )
    conn.execute("DELETE FROM events WHERE ts < ?", (cutoff,))
    return Outcome(sum(count for _, count, _, _ in per_stream))


def _apply(conn: sqlite3.Connection, op: WriteOp, now: float, retention: Retention, state: WriterState) -> Outcome:
    if isinstance(op, AppendOp):
        return _append(conn, op, now, retention, state)
    if isinstance(op, CloseOp):
        return _close(conn, op, now)
    if isinstance(op, DeleteOp):
        return _delete(conn, op)
    return _trim(conn, now, retention)


def _apply_isolated(
    conn: sqlite3.Connection, op: WriteOp, now: float, retention: Retention, state: WriterState
) -> Outcome:
    """Apply ``op`` under a savepoint: if it fails, only its own changes are undone."""
    conn.execute("SAVEPOINT op")
    try:
        outcome = _apply(conn, op, now, retention, state)
    except sqlite3.ProgrammingError:
        raise
    except Exception as exc:
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")
        return Outcome(error=exc)
    conn.execute("RELEASE op")
    return outcome


def _apply_all(
    conn: sqlite3.Connection, ops: Sequence[WriteOp], now: float, retention: Retention, state: WriterState
) -> list[Outcome]:
    """Apply ``ops`` in the open transaction: without savepoints while none raises; if one does,
    everything is rolled back and applied again, each op under its own savepoint."""
    try:
        return [_apply(conn, op, now, retention, state) for op in ops]
    except sqlite3.ProgrammingError:
        raise
    except Exception:
        conn.execute("ROLLBACK")
        state.oldest_ts.clear()  # what the undone attempt learned may not hold
        _begin(conn)
        return [_apply_isolated(conn, op, now, retention, state) for op in ops]


def commit_batch(
    conn: sqlite3.Connection,
    ops: Sequence[WriteOp],
    now: float,
    retention: Retention,
    state: WriterState | None = None,
) -> list[Outcome]:
    """Apply ``ops`` in order in ONE transaction and commit it; return one outcome per op (an op
    that raised has its error as its outcome, and none of its changes).

    ``state`` is the connection's :class:`WriterState` (a fresh one when omitted). Raises
    :class:`BatchFailed` (everything rolled back) if the transaction cannot be committed, its
    subclass :class:`WriteLockBusy` if that is only because another connection holds the write
    lock (with a zero busy timeout: at once). Any other exception means the connection is unusable.
    """
    if state is None:
        state = WriterState()
    try:
        _begin(conn)
        outcomes = _apply_all(conn, ops, now, retention, state)
        keyed = any(isinstance(op, AppendOp) and op.key is not None for op in ops)
        if keyed and not 0 <= now - state.keys_forgotten_at < FORGET_KEYS_INTERVAL:
            _forget_keys(conn, now, retention.idempotency_window)
            state.keys_forgotten_at = now
        conn.execute("COMMIT")
    except sqlite3.ProgrammingError:
        raise
    except (sqlite3.Error, WriteLockBusy) as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        state.oldest_ts.clear()
        if isinstance(exc, WriteLockBusy):
            raise
        raise BatchFailed(str(exc)) from exc
    return outcomes


def checkpoint(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """Copy what it can of the WAL into the database file without waiting for any lock
    (``PRAGMA wal_checkpoint(PASSIVE)``, which fsyncs); return sqlite's ``(busy, wal frames,
    frames checkpointed)``. Blocking: call it from a worker thread."""
    busy, frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(busy), int(frames), int(done)


def read_info(conn: sqlite3.Connection, stream: str) -> StreamInfo | None:
    """Return the state of ``stream``, or ``None`` if it does not exist."""
    row = _load(conn, stream)
    return None if row is None else row.info(stream)


HEADS_CHUNK = 500
"""Streams looked up per query by :func:`read_heads` (below every sqlite's bound-parameter limit)."""


def read_heads(conn: sqlite3.Connection, streams: Sequence[str]) -> dict[str, Head]:
    """Return the :class:`Head` of each existing stream in ``streams``: one query per :data:`HEADS_CHUNK`."""
    out: dict[str, Head] = {}
    for i in range(0, len(streams), HEADS_CHUNK):
        chunk = streams[i : i + HEADS_CHUNK]
        marks = ",".join("?" * len(chunk))
        for name, epoch, last_seq, closed in conn.execute(
            f"SELECT name, epoch, last_seq, closed FROM streams WHERE name IN ({marks})", chunk
        ):
            out[name] = Head(epoch, last_seq, bool(closed))
    return out


def read_page(conn: sqlite3.Connection, stream: str, after_seq: int, limit: int) -> Page:
    """Return the state of ``stream`` and up to ``limit`` events after ``after_seq``, from one snapshot."""
    conn.execute("BEGIN")
    try:
        row = _load(conn, stream)
        if row is None:
            return Page(None)
        info = row.info(stream)
        if limit <= 0 or row.length == 0 or after_seq >= row.last_seq:
            return Page(info)
        rows = conn.execute(
            "SELECT seq, type, data, binary FROM events WHERE stream = ? AND seq > ? ORDER BY seq LIMIT ?",
            (stream, max(after_seq, row.first_seq - 1), limit),
        ).fetchall()
        return Page(info, [Event(stream, row.epoch, seq, t, data, bool(b)) for seq, t, data, b in rows])
    finally:
        conn.execute("COMMIT")
