"""The embedded default store: one sqlite file in WAL mode, shared by every worker on the host.

Writes (append, close, delete, trim) are queued to ONE writer task, which takes everything queued
(up to ``max_batch`` requests), applies it in one transaction and commits it before anyone is
answered. Then, in commit order, the writer tells the listener of every change and wakes each
caller with its result (group commit: one commit for many appends). How a commit runs depends on
``sync``:

* ``"full"``: in a worker thread, with ``synchronous=FULL``: an acknowledged append survives
  ``kill -9`` and, as far as the disk honours fsync, power loss. Sqlite checkpoints the WAL inside
  a commit now and then, and sleeps in the thread while another process holds the write lock.
* ``"normal"``: on the event loop's thread, with ``synchronous=NORMAL``: no fsync, so a commit is
  tens of microseconds of CPU and page-cache writes, with no thread hand-off (a batch holding a
  trim or a delete, which may drop many rows, still goes to a thread); an acknowledged
  append survives ``kill -9`` of any process, not a power loss or a kernel crash. Nothing on
  that path sleeps: the writer connection never checkpoints (a checkpointer task does, on its
  own connection in a thread, every ``checkpoint_interval`` seconds or ``checkpoint_commits``
  commits, whichever comes first) and has a zero busy timeout: when another worker holds the
  write lock, the writer waits with ``trio.sleep`` (1 ms, doubling to 8 ms, up to
  ``busy_timeout`` in all), takes into the batch what was queued meanwhile, and tries again.

Reads use a small pool of separate read-only connections (WAL readers never wait for the writer),
in threads. Use :func:`open_sqlite_store` to get a store.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio

from server.core.events import NewEvent, StreamInfo
from server.core.groups import lone_error_unwrapped
from server.core.ports.store import (
    AppendResult,
    Head,
    Notice,
    Page,
    Retention,
    Store,
    StoreUnavailable,
    StreamClosed,
)
from server.store.sqlite_ops import (
    BatchFailed,
    CloseOp,
    DeleteOp,
    OpValue,
    Outcome,
    TrimOp,
    WriteLockBusy,
    WriteOp,
    WriterState,
    checkpoint,
    commit_batch,
    read_heads,
    read_info,
    read_page,
)
from server.store.sqlite_schema import SYNC_MODES, open_checkpointer, open_reader, open_writer
from server.store.writes import (
    Request,
    WriterStats,
    append_op,
    each_result,
    fail_pending,
    next_batch,
    outcome_value,
    take_queued,
)

logger = logging.getLogger(__name__)

DEFAULT_RETENTION = Retention()
"""The retention used when none is given (the :class:`Retention` defaults)."""

MAX_READ_LIMIT = 10_000
"""Largest number of events one :meth:`SqliteStore.read` returns, whatever ``limit`` asks for."""

BUSY_FIRST_WAIT = 0.001
"""Seconds the ``"normal"`` writer first waits when another connection holds the write lock."""

BUSY_MAX_WAIT = 0.008
"""Longest single wait of the ``"normal"`` writer for the write lock (the waits double up to it)."""

_T = TypeVar("_T")


@dataclass(slots=True)
class SqliteStats(WriterStats):
    """The writer's counters (:class:`WriterStats`): a commit is a committed transaction, a
    failed one was rolled back as a whole. With ``sync = "normal"``: ``busy_waits`` counts the
    times the writer found the write lock taken by another connection and waited, and
    ``checkpoints`` the WAL checkpoints run (``checkpoint_failures`` those that raised).
    """

    busy_waits: int = 0
    checkpoints: int = 0
    checkpoint_failures: int = 0


_Request = Request[WriteOp]


class SqliteStore(Store):
    """A :class:`Store` in one sqlite file. Obtain it from :func:`open_sqlite_store`.

    Appends return only after COMMIT (durable as its ``sync`` promises: see the module
    docstring). If a caller is cancelled after its request was queued, the request may still be
    committed (and the listener told).
    """

    def __init__(
        self,
        writer: sqlite3.Connection,
        readers: Sequence[sqlite3.Connection],
        retention: Retention,
        clock: Callable[[], float],
        *,
        queue_size: int,
        max_batch: int,
        sync: str = "full",
        busy_timeout: float = 5.0,
        checkpointer: sqlite3.Connection | None = None,
        checkpoint_interval: float = 1.0,
        checkpoint_commits: int = 256,
    ) -> None:
        self.stats = SqliteStats()
        self._writer = writer
        self._inline = sync == "normal"
        self._busy_timeout = busy_timeout
        self._checkpointer = checkpointer
        self._checkpoint_interval = checkpoint_interval
        self._checkpoint_commits = checkpoint_commits
        self._uncheckpointed = 0  # commits since the last checkpoint began
        self._wrote = trio.Event()  # set by a commit since the last checkpoint began
        self._checkpoint_due = trio.Event()  # set once checkpoint_commits commits are waiting
        self._readers = list(readers)
        self._retention = retention
        self._clock = clock
        self._max_batch = max_batch
        self._send, self._recv = trio.open_memory_channel[_Request](queue_size)
        self._pool_send, self._pool_recv = trio.open_memory_channel[sqlite3.Connection](len(self._readers))
        for conn in self._readers:
            self._pool_send.send_nowait(conn)
        self._write_limiter = trio.CapacityLimiter(1)
        self._checkpoint_limiter = trio.CapacityLimiter(1)
        self._read_limiter = trio.CapacityLimiter(len(self._readers))
        self._inflight: list[_Request] = []
        self._writer_state = WriterState()  # touched only by the writer's thread calls
        self._closing = False
        self._failure: Exception | None = None
        self._writer_done = trio.Event()
        self._released = False
        self._released_event = trio.Event()

    # -- public interface ---------------------------------------------------------------------

    async def append(
        self, stream: str, events: Sequence[NewEvent], *, idempotency_key: str | None = None
    ) -> AppendResult:
        """Append ``events`` atomically and in order, durably, honouring ``idempotency_key``."""
        value = await self._submit(append_op(stream, events, idempotency_key))
        assert isinstance(value, AppendResult)
        return value

    async def append_each(self, items: Sequence[tuple[str, Sequence[NewEvent]]]) -> list[AppendResult | StreamClosed]:
        """As :meth:`Store.append_each`: every item is queued before any is waited for, so the
        writer takes them into one transaction (up to ``max_batch`` requests), one fsync for all."""
        requests = [await self._enqueue(append_op(stream, events, None)) for stream, events in items]
        return await each_result(requests, self._outcome)

    async def read(self, stream: str, after_seq: int, limit: int) -> Page:
        """Return up to ``limit`` (at most :data:`MAX_READ_LIMIT`) retained events after ``after_seq``."""
        return await self._read(read_page, stream, after_seq, min(limit, MAX_READ_LIMIT))

    async def info(self, stream: str) -> StreamInfo | None:
        """Return the stream's committed state, or ``None`` if it does not exist."""
        return await self._read(read_info, stream)

    async def heads(self, streams: Sequence[str]) -> dict[str, Head]:
        """Return the committed :class:`Head` of each existing stream in ``streams``, in one thread
        call and one query per chunk of streams."""
        if not streams:
            return {}
        return await self._read(read_heads, list(streams))

    async def close_stream(self, stream: str) -> StreamInfo:
        """Mark the stream closed, creating it empty and closed if missing; closing twice is a no-op."""
        value = await self._submit(CloseOp(stream))
        assert isinstance(value, StreamInfo)
        return value

    async def delete(self, stream: str) -> bool:
        """Drop the stream, its events and its idempotency keys; return whether it existed."""
        value = await self._submit(DeleteOp(stream))
        assert isinstance(value, bool)
        return value

    async def trim_expired(self) -> int:
        """Drop events older than ``max_age`` and expired idempotency keys in every stream; return the count."""
        value = await self._submit(TrimOp())
        assert isinstance(value, int)
        return value

    async def aclose(self) -> None:
        """Commit what is already queued, refuse anything new, and close every connection."""
        self._begin_close()
        await self._writer_done.wait()
        await self._release()

    def _begin_close(self) -> None:
        """Refuse new requests; the writer commits what is queued, then stops."""
        self._closing = True
        self._send.close()

    # -- writer -------------------------------------------------------------------------------

    async def _submit(self, op: WriteOp) -> OpValue:
        return await self._outcome(await self._enqueue(op))

    async def _enqueue(self, op: WriteOp) -> _Request:
        """Queue ``op`` for the writer; without yielding when the queue has room (so requests
        queued one after the other go in one transaction), else waiting for room."""
        if self._closing or self._failure is not None:
            raise StoreUnavailable("the store is closed or its writer stopped") from self._failure
        request = _Request(op)
        try:
            try:
                self._send.send_nowait(request)
            except trio.WouldBlock:
                await self._send.send(request)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise StoreUnavailable("the store is closed") from self._failure
        return request

    async def _outcome(self, request: _Request) -> OpValue:
        """Wait for ``request`` to be committed; its value, or raise its error."""
        await request.done.wait()
        return outcome_value(request.outcome)

    async def _run_writer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit queued requests in groups until the queue is closed and drained."""
        task_status.started()
        try:
            while (batch := await next_batch(self._recv, self._max_batch)) is not None:
                self._inflight = batch
                await self._commit(batch)
                self._inflight = []
        except Exception as exc:
            self._failure = exc
            raise
        finally:
            self._stop_writer()

    def _take_queued(self, batch: list[_Request]) -> None:
        """Add to ``batch`` what is queued now, up to ``max_batch`` requests in all."""
        take_queued(self._recv, batch, self._max_batch)

    async def _commit(self, batch: list[_Request]) -> None:
        try:
            if self._inline:
                outcomes = await self._commit_inline(batch)
            else:
                outcomes = await trio.to_thread.run_sync(
                    commit_batch,
                    self._writer,
                    [request.op for request in batch],
                    self._clock(),
                    self._retention,
                    self._writer_state,
                    limiter=self._write_limiter,
                )
        except BatchFailed as exc:
            self.stats.failed_commits += 1
            logger.warning("sqlite store: commit of %d requests failed: %s", len(batch), exc)
            for request in batch:
                error = StoreUnavailable(f"commit failed: {exc}")
                error.__cause__ = exc
                request.fail(error)
            return
        stats = self.stats
        stats.commits += 1
        stats.requests += len(batch)
        stats.largest_batch = max(stats.largest_batch, len(batch))
        for outcome in outcomes:
            for notice in outcome.notices:
                self._tell(notice)
            if isinstance(outcome.value, AppendResult):
                stats.events += len(outcome.value.events)
        for request, outcome in zip(batch, outcomes, strict=True):
            request.finish(outcome)
        if self._inline:
            self._wrote.set()
            self._uncheckpointed += 1
            if self._uncheckpointed >= self._checkpoint_commits:
                self._checkpoint_due.set()

    async def _commit_inline(self, batch: list[_Request]) -> list[Outcome]:
        """Commit ``batch`` on this thread (no fsync, zero busy timeout), or in a thread if it holds a
        trim or a delete (which may drop many rows). While another connection
        holds the write lock, wait with trio (doubling waits, ``busy_timeout`` in all) and take
        what was queued meanwhile into ``batch`` (up to ``max_batch``); :class:`WriteLockBusy`
        once the time is up."""
        give_up = trio.current_time() + self._busy_timeout
        wait = BUSY_FIRST_WAIT
        while True:
            ops = [request.op for request in batch]
            args = (self._writer, ops, self._clock(), self._retention, self._writer_state)
            try:
                if any(isinstance(op, TrimOp | DeleteOp) for op in ops):  # may drop many rows: a thread
                    return await trio.to_thread.run_sync(commit_batch, *args, limiter=self._write_limiter)
                return commit_batch(*args)
            except WriteLockBusy:
                now = trio.current_time()
                if now >= give_up:
                    raise
                self.stats.busy_waits += 1
                await trio.sleep(min(wait, give_up - now))
                wait = min(wait * 2, BUSY_MAX_WAIT)
                self._take_queued(batch)

    async def _run_checkpointer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Checkpoint the WAL (``"normal"`` only) in a thread, on its own connection, so commits
        go on meanwhile: ``checkpoint_interval`` seconds after the first commit since the last
        checkpoint, or at once when ``checkpoint_commits`` commits are waiting. Runs until cancelled."""
        task_status.started()
        assert self._checkpointer is not None
        while True:
            await self._wrote.wait()
            with trio.move_on_after(self._checkpoint_interval):
                await self._checkpoint_due.wait()
            self._wrote, self._checkpoint_due, self._uncheckpointed = trio.Event(), trio.Event(), 0
            try:
                await trio.to_thread.run_sync(checkpoint, self._checkpointer, limiter=self._checkpoint_limiter)
            except sqlite3.Error as exc:
                self.stats.checkpoint_failures += 1
                logger.warning("sqlite store: WAL checkpoint failed: %s", exc)
            else:
                self.stats.checkpoints += 1

    def _stop_writer(self) -> None:
        """Fail every request the writer will not commit, and refuse new ones (no checkpoint)."""
        pending, self._inflight = self._inflight, []

        def stopped() -> Exception:
            error = StoreUnavailable("the store's writer stopped before committing this request")
            error.__cause__ = self._failure
            return error

        fail_pending(pending, self._recv, stopped)
        self._writer_done.set()

    def _tell(self, notice: Notice) -> None:
        try:
            self._notify(notice)
        except Exception:
            logger.exception("store listener failed on %s", type(notice).__name__)

    # -- readers and shutdown -----------------------------------------------------------------

    async def _read(self, fn: Callable[..., _T], *args: object) -> _T:
        if self._closing:
            raise StoreUnavailable("the store is closed")
        try:
            conn = await self._pool_recv.receive()
        except (trio.ClosedResourceError, trio.EndOfChannel):
            raise StoreUnavailable("the store is closed") from None
        try:
            if self._closing:
                raise StoreUnavailable("the store is closed")
            return await trio.to_thread.run_sync(fn, conn, *args, limiter=self._read_limiter)
        finally:
            self._pool_send.send_nowait(conn)

    async def _release(self) -> None:
        """Close every connection once no thread uses it; bounded by the reads in flight."""
        if self._released:
            await self._released_event.wait()
            return
        self._released = True
        with trio.CancelScope(shield=True):
            try:
                for _ in self._readers:
                    await self._pool_recv.receive()
                self._pool_recv.close()
                self._pool_send.close()
                extra = [] if self._checkpointer is None else [self._checkpointer]
                await trio.to_thread.run_sync(_close_all, [self._writer, *self._readers, *extra])
            finally:
                self._released_event.set()


