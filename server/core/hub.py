"""Per-worker fan-out: exact replay from the store, then live delivery with no task switch.

A :class:`Subscription` belongs to one task (the SSE response, the WebSocket subscription, the
long-poll request). It registers with the :class:`Hub` *before* it reads anything, then catches up
from the store page by page, then goes live. The store's listener calls :meth:`Hub.on_notice`
synchronously, in commit order; the hub encodes each event once and walks the stream's
subscriptions in one synchronous loop, each handing the shared bytes to its connection
(:meth:`Sink.deliver`). A subscription's own task only wakes to catch up again (a gap, an epoch
change), to send a heartbeat, or to finish.

Exactness: while catching up, a subscription ignores live events but remembers the newest one it
saw; after a read it reads again while the live stream has moved past what it delivered. Live, it
checks every event is the next ``seq`` of its epoch; anything else sends it back to the store.
Every id is therefore delivered once, in order, or preceded by an explicit reset.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Protocol

import trio

from server.core.encoding import EncodedEvent
from server.core.events import Event
from server.core.ids import format_id
from server.core.replay import Reset, Start, plan_replay
from server.observability.stats import HubStats
from server.store.base import Appended, Closed, Deleted, Notice, Store


class Sink(Protocol):
    """Where a subscription's output goes: one transport's view of one subscription.

    The synchronous methods never block; they return ``False`` once the connection can take no
    more (gone, or its bounded buffer overflowed), which ends the subscription.
    """

    def deliver(self, enc: EncodedEvent) -> bool:
        """Send one event."""

    def reset(self, reset: Reset) -> bool:
        """Tell the client its position could not be honoured exactly."""

    def end(self) -> None:
        """The stream is closed and everything was delivered."""

    def idle(self) -> bool:
        """Nothing was sent for a heartbeat interval (SSE sends a comment)."""

    async def drain(self) -> None:
        """Wait until the connection has room again (backpressure during replay)."""


class Watcher(Protocol):
    """Anything the hub calls when a stream changes."""

    def on_appended(self, encs: list[EncodedEvent]) -> None:
        """Events were committed (one stream, consecutive, in order)."""

    def on_closed(self, notice: Closed) -> None:
        """The stream was closed."""

    def on_hint(self, epoch: str, last_seq: int) -> bool:
        """The stream's history now reaches ``last_seq`` of ``epoch``; the events came by another way.

        Returns whether the watcher was behind and acts on it."""


class Subscription:
    """One reader of one stream: replay from ``start``, then live, until the end or cancellation.

    Use it through :meth:`Hub.open_subscription`: registering and planning (which fixes what
    ``from=now`` means) happen there, before the caller tells its client it is subscribed; then
    :meth:`run` produces the output.
    """

    __slots__ = (
        "_closed_seen",
        "_heartbeat",
        "_hub",
        "_live_mark",
        "_pending_reset",
        "_sent",
        "_wake",
        "done",
        "ended",
        "epoch",
        "last_seq",
        "live",
        "sink",
        "start",
        "stopped",
        "stream",
    )

    def __init__(self, hub: Hub, stream: str, start: Start, *, heartbeat: float | None = None) -> None:
        self._hub = hub
        self.stream = stream
        self.start = start
        self.sink: Sink = _NO_SINK
        self._heartbeat = heartbeat
        self.epoch: str | None = None
        self.last_seq = 0  # the last seq delivered (or the position it resumes after)
        self.live = False
        self.done = False  # no more output: ended, dead, or finished
        self.ended = False  # the stream's end was delivered
        self.stopped = False  # ended from outside by stop()
        self._wake: trio.Event | None = None
        self._live_mark: tuple[str, int] | None = None  # newest live event seen while catching up
        self._closed_seen = False
        self._sent = 0  # outputs since the last heartbeat check
        self._pending_reset: Reset | None = None

    @property
    def pending_reset(self) -> Reset | None:
        """A reset planned but not yet handed to the sink (``run`` sends it first)."""
        return self._pending_reset

    @property
    def position(self) -> str | None:
        """The id to resume after, or ``None`` if nothing of any epoch has been passed yet."""
        return format_id(self.epoch, self.last_seq) if self.epoch is not None and self.last_seq else None

    # -- called synchronously by the hub, on the trio thread ---------------------------------

    def on_appended(self, encs: list[EncodedEvent]) -> None:
        """Deliver live events, or note them while catching up."""
        if not self.live:
            last = encs[-1].event
            self._note(last.epoch, last.seq)
            return
        sink = self.sink
        epoch = self.epoch
        last_seq = self.last_seq
        n = 0
        for enc in encs:
            ev = enc.event
            seq = ev.seq
            if ev.epoch != epoch or seq > last_seq + 1:
                # A gap or a new history (another worker's notice was missed or overtaken): the
                # store decides what to send.
                self.last_seq = last_seq
                self._back_to_store(ev)
                self._hub.stats.delivered += n
                return
            if seq <= last_seq:
                continue
            if not sink.deliver(enc):
                self.last_seq = last_seq
                self._hub.stats.delivered += n
                self._die()
                return
            last_seq = seq
            n += 1
        self.last_seq = last_seq
        self._sent += n
        self._hub.stats.delivered += n

    def on_closed(self, notice: Closed) -> None:
        """End now if everything was delivered, else let the catch-up find the end."""
        if not self.live:
            self._closed_seen = True
            return
        if notice.epoch == self.epoch and self.last_seq >= notice.last_seq:
            self._finish()
        else:
            self.live = False
            self._closed_seen = True
            self._poke()

    def on_hint(self, epoch: str, last_seq: int) -> bool:
        """The stream reached ``last_seq`` of ``epoch`` without this worker seeing the events.

        Live and behind (another epoch, or an older seq): go back to the store, which delivers
        what is missing, and return True. Catching up: note it, so the catch-up reads again
        before going live.
        """
        if self.done:
            return False
        if not self.live:
            self._note(epoch, last_seq)
            return False
        if epoch == self.epoch and last_seq <= self.last_seq:
            return False
        self.live = False
        self._live_mark = (epoch, last_seq)
        self._poke()
        return True

    def stop(self) -> None:
        """End the subscription from outside (the connection is winding down), synchronously.

        Nothing more is handed to the sink; :meth:`run` returns soon (at once when live, after
        the store read in progress while catching up) with ``ended`` False and ``stopped`` True,
        and :attr:`position` is the exact id to resume after. A no-op once the subscription is
        done (ended, dead or already stopped); may be called before ``run``."""
        if self.done:
            return
        self.stopped = True
        self.done = True
        self.live = False
        self._poke()

    # -- internals ---------------------------------------------------------------------------

    def _note(self, epoch: str, seq: int) -> None:
        """Remember the newest position seen live while catching up (notices may come out of order)."""
        mark = self._live_mark
        if mark is None or mark[0] != epoch or mark[1] < seq:
            self._live_mark = (epoch, seq)

    def _back_to_store(self, ev: Event) -> None:
        self.live = False
        self._live_mark = (ev.epoch, ev.seq)
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _finish(self) -> None:
        if not self.done:
            self.sink.end()
            self.ended = True
        self.done = True
        self._poke()

    def _die(self) -> None:
        if not self.done:
            self._hub.stats.dropped += 1
        self.done = True
        self._poke()

    def _reset(self, reset: Reset) -> None:
        self._hub.stats.resets[reset.reason] += 1
        self._sent += 1
        if not self.sink.reset(reset):
            self._die()

    async def _plan(self) -> None:
        info = await self._hub.store.info(self.stream)
        plan = plan_replay(self.start, info)
        self.epoch = plan.epoch
        self.last_seq = plan.after_seq
        if plan.reset is not None:
            self._pending_reset = plan.reset
            if info is not None and info.length == 0:
                # Nothing retained: the next event to come is the earliest; resume exactly there.
                self.last_seq = info.last_seq

    async def _catch_up(self) -> None:
        """Read from the store until caught up with the live stream, then go live (or finish)."""
        hub = self._hub
        page_size = hub.replay_page
        while not self.done:
            self._live_mark = None
            self._closed_seen = False
            page = await hub.store.read(self.stream, self.last_seq, page_size)
            info = page.info
            if info is None:  # no such stream (yet, or any more): the first event comes live
                await self.sink.drain()  # a page (an empty one) was read: sinks may act on it
                if self._live_mark is None and not self._closed_seen:
                    self.live = True
                    return
                continue
            if self.epoch is None:
                self.epoch = info.epoch
            elif info.epoch != self.epoch:
                requested = self.position
                self.epoch = info.epoch
                self.last_seq = 0
                self._reset(Reset("epoch", info.first_id, requested))
                if info.length == 0:
                    self.last_seq = info.last_seq
                continue
            delivered = 0
            for ev in page.events:
                if self.last_seq and ev.seq != self.last_seq + 1:
                    self._reset(Reset("gone", ev.id, self.position))
                if self.done or not self.sink.deliver(EncodedEvent(ev)):
                    self._die()
                    break
                self.last_seq = ev.seq
                delivered += 1
            self._sent += delivered
            hub.stats.replayed += delivered
            hub.stats.delivered += delivered
            if self.done:
                return
            await self.sink.drain()
            if self.done:  # stopped (or died) while the connection drained
                return
            if len(page.events) >= page_size:
                continue
            mark = self._live_mark
            if mark is not None and (mark[0] != self.epoch or mark[1] > self.last_seq):
                continue
            if self._closed_seen:
                continue
            if info.closed and self.last_seq >= info.last_seq:
                self._finish()
                return
            self.live = True
            return

    async def run(self, sink: Sink) -> None:
        """Send output to ``sink`` until the stream ends or the connection dies; cancel to stop.

        Call once, inside :meth:`Hub.open_subscription`.
        """
        self.sink = sink
        if self._pending_reset is not None:
            reset, self._pending_reset = self._pending_reset, None
            self._reset(reset)
        try:
            while not self.done:
                if not self.live:
                    await self._catch_up()
                    continue
                self._wake = trio.Event()
                if self._heartbeat is None:
                    await self._wake.wait()
                    continue
                with trio.move_on_after(self._heartbeat):
                    await self._wake.wait()
                if not self._wake.is_set():
                    if self._sent == 0 and not self.sink.idle():
                        self._die()
                    self._sent = 0
        finally:
            self._wake = None


class _NoSink:
    """The sink of a subscription that is not running yet: accepts nothing."""

    def deliver(self, enc: EncodedEvent) -> bool:
        return False

    def reset(self, reset: Reset) -> bool:
        return False

    def end(self) -> None:
        pass

    def idle(self) -> bool:
        return False

    async def drain(self) -> None:
        pass


_NO_SINK = _NoSink()


class _Nudge:
    """A watcher that only records that something happened (for long-poll waits)."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = trio.Event()

    def on_appended(self, encs: list[EncodedEvent]) -> None:
        self.event.set()

    def on_closed(self, notice: Closed) -> None:
        self.event.set()

    def on_hint(self, epoch: str, last_seq: int) -> bool:
        self.event.set()
        return True


