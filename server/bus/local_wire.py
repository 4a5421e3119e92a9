"""The notice bus's wire format (see :mod:`server.bus.local`): encoding and checked decoding.

A datagram is one msgpack array ``[VERSION, item, item, ...]``; each item is an array whose first
element is its kind:

* ``[0, stream, epoch, first_seq, [type, data, binary, ...]]``: consecutive committed events;
* ``[1, stream, epoch, last_seq, closed]``: a hint: the stream reached that position, read the
  store (an event too big for a datagram, or a notice a peer could not take when it was sent);
* ``[2, stream, epoch, last_seq]``: the stream was closed; ``[3, stream]``: it was deleted;
* ``[4]`` hello (a worker started: add me, then welcome me), ``[5]`` welcome, ``[6]`` bye
  (a worker is leaving: forget me), ``[7]`` resync (you missed notices: check the store);
* interest (:mod:`server.bus.local_interest`), the streams the sender has watchers on, at a version
  of a generation (one per bus): ``[8, gen, base, version, added, removed]`` a change from version
  ``base``; ``[9, gen, version, part, final, streams]`` one part of the whole set;
  ``[10, gen, version]`` an acknowledgement (the receiver routes by that version of the
  addressee's interest); ``[11, gen, version]`` a check (the sender's interest is at that
  version); ``[12]`` a request for the whole set.

Items are read by position, so a later version may append fields; unknown kinds are ignored.
Items are encoded once and concatenated under a hand-made array header, so notices committed
together share a datagram without being encoded again per datagram or per peer.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgpack

from server.core.events import Event
from server.core.ports.store import Appended, Closed, Head, Notice

VERSION = 1
"""Format version: the first element of every datagram."""

EVENTS, HINT, CLOSED, DELETED, HELLO, WELCOME, BYE, RESYNC = range(8)
INTEREST, INTEREST_FULL, INTEREST_ACK, INTEREST_CHECK, INTEREST_NEED = range(8, 13)
"""Item kinds."""

HEADER_MAX = 6
"""Bytes a datagram adds to its items: the array header (at most 5) and the version."""

Key = tuple[str, Head | None]
"""What an item tells of its stream: the head it reaches, or ``None`` (the stream was deleted)."""

Encoded = tuple[bytes, Key, bool]
"""One encoded item, what it tells, and whether it is a hint."""


def datagram(items: Sequence[bytes]) -> bytes:
    """``[VERSION, *items]`` from already encoded items."""
    n = len(items) + 1
    if n < 16:
        head = bytes((0x90 | n, VERSION))
    elif n < 0x10000:
        head = b"\xdc" + n.to_bytes(2, "big") + bytes((VERSION,))
    else:
        head = b"\xdd" + n.to_bytes(4, "big") + bytes((VERSION,))
    return head + b"".join(items)


HELLO_DGRAM = datagram([msgpack.packb([HELLO])])
WELCOME_DGRAM = datagram([msgpack.packb([WELCOME])])
BYE_DGRAM = datagram([msgpack.packb([BYE])])
RESYNC_DGRAM = datagram([msgpack.packb([RESYNC])])
INTEREST_NEED_DGRAM = datagram([msgpack.packb([INTEREST_NEED])])


def hint_item(stream: str, head: Head) -> bytes:
    """A hint item: ``stream`` reached ``head``."""
    return msgpack.packb([HINT, stream, head.epoch, head.last_seq, head.closed])


def encode_notice(notice: Notice, budget: int) -> list[Encoded]:
    """The items telling of ``notice``, each at most ``budget`` bytes.

    Events go in as few items as fit; from an event too big for one item on, the rest of the
    notice is one hint.
    """
    if isinstance(notice, Appended):
        return _encode_events(notice.events, budget)
    if isinstance(notice, Closed):
        item = msgpack.packb([CLOSED, notice.stream, notice.epoch, notice.last_seq])
        return [(item, (notice.stream, Head(notice.epoch, notice.last_seq, True)), False)]
    return [(msgpack.packb([DELETED, notice.stream]), (notice.stream, None), False)]


def _encode_events(events: list[Event], budget: int) -> list[Encoded]:
    out: list[Encoded] = []
    if not events:
        return out
    stream, epoch = events[0].stream, events[0].epoch
    overhead = 4 * len(stream) + len(epoch) + 32  # generous: headers, seq, array headers
    start, n = 0, len(events)
    while start < n:
        size, end = overhead, start
        flat: list[object] = []
        while end < n:
            ev = events[end]
            cost = 4 * len(ev.type) + len(ev.data) + 8
            if size + cost > budget and end > start:
                break
            size += cost
            flat += (ev.type, ev.data, ev.binary)
            end += 1
        item = msgpack.packb([EVENTS, stream, epoch, events[start].seq, flat])
        if len(item) > budget:
            head = Head(epoch, events[-1].seq)
            out.append((hint_item(stream, head), (stream, head), True))
            return out
        out.append((item, (stream, Head(epoch, events[end - 1].seq)), False))
        start = end
    return out


def decode(data: bytes) -> list[list[object]]:
    """The items of a datagram; ``ValueError`` if it is not a well-formed datagram of this version."""
    try:
        msg = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise ValueError(f"undecodable datagram: {exc}") from None
    if not isinstance(msg, list) or not msg or msg[0] != VERSION:
        raise ValueError("not a version 1 notice datagram")
    items = msg[1:]
    for item in items:
        if not isinstance(item, list) or not item:
            raise ValueError("an item is not a non-empty array")
    return items


def events_of(item: list[object]) -> list[Event]:
    """The events of an ``EVENTS`` item; ``ValueError``, ``TypeError`` or ``IndexError`` when malformed."""
    stream, epoch, seq, flat = text(item[1]), text(item[2]), count(item[3]), item[4]
    if not isinstance(flat, list) or not flat or len(flat) % 3:
        raise ValueError("an event list is not triples of type, data, binary")
    return [
        Event(stream, epoch, seq + i, text(flat[j]), _bytes(flat[j + 1]), flag(flat[j + 2]))
        for i, j in enumerate(range(0, len(flat), 3))
    ]


def texts(value: object) -> list[str]:
    """``value`` if it is a list of strings, else ``TypeError``."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError("expected a list of strings")
    return value


def text(value: object) -> str:
    """``value`` if it is a string, else ``TypeError``."""
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def count(value: object) -> int:
    """``value`` if it is a non-negative integer, else ``TypeError``."""
    if type(value) is not int or value < 0:
        raise TypeError("expected a non-negative integer")
    return value


def flag(value: object) -> bool:
    """``value`` if it is a boolean, else ``TypeError``."""
    if not isinstance(value, bool):
        raise TypeError("expected a boolean")
    return value


def _bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError("expected bytes")
    return value
