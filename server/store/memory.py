"""The in-process store: dicts and deques, for a single worker (tests, development, one-process setups).

Nothing survives the process. Every operation completes synchronously after one checkpoint, so the
listener has heard of a change before the awaiting call returns and no other task can observe a
half-applied change.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from server.core.events import Event, NewEvent, StreamInfo
from server.core.ids import format_id, new_epoch
from server.core.ports.store import (
    Appended,
    AppendResult,
    Closed,
    Deleted,
    IdempotencyKeyReused,
    Notice,
    Page,
    Retention,
    Store,
    StreamClosed,
)
from server.store.fingerprint import fingerprint

logger = logging.getLogger(__name__)

DEFAULT_RETENTION = Retention()
"""The retention used when none is given (the :class:`Retention` defaults)."""

MAX_READ_LIMIT = 10_000
"""Largest number of events one :meth:`MemoryStore.read` returns, whatever ``limit`` asks for."""

DEFAULT_MAX_IDEMPOTENCY_KEYS = 100_000
"""Default cap on remembered idempotency keys, all streams together (oldest forgotten first)."""


@dataclass(frozen=True, slots=True)
class _Key:
    stream: str
    epoch: str
    first_seq: int
    count: int
    ts: float
    fingerprint: bytes


@dataclass(slots=True)
class _Stream:
    epoch: str
    last_seq: int = 0
    closed: bool = False
    last_ts: float = 0.0
    nbytes: int = 0
    events: deque[Event] = field(default_factory=deque)
    stamps: deque[float] = field(default_factory=deque)

    def info(self, name: str) -> StreamInfo:
        first = self.events[0].seq if self.events else 0
        return StreamInfo(name, self.epoch, first, self.last_seq, self.closed, len(self.events))

    def drop_oldest(self) -> None:
        event = self.events.popleft()
        self.stamps.popleft()
        self.nbytes -= len(event.data)


class MemoryStore(Store):
    """A :class:`Store` held in this process's memory; usable by one worker only.

    ``retention`` bounds what each stream keeps; ``clock`` (seconds, like :func:`time.time`) stamps
    events and idempotency keys, so tests can move time deterministically. At most
    ``max_idempotency_keys`` keys are remembered in all, oldest forgotten first, so that memory
    stays bounded even with an unlimited ``idempotency_window``.
    """

    def __init__(
        self,
        retention: Retention = DEFAULT_RETENTION,
        clock: Callable[[], float] = time.time,
        *,
        max_idempotency_keys: int = DEFAULT_MAX_IDEMPOTENCY_KEYS,
    ) -> None:
        if max_idempotency_keys < 1:
            raise ValueError("max_idempotency_keys must be at least 1")
        self._retention = retention
        self._clock = clock
        self._max_keys = max_idempotency_keys
        self._streams: dict[str, _Stream] = {}
        self._keys: OrderedDict[str, _Key] = OrderedDict()
        self._closed = False

    async def append(
        self, stream: str, events: Sequence[NewEvent], *, idempotency_key: str | None = None
    ) -> AppendResult:
        """Append ``events`` atomically and in order, honouring ``idempotency_key`` (see :class:`Store`)."""
        if not events:
            raise ValueError("append needs at least one event")
        await self._enter()
        now = self._clock()
        state = self._streams.get(stream)
        digest = b""
        if idempotency_key is not None:
            self._forget_keys(now)
            digest = fingerprint(events)
            key = self._keys.get(idempotency_key)
            if key is not None and self._key_live(key, now):
                if key.stream != stream or key.fingerprint != digest:
                    raise IdempotencyKeyReused(idempotency_key)
                ids = [format_id(key.epoch, key.first_seq + i) for i in range(key.count)]
                return AppendResult(ids=ids, duplicate=True)
        if state is None:
            state = self._streams[stream] = _Stream(epoch=new_epoch(), last_ts=now)
        elif state.closed:
            raise StreamClosed(stream)
        stamp = max(now, state.last_ts)
        state.last_ts = stamp
        first_seq = state.last_seq + 1
        appended = [
            Event(stream, state.epoch, first_seq + i, e.type, bytes(e.data), e.binary) for i, e in enumerate(events)
        ]
        for event in appended:
            state.events.append(event)
            state.stamps.append(stamp)
            state.nbytes += len(event.data)
        state.last_seq = appended[-1].seq
        self._enforce(state, now)
        if idempotency_key is not None:
            keys = self._keys
            keys[idempotency_key] = _Key(stream, state.epoch, first_seq, len(appended), now, digest)
            keys.move_to_end(idempotency_key)
            while len(keys) > self._max_keys:
                keys.popitem(last=False)
        self._tell(Appended(appended))
        return AppendResult(ids=[e.id for e in appended], events=appended)

    async def read(self, stream: str, after_seq: int, limit: int) -> Page:
        """Return up to ``limit`` (at most :data:`MAX_READ_LIMIT`) retained events after ``after_seq``."""
        await self._enter()
        state = self._streams.get(stream)
        if state is None:
            return Page(None)
        info = state.info(stream)
        limit = min(limit, MAX_READ_LIMIT)
        if limit <= 0 or not state.events:
            return Page(info)
        start = max(after_seq - info.first_seq + 1, 0)
        stop = min(start + limit, len(state.events))
        return Page(info, [state.events[i] for i in range(start, stop)])

    async def info(self, stream: str) -> StreamInfo | None:
        """Return the stream's state, or ``None`` if it does not exist."""
        await self._enter()
        state = self._streams.get(stream)
        return None if state is None else state.info(stream)

    async def close_stream(self, stream: str) -> StreamInfo:
        """Mark the stream closed, creating it empty and closed if missing; closing twice is a no-op."""
        await self._enter()
        state = self._streams.get(stream)
        if state is None:
            state = self._streams[stream] = _Stream(epoch=new_epoch(), last_ts=self._clock())
        if not state.closed:
            state.closed = True
            self._tell(Closed(stream, state.epoch, state.last_seq))
        return state.info(stream)

    async def delete(self, stream: str) -> bool:
        """Drop the stream, its events and its idempotency keys; return whether it existed."""
        await self._enter()
        if self._streams.pop(stream, None) is None:
            return False
        self._tell(Deleted(stream))
        return True

    async def trim_expired(self) -> int:
        """Drop events older than ``max_age`` and keys older than the window, in every stream.

        Returns the number of events dropped.
        """
        await self._enter()
        now = self._clock()
        dropped = 0
        for state in self._streams.values():
            dropped += self._expire(state, now)
        self._forget_keys(now)
        return dropped

    async def aclose(self) -> None:
        """Forget everything; later calls raise ``RuntimeError``."""
        self._closed = True
        self._streams.clear()
        self._keys.clear()
        await trio.lowlevel.checkpoint()

    async def _enter(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise RuntimeError("the store is closed")

    def _expire(self, state: _Stream, now: float) -> int:
        max_age = self._retention.max_age
        if max_age <= 0:
            return 0
        cutoff = now - max_age
        dropped = 0
        while state.stamps and state.stamps[0] < cutoff:
            state.drop_oldest()
            dropped += 1
        return dropped

    def _enforce(self, state: _Stream, now: float) -> None:
        """Apply every retention limit to ``state`` after an append; the newest event always stays."""
        self._expire(state, now)
        max_events, max_bytes = self._retention.max_events, self._retention.max_bytes
        while len(state.events) > 1 and (
            (max_events > 0 and len(state.events) > max_events) or (max_bytes > 0 and state.nbytes > max_bytes)
        ):
            state.drop_oldest()

    def _key_live(self, key: _Key, now: float) -> bool:
        """Within the window, and its stream not deleted since (a stream created again has a new epoch)."""
        window = self._retention.idempotency_window
        if window > 0 and now - key.ts >= window:
            return False
        state = self._streams.get(key.stream)
        return state is not None and state.epoch == key.epoch

    def _forget_keys(self, now: float) -> None:
        keys = self._keys
        while keys and not self._key_live(next(iter(keys.values())), now):
            keys.popitem(last=False)

    def _tell(self, notice: Notice) -> None:
        try:
            self._notify(notice)
        except Exception:
            logger.exception("store listener failed on %r", type(notice).__name__)