def _close_all(conns: Sequence[sqlite3.Connection]) -> None:
    for conn in conns:
        try:
            conn.close()
        except sqlite3.Error:
            logger.exception("sqlite store: closing a connection failed")


@asynccontextmanager
async def open_sqlite_store(
    path: str | Path,
    retention: Retention = DEFAULT_RETENTION,
    *,
    clock: Callable[[], float] = time.time,
    queue_size: int = 1024,
    max_batch: int = 512,
    readers: int = 2,
    busy_timeout: float = 5.0,
    sync: str = "full",
    checkpoint_interval: float = 1.0,
    checkpoint_commits: int = 256,
) -> AsyncIterator[SqliteStore]:
    """Open (creating if needed) the store file ``path`` and run its writer until the block exits.

    ``queue_size`` bounds the write requests waiting for the writer (callers wait when it is
    full); ``max_batch`` bounds the requests committed in one transaction; ``readers`` is the size
    of the read connection pool; ``busy_timeout`` (seconds) bounds waits for another process's
    write lock. ``sync`` is ``"full"`` (fsync at every commit, in a thread) or ``"normal"`` (no
    fsync, commits on the event loop's thread, WAL checkpoints by a task of the store every
    ``checkpoint_interval`` seconds or ``checkpoint_commits`` commits): see the module docstring.
    On exit, queued writes are committed, then every connection is closed. If the writer fails,
    waiting callers get :class:`StoreUnavailable`, the block is cancelled and the writer's
    exception propagates.
    """
    if queue_size < 1 or max_batch < 1 or readers < 1 or checkpoint_commits < 1:
        raise ValueError("queue_size, max_batch, readers and checkpoint_commits must each be at least 1")
    if sync not in SYNC_MODES:
        raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)}, got {sync!r}")
    if not checkpoint_interval > 0:
        raise ValueError("checkpoint_interval must be positive")
    conns: list[sqlite3.Connection] = []
    try:
        conns.append(await trio.to_thread.run_sync(open_writer, path, busy_timeout, sync))
        for _ in range(readers):
            conns.append(await trio.to_thread.run_sync(open_reader, path, busy_timeout))
        if sync == "normal":
            conns.append(await trio.to_thread.run_sync(open_checkpointer, path, busy_timeout))
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_close_all, conns)
        raise
    store = SqliteStore(
        conns[0],
        conns[1 : readers + 1],
        retention,
        clock,
        queue_size=queue_size,
        max_batch=max_batch,
        sync=sync,
        busy_timeout=busy_timeout,
        checkpointer=conns[readers + 1] if sync == "normal" else None,
        checkpoint_interval=checkpoint_interval,
        checkpoint_commits=checkpoint_commits,
    )
    try:
        with lone_error_unwrapped():
            async with trio.open_nursery() as nursery:
                await nursery.start(store._run_writer)
                if store._checkpointer is not None:
                    await nursery.start(store._run_checkpointer)
                try:
                    yield store
                finally:
                    store._begin_close()
                    await store._writer_done.wait()
                    nursery.cancel_scope.cancel()
    finally:
        await store._release()
