"""What the writing backends (sqlite, redis) share: the write requests a store's single writer
task carries out, what each produced, and the caller's side of waiting for it."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import trio

from server.core.events import NewEvent, StreamInfo
from server.core.ports.store import AppendResult, Notice, StreamClosed


@dataclass(frozen=True, slots=True)
class AppendOp:
    """Append ``events`` to ``stream``; ``key`` is the optional idempotency key."""

    stream: str
    events: tuple[NewEvent, ...]
    key: str | None = None


@dataclass(frozen=True, slots=True)
class CloseOp:
    """Close ``stream``, creating it closed if missing."""

    stream: str


@dataclass(frozen=True, slots=True)
class DeleteOp:
    """Drop ``stream``, its events and its idempotency keys."""

    stream: str


OpValue = AppendResult | StreamInfo | bool | int
"""What a write returns: an append's result, a close's state, a delete's "existed", a trim's count."""


@dataclass(slots=True)
class WriterStats:
    """The counters every store writer keeps since its store was opened (read them, do not write
    them); each store says what a commit is for it. ``requests / commits`` is the mean
    group-commit size, ``largest_batch`` the most requests one commit carried, ``events`` the
    events appended, ``failed_commits`` the commits that failed as a whole (or whose outcome is
    unknown)."""

    commits: int = 0
    requests: int = 0
    events: int = 0
    largest_batch: int = 0
    failed_commits: int = 0


@dataclass(slots=True)
class Outcome:
    """What one write request produced: a value or an error, and the notices to publish."""

    value: OpValue | None = None
    error: Exception | None = None
    notices: list[Notice] = field(default_factory=list)


def append_op(stream: str, events: Sequence[NewEvent], key: str | None) -> AppendOp:
    """The op for one append (its own copy of the events); ``ValueError`` when ``events`` is empty."""
    if not events:
        raise ValueError("append needs at least one event")
    return AppendOp(stream, tuple(NewEvent(str(e.type), bytes(e.data), bool(e.binary)) for e in events), key)


OpT = TypeVar("OpT")


@dataclass(eq=False, slots=True)
class Request(Generic[OpT]):
    """One queued write: its ``op``, settled once by the writer with :meth:`finish` or :meth:`fail`.
    ``deadline`` (trio time) is when the caller stops waiting for it (none by default)."""

    op: OpT
    deadline: float = math.inf
    done: trio.Event = field(default_factory=trio.Event)
    outcome: Outcome | None = None

    def finish(self, outcome: Outcome) -> None:
        """Settle the request with ``outcome`` and wake its caller."""
        self.outcome = outcome
        self.done.set()

    def fail(self, error: Exception) -> None:
        """Settle the request with ``error``."""
        self.finish(Outcome(error=error))


RequestT = TypeVar("RequestT", bound=Request[Any])


def outcome_value(outcome: Outcome | None) -> OpValue:
    """The value of a settled request's ``outcome``, or raise its error."""
    assert outcome is not None
    if outcome.error is not None:
        raise outcome.error
    assert outcome.value is not None
    return outcome.value


async def each_result(
    requests: Sequence[RequestT], outcome: Callable[[RequestT], Awaitable[OpValue]]
) -> list[AppendResult | StreamClosed]:
    """The results of queued appends in order (for :meth:`Store.append_each`): each one's
    :class:`AppendResult`, or its :class:`StreamClosed` in its place; any other error raises."""
    results: list[AppendResult | StreamClosed] = []
    for request in requests:
        try:
            value = await outcome(request)
        except StreamClosed as exc:
            results.append(exc)
            continue
        assert isinstance(value, AppendResult)
        results.append(value)
    return results


def take_queued(receive: trio.MemoryReceiveChannel[OpT], batch: list[OpT], max_batch: int) -> None:
    """Add to ``batch`` what ``receive`` holds now, without waiting, up to ``max_batch`` in all."""
    while len(batch) < max_batch:
        try:
            batch.append(receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break


async def next_batch(receive: trio.MemoryReceiveChannel[OpT], max_batch: int) -> list[OpT] | None:
    """Wait for the next queued item and take with it what else is queued (up to ``max_batch``
    in all); ``None`` once the queue is closed and drained."""
    try:
        first = await receive.receive()
    except trio.EndOfChannel:
        return None
    batch = [first]
    take_queued(receive, batch, max_batch)
    return batch


def fail_pending(
    pending: list[Request[OpT]], receive: trio.MemoryReceiveChannel[Request[OpT]], error: Callable[[], Exception]
) -> None:
    """Close the writer's queue ``receive``, then fail (with a fresh ``error()`` each) every
    request in ``pending`` or still queued that is not settled yet."""
    while True:
        try:
            pending.append(receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            break
    receive.close()
    for request in pending:
        if not request.done.is_set():
            request.fail(error())
