"""The Redis store's operations as plain data: the ``KEYS``/``ARGV`` of each call of the store's
Lua script (``redis_store.lua``) and what its replies mean. Nothing here does I/O or touches trio.

Times cross to Redis as integer milliseconds (:func:`ms`) and numbers as decimal text, so the
script never meets a float; seqs and byte counts stay below 2**53, where Lua's numbers are exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from importlib import resources
from typing import Any

from server.core.events import Event, StreamInfo
from server.core.ids import MAX_SEQ, format_id
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
from server.store.redis_keys import Keys
from server.store.writes import AppendOp, CloseOp, DeleteOp, Outcome

SCRIPT: str = resources.files("server.store").joinpath("redis_store.lua").read_text(encoding="utf-8")
"""The store's Lua script: every operation, chosen by ``ARGV[1]``."""

Call = tuple[list[str], list[str | bytes]]
"""The ``KEYS`` and ``ARGV`` of one script call."""


def ms(seconds: float) -> int:
    """``seconds`` as whole milliseconds (rounded down), the unit of every stamp in Redis."""
    return math.floor(seconds * 1000)


WriteOp = AppendOp | CloseOp | DeleteOp
"""The writes the Redis store's writer sends (the sweep runs apart: :func:`trim_call`)."""


def write_call(keys: Keys, op: WriteOp, now: float, retention: Retention, epoch: str, *, strict: bool) -> Call:
    """The script call carrying ``op`` at time ``now`` (seconds); ``epoch`` is the epoch a stream
    created by it gets, or an open stream relabelled by it: with ``strict``, a stream last written
    under another lineage generation (a failover since) is relabelled before ``op`` applies."""
    stream = op.stream
    if isinstance(op, DeleteOp):
        return keys.stream_keys(stream), ["delete", stream]
    meta, log, ages = keys.stream_keys(stream)
    if isinstance(op, CloseOp):
        return [meta, log, keys.lineage], ["close", str(ms(now)), epoch, _flag(strict)]
    names = [meta, log, ages, keys.lineage]
    digest = b""
    if op.key is not None:
        names.append(keys.idempotency(op.key))
        digest = fingerprint(op.events)
    args: list[str | bytes] = [
        "append",
        str(ms(now)),
        epoch,
        str(retention.max_events),
        str(retention.max_bytes),
        str(ms(retention.max_age)),
        str(ms(retention.idempotency_window)),
        stream,
        keys.prefix,
        digest,
        str(len(op.events)),
        _flag(strict),
    ]
    for e in op.events:
        args += [e.type, e.data, b"1" if e.binary else b"0"]
    return names, args


def write_outcome(op: WriteOp, reply: Any) -> Outcome:
    """What the script's ``reply`` to ``op`` means (see ``redis_store.lua``)."""
    if isinstance(op, DeleteOp):
        existed = int(reply) == 1
        return Outcome(existed, notices=[Deleted(op.stream)] if existed else [])
    if isinstance(op, CloseOp):
        changed, epoch, last, length = reply
        info = _info(op.stream, _text(epoch), int(last), True, int(length))
        return Outcome(info, notices=[Closed(op.stream, info.epoch, info.last_seq)] if int(changed) else [])
    status = _text(reply[0])
    if status == "closed":
        return Outcome(error=StreamClosed(op.stream))
    if status == "reused":
        return Outcome(error=IdempotencyKeyReused(op.key))
    epoch, first = _text(reply[1]), int(reply[2])
    if status == "dup":
        return Outcome(AppendResult(ids=[format_id(epoch, first + i) for i in range(int(reply[3]))], duplicate=True))
    if status != "ok":
        raise ValueError(f"unexpected reply of the append script: {reply!r}")
    events = [Event(op.stream, epoch, first + i, e.type, e.data, e.binary) for i, e in enumerate(op.events)]
    return Outcome(AppendResult(ids=[e.id for e in events], events=events), notices=[Appended(events)])


def trim_call(keys: Keys, stream: str, now: float, retention: Retention) -> Call:
    """The script call dropping ``stream``'s events older than ``retention.max_age`` at ``now``;
    its reply is the number dropped."""
    return keys.stream_keys(stream), ["trim", str(ms(now)), str(ms(retention.max_age)), stream]


def read_call(keys: Keys, stream: str, after_seq: int, limit: int, *, strict: bool = False, epoch: str = "") -> Call:
    """The script call reading ``stream``'s state and up to ``limit`` events after ``after_seq``;
    with ``strict`` it first relabels the stream with ``epoch`` as a strict write would."""
    start = min(max(after_seq + 1, 1), MAX_SEQ)
    meta, log, _ = keys.stream_keys(stream)
    return [meta, log, keys.lineage], ["read", f"{start}-0", str(max(limit, 0)), _flag(strict), epoch]


def read_page(stream: str, reply: Any) -> Page:
    """The :class:`Page` a read script ``reply`` describes."""
    if reply is None:
        return Page(None)
    epoch, last, closed, length, entries = reply
    info = _info(stream, _text(epoch), int(last), closed == b"1", int(length))
    events = []
    for entry_id, values in entries:
        seq = int(bytes(entry_id).partition(b"-")[0])
        # values: t, type, d, data, b, binary, s, stamp, c, cum (the script's field order)
        events.append(Event(stream, info.epoch, seq, _text(values[1]), bytes(values[3]), values[5] == b"1"))
    return Page(info, events)


HEAD_FIELDS = ("epoch", "last", "closed")
"""The meta fields :func:`head` reads (``HMGET <meta> epoch last closed``)."""


def head(reply: Sequence[Any]) -> Head | None:
    """The :class:`Head` in an ``HMGET`` of :data:`HEAD_FIELDS`, or ``None`` for a missing stream."""
    epoch, last, closed = reply
    if epoch is None:
        return None
    return Head(_text(epoch), int(last), closed == b"1")


MAX_UNREPLICATED = 65_536
"""Most streams :class:`Unreplicated` remembers."""


class Unreplicated:
    """The streams whose last write from this worker may be missing on every replica while
    ``store.redis_wait_replicas`` is at least 1: its WAIT fell short (``ReplicationFailed``: the
    primary applied it and subscribers may have seen it). Their calls are strict until a write to
    them is applied and acknowledged by the replicas, so a failover before that relabels them
    (see ``redis_store.lua``). Only this worker knows; at most ``limit`` streams, the longest
    remembered forgotten first."""

    __slots__ = ("_limit", "_streams")

    def __init__(self, limit: int = MAX_UNREPLICATED) -> None:
        self._limit = limit
        self._streams: dict[str, None] = {}

    def __contains__(self, stream: object) -> bool:
        return stream in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    def mark(self, stream: str) -> None:
        """``stream``'s last write may not have reached a replica."""
        self._streams.pop(stream, None)
        self._streams[stream] = None
        if len(self._streams) > self._limit:
            del self._streams[next(iter(self._streams))]

    def clear(self, stream: str) -> None:
        """A write to ``stream`` was applied and acknowledged by the replicas (so was every earlier one)."""
        self._streams.pop(stream, None)


def _info(stream: str, epoch: str, last: int, closed: bool, length: int) -> StreamInfo:
    """Retained events are the contiguous run ending at ``last``, so ``first`` follows from ``length``."""
    return StreamInfo(stream, epoch, last - length + 1 if length else 0, last, closed, length)


def _flag(value: bool) -> str:
    return "1" if value else "0"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
