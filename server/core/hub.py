"""Per-worker fan-out: each committed event is encoded once and handed to every live subscriber
of its stream in one synchronous loop, with no task switch per subscriber.

The store's listener calls :meth:`Hub.on_notice` synchronously, in commit order; the hub wraps
each event in an :class:`EncodedEvent` and walks the stream's watchers (subscriptions, see
:mod:`server.core.subscription`, and long-poll nudges). :meth:`Hub.run`, one task per worker,
sends the heartbeats of every subscription that asked for them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

import trio

from server.core.encoding import EncodedEvent, EventBatch
from server.core.events import Event
from server.core.heartbeats import BEAT_SLACK, HeartbeatTicker, heartbeat_or_none
from server.core.hub_stats import HubStats
from server.core.nudge import Nudge
from server.core.ports.store import Appended, Closed, Deleted, Notice, Store
from server.core.replay import Start
from server.core.sequencer import Gap, Sequencer
from server.core.subscription import Sink, Subscription, Watcher
from server.core.tail import Tail, Tails

__all__ = ["BEAT_SLACK", "Hub", "Sink", "Subscription", "Watcher", "heartbeat_or_none"]

log = logging.getLogger(__name__)

FANOUT_SLICE = 0.001  # seconds of fan-out after which the fan-out task lets other tasks run
MAX_QUEUED = 100_000  # events queued for the fan-out task past which they are fanned out at once
GAP_READ_TIMEOUT = 5.0  # seconds one store read for a gap in the notices may take before it is given up


class Hub:
    """One worker's registry of watchers per stream, fed by the store's commit listener."""

    def __init__(
        self,
        store: Store,
        *,
        replay_page: int = 500,
        coalesce: float = 0.0,
        replay_buffer: int = 0,
        replay_buffer_total: int = 0,
        replay_buffer_bytes: int = 64 * 1024 * 1024,
        reorder_window: float = 0.0,
        stats: HubStats | None = None,
    ) -> None:
        """``coalesce``: least seconds between two fan-out passes of one stream (see :meth:`run`).
        ``replay_buffer`` / ``replay_buffer_total`` / ``replay_buffer_bytes``: the replay buffer in
        memory (:attr:`tails`): events kept per watched stream, events and bytes for all of them
        (0: none; every catch-up reads the store). ``reorder_window``: seconds a notice that leaves
        a gap is held for the missing ones while :meth:`run` runs, before the gap is read from the
        store once for every subscriber (see :mod:`server.core.sequencer`; 0: never held)."""
        if replay_page < 1:
            raise ValueError("replay_page must be >= 1")
        if coalesce < 0:
            raise ValueError("coalesce must be >= 0")
        self.store = store
        self.replay_page = replay_page
        self.coalesce = coalesce
        self.stats = stats if stats is not None else HubStats()
        # The newest events of each watched stream, for resumes that need no store read.
        self.tails = Tails(per_stream=replay_buffer, total=replay_buffer_total, max_bytes=replay_buffer_bytes)
        self._watchers: dict[str, dict[Watcher, None]] = {}
        # The newest (epoch, last_seq, closed) every watcher of a stream has been told of.
        self._heads: dict[str, tuple[str, int, bool]] = {}
        self._ticker = HeartbeatTicker()
        # Fan-out: notices queued per stream for the fan-out task while run() runs.
        self._fanning = False
        self._queued: dict[str, list[list[EncodedEvent] | Closed]] = {}
        self._queued_size = 0  # events (and closes) queued
        self._fanout_parked: trio.lowlevel.Task | None = None
        self._recent: dict[str, float] = {}  # streams fanned out less than ``coalesce`` ago: when
        # Ordering of notices per stream (a late notice of one worker behind another's later one).
        self._order = Sequencer(reorder_window)
        self._gap_scope: trio.CancelScope | None = None  # the gap reader's sleep, while it sleeps
        self._on_interest: Callable[[str, bool], None] | None = None

    def set_interest_listener(self, listener: Callable[[str, bool], None] | None) -> None:
        """Have ``listener(stream, watched)`` called, synchronously, when ``stream`` gains its first
        watcher here (``watched`` True, inside :meth:`add`, so before the watcher's first store
        read) or loses its last one (False); ``None`` stops the calls."""
        self._on_interest = listener

    def add(self, stream: str, watcher: Watcher) -> None:
        """Register ``watcher`` for ``stream`` (synchronous; no await before the caller reads)."""
        watchers = self._watchers.get(stream)
        if watchers is None:
            watchers = self._watchers[stream] = {}
            if self._on_interest is not None:
                self._on_interest(stream, True)
        watchers[watcher] = None
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
                self._drop_tail(stream)
                self._order.forget(stream)
                if self._on_interest is not None:
                    self._on_interest(stream, False)

    def watcher_count(self, stream: str) -> int:
        """How many watchers ``stream`` has on this worker."""
        return len(self._watchers.get(stream, ()))

    def streams(self) -> list[str]:
        """The streams that have watchers on this worker."""
        return list(self._watchers)

    def on_notice(self, notice: Notice, *, remote: bool = False) -> None:
        """The store's listener: fan a committed change out to the stream's watchers.

        While :meth:`run` runs, the fan-out is queued for its task (in order, per stream), so the
        committer (and the publisher waiting for its answer) goes on at once, and notices that
        pile up meanwhile go out together; without it, the fan-out happens here and now.
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
            if stream not in self._watchers:
                return
            if not self._fanning:
                self._pass_on(stream, events)
                return
            order = self._order
            runs = order.accept(events, trio.current_time())
            if not runs:
                self.stats.reordered += 1
                self._gap_opened()
            for run in runs:
                self._pass_on(stream, run)
        elif isinstance(notice, Closed):
            if self._order.holding(notice.stream):
                self._give_up(notice.stream)  # what was held goes first, then the close
            self._drop_tail(notice.stream)
            if notice.stream not in self._watchers:
                return
            self._newer(notice.stream, (notice.epoch, notice.last_seq, True))
            if not self._defer(notice.stream, notice, 1):
                self._close(notice)
        elif isinstance(notice, Deleted):
            # The next event has a new epoch; subscriptions reset when it arrives.
            for run in self._order.forget(notice.stream):
                self._pass_on(notice.stream, run)
            self._heads.pop(notice.stream, None)
            self._drop_tail(notice.stream)

    def _pass_on(self, stream: str, events: list[Event] | tuple[Event, ...]) -> None:
        """Fan out (or queue for the fan-out task) events of ``stream`` in order, and keep them in
        the replay buffer."""
        last = events[-1]
        self._newer(stream, (last.epoch, last.seq, False))
        encs = [EncodedEvent(e) for e in events]
        tails = self.tails
        tails.extend(stream, encs)
        self.stats.replay_buffered = tails.size
        if self._defer(stream, encs, len(encs)):
            return
        self._fan_out(stream, EventBatch(encs))

    def _give_up(self, stream: str) -> None:
        runs = self._order.give_up(stream)
        if runs:
            self.stats.gaps_given_up += 1
        for run in runs:
            self._pass_on(stream, run)

    # -- gaps in the notices -------------------------------------------------------------------

    def _gap_opened(self) -> None:
        scope = self._gap_scope
        if scope is not None:
            scope.deadline = min(scope.deadline, self._order.next_deadline)

    async def _gap_reader(self) -> NoReturn:
        """Read the gaps that stayed open for ``reorder_window`` from the store, one read per gap
        for all of the stream's subscribers; a gap the store cannot fill is passed on as it is."""
        order = self._order
        try:
            while True:
                with trio.CancelScope(deadline=order.next_deadline) as scope:
                    self._gap_scope = scope
                    await trio.sleep_forever()
                self._gap_scope = None
                for gap in order.due(trio.current_time()):
                    await self._read_gap(gap)
        finally:
            self._gap_scope = None

    async def _read_gap(self, gap: Gap) -> None:
        events: list[Event] = []
        self.stats.gap_reads += 1
        with trio.move_on_after(GAP_READ_TIMEOUT):
            try:
                page = await self.store.read(gap.stream, gap.after_seq, gap.before_seq - gap.after_seq - 1)
                events = page.events
            except Exception as exc:  # the store is the source of truth; each subscription asks it again
                log.warning("reading a gap in the notices of %r failed: %s", gap.stream, exc)
        runs, filled = self._order.fill(gap, events, trio.current_time())
        if not filled:
            self.stats.gaps_given_up += 1
        for run in runs:
            self._pass_on(gap.stream, run)

    def _drop_tail(self, stream: str) -> None:
        self.tails.drop(stream)
        self.stats.replay_buffered = self.tails.size

    def _fan_out(self, stream: str, batch: EventBatch) -> None:
        """Hand ``batch`` to every watcher of ``stream`` now, in one synchronous loop."""
        watchers = self._watchers.get(stream)
        if watchers:
            delivered = 0
            for w in tuple(watchers):
                delivered += w.on_appended(batch)
            self.stats.delivered += delivered

    def _close(self, notice: Closed) -> None:
        watchers = self._watchers.get(notice.stream)
        if watchers:
            for w in tuple(watchers):
                w.on_closed(notice)

    # -- the fan-out task ----------------------------------------------------------------------

    def _defer(self, stream: str, notice: list[EncodedEvent] | Closed, size: int) -> bool:
        """Queue ``notice`` for the fan-out task; False when there is none (fan out now instead).

        Past ``MAX_QUEUED`` queued events everything queued is fanned out at once, here: the
        queue stays bounded, and only its latency suffers."""
        if not self._fanning:
            return False
        queue = self._queued.get(stream)
        if queue is None:
            self._queued[stream] = [notice]
        else:
            queue.append(notice)
        self._queued_size += size
        task = self._fanout_parked
        if task is not None:
            self._fanout_parked = None
            trio.lowlevel.reschedule(task)
        if self._queued_size > MAX_QUEUED:
            self._flush_queued()
        return True

    def _take_queued(self) -> list[tuple[str, EventBatch | Closed]]:
        """Everything queued, as batches of consecutive events and closes, in order per stream."""
        queued, self._queued = self._queued, {}
        self._queued_size = 0
        items: list[tuple[str, EventBatch | Closed]] = []
        for stream, notices in queued.items():
            run: list[EncodedEvent] = []
            for notice in notices:
                if isinstance(notice, Closed):
                    if run:
                        items.append((stream, EventBatch(run)))
                        run = []
                    items.append((stream, notice))
                    continue
                first, prev = notice[0].event, run[-1].event if run else None
                if prev is not None and (first.epoch != prev.epoch or first.seq != prev.seq + 1):
                    items.append((stream, EventBatch(run)))
                    run = []
                run.extend(notice)
            if run:
                items.append((stream, EventBatch(run)))
        return items

    def _hold_recent(self, now: float) -> tuple[dict[str, list[list[EncodedEvent] | Closed]], int, float]:
        """Take the streams fanned out less than ``coalesce`` ago out of the queue: their notices,
        how many events (and closes) they hold, and when the first of them may go. The caller
        takes the rest (:meth:`_take_queued`, which zeroes the count) and puts these back."""
        recent, window = self._recent, self.coalesce
        for stream in [s for s, at in recent.items() if at + window <= now]:  # as `due` is: no float gap
            del recent[stream]
        held: dict[str, list[list[EncodedEvent] | Closed]] = {}
        size, due = 0, math.inf
        for stream in [s for s in self._queued if s in recent]:
            notices = held[stream] = self._queued.pop(stream)
            size += sum(1 if isinstance(n, Closed) else len(n) for n in notices)
            due = min(due, recent[stream] + window)
        return held, size, due

    async def _park(self, deadline: float) -> None:
        """Wait until a notice is queued (see :meth:`_defer`) or ``deadline``."""
        with trio.move_on_at(deadline):
            self._fanout_parked = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort_fanout_park)

    def _flush_queued(self) -> None:
        """Fan out everything queued now, synchronously."""
        for stream, item in self._take_queued():
            if isinstance(item, Closed):
                self._close(item)
            else:
                self._fan_out(stream, item)

    def _abort_fanout_park(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._fanout_parked = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def _fanout_loop(self) -> NoReturn:
        """Fan out queued notices: one pass per wake-up, yielding every ``FANOUT_SLICE`` seconds;
        a stream fanned out less than ``coalesce`` seconds ago waits for its next turn."""
        perf = time.perf_counter
        while True:
            if not self._queued:
                await self._park(math.inf)
            # Woken with the committers' callers: let them answer first (a publisher's 201 does
            # not wait for the fan-out), and let what they commit meanwhile join this pass.
            await trio.lowlevel.cancel_shielded_checkpoint()
            now = trio.current_time()
            held: dict[str, list[list[EncodedEvent] | Closed]] = {}
            due, held_size = math.inf, 0
            if self.coalesce:
                held, held_size, due = self._hold_recent(now)
            items = self._take_queued()
            if held:  # back in the queue, ahead of anything queued later
                self._queued = held | self._queued
                self._queued_size += held_size
            if not items:
                await self._park(due)  # only held streams: until the first may go, or news
                continue
            stats = self.stats
            recent = self._recent if self.coalesce else None
            for stream, item in items:
                if recent is not None:
                    recent[stream] = now
                if isinstance(item, Closed):
                    self._close(item)
                    continue
                watchers = self._watchers.get(stream)
                if not watchers:
                    continue
                snapshot = tuple(watchers)
                delivered = 0
                deadline = perf() + FANOUT_SLICE
                for i, w in enumerate(snapshot):
                    if not i & 63 and i and perf() > deadline:
                        stats.delivered += delivered
                        delivered = 0
                        await trio.lowlevel.checkpoint()
                        deadline = perf() + FANOUT_SLICE
                        watchers = self._watchers.get(stream) or {}
                    if w in watchers:  # not gone while the pass yielded
                        delivered += w.on_appended(item)
                stats.delivered += delivered

    def buffer_covers(self, stream: str, epoch: str, seq: int) -> bool:
        """True when :meth:`buffered_after` can answer for position (``epoch``, ``seq``)."""
        tail = self._vouched_tail(stream)
        return tail is not None and tail.covers(epoch, seq)

    def buffered_after(self, stream: str, epoch: str, seq: int) -> list[EncodedEvent] | None:
        """The committed events after position (``epoch``, ``seq``) of ``stream`` up to the newest
        this worker was told of, from the replay buffer; ``None`` when the buffer cannot say (it
        does not reach back to that position, or the stream moved past it by a hint or a close):
        the store must answer."""
        return self.tails.after(stream, epoch, seq) if self._vouched_tail(stream) is not None else None

    def _vouched_tail(self, stream: str) -> Tail | None:
        """``stream``'s tail if it ends at the newest head its watchers were told of."""
        tail = self.tails.get(stream)
        if tail is None:
            return None
        head = self._heads.get(stream)
        if head is None or head[2] or head[0] != tail.epoch or head[1] != tail.last_seq:
            return None
        return tail

    def on_page(self, stream: str, encs: list[EncodedEvent], epoch: str, last_seq: int) -> None:
        """A store read found ``stream`` at ``last_seq`` of ``epoch`` (open) and returned ``encs``,
        the events up to it (one epoch, consecutive, possibly none). They join the replay buffer
        and, when they reach that head, the head is told to the watchers (:meth:`on_hint`): the
        buffer then answers later resumes of this stream, so a crowd reconnecting to one stream
        reads the store about once instead of once each."""
        if stream not in self._watchers or not encs:
            return
        known = self._heads.get(stream)
        if known is not None and known[0] != epoch:
            return  # another epoch than this worker knows of: leave it to the store reads
        tails = self.tails
        tails.extend(stream, encs)  # starts the tail, or extends it when it follows on
        tails.prepend(stream, encs)  # or joins in front of newer events that came live meanwhile
        self.stats.replay_buffered = tails.size
        if encs[-1].event.seq == last_seq:
            self.on_hint(stream, epoch, last_seq)

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

    def open_subscription(self, stream: str, start: Start, *, heartbeat: float | None = None) -> Subscription:
        """A subscription to use as ``async with hub.open_subscription(...) as sub``: entering
        registers it and plans its start, then :meth:`Subscription.run` produces the output.

        Every event committed after the ``async with`` is entered is delivered by ``run`` (or is
        explained by a reset), so a caller that tells its client "subscribed" only then never
        loses an event published after the client heard it. Unregisters on exit. With
        ``heartbeat``, a live subscription that sent nothing for that many seconds gets an idle
        notice (:meth:`Sink.idle`) while :meth:`run` runs.
        """
        return Subscription(self, stream, start, heartbeat=heartbeat)

    # -- heartbeats ----------------------------------------------------------------------------

    def watch_heartbeat(self, sub: Subscription, interval: float) -> None:
        """Check ``sub`` every ``interval`` seconds (see :meth:`Subscription.beat`) from now on."""
        self._ticker.watch(sub, interval)

    async def run(self) -> NoReturn:
        """The hub's tasks (one per worker; cancel to stop): the fan-out of queued notices (see
        :meth:`on_notice`) and the heartbeat ticker, which calls :meth:`Subscription.beat` of each
        subscription every ``heartbeat`` seconds. Without it: fan-out inline, no heartbeats.

        With ``coalesce``, a stream fanned out less than that many seconds ago waits for its next
        pass, so events that arrive meanwhile reach each subscriber together, in one write: a
        stream at 200 events/s costs 50 writes per subscriber per second instead of 200, and its
        events wait at most ``coalesce`` longer. A stream whose events are further apart than
        ``coalesce`` is never held."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._ticker.run)
                nursery.start_soon(self._gap_reader)
                self._fanning = True
                await self._fanout_loop()
        finally:
            self._fanning = False
            for stream in list(self._watchers):
                if self._order.holding(stream):
                    self._give_up(stream)
            self._flush_queued()

    async def subscribe(self, stream: str, start: Start, sink: Sink, *, heartbeat: float | None = None) -> Subscription:
        """Open a subscription and run it to completion (end of stream or dead connection)."""
        async with self.open_subscription(stream, start, heartbeat=heartbeat) as sub:
            await sub.run(sink)
        return sub

    @contextmanager
    def nudge(self, stream: str) -> Iterator[trio.Event]:
        """Register for ``stream`` and yield an event that is set on its next change."""
        n = Nudge()
        self.add(stream, n)
        try:
            yield n.event
        finally:
            self.remove(stream, n)
