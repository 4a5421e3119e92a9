"""One reader of one stream: exact replay from the store, then live delivery with no task switch.

A :class:`Subscription` belongs to one task (the SSE response, the WebSocket subscription, the
long-poll request). It registers with the :class:`~server.core.hub.Hub` *before* it reads
anything, then catches up from the store page by page, then goes live. Live, the hub's
synchronous fan-out calls :meth:`Subscription.on_appended`, which hands the shared bytes to the
connection (:meth:`Sink.deliver`); the subscription's own task stays parked (no timer, no event
object) and only wakes to catch up again (a gap, an epoch change) or to finish. Heartbeats come
from the hub's one ticker task.

Exactness: while catching up, a subscription ignores live events but remembers the newest one it
saw; after a read it reads again while the live stream has moved past what it delivered. Live, it
checks every event is the next ``seq`` of its epoch; anything else sends it back to the store.
Every id is therefore delivered once, in order, or preceded by an explicit reset.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import trio

from server.core.encoding import EncodedEvent, EventBatch
from server.core.events import Event
from server.core.ids import format_id
from server.core.ports.store import Closed, StoreUnavailable
from server.core.replay import Reset, Start, plan_replay

if TYPE_CHECKING:
    from server.core.hub import Hub


class Sink(Protocol):
    """Where a subscription's output goes: one transport's view of one subscription.

    The synchronous methods never block; they return ``False`` once the connection can take no
    more (gone, or its bounded buffer overflowed), which ends the subscription.

    A sink may also have ``deliver_batch(batch: EventBatch) -> bool``, sending every event of a
    batch at once (one write); live batches that come exactly next then go through it;
    ``went_live() -> None``, called once, the first time the subscription is live (its replay,
    if any, delivered); and ``fell_behind() -> bool``, asked when the sink refused output: True
    if its connection was cut for falling behind (a slow consumer), not because the client left.
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
        """Wait until the connection has room again (backpressure during replay); may raise
        ``trio.BrokenResourceError`` or ``trio.ClosedResourceError`` once the connection is gone,
        which ends the subscription like a refused delivery."""


_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)
STORE_RETRY_FIRST = 0.1
"""Seconds a subscription whose store read failed (:class:`StoreUnavailable`) waits before it
reads again; the wait doubles up to :data:`STORE_RETRY_MAX`. It stays open meanwhile (its
heartbeats go on) and continues exactly where it was once the store answers."""
STORE_RETRY_MAX = 2.0


