"""The sqlite store's on-disk schema and connection set-up (blocking: call from a worker thread).

Layout (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`):

* ``streams``: one row per stream. ``last_seq`` is the newest seq ever appended in ``epoch`` and
  survives retention; ``first_seq``/``length``/``bytes`` describe what is retained (``first_seq``
  is 0 when nothing is); ``last_ts`` is the newest event stamp, so stamps never decrease within a
  stream and every trim removes a prefix (retained seqs stay contiguous).
* ``events``: ``(stream, seq)`` keyed, ``WITHOUT ROWID`` so a stream's events are stored together
  in seq order; ``ts`` is indexed for the age sweep.
* ``idempotency``: ``(stream, key)`` -> the ids it produced (``epoch``, ``first_seq``, ``count``)
  and the request's ``fingerprint`` (:func:`server.store.fingerprint.fingerprint` of its events);
  ``key`` is indexed, since keys are one namespace for every stream, and ``ts`` so expired keys
  go in one range delete. A row written before version 2 has a ``NULL`` fingerprint: it matches
  any events on its own stream (such rows age out within one idempotency window).

Version 1 files are migrated in place (a column and an index are added); nothing is rewritten.

Durability (:data:`SYNC_MODES`): with ``"full"`` the writer commits with ``synchronous=FULL`` and
sqlite checkpoints the WAL inside a commit now and then; with ``"normal"`` it commits with
``synchronous=NORMAL`` (no fsync per commit), never checkpoints (``wal_autocheckpoint=0``) and has
a zero busy timeout (a taken write lock is reported at once, never slept on): the store waits for
the lock itself and checkpoints on a connection of its own (:func:`open_checkpointer`).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

SCHEMA_VERSION = 2

SYNC_MODES = ("full", "normal")
"""The writer's durability settings: ``"full"`` fsyncs at every commit (an acknowledged write
survives power loss); ``"normal"`` does not (it survives a crash or ``kill -9`` of the process,
not a power loss or kernel crash)."""

JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
"""Bytes the WAL file is truncated to after a checkpoint, so it cannot stay large forever."""

_DDL = """
CREATE TABLE IF NOT EXISTS streams (
    name      TEXT    NOT NULL PRIMARY KEY,
    epoch     TEXT    NOT NULL,
    last_seq  INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    length    INTEGER NOT NULL,
    bytes     INTEGER NOT NULL,
    closed    INTEGER NOT NULL,
    last_ts   REAL    NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS events (
    stream TEXT    NOT NULL,
    seq    INTEGER NOT NULL,
    type   TEXT    NOT NULL,
    data   BLOB    NOT NULL,
    binary INTEGER NOT NULL,
    ts     REAL    NOT NULL,
    PRIMARY KEY (stream, seq)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS events_by_ts ON events (ts);

CREATE TABLE IF NOT EXISTS idempotency (
    stream    TEXT    NOT NULL,
    key       TEXT    NOT NULL,
    epoch     TEXT    NOT NULL,
    first_seq INTEGER NOT NULL,
    count     INTEGER NOT NULL,
    ts        REAL    NOT NULL,
    PRIMARY KEY (stream, key)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS idempotency_by_ts ON idempotency (ts);
"""

_KEY_INDEX = "CREATE INDEX IF NOT EXISTS idempotency_by_key ON idempotency (key)"


class SchemaError(RuntimeError):
    """The database file was written by an incompatible (newer) version of this store."""


def _connect(path: str | Path, busy_timeout: float) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions, every BEGIN/COMMIT is ours. The connection
    # moves between worker threads, never used by two at once (the store serialises access).
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA synchronous=FULL")
    except BaseException:
        conn.close()
        raise
    return conn


def open_writer(path: str | Path, busy_timeout: float, sync: str = "full") -> sqlite3.Connection:
    """Open the writing connection: WAL, schema created or checked, then set up for ``sync`` (one
    of :data:`SYNC_MODES`; see the module docstring). Creating or migrating the schema waits up
    to ``busy_timeout`` for the write lock whatever ``sync`` is.

    Raises :class:`SchemaError` if the file holds a newer schema than :data:`SCHEMA_VERSION`,
    ``ValueError`` for an unknown ``sync``.
    """
    if sync not in SYNC_MODES:
        raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)}, got {sync!r}")
    conn = _connect(path, busy_timeout)
    try:
        _configure_writer(conn, path, busy_timeout)
        if sync == "normal":
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute("PRAGMA busy_timeout=0")
    except BaseException:
        conn.close()
        raise
    return conn


def open_checkpointer(path: str | Path, busy_timeout: float) -> sqlite3.Connection:
    """Open a connection that only checkpoints the WAL of an existing store file (it writes no
    rows; its checkpoints fsync, ``synchronous=NORMAL``)."""
    conn = _connect(path, busy_timeout)
    try:
        conn.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


def _enable_wal(conn: sqlite3.Connection, busy_timeout: float) -> str:
    """Switch to WAL. SQLite does not call the busy handler for this switch, so workers opening a
    new file at the same moment retry here (bounded by ``busy_timeout``) instead of failing."""
    give_up = time.monotonic() + busy_timeout
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= give_up:
                raise
            time.sleep(0.01)


def _configure_writer(conn: sqlite3.Connection, path: str | Path, busy_timeout: float) -> None:
    mode = _enable_wal(conn, busy_timeout)
    if str(mode).lower() != "wal":
        raise SchemaError(f"cannot use WAL journaling for {path!s} (got {mode!r})")
    conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
    conn.execute("BEGIN IMMEDIATE")
    try:
        _migrate(conn)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def open_reader(path: str | Path, busy_timeout: float) -> sqlite3.Connection:
    """Open a read-only connection to an existing store file (``PRAGMA query_only``)."""
    conn = _connect(path, busy_timeout)
    conn.execute("PRAGMA query_only=1")
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise SchemaError(f"store schema version {version} is newer than supported {SCHEMA_VERSION}")
    if version < SCHEMA_VERSION:
        for statement in _DDL.split(";"):
            if statement.strip():
                conn.execute(statement)
        columns = {r[1] for r in conn.execute("PRAGMA table_info(idempotency)")}
        if "fingerprint" not in columns:
            conn.execute("ALTER TABLE idempotency ADD COLUMN fingerprint BLOB")
        conn.execute(_KEY_INDEX)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
