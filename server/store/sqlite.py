"""The embedded default store: one sqlite file in WAL mode, shared by every worker on the host.

Writes (append, close, delete, trim) are queued to ONE writer task, which takes everything queued
(up to ``max_batch`` requests), applies it in one transaction in a worker thread and commits with
``synchronous=FULL`` before anyone is answered: an acknowledged append survives ``kill -9`` and,
as far as the disk honours fsync, power loss. Back on the trio thread, in commit order, the writer
tells the listener of every change and then wakes each caller with its result (group commit: one
fsync for many appends).

Reads use a small pool of separate read-only connections (WAL readers never wait for the writer).
Blocking sqlite calls always run in threads. Use :func:`open_sqlite_store` to get a store.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import trio

from server.core.events import NewEvent, StreamInfo
from server.core.groups import lone_error_unwrapped
from server.store.base import AppendResult, Head, Notice, Page, Retention, Store, StreamClosed
from server.store.sqlite_ops import (
    AppendOp,
    BatchFailed,
    CloseOp,
    DeleteOp,
    OpValue,
    Outcome,
    TrimOp,
    WriteOp,
    WriterState,
    commit_batch,
    read_heads,
    read_info,
    read_page,
)
from server.store.sqlite_schema import open_reader, open_writer

logger = logging.getLogger(__name__)

DEFAULT_RETENTION = Retention()
"""The retention used when none is given (the :class:`Retention` defaults)."""

MAX_READ_LIMIT = 10_000
"""Largest number of events one :meth:`SqliteStore.read` returns, whatever ``limit`` asks for."""

_T = TypeVar("_T")


class StoreUnavailable(RuntimeError):
    """The request was not carried out: the store is closed, its writer stopped, or the commit failed."""


@dataclass(slots=True)
class SqliteStats:
    """Counters of the writer since the store was opened (read them, do not write them).

    ``commits`` counts committed transactions and ``requests`` the write requests they carried, so
    ``requests / commits`` is the mean group-commit size; ``largest_batch`` is the most requests
    one transaction carried; ``events`` counts appended events; ``failed_commits`` counts
    transactions rolled back as a whole.
    """

    commits: int = 0
    requests: int = 0
    events: int = 0
    largest_batch: int = 0
    failed_commits: int = 0


def _append_op(stream: str, events: Sequence[NewEvent], key: str | None) -> AppendOp:
    """The writer's op for one append (its own copy of the events); ``ValueError`` when empty."""
    if not events:
        raise ValueError("append needs at least one event")
    return AppendOp(stream, tuple(NewEvent(str(e.type), bytes(e.data), bool(e.binary)) for e in events), key)


@dataclass(eq=False, slots=True)
class _Request:
    op: WriteOp
    done: trio.Event = field(default_factory=trio.Event)
    outcome: Outcome | None = None

    def finish(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.done.set()

    def fail(self, error: Exception) -> None:
        self.finish(Outcome(error=error))


class SqliteStore(Store):
    """A :class:`Store` in one sqlite file. Obtain it from :func:`open_sqlite_store`.

    Appends return only after COMMIT with ``synchronous=FULL``. If a caller is cancelled after
    its request was queued, the request may still be committed (and the listener told).
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
    ) -> None:
        self.stats = SqliteStats()
        self._writer = writer
        self._readers = list(readers)
        self._retention = retention
        self._clock = clock
        self._max_batch = max_batch
        self._send, self._recv = trio.open_memory_channel[_Request](queue_size)
        self._pool_send, self._pool_recv = trio.open_memory_channel[sqlite3.Connection](len(self._readers))
        for conn in self._readers:
            self._pool_send.send_nowait(conn)
        self._write_limiter = trio.CapacityLimiter(1)
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
        value = await self._submit(_append_op(stream, events, idempotency_key))
        assert isinstance(value, AppendResult)
        return value

    async def append_each(self, items: Sequence[tuple[str, Sequence[NewEvent]]]) -> list[AppendResult | StreamClosed]:
        """As :meth:`Store.append_each`: every item is queued before any is waited for, so the
        writer takes them into one transaction (up to ``max_batch`` requests), one fsync for all."""
        requests = [await self._enqueue(_append_op(stream, events, None)) for stream, events in items]
        results: list[AppendResult | StreamClosed] = []
        for request in requests:
            try:
                value = await self._outcome(request)
            except StreamClosed as exc:
                results.append(exc)
                continue
            assert isinstance(value, AppendResult)
            results.append(value)
        return results

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
        outcome = request.outcome
        assert outcome is not None
        if outcome.error is not None:
            raise outcome.error
        assert outcome.value is not None
        return outcome.value

    async def _run_writer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit queued requests in groups until the queue is closed and drained."""
        task_status.started()
        try:
            while True:
                try:
                    first = await self._recv.receive()
                except trio.EndOfChannel:
                    return
                batch = [first]
                while len(batch) < self._max_batch:
                    try:
                        batch.append(self._recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                self._inflight = batch
                await self._commit(batch)
                self._inflight = []
        except Exception as exc:
            self._failure = exc
            raise
        finally:
            self._stop_writer()

    async def _commit(self, batch: list[_Request]) -> None:
        now = self._clock()
        ops = [request.op for request in batch]
        try:
            outcomes = await trio.to_thread.run_sync(
                commit_batch, self._writer, ops, now, self._retention, self._writer_state,
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

    def _stop_writer(self) -> None:
        """Fail every request the writer will not commit, and refuse new ones (no checkpoint)."""
        pending, self._inflight = self._inflight, []
        while True:
            try:
                pending.append(self._recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        self._recv.close()
        for request in pending:
            if not request.done.is_set():
                error = StoreUnavailable("the store's writer stopped before committing this request")
                error.__cause__ = self._failure
                request.fail(error)
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
                await trio.to_thread.run_sync(_close_all, [self._writer, *self._readers])
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
) -> AsyncIterator[SqliteStore]:
    """Open (creating if needed) the store file ``path`` and run its writer until the block exits.

    ``queue_size`` bounds the write requests waiting for the writer (callers wait when it is
    full); ``max_batch`` bounds the requests committed in one transaction; ``readers`` is the size
    of the read connection pool; ``busy_timeout`` (seconds) bounds waits for another process's
    write lock. On exit, queued writes are committed, then every connection is closed. If the
    writer fails, waiting callers get :class:`StoreUnavailable`, the block is cancelled and the
    writer's exception propagates.
    """
    if queue_size < 1 or max_batch < 1 or readers < 1:
        raise ValueError("queue_size, max_batch and readers must each be at least 1")
    conns: list[sqlite3.Connection] = []
    try:
        conns.append(await trio.to_thread.run_sync(open_writer, path, busy_timeout))
        for _ in range(readers):
            conns.append(await trio.to_thread.run_sync(open_reader, path, busy_timeout))
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_close_all, conns)
        raise
    store = SqliteStore(conns[0], conns[1:], retention, clock, queue_size=queue_size, max_batch=max_batch)
    try:
        with lone_error_unwrapped():
            async with trio.open_nursery() as nursery:
                await nursery.start(store._run_writer)
                try:
                    yield store
                finally:
                    store._begin_close()
                    await store._writer_done.wait()
    finally:
        await store._release()