class Watcher(Protocol):
    """Anything the hub calls when a stream changes."""

    def on_appended(self, batch: EventBatch) -> int:
        """Events were committed (one stream and epoch, consecutive, in order); returns how many
        were delivered (for the hub's counters)."""

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
        "_deliver_batch",
        "_heartbeat",
        "_hub",
        "_live_mark",
        "_on_live",
        "_parked",
        "_pending_reset",
        "_running",
        "_sent",
        "_store_only",
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
        self._deliver_batch: Callable[[EventBatch], bool] | None = None  # the sink's, if it has one
        self._on_live: Callable[[], None] | None = None  # the sink's went_live, until it was called
        self._heartbeat = heartbeat
        self.epoch: str | None = None
        self.last_seq = 0  # the last seq delivered (or the position it resumes after)
        self.live = False
        self.done = False  # no more output: ended, dead, or finished
        self.ended = False  # the stream's end was delivered
        self.stopped = False  # ended from outside by stop()
        self._parked: trio.lowlevel.Task | None = None  # run() waiting for a poke
        self._running = False  # run() is under way (the hub's heartbeat ticker checks it)
        self._live_mark: tuple[str, int] | None = None  # newest live event seen while catching up
        self._closed_seen = False
        self._sent = 0  # outputs since the last heartbeat check
        self._pending_reset: Reset | None = None
        self._store_only = False  # the store said closed: its reads decide when this ends

    @property
    def pending_reset(self) -> Reset | None:
        """A reset planned but not yet handed to the sink (``run`` sends it first)."""
        return self._pending_reset

    @property
    def position(self) -> str | None:
        """The id to resume after, or ``None`` if nothing of any epoch has been passed yet."""
        return format_id(self.epoch, self.last_seq) if self.epoch is not None and self.last_seq else None

    # -- called synchronously by the hub, on the trio thread ---------------------------------

    def on_appended(self, batch: EventBatch) -> int:
        """Deliver live events (the whole batch in one write when it is exactly what comes next),
        or note them while catching up; return how many were delivered."""
        if not self.live:
            self._note(batch.epoch, batch.last_seq)
            return 0
        last_seq = self.last_seq
        if self.epoch is None and last_seq == 0 and batch.first_seq == 1:
            # The stream did not exist when this subscription started: these are the first events
            # of its history, nothing came before them (what a store read would also conclude).
            self.epoch = batch.epoch
        if batch.first_seq == last_seq + 1 and batch.epoch == self.epoch:
            whole = self._deliver_batch
            if whole is not None:
                if not whole(batch):
                    self._die()
                    return 0
                self.last_seq = last_seq = batch.last_seq
                n = last_seq - batch.first_seq + 1
                self._sent += n
                return n
        sink = self.sink
        epoch = self.epoch
        n = 0
        for enc in batch.encs:
            ev = enc.event
            seq = ev.seq
            if ev.epoch != epoch or seq > last_seq + 1:
                # A gap or a new history (another worker's notice was missed or overtaken): the
                # store decides what to send.
                self.last_seq = last_seq
                self._back_to_store(ev)
                self._sent += n
                return n
            if seq <= last_seq:
                continue
            if not sink.deliver(enc):
                self.last_seq = last_seq
                self._die()
                return n
            last_seq = seq
            n += 1
        self.last_seq = last_seq
        self._sent += n
        return n

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
        task = self._parked
        if task is not None:
            self._parked = None
            trio.lowlevel.reschedule(task)

    def _abort_park(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._parked = None
        return trio.lowlevel.Abort.SUCCEEDED

    def beat(self) -> bool:
        """The hub's heartbeat check, every ``heartbeat`` seconds: a live subscription that sent
        nothing since the last check hands the sink an idle notice. False once it no longer
        needs checks (its ``run`` is over)."""
        if not self._running:
            return False
        if self.live and not self.done:
            if self._sent == 0 and not self.sink.idle():
                self._die()
            self._sent = 0
        return True

    def _finish(self) -> None:
        if not self.done:
            self.sink.end()
            self.ended = True
        self.done = True
        self._poke()

    def _die(self) -> None:
        """The connection can take no more: stop, and leave the hub at once (no further fan-out
        reaches it while its task unwinds). Counted in ``dropped`` when the connection was cut
        for falling behind, else in ``subscriptions_gone`` (the client left)."""
        if not self.done:
            fell_behind = getattr(self.sink, "fell_behind", None)
            if fell_behind is not None and fell_behind():
                self._hub.stats.dropped += 1
            else:
                self._hub.stats.subscriptions_gone += 1
        self.done = True
        self._hub.remove(self.stream, self)
        self._poke()

    async def _drain(self) -> None:
        """Wait for the sink's connection to have room; a connection gone meanwhile ends the
        subscription (as a refused delivery would), quietly."""
        try:
            await self.sink.drain()
        except _GONE:
            self._die()

    def _go_live(self) -> None:
        """Replay is done: deliver live from now on (the sink hears it the first time)."""
        self.live = True
        hook = self._on_live
        if hook is not None:
            self._on_live = None
            hook()

    def _reset(self, reset: Reset) -> None:
        self._hub.stats.resets[reset.reason] += 1
        self._sent += 1
        if not self.sink.reset(reset):
            self._die()

    async def _plan(self) -> None:
        hub, start = self._hub, self.start
        pos = start.position
        if pos is not None and hub.buffer_covers(self.stream, pos.epoch, pos.seq):
            # Committed events follow on from the client's id in its own epoch: the exact resume
            # the store would plan, without asking it.
            self.epoch, self.last_seq = pos.epoch, pos.seq
            return
        info = await hub.store.info(self.stream)
        plan = plan_replay(start, info)
        self.epoch = plan.epoch
        self.last_seq = plan.after_seq
        if info is not None and info.closed:
            self._store_only = True
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
            if self._from_memory():
                await self._drain()
                if self.done:
                    return
                if self._caught_up():
                    self._go_live()
                    return
                continue
            page = await hub.store.read(self.stream, self.last_seq, page_size)
            info = page.info
            if info is None:  # no such stream (yet, or any more): the first event comes live
                await self._drain()  # a page (an empty one) was read: sinks may act on it
                if self.done:
                    return
                if self._live_mark is None and not self._closed_seen:
                    self._go_live()
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
            encs = [EncodedEvent(ev) for ev in page.events]
            if not info.closed:
                hub.on_page(self.stream, encs, info.epoch, info.last_seq)
            delivered = 0
            if encs and not self.done and encs[0].event.seq == self.last_seq + 1:
                # Consecutive from where it stands (pages are): every event in one write.
                delivered = self._deliver_run(encs)
                encs = []
            for enc in encs:
                ev = enc.event
                if self.last_seq and ev.seq != self.last_seq + 1:
                    self._reset(Reset("gone", ev.id, self.position))
                if self.done or not self.sink.deliver(enc):
                    self._die()
                    break
                self.last_seq = ev.seq
                delivered += 1
            self._sent += delivered
            hub.stats.replayed += delivered
            hub.stats.delivered += delivered
            if self.done:
                return
            await self._drain()
            if self.done:  # stopped (or died) while the connection drained
                return
            if len(page.events) >= page_size or not self._caught_up():
                continue
            if info.closed and self.last_seq >= info.last_seq:
                self._finish()
                return
            self._go_live()
            return

    def _from_memory(self) -> bool:
        """Deliver what the hub's replay buffer holds after this position; False when it does
        not reach back to it (the store must answer)."""
        if self._store_only or self.epoch is None:
            return False
        hub = self._hub
        encs = hub.buffered_after(self.stream, self.epoch, self.last_seq)
        if encs is None:
            return False
        if encs:
            n = self._deliver_run(encs)
            self._sent += n
            hub.stats.replayed_memory += n
            hub.stats.delivered += n
        return True

    def _deliver_run(self, encs: list[EncodedEvent]) -> int:
        """Hand the sink ``encs``, which follow on from ``last_seq``: in one write when it takes
        batches; returns how many it took (dying at the first refusal)."""
        whole = self._deliver_batch
        if whole is not None:
            if not whole(EventBatch(encs)):
                self._die()
                return 0
            self.last_seq = encs[-1].event.seq
            return len(encs)
        n = 0
        for enc in encs:
            if not self.sink.deliver(enc):
                self._die()
                break
            self.last_seq = enc.event.seq
            n += 1
        return n

    def _caught_up(self) -> bool:
        """Nothing seen live while reading is newer than what was delivered, and no close."""
        mark = self._live_mark
        if mark is not None and (mark[0] != self.epoch or mark[1] > self.last_seq):
            return False
        return not self._closed_seen

    async def run(self, sink: Sink) -> None:
        """Send output to ``sink`` until the stream ends or the connection dies; cancel to stop.

        Call once, inside ``async with`` the subscription (:meth:`Hub.open_subscription`). While
        live it waits parked, without a timer: the hub's synchronous fan-out delivers, and the
        hub's heartbeat ticker (:meth:`Hub.run`) calls :meth:`beat`.
        """
        self.sink = sink
        self._deliver_batch = getattr(sink, "deliver_batch", None)
        self._on_live = getattr(sink, "went_live", None)
        self._running = True
        if self._heartbeat is not None:
            self._hub.watch_heartbeat(self, self._heartbeat)
        if self._pending_reset is not None:
            reset, self._pending_reset = self._pending_reset, None
            self._reset(reset)
        retry = STORE_RETRY_FIRST
        try:
            while not self.done:
                if not self.live:
                    try:
                        await self._catch_up()
                    except StoreUnavailable:
                        await trio.sleep(retry)  # and read again from where it stands
                        retry = min(2 * retry, STORE_RETRY_MAX)
                        continue
                    retry = STORE_RETRY_FIRST
                    continue
                self._parked = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort_park)
        finally:
            self._parked = None
            self._running = False

    # -- as an async context manager (what Hub.open_subscription returns) ---------------------

    async def __aenter__(self) -> Subscription:
        """Register with the hub, then plan the start (see :meth:`Hub.open_subscription`)."""
        hub = self._hub
        hub.add(self.stream, self)
        try:
            await self._plan()
        except BaseException:
            hub.remove(self.stream, self)
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Unregister from the hub."""
        self._hub.remove(self.stream, self)


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
