"""The notice bus's repair from the store (see :mod:`server.bus.local`): reconciliation.

Notices can be missed; the store is the source of truth. A subscription detects a missed notice
as soon as any later one arrives (a gap in ``seq``), so only a notice missed with nothing after
it needs the store to be asked. Every ``reconcile_interval`` the bus reads, in one batched query
(:meth:`Store.heads`), the heads of the watched streams that heard of no change for an interval
(:class:`Freshness`), plus those that are suspect (a hint came, an announcement of interest was
not acknowledged in time, or the last pass found them behind), and hints the hub, which wakes
only the watchers that are behind. Busy streams, whose notices keep coming, are not read at all.
A pass asked for (a bad datagram, a resync, a failure) reads every watched stream.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import trio

from server.bus.stats import BusStats
from server.core.ports.bus import Receiver
from server.core.ports.store import Store

log = logging.getLogger(__name__)

RECONCILE_MAX_STREAMS = 50_000
"""Streams checked per reconciliation pass; with more, successive passes take turns."""

RECONCILE_GRACE = 0.1
"""Seconds a head read waits for notices in flight before it counts as news."""


class Freshness:
    """When each watched stream last heard of a change, and which are suspect, for reconciliation.

    Promises: :meth:`due` returns the streams a periodic pass must read: every one that heard
    nothing for ``interval`` seconds, and every suspect one. Bounded by the streams watched here
    (the caller calls :meth:`forget` when a stream loses its last watcher).
    """

    def __init__(self, interval: float) -> None:
        """``interval``: the reconciliation interval in seconds."""
        self.interval = interval
        self._heard: dict[str, float] = {}
        self._suspect: set[str] = set()

    def heard(self, stream: str, now: float) -> None:
        """A change of ``stream`` was heard of at ``now`` (a notice, local or from a peer)."""
        self._heard[stream] = now

    def suspect(self, streams: Iterable[str]) -> None:
        """These streams may have missed a notice: the next pass reads them."""
        self._suspect.update(streams)

    def forget(self, stream: str) -> None:
        """``stream`` is no longer watched here."""
        self._heard.pop(stream, None)
        self._suspect.discard(stream)

    def due(self, streams: list[str], now: float) -> list[str]:
        """Those of ``streams`` the pass at ``now`` must read."""
        cutoff = now - self.interval
        heard, suspect = self._heard, self._suspect
        return [s for s in streams if s in suspect or heard.get(s, -math.inf) <= cutoff]

    def read(self, streams: Iterable[str]) -> None:
        """These streams were read from the store: no longer suspect."""
        self._suspect.difference_update(streams)


class Reconciler:
    """Reads heads from the store and hints the hub: the periodic passes and reads on demand.

    Promises: :meth:`run` makes a pass every ``interval`` seconds (0: never) and soon after each
    :meth:`request`; a stream that heard nothing for an interval is read within about two.
    """

    def __init__(self, hub: Receiver, store: Store, stats: BusStats, interval: float) -> None:
        """``stats``: the bus's counters (``reconciles``, ``repairs``, ``reconcile_reads``)."""
        self.fresh = Freshness(interval)
        self._hub = hub
        self._store = store
        self._stats = stats
        self._interval = interval if interval > 0 else math.inf
        self._wanted = trio.Event()
        self._cursor = 0

    def request(self) -> None:
        """Run a pass over every watched stream soon (also when periodic passes are off)."""
        self._wanted.set()

    async def reconcile(self, *, everything: bool = True) -> int:
        """One pass; how many streams were behind. ``everything``: every watched stream, else only
        those :class:`Freshness` says are due. At most :data:`RECONCILE_MAX_STREAMS`, taking turns."""
        streams = self._hub.streams()
        if not streams:
            return 0
        if not everything:
            streams = self.fresh.due(streams, trio.current_time())
        if len(streams) > RECONCILE_MAX_STREAMS:
            start = self._cursor % len(streams)
            streams = (streams[start:] + streams[:start])[:RECONCILE_MAX_STREAMS]
            self._cursor = start + RECONCILE_MAX_STREAMS
        stats = self._stats
        stats.reconciles += 1
        if not streams:
            return 0
        self.fresh.read(streams)
        stats.reconcile_reads += len(streams)
        behind = await self.hint_heads(streams)
        stats.repairs += len(behind)
        self.fresh.suspect(behind)  # read again next time, whether or not news comes
        return len(behind)

    async def hint_heads(self, streams: list[str]) -> list[str]:
        """Read the heads of ``streams``, hand them to the hub; the streams whose watchers were behind."""
        heads = await self._store.heads(streams)
        # The read may see commits whose notices are still on their way (a datagram in flight, the
        # committing writer not yet back on its thread): give them a moment, so that a race does
        # not send every subscriber of a busy stream back to the store for nothing.
        await trio.sleep(RECONCILE_GRACE)
        on_hint = self._hub.on_hint
        return [s for s, head in heads.items() if on_hint(s, head.epoch, head.last_seq, head.closed)]

    async def run(self) -> None:
        """The passes, forever (cancel to stop); a failed pass is logged and the next one made."""
        while True:
            everything = False
            with trio.move_on_after(self._interval):
                await self._wanted.wait()
                everything = True
            self._wanted = trio.Event()
            try:
                await self.reconcile(everything=everything)
            except Exception:
                log.warning("peer bus: reconciliation failed", exc_info=True)
