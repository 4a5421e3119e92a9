"""The Redis store: every stream a Redis stream, shared by every worker and host that uses the
same Redis (or Sentinel-discovered primary), through `coredis` running natively on trio.

The data model is in :mod:`server.store.redis_keys` and ``redis_store.lua``; each operation on a
stream is one call of that one script, which Redis runs atomically: the idempotency check, the
closed check, the id assignment (epoch + seq, as every backend), the appends and the retention
trims of an append happen together or not at all.

Writes (append, close, delete) are queued to ONE writer task, which takes everything queued (up
to ``max_batch`` requests) and sends it as one pipeline of script calls (one round trip),
followed by ``WAIT <wait_replicas>`` when replicas must acknowledge. Then, in the order Redis ran
them, it tells the listener of every change and wakes each caller. An append returns once Redis
has answered it, so it is as durable as Redis's ``appendfsync`` makes it (``always``: fsynced
before the reply), and with ``wait_replicas`` also copied to that many replicas.

A failover never makes a stream issue a seq twice: a replica promoted without the last writes
its primary acknowledged starts a new lineage generation, and a strict call (every call with
``wait_replicas = 0``; with more, the calls on a stream whose last write here fell short of its
WAIT) on a stream last written under an older generation first gives it a new epoch, keeping its
retained events (``redis_store.lua``), so readers holding ids of the old epoch get a reset
``epoch``. A restart of a primary from its own AOF changes nothing.

Every call has a deadline of ``timeout`` seconds from the moment it was asked for: queued past
it, a request is failed without being sent; a pipeline, read or sweep still unanswered at its
deadline is abandoned, and its callers get :class:`RedisUnavailable` (a write then may or may
not have been applied: retry with the same idempotency key). Use :func:`open_redis_store`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from coredis.exceptions import NoScriptError
from coredis.tokens import PureToken

from server.core.events import NewEvent, StreamInfo
from server.core.groups import lone_error_unwrapped
from server.core.ids import new_epoch
from server.core.ports.store import AppendResult, Head, Notice, Page, Retention, Store, StreamClosed
from server.store.redis_client import (
    Redis,
    RedisUnavailable,
    ReplicationFailed,
    deadline,
    load_script,
    open_client,
    run_pipeline,
)
from server.store.redis_keys import DEFAULT_PREFIX, Keys
from server.store.redis_ops import (
    HEAD_FIELDS,
    SCRIPT,
    Call,
    Unreplicated,
    WriteOp,
    head,
    ms,
    read_call,
    read_page,
    trim_call,
    write_call,
    write_outcome,
)
from server.store.writes import (
    CloseOp,
    DeleteOp,
    OpValue,
    Outcome,
    Request,
    WriterStats,
    append_op,
    each_result,
    fail_pending,
    next_batch,
    outcome_value,
)

__all__ = ["RedisStats", "RedisStore", "RedisUnavailable", "ReplicationFailed", "open_redis_store"]

logger = logging.getLogger(__name__)

DEFAULT_RETENTION = Retention()
"""The retention used when none is given (the :class:`Retention` defaults)."""

MAX_READ_LIMIT = 10_000
"""Largest number of events one :meth:`RedisStore.read` returns, whatever ``limit`` asks for."""

HEADS_CHUNK = 500
"""Streams whose heads one pipeline of :meth:`RedisStore.heads` reads."""

TRIM_CHUNK = 256
"""Streams one round of :meth:`RedisStore.trim_expired` sweeps."""

TRIM_ROUNDS = 64
"""Most rounds of one :meth:`RedisStore.trim_expired` call; the rest waits for the next sweep."""


@dataclass(slots=True)
class RedisStats(WriterStats):
    """The writer's counters (:class:`WriterStats`): a commit is a pipeline Redis answered, a
    failed one a pipeline whose outcome is unknown (no answer in time, a lost connection)."""


_Request = Request[WriteOp]


class RedisStore(Store):
    """A :class:`Store` in Redis. Obtain it from :func:`open_redis_store`.

    If a caller is cancelled, or its deadline passes, after its request was sent, the request may
    still be applied (and the listener then told). After a failover (see the module docstring) a
    stream is relabelled by its first strict call, a write or a read: nothing tells the listener,
    and subscriptions learn it from the next event or head they meet, as after a delete.
    """

    def __init__(
        self,
        client: Redis,
        keys: Keys,
        retention: Retention,
        clock: Callable[[], float],
        *,
        timeout: float,
        wait_replicas: int = 0,
        queue_size: int = 1024,
        max_batch: int = 512,
    ) -> None:
        self.stats = RedisStats()
        self._client = client
        self._keys = keys
        self._retention = retention
        self._clock = clock
        self._timeout = timeout
        self._wait_replicas = wait_replicas
        self._unreplicated = Unreplicated()
        self._max_batch = max_batch
        self._sha = hashlib.sha1(SCRIPT.encode()).hexdigest()
        self._send, self._recv = trio.open_memory_channel[_Request](queue_size)
        self._inflight: list[_Request] = []
        self._closing = False
        self._writer_done = trio.Event()

    # -- public interface ---------------------------------------------------------------------

    async def append(
        self, stream: str, events: Sequence[NewEvent], *, idempotency_key: str | None = None
    ) -> AppendResult:
        """Append ``events`` atomically and in order, honouring ``idempotency_key`` (one script call)."""
        value = await self._outcome(await self._enqueue(append_op(stream, events, idempotency_key)))
        assert isinstance(value, AppendResult)
        return value

    async def append_each(self, items: Sequence[tuple[str, Sequence[NewEvent]]]) -> list[AppendResult | StreamClosed]:
        """As :meth:`Store.append_each`: every item is queued before any is waited for, so the
        writer sends them in one pipeline (up to ``max_batch`` requests), one round trip for all."""
        requests = [await self._enqueue(append_op(stream, events, None)) for stream, events in items]
        return await each_result(requests, self._outcome)

    async def read(self, stream: str, after_seq: int, limit: int) -> Page:
        """Return up to ``limit`` (at most :data:`MAX_READ_LIMIT`) retained events after ``after_seq``,
        with the stream's state, from one atomic script call."""
        strict = self._strict(stream)
        limit = min(limit, MAX_READ_LIMIT)
        call = read_call(self._keys, stream, after_seq, limit, strict=strict, epoch=new_epoch() if strict else "")
        return read_page(stream, await self._script(call, "read"))

    async def info(self, stream: str) -> StreamInfo | None:
        """Return the stream's state, or ``None`` if it does not exist."""
        return (await self.read(stream, 0, 0)).info

    async def heads(self, streams: Sequence[str]) -> dict[str, Head]:
        """Return the :class:`Head` of each existing stream in ``streams``: one pipeline of
        ``HMGET`` per :data:`HEADS_CHUNK` streams, each under the store's deadline."""
        out: dict[str, Head] = {}
        for i in range(0, len(streams), HEADS_CHUNK):
            chunk = list(streams[i : i + HEADS_CHUNK])
            with self._deadline("read stream heads"):
                async with self._client.pipeline(transaction=False) as pipe:
                    replies = [pipe.hmget(self._keys.meta(s), HEAD_FIELDS) for s in chunk]
                for stream, reply in zip(chunk, replies, strict=True):
                    found = head(await reply)
                    if found is not None:
                        out[stream] = found
        return out

    async def close_stream(self, stream: str) -> StreamInfo:
        """Mark the stream closed, creating it empty and closed if missing; closing twice is a no-op."""
        value = await self._outcome(await self._enqueue(CloseOp(stream)))
        assert isinstance(value, StreamInfo)
        return value

    async def delete(self, stream: str) -> bool:
        """Drop the stream and its events; return whether it existed. Its idempotency keys die
        with it (a key is live only while its stream keeps the epoch it was used in)."""
        value = await self._outcome(await self._enqueue(DeleteOp(stream)))
        assert isinstance(value, bool)
        return value

    async def trim_expired(self) -> int:
        """Drop events older than ``max_age`` in every stream that has some (found through the
        ages index, :data:`TRIM_CHUNK` streams per pipeline, at most :data:`TRIM_ROUNDS` rounds);
        return how many. Idempotency keys expire in Redis on their own (``PEXPIRE``)."""
        retention = self._retention
        if retention.max_age <= 0:
            return 0
        self._check_open()
        dropped = 0
        for _ in range(TRIM_ROUNDS):
            now = self._clock()
            cutoff = ms(now) - ms(retention.max_age)
            with self._deadline("sweep expired events"):
                names = await self._client.zrange(
                    self._keys.ages, "-inf", f"({cutoff}", sortby=PureToken.BYSCORE, offset=0, count=TRIM_CHUNK
                )
                calls = [trim_call(self._keys, name.decode(), now, retention) for name in names]
                replies = await self._pipeline(calls)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise RedisUnavailable(f"redis store: sweeping expired events failed: {reply}") from reply
                dropped += int(reply)
            if len(names) < TRIM_CHUNK:
                break
        return dropped

    async def ready(self) -> bool:
        """Redis answers a PING within ``store.redis_timeout`` (and the store is open)."""
        if self._closing:
            return False
        try:
            with self._deadline("ping"):
                await self._client.ping()
        except RedisUnavailable:
            return False
        return True

    async def aclose(self) -> None:
        """Send what is already queued, refuse anything new, and stop the writer."""
        self._begin_close()
        await self._writer_done.wait()

    def _begin_close(self) -> None:
        self._closing = True
        self._send.close()

    def _strict(self, stream: str) -> bool:
        """Whether calls on ``stream`` relabel it after a failover (see the class docstring)."""
        return not self._wait_replicas or stream in self._unreplicated

    def _check_open(self) -> None:
        if self._closing:
            raise RedisUnavailable("redis store: the store is closed")

    # -- calls --------------------------------------------------------------------------------

    def _deadline(self, what: str, at: float | None = None) -> AbstractContextManager[None]:
        """The store's deadline for one call (see :func:`_deadline`): ``at``, or ``timeout`` from now."""
        return deadline(what, trio.current_time() + self._timeout if at is None else at, self._timeout)

    async def _script(self, call: Call, what: str) -> Any:
        """One script call under the store's deadline (loading the script if Redis lacks it)."""
        self._check_open()
        keys, args = call
        with self._deadline(what):
            try:
                return await self._client.evalsha(self._sha, keys, args)
            except NoScriptError:
                await self._load_script()
                return await self._client.evalsha(self._sha, keys, args)

    async def _load_script(self) -> None:
        await load_script(self._client, self._sha)

    async def _pipeline(self, calls: Sequence[Call], wait: int = 0, wait_ms: int = 0) -> list[Any]:
        return await run_pipeline(self._client, self._sha, calls, wait, wait_ms)

    # -- writer -------------------------------------------------------------------------------

    async def _enqueue(self, op: WriteOp) -> _Request:
        """Queue ``op`` for the writer, without yielding when the queue has room (so requests
        queued one after the other go in one pipeline), else waiting for room until the deadline."""
        self._check_open()
        request = _Request(op, trio.current_time() + self._timeout)
        try:
            try:
                self._send.send_nowait(request)
            except trio.WouldBlock:
                with trio.move_on_at(request.deadline):
                    await self._send.send(request)
                    return request
                raise RedisUnavailable(
                    f"redis store: the write queue stayed full for {self._timeout} s (store.redis_timeout)"
                ) from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise RedisUnavailable("redis store: the store is closed") from None
        return request

    async def _outcome(self, request: _Request) -> OpValue:
        """Wait for ``request``'s outcome (the writer settles it by its deadline); its value, or raise its error."""
        with trio.move_on_at(request.deadline + self._timeout):
            await request.done.wait()
        if request.outcome is None:
            raise RedisUnavailable("redis store: no outcome within store.redis_timeout; the write may still apply")
        return outcome_value(request.outcome)

    async def _run_writer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send queued requests in pipelines until the queue is closed and drained."""
        task_status.started()
        try:
            while (batch := await next_batch(self._recv, self._max_batch)) is not None:
                self._inflight = batch
                await self._commit(batch)
                self._inflight = []
        finally:
            self._stop_writer()

    async def _commit(self, batch: list[_Request]) -> None:
        now = trio.current_time()
        for request in batch:
            if request.deadline <= now:
                request.fail(RedisUnavailable("redis store: not sent, the writer was busy past store.redis_timeout"))
        batch = [request for request in batch if not request.done.is_set()]
        if not batch:
            return
        deadline = min(request.deadline for request in batch)
        wall = self._clock()
        calls = [
            write_call(self._keys, r.op, wall, self._retention, new_epoch(), strict=self._strict(r.op.stream))
            for r in batch
        ]
        wait_ms = max(1, ms((deadline - now) / 2))
        try:
            with self._deadline("write", deadline):
                replies = await self._pipeline(calls, self._wait_replicas, wait_ms)
        except RedisUnavailable as exc:
            self.stats.failed_commits += 1
            logger.warning("redis store: a pipeline of %d requests failed: %s", len(batch), exc)
            for request in batch:
                request.fail(RedisUnavailable(str(exc)))
            return
        self._settle(batch, replies)

    def _settle(self, batch: list[_Request], replies: list[Any]) -> None:
        """Tell the listener of each change in the order Redis applied them, then wake the callers."""
        short = None
        if self._wait_replicas:
            acked = replies.pop()
            if isinstance(acked, Exception) or int(acked) < self._wait_replicas:
                short = f"{acked} of {self._wait_replicas} replicas acknowledged within the timeout"
        stats = self.stats
        stats.commits += 1
        stats.requests += len(batch)
        stats.largest_batch = max(stats.largest_batch, len(batch))
        outcomes = []
        for request, reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception):
                error = RedisUnavailable(f"redis store: Redis refused the write: {reply}")
                error.__cause__ = reply
                outcomes.append(Outcome(error=error))
                continue
            try:
                outcome = write_outcome(request.op, reply)
            except (ValueError, TypeError, IndexError) as exc:  # not the script's reply: the outcome is unknown
                outcomes.append(Outcome(error=RedisUnavailable(f"redis store: unexpected reply {reply!r}: {exc}")))
                continue
            for notice in outcome.notices:
                self._tell(notice)
            if isinstance(outcome.value, AppendResult):
                stats.events += len(outcome.value.events)
            if self._wait_replicas and outcome.notices:
                if short is None:
                    self._unreplicated.clear(request.op.stream)
                else:
                    self._unreplicated.mark(request.op.stream)
            if short is not None and outcome.error is None:
                outcome = Outcome(error=ReplicationFailed(f"redis store: applied on the primary, but only {short}"))
            outcomes.append(outcome)
        for request, outcome in zip(batch, outcomes, strict=True):
            request.finish(outcome)

    def _stop_writer(self) -> None:
        """Fail every request the writer will not send, and refuse new ones."""
        pending, self._inflight = self._inflight, []
        self._closing = True
        stopped = "redis store: the writer stopped before this request was answered"
        fail_pending(pending, self._recv, lambda: RedisUnavailable(stopped))
        self._writer_done.set()

    def _tell(self, notice: Notice) -> None:
        try:
            self._notify(notice)
        except Exception:
            logger.exception("store listener failed on %s", type(notice).__name__)


@asynccontextmanager
async def open_redis_store(
    url: str | None = None,
    retention: Retention = DEFAULT_RETENTION,
    *,
    sentinels: Sequence[str] = (),
    master: str | None = None,
    prefix: str = DEFAULT_PREFIX,
    timeout: float = 2.0,
    wait_replicas: int = 0,
    clock: Callable[[], float] = time.time,
    queue_size: int = 1024,
    max_batch: int = 512,
    max_connections: int = 8,
) -> AsyncIterator[RedisStore]:
    """Connect to Redis at ``url`` (``redis://``, ``rediss://``, ``unix://``), or to the primary
    named ``master`` that ``sentinels`` (``host:port``) know, and run the store's writer until the
    block exits. Keys start with ``prefix``.

    ``timeout`` (seconds) bounds every Redis call and each request's whole stay in the store;
    ``wait_replicas`` replicas must acknowledge each pipeline of writes (``WAIT``), else its
    callers get :class:`ReplicationFailed`. ``queue_size`` bounds the write requests waiting for
    the writer, ``max_batch`` the requests in one pipeline, ``max_connections`` the client's pool.
    Redis need not be reachable at open: requests fail with :class:`RedisUnavailable` until it is.
    On exit, queued writes are sent, then the connections are closed.
    """
    if queue_size < 1 or max_batch < 1 or max_connections < 1 or wait_replicas < 0:
        raise ValueError("queue_size, max_batch and max_connections must be at least 1, wait_replicas at least 0")
    if not timeout > 0:
        raise ValueError("timeout must be positive")
    keys = Keys(prefix)
    async with open_client(url, sentinels, master, timeout, max_connections) as client:
        store = RedisStore(
            client,
            keys,
            retention,
            clock,
            timeout=timeout,
            wait_replicas=wait_replicas,
            queue_size=queue_size,
            max_batch=max_batch,
        )
        try:
            with store._deadline("load the store's script"):
                await store._load_script()
        except RedisUnavailable as exc:
            logger.warning("%s; requests fail until Redis answers", exc)
        with lone_error_unwrapped():
            async with trio.open_nursery() as nursery:
                await nursery.start(store._run_writer)
                try:
                    yield store
                finally:
                    store._begin_close()
                    with trio.CancelScope(shield=True), trio.move_on_after(timeout):
                        await store._writer_done.wait()
                    nursery.cancel_scope.cancel()
