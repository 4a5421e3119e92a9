"""The store interface: the replay log every transport and worker reads from.

Everything a consumer of a store needs lives here: :class:`Store`, the results it returns
(:class:`AppendResult`, :class:`Page`, :class:`Head`), the notices it tells its :data:`Listener`
of (:data:`Notice`: :class:`Appended`, :class:`Closed`, :class:`Deleted`), :class:`Retention`
and the errors it raises. Every backend under ``server/store/`` (``memory``, ``sqlite``, later
``redis``) implements :class:`Store` and passes the shared suite in ``tests/store_contract.py``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from server.core.events import Event, NewEvent, StreamInfo


class StreamClosed(Exception):
    """Raised by :meth:`Store.append` when the stream is closed (HTTP 409)."""


class StoreUnavailable(RuntimeError):
    """Raised by any store operation that was not carried out, or whose outcome is unknown: the
    store is closed or unreachable, did not answer in time, or its commit failed (HTTP 503 with
    ``Retry-After``; a publisher retries with its ``Idempotency-Key``)."""


class IdempotencyKeyReused(Exception):
    """Raised by :meth:`Store.append` when its idempotency key is live for a different request
    (another stream, or other events) (HTTP 422 ``idempotency_key_reused``). Nothing was appended."""


@dataclass(frozen=True, slots=True)
class Retention:
    """How much history each stream keeps. Any limit of 0 means "no limit of this kind".

    ``max_events`` and ``max_bytes`` are enforced at append time (oldest events go first; the
    newest event is always kept). ``max_age`` (seconds) is enforced by :meth:`Store.trim_expired`
    and at append time. ``idempotency_window`` (seconds) is how long idempotency keys are kept.
    """

    max_events: int = 10_000
    max_bytes: int = 64 * 1024 * 1024
    max_age: float = 24 * 3600.0
    idempotency_window: float = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Outcome of an append: the ids in publish order, and whether it replayed an idempotency key.

    ``events`` holds the appended events; it is empty for a ``duplicate`` (nothing was appended).
    """

    ids: list[str]
    events: list[Event] = field(default_factory=list)
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Page:
    """A read: the stream's state at the time of the read and the events found.

    ``info`` is ``None`` when the stream does not exist. ``events`` all belong to ``info.epoch``.
    """

    info: StreamInfo | None
    events: list[Event] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Appended:
    """Notice: ``events`` (one stream, consecutive, in order) were committed."""

    events: list[Event]


@dataclass(frozen=True, slots=True)
class Closed:
    """Notice: ``stream`` was closed; its last event is ``last_seq`` of ``epoch``."""

    stream: str
    epoch: str
    last_seq: int


@dataclass(frozen=True, slots=True)
class Deleted:
    """Notice: ``stream`` and all its history were dropped."""

    stream: str


Notice = Appended | Closed | Deleted
Listener = Callable[[Notice], None]


class Head(NamedTuple):
    """Where a stream's history stands: its ``epoch``, the newest ``last_seq`` issued in it, ``closed``."""

    epoch: str
    last_seq: int
    closed: bool = False


class Store(abc.ABC):
    """A durable, ordered log of events per stream.

    Promises, for every backend:

    * ``seq`` values of a stream's epoch start at 1 and strictly increase, with no reuse, also
      across restarts of a persistent backend;
    * an append returns only once the events are durable to the backend's standard;
    * the listener set with :meth:`set_listener` is called synchronously, on the trio thread, once
      per change, in commit order, before the awaiting ``append``/``close_stream``/``delete``
      call returns. It must not block or raise.
    """

    def set_listener(self, listener: Listener | None) -> None:
        """Install the callback that hears of every committed change (see class docstring)."""
        self._listener = listener

    def _notify(self, notice: Notice) -> None:
        listener = getattr(self, "_listener", None)
        if listener is not None:
            listener(notice)

    @abc.abstractmethod
    async def append(
        self, stream: str, events: Sequence[NewEvent], *, idempotency_key: str | None = None
    ) -> AppendResult:
        """Append ``events`` atomically and in order; create the stream (new epoch) if needed.

        Raises :class:`StreamClosed` if the stream is closed. Idempotency keys are global (one
        namespace for every stream) and live for the ``idempotency_window`` from their first
        append, or until their stream is deleted. With ``idempotency_key`` live for this stream
        and the same events (each event's type, text-or-binary mark and data, in order), even if
        the stream was closed since, appends nothing and returns the original ids, no events, and
        ``duplicate=True``; live for another stream or for other events, appends nothing and
        raises :class:`IdempotencyKeyReused`. Raises ``ValueError`` for an empty ``events``.
        """

    async def append_each(self, items: Sequence[tuple[str, Sequence[NewEvent]]]) -> list[AppendResult | StreamClosed]:
        """Make each ``(stream, events)`` item an :meth:`append` of its own, in order, and return
        their results in the items' order; an item whose stream is closed gets its
        :class:`StreamClosed` there instead of raising it. Every item keeps :meth:`append`'s
        promises (atomic, in order, durable before this returns, the listener told in commit
        order); a backend may commit them together (SQLite: one transaction). Any other error
        raises, as from :meth:`append`. The default appends one item after the other.
        """
        results: list[AppendResult | StreamClosed] = []
        for stream, events in items:
            try:
                results.append(await self.append(stream, events))
            except StreamClosed as exc:
                results.append(exc)
        return results

    @abc.abstractmethod
    async def read(self, stream: str, after_seq: int, limit: int) -> Page:
        """Return up to ``limit`` retained events with ``seq > after_seq`` in the current epoch."""

    @abc.abstractmethod
    async def info(self, stream: str) -> StreamInfo | None:
        """Return the stream's state, or ``None`` if it does not exist."""

    @abc.abstractmethod
    async def close_stream(self, stream: str) -> StreamInfo:
        """Mark the stream closed (creating it, empty and closed, if missing). Idempotent."""

    @abc.abstractmethod
    async def delete(self, stream: str) -> bool:
        """Drop the stream and its history; return whether it existed."""

    async def ready(self) -> bool:
        """Whether the store can take requests now (``/readyz``); never raises, and answers within
        the store's own deadline. The default (an embedded store): True."""
        return True

    async def heads(self, streams: Sequence[str]) -> dict[str, Head]:
        """Return the current :class:`Head` of each existing stream in ``streams`` (missing ones are left out).

        Each head is read from committed state, so it is at least as new as every change whose
        listener call happened before this call. The default asks :meth:`info` once per stream;
        backends override it with a batched read.
        """
        out: dict[str, Head] = {}
        for stream in streams:
            info = await self.info(stream)
            if info is not None:
                out[stream] = Head(info.epoch, info.last_seq, info.closed)
        return out

    async def trim_expired(self) -> int:
        """Drop events older than the retention age; return how many. Default: nothing to do."""
        return 0

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Flush and release everything; the store is unusable afterwards."""