class Hub:
    """One worker's registry of watchers per stream, fed by the store's commit listener."""

    def __init__(self, store: Store, *, replay_page: int = 500, stats: HubStats | None = None) -> None:
        if replay_page < 1:
            raise ValueError("replay_page must be >= 1")
        self.store = store
        self.replay_page = replay_page
        self.stats = stats if stats is not None else HubStats()
        self._watchers: dict[str, dict[Watcher, None]] = {}
        # The newest (epoch, last_seq, closed) every watcher of a stream has been told of.
        self._heads: dict[str, tuple[str, int, bool]] = {}

    def add(self, stream: str, watcher: Watcher) -> None:
        """Register ``watcher`` for ``stream`` (synchronous; no await before the caller reads)."""
        self._watchers.setdefault(stream, {})[watcher] = None
        self.stats.subscriptions += 1
        self.stats.subscriptions_total += 1

    def remove(self, stream: str, watcher: Watcher) -> None:
        """Unregister ``watcher``; a no-op if it is not registered."""
        watchers = self._watchers.get(stream)
        if watchers is not None and watchers.pop(watcher, 0) is None:
            self.stats.subscriptions -= 1
            if not watchers:
                del self._watchers[stream]
                self._heads.pop(stream, None)

    def watcher_count(self, stream: str) -> int:
        """How many watchers ``stream`` has on this worker."""
        return len(self._watchers.get(stream, ()))

    def streams(self) -> list[str]:
        """The streams that have watchers on this worker."""
        return list(self._watchers)

    def on_notice(self, notice: Notice, *, remote: bool = False) -> None:
        """The store's listener: fan a committed change out to the stream's watchers.

        ``remote``: the change was committed by another worker (it is not counted as published
        here). Notices may then arrive late, twice or not at all; watchers cope (a gap or an
        unexpected epoch sends a subscription back to the store, old events are skipped).
        """
        if isinstance(notice, Appended):
            events = notice.events
            if not events:
                return
            if not remote:
                self.stats.published += len(events)
            stream = events[0].stream
            watchers = self._watchers.get(stream)
            if not watchers:
                return
            last = events[-1]
            self._newer(stream, (last.epoch, last.seq, False))
            encs = [EncodedEvent(e) for e in events]
            for w in tuple(watchers):
                w.on_appended(encs)
        elif isinstance(notice, Closed):
            watchers = self._watchers.get(notice.stream)
            if not watchers:
                return
            self._newer(notice.stream, (notice.epoch, notice.last_seq, True))
            for w in tuple(watchers):
                w.on_closed(notice)
        elif isinstance(notice, Deleted):
            # The next event has a new epoch; subscriptions reset when it arrives.
            self._heads.pop(notice.stream, None)

    def on_hint(self, stream: str, epoch: str, last_seq: int, closed: bool = False) -> bool:
        """``stream`` reached ``last_seq`` of ``epoch`` (and is ``closed``), as another worker or
        the store says; the events themselves did not come through :meth:`on_notice`.

        Unless every watcher was already told of that position (or a newer one of the same epoch),
        each is told: subscriptions that are behind go back to the store and catch up, long-poll
        waits wake. Returns whether a watcher was behind (for a close: whether it was news).
        """
        watchers = self._watchers.get(stream)
        if not watchers or not self._newer(stream, (epoch, last_seq, closed)):
            return False
        if closed:
            notice = Closed(stream, epoch, last_seq)
            for w in tuple(watchers):
                w.on_closed(notice)
            return True
        behind = False
        for w in tuple(watchers):
            behind = w.on_hint(epoch, last_seq) or behind
        return behind

    def _newer(self, stream: str, head: tuple[str, int, bool]) -> bool:
        """Record ``head`` as told to ``stream``'s watchers unless it is not newer than the last one."""
        known = self._heads.get(stream)
        if known is not None and known[0] == head[0] and (known[1], known[2]) >= (head[1], head[2]):
            return False
        self._heads[stream] = head
        return True

    @asynccontextmanager
    async def open_subscription(
        self, stream: str, start: Start, *, heartbeat: float | None = None
    ) -> AsyncIterator[Subscription]:
        """Register a subscription and plan its start; yield it, ready for :meth:`Subscription.run`.

        Every event committed after this returns is delivered by ``run`` (or is explained by a
        reset), so a caller that tells its client "subscribed" only now never loses an event
        published after the client heard it. Unregisters on exit.
        """
        sub = Subscription(self, stream, start, heartbeat=heartbeat)
        self.add(stream, sub)
        try:
            await sub._plan()
            yield sub
        finally:
            self.remove(stream, sub)

    async def subscribe(self, stream: str, start: Start, sink: Sink, *, heartbeat: float | None = None) -> Subscription:
        """Open a subscription and run it to completion (end of stream or dead connection)."""
        async with self.open_subscription(stream, start, heartbeat=heartbeat) as sub:
            await sub.run(sink)
        return sub

    @contextmanager
    def nudge(self, stream: str) -> Iterator[trio.Event]:
        """Register for ``stream`` and yield an event that is set on its next change."""
        n = _Nudge()
        self.add(stream, n)
        try:
            yield n.event
        finally:
            self.remove(stream, n)


def heartbeat_or_none(seconds: float) -> float | None:
    """``None`` for a non-positive or infinite interval (no heartbeats), else ``seconds``."""
    return seconds if 0 < seconds < math.inf else None
