"""Handing a received notice item to the worker's hub: what every bus implementation does with
the notice kinds of :mod:`server.bus.local_wire` (events, hint, closed, deleted), written once."""

from __future__ import annotations

import trio

from server.bus import local_wire as wire
from server.bus.reconcile import Freshness
from server.bus.stats import BusStats
from server.core.ports.bus import Receiver
from server.core.ports.store import Appended, Closed, Deleted

NOTICE_KINDS = frozenset((wire.EVENTS, wire.HINT, wire.CLOSED, wire.DELETED))
"""The item kinds :func:`deliver` takes."""


def deliver(hub: Receiver, fresh: Freshness, stats: BusStats, item: list[object]) -> None:
    """Hand one notice item (its kind in :data:`NOTICE_KINDS`) to ``hub`` as a remote change.

    Events for a stream not watched here are dropped; what a stream heard is noted in ``fresh``
    (a hint makes it suspect, so the next reconciliation reads it). ``ValueError``,
    ``TypeError`` or ``IndexError`` when the item is malformed."""
    kind = item[0]
    if kind == wire.EVENTS:
        stream = wire.text(item[1])
        if hub.watcher_count(stream):
            fresh.heard(stream, trio.current_time())
            hub.on_notice(Appended(wire.events_of(item)), remote=True)
    elif kind == wire.HINT:
        stats.hints_received += 1
        stream = wire.text(item[1])
        fresh.suspect((stream,))
        hub.on_hint(stream, wire.text(item[2]), wire.count(item[3]), wire.flag(item[4]))
    elif kind == wire.CLOSED:
        stream = wire.text(item[1])
        fresh.heard(stream, trio.current_time())
        hub.on_notice(Closed(stream, wire.text(item[2]), wire.count(item[3])), remote=True)
    elif kind == wire.DELETED:
        hub.on_notice(Deleted(wire.text(item[1])), remote=True)
    else:
        raise ValueError(f"not a notice item kind: {kind!r}")
