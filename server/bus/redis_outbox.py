"""What the Redis notice bus (:mod:`server.bus.redis`) has yet to publish: pure, no I/O.

Notices committed in one scheduling pass are encoded once (:mod:`server.bus.local_wire` items)
and grouped by stream: each stream's items become as few messages on that stream's channel as
fit :attr:`RedisOutbox.budget`, each message ``<sender token><datagram>``. What is queued is
bounded in bytes; a notice that finds no room, or a message that could not be published, leaves
its stream owed a hint (the newest head it reached); past :data:`MAX_OWED` streams the whole bus
is owed one resync instead (every worker then reads the heads of everything it watches).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.bus import local_wire as wire
from server.bus.local_send import MAX_OWED
from server.core.ports.store import Appended, Head, Notice

__all__ = ["MAX_OWED", "TOKEN_SIZE", "Message", "RedisOutbox"]

TOKEN_SIZE = 8
"""Bytes of the sender token that starts every message (a worker skips its own messages)."""


@dataclass(slots=True)
class Message:
    """One message to publish: on ``stream``'s channel (``None``: the bus's control channel)."""

    stream: str | None
    data: bytes
    keys: list[wire.Key] = field(default_factory=list)  # what it tells, to owe if it is lost
    hints: int = 0  # how many of its items are hints


def stream_of(notice: Notice) -> str:
    """The stream a notice is about."""
    if isinstance(notice, Appended):
        return notice.events[0].stream if notice.events else ""
    return notice.stream


class RedisOutbox:
    """The queue of one worker's outgoing notices, bounded by ``max_queued`` bytes.

    Promises: :meth:`add` never blocks and never holds more than ``max_queued`` bytes of items;
    :meth:`take` returns every queued item and every owed hint once, as messages of at most
    ``budget`` bytes plus the token and the array header, a stream's items in commit order;
    :meth:`owe` (after a failed publish) keeps at most :data:`MAX_OWED` streams, then a resync.
    """

    def __init__(self, token: bytes, budget: int, max_queued: int) -> None:
        """``token``: :data:`TOKEN_SIZE` bytes naming this worker; ``budget``: bytes of items per
        message; ``max_queued``: bytes of items held before notices are owed as hints instead."""
        if len(token) != TOKEN_SIZE:
            raise ValueError(f"the token must be {TOKEN_SIZE} bytes")
        self.token = token
        self.budget = budget
        self.max_queued = max_queued
        self._queued: dict[str, list[wire.Encoded]] = {}
        self._size = 0
        self.owed: dict[str, Head] = {}
        self.resync = False

    def __bool__(self) -> bool:
        return bool(self._queued or self.owed or self.resync)

    @property
    def held(self) -> int:
        """What is owed: streams owed a hint, plus one for an owed resync."""
        return len(self.owed) + int(self.resync)

    def add(self, notice: Notice) -> None:
        """Queue a committed change (in commit order)."""
        stream = stream_of(notice)
        for encoded in wire.encode_notice(notice, self.budget):
            item, key, _ = encoded
            if self._size + len(item) > self.max_queued:
                self.owe([key])
                continue
            self._queued.setdefault(stream, []).append(encoded)
            self._size += len(item)

    def owe(self, keys: list[wire.Key]) -> None:
        """These items were not published: owe their streams hints (past the bound, a resync)."""
        if self.resync:
            return
        owed = self.owed
        for stream, head in keys:
            if head is None:
                owed.pop(stream, None)  # deleted: nothing left to read
            elif stream in owed or len(owed) < MAX_OWED:
                owed[stream] = head  # keys come in commit order: the newest wins
            else:
                owed.clear()
                self.resync = True
                return

    def take(self) -> list[Message]:
        """Everything to publish now, emptied from the outbox."""
        out: list[Message] = []
        if self.resync:
            out.append(Message(None, self.token + wire.RESYNC_DGRAM))
            self.resync = False
        for stream, head in self.owed.items():
            item = wire.hint_item(stream, head)
            out.append(Message(stream, self.token + wire.datagram([item]), [(stream, head)], 1))
        self.owed = {}
        for stream, encoded in self._queued.items():
            start = 0
            while start < len(encoded):
                size, end = 0, start
                while end < len(encoded) and (end == start or size + len(encoded[end][0]) <= self.budget):
                    size += len(encoded[end][0])
                    end += 1
                part = encoded[start:end]
                data = self.token + wire.datagram([item for item, _, _ in part])
                out.append(Message(stream, data, [key for _, key, _ in part], sum(hint for _, _, hint in part)))
                start = end
        self._queued, self._size = {}, 0
        return out
