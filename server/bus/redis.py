"""Notices across hosts: every worker of every host that shares one Redis hears of the commits the
others make, through Redis PUB/SUB. The implementation of :class:`server.core.ports.bus.Bus`
used with the Redis store (``store.backend = "redis"``).

Channels: one per stream, ``<prefix>bus:<stream>`` (``prefix``: ``store.redis_prefix``), plus the
bus's control channel ``<prefix>bus``. A worker subscribes, on ONE PUB/SUB connection whatever
the number of streams, to the channels of the streams it has watchers on (the hub's interest
listener) and to the control channel, so Redis sends a notice only to the workers that watch its
stream. Publishing goes through a second connection: the notices committed in one scheduling
pass are grouped per stream (:mod:`server.bus.redis_outbox`) and sent as one pipeline of
``PUBLISH``; one pipeline is in flight at a time, and what is committed meanwhile goes in the
next. A message is ``<8-byte sender token><datagram>``, the datagram in the format of
:mod:`server.bus.local_wire` (events, hints, closed, deleted, resync); a worker skips its own.

Nothing blocks: :meth:`RedisBus.publish` queues (bounded in bytes; past the bound, or when a
pipeline fails, a stream is owed a hint, and past :data:`~server.bus.redis_outbox.MAX_OWED`
streams every worker is sent one resync). Loss is repaired from the store, the source of truth,
as on the host-local bus (:mod:`server.bus.reconcile`): a subscription notices a gap in ``seq``
at the next notice; a stream that heard nothing for ``reconcile_interval`` is read in the next
pass; after the PUB/SUB connection is (re)established, and after new channels are subscribed,
the heads of the streams concerned are read once, so nothing committed while this worker was
not yet (or no longer) subscribed is missed. A lost connection is retried with backoff (at most
:data:`RECONNECT_MAX` seconds apart), every command under ``timeout``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import coredis
import trio
from coredis.exceptions import RedisError
from coredis.patterns.pubsub import PubSub
from coredis.retry import NoRetryPolicy

from server.bus import local_wire as wire
from server.bus.deliver import NOTICE_KINDS, deliver
from server.bus.reconcile import Reconciler
from server.bus.redis_outbox import TOKEN_SIZE, RedisOutbox, stream_of
from server.bus.stats import BusStats
from server.core.groups import lone_error_unwrapped
from server.core.ports.bus import Receiver
from server.core.ports.store import Notice, Store

__all__ = ["Connect", "RedisBus", "RedisBusStats", "open_redis_bus"]

Redis = coredis.Redis[bytes]
"""The client type: replies undecoded (bytes)."""

Connect = Callable[[], AbstractAsyncContextManager[Redis]]
"""Opens a running client for the Redis the bus uses (the composition root gives the store's
settings: a URL, or Sentinels): commands never retried, none waiting past the bus's ``timeout``."""

log = logging.getLogger(__name__)

SUBSCRIBE_CHUNK = 512
"""Channels named in one SUBSCRIBE or UNSUBSCRIBE."""

RECONNECT_MIN, RECONNECT_MAX = 0.05, 1.0
"""Backoff bounds (seconds) between attempts to (re)establish the PUB/SUB connection or to
publish again after a failed pipeline."""

LEAVE_TIMEOUT = 0.1
"""Seconds a leaving bus gives Redis to acknowledge that it unsubscribed everything."""

MAX_QUEUED_FACTOR = 64
"""The outbox holds at most this many messages' worth of bytes (``max_message`` each)."""


@dataclass(slots=True)
class RedisBusStats(BusStats):
    """:class:`BusStats`, as the Redis bus counts them: ``sent``/``received`` are messages
    published/taken in (its own echoes not counted), ``send_failures`` messages whose pipeline
    failed, ``unrouted`` messages Redis delivered to no subscriber, ``interest_sent`` channels
    subscribed or unsubscribed; ``peers`` stays 0 (Redis knows the subscribers)."""

    channels: int = 0  # stream channels this worker is subscribed to
    reconnects: int = 0  # PUB/SUB connections lost once up (each made again, then every watched head read)


class RedisBus:
    """One worker's end of the notice bus over Redis PUB/SUB. Obtain it from :func:`open_redis_bus`.

    Promises (those of :class:`server.core.ports.bus.Bus`): every change passed to
    :meth:`publish` is published on its stream's channel, or its stream is owed a hint, or every
    worker a resync, resent until Redis takes it; what arrives from other workers goes to the hub
    (``on_notice`` with ``remote=True``, ``on_hint``); a stream that starts being watched is
    subscribed, then its head read once; every ``reconcile_interval`` the heads of the watched
    streams that heard of no change are read. Everything runs on the trio thread; nothing blocks.
    """

    def __init__(
        self,
        client: Redis,
        hub: Receiver,
        store: Store,
        *,
        prefix: str,
        timeout: float,
        max_message: int,
        reconcile_interval: float,
        token: bytes | None = None,
    ) -> None:
        self.stats = RedisBusStats()
        self.token = token if token is not None else os.urandom(TOKEN_SIZE)
        self._client = client
        self._hub = hub
        self._timeout = timeout
        self._channel_prefix = f"{prefix}bus:".encode()
        self.control = f"{prefix}bus".encode()
        self._outbox = RedisOutbox(self.token, max_message - wire.HEADER_MAX, MAX_QUEUED_FACTOR * max_message)
        self._recon = Reconciler(hub, store, self.stats, reconcile_interval)
        self._fresh = self._recon.fresh
        self._send_wanted = trio.Event()
        self._pubsub: PubSub[bytes] | None = None  # the connected PubSub, or None while (re)connecting
        self._subscribed: set[str] = set()  # stream channels acknowledged on the current connection
        self._interest: dict[str, bool] = {}  # changes not yet sent: stream -> watched
        self._interest_wake = trio.Event()
        self._connected = trio.Event()
        self._leaving = trio.Event()
        self._left = trio.Event()
        self._listening = trio.CancelScope()
        self._busy = 0  # pipelines or (un)subscriptions in flight
        self._closed = False

    def channel(self, stream: str) -> bytes:
        """The channel carrying ``stream``'s notices."""
        return self._channel_prefix + stream.encode()

    @property
    def held(self) -> int:
        """What is owed for lack of room or after a failure: streams owed a hint (+1 for a resync)."""
        return self._outbox.held

    @property
    def idle(self) -> bool:
        """Whether nothing is queued, owed or being published, and no interest change is pending."""
        return not self._outbox and not self._busy and not self._interest

    @property
    def connected(self) -> bool:
        """Whether the PUB/SUB connection is up and subscribed."""
        return self._pubsub is not None

    # -- the Bus interface ----------------------------------------------------------------------

    def publish(self, notice: Notice) -> None:
        """Queue a change this worker committed; the queue is published at the end of the pass."""
        if self._closed:
            return
        stream = stream_of(notice)
        if self._hub.watcher_count(stream):
            self._fresh.heard(stream, trio.current_time())
        self._outbox.add(notice)
        self._send_wanted.set()

    def declare_interest(self, stream: str, watched: bool) -> None:
        """``stream`` gained its first watcher here, or lost its last: (un)subscribe its channel."""
        self._interest[stream] = watched
        if not watched:
            self._fresh.forget(stream)
        self._interest_wake.set()

    def request_reconcile(self) -> None:
        """Read the heads of every watched stream soon."""
        self._recon.request()

    async def reconcile(self, *, everything: bool = True) -> int:
        """One reconciliation pass now (see :class:`~server.bus.reconcile.Reconciler`); how many
        streams were behind."""
        return await self._recon.reconcile(everything=everything)

    # -- publishing -----------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        delay = RECONNECT_MIN
        while True:
            if not self._outbox:
                await self._send_wanted.wait()
            self._send_wanted = trio.Event()
            if await self._send(self._outbox.take()):
                delay = RECONNECT_MIN
            else:
                await trio.sleep(delay)
                delay = min(2 * delay, RECONNECT_MAX)

    async def _send(self, messages: Sequence[Any]) -> bool:
        """Publish ``messages`` in one pipeline; on failure owe what they told. Whether it worked."""
        if not messages:
            return True
        stats = self.stats
        self._busy += 1
        try:
            with lone_error_unwrapped(), trio.fail_after(self._timeout):
                async with self._client.pipeline(transaction=False) as pipe:
                    requests = [
                        pipe.publish(self.control if m.stream is None else self.channel(m.stream), m.data)
                        for m in messages
                    ]
                replies = [await r for r in requests]
        except (RedisError, OSError, trio.TooSlowError) as exc:
            stats.send_failures += len(messages)
            log.warning("notice bus: %d message(s) not published, owed again: %r", len(messages), exc)
            for m in messages:
                if m.stream is None:
                    self._outbox.resync = True
                else:
                    self._outbox.owe(m.keys)
            return False
        finally:
            self._busy -= 1
        stats.sent += len(messages)
        stats.hints_sent += sum(m.hints for m in messages)
        stats.resyncs_sent += sum(m.stream is None for m in messages)
        stats.unrouted += sum(1 for n in replies if not n)
        return True

    # -- receiving ------------------------------------------------------------------------------

    async def _pubsub_loop(self) -> None:
        """Keep one PUB/SUB connection subscribed to what is watched here, and hand on what arrives,
        until :meth:`_leave`."""
        try:
            await self._keep_listening()
        finally:
            self._left.set()

    async def _keep_listening(self) -> None:
        delay = RECONNECT_MIN
        while not self._leaving.is_set():
            try:
                await self._listen()
            except* Exception as failed:  # a lost or refused connection, a command past its deadline
                # (``except*``: coredis's own cleanup may fail beside a cancellation, which goes on)
                # on the way out (leaving, or the worker cancelled) the connection is let go anyway
                going = self._leaving.is_set() or trio.current_effective_deadline() == -math.inf
                if going:
                    log.debug("notice bus: the PUB/SUB connection failed on the way out: %r", failed.exceptions)
                else:
                    log.warning("notice bus: the PUB/SUB connection failed: %r", failed.exceptions)
                    if self._pubsub is not None:  # it was up: lost
                        self.stats.reconnects += 1
            self._pubsub, self._subscribed = None, set()
            self.stats.channels = 0
            if self._leaving.is_set():
                return
            with trio.move_on_after(delay):
                await self._leaving.wait()
            delay = min(2 * delay, RECONNECT_MAX)

    async def _listen(self) -> None:
        pubsub: PubSub[bytes] = PubSub(
            self._client.connection_pool,
            ignore_subscribe_messages=True,
            retry_policy=NoRetryPolicy(),
            subscription_timeout=self._timeout,
            unsubscription_timeout=LEAVE_TIMEOUT,
            max_idle_seconds=max(1.0, self._timeout),
        )
        # Leaving ends the loop below and then the ``async with`` normally, which unsubscribes on
        # the live connection (cancelling the whole block would close it under the unsubscribe).
        self._listening = setup = trio.CancelScope()
        with setup:
            if self._leaving.is_set():
                return
            async with pubsub:
                with trio.fail_after(self._timeout):
                    await pubsub.subscribe(self.control)
                self._pubsub = pubsub
                self._interest.clear()  # everything watched now is subscribed below
                streams = self._hub.streams()
                await self._subscribe(streams)
                self._connected.set()
                if streams:
                    # What was committed while no connection was subscribed (or, the first time,
                    # before these watchers' streams were subscribed) is read now.
                    self._fresh.suspect(streams)
                    self.request_reconcile()
                get, handle = pubsub.get_message, self._handle
                self._listening = loop = trio.CancelScope()  # leaving now ends only this loop
                with loop:
                    while True:
                        message = await get()
                        if message is not None:
                            handle(message["data"])

    def _leave(self) -> None:
        """Stop listening: unsubscribe and let the PUB/SUB connection go."""
        self._closed = True
        self._leaving.set()
        self._listening.cancel()

    def _handle(self, data: object) -> None:
        """Act on one message's payload."""
        if self._closed or not isinstance(data, bytes) or data[:TOKEN_SIZE] == self.token:
            return  # our own, echoed back by Redis (or the bus is leaving)
        self.stats.received += 1
        try:
            items = wire.decode(data[TOKEN_SIZE:])
        except ValueError:
            self._bad()
            return
        for item in items:
            try:
                if item[0] in NOTICE_KINDS:
                    deliver(self._hub, self._fresh, self.stats, item)
                elif item[0] == wire.RESYNC:
                    self.request_reconcile()
            except (ValueError, TypeError, IndexError):
                self._bad()
            except Exception:
                log.exception("notice bus: handing on a notice failed")
                self.request_reconcile()

    def _bad(self) -> None:
        self.stats.bad += 1
        log.warning("notice bus: an undecodable message", exc_info=True)
        self.request_reconcile()

    # -- interest -------------------------------------------------------------------------------

    async def _subscribe(self, streams: list[str]) -> None:
        """Subscribe the channels of ``streams`` on the current connection (in chunks)."""
        pubsub = self._pubsub
        assert pubsub is not None
        for start in range(0, len(streams), SUBSCRIBE_CHUNK):
            chunk = [s for s in streams[start : start + SUBSCRIBE_CHUNK] if s not in self._subscribed]
            if not chunk:
                continue
            with trio.fail_after(self._timeout):
                await pubsub.subscribe(*[self.channel(s) for s in chunk])
            self._subscribed.update(chunk)
            self.stats.interest_sent += len(chunk)
        self.stats.channels = len(self._subscribed)

    def _unsubscribe(self, streams: list[str]) -> None:
        """Unsubscribe the channels of ``streams`` on the current connection."""
        pubsub = self._pubsub
        assert pubsub is not None
        for start in range(0, len(streams), SUBSCRIBE_CHUNK):
            chunk = [s for s in streams[start : start + SUBSCRIBE_CHUNK] if s in self._subscribed]
            if not chunk:
                continue
            self._subscribed.difference_update(chunk)
            # Sent without waiting for Redis's acknowledgement (coredis's ``unsubscribe`` waits a
            # fixed time for it, then warns): a late one only delays the end of messages that
            # the hub then drops, as nothing watches their streams here.
            pubsub._unsubscribe(*[self.channel(s) for s in chunk])
            self.stats.interest_sent += len(chunk)
        self.stats.channels = len(self._subscribed)

    async def _interest_loop(self) -> None:
        """Apply interest changes on the connection; read each newly subscribed stream's head once."""
        while True:
            await self._interest_wake.wait()
            self._interest_wake = trio.Event()
            if self._pubsub is None:
                continue  # the (re)connection subscribes everything watched then
            changes, self._interest = self._interest, {}
            watched = self._hub.watcher_count
            added = [s for s, w in changes.items() if w and watched(s)]
            removed = [s for s, w in changes.items() if not w and not watched(s)]
            self._busy += 1
            try:
                self._unsubscribe(removed)
                await self._subscribe(added)
            except Exception as exc:
                log.warning("notice bus: (un)subscribing failed: %s", exc)
                self._fresh.suspect(added)  # the reconnection subscribes them and reads them
                continue
            finally:
                self._busy -= 1
            added = [s for s in added if watched(s)]
            if not added:
                continue
            self.stats.interest_reads += len(added)
            try:
                await self._recon.hint_heads(added)
            except Exception:
                log.warning("notice bus: reading newly watched streams failed", exc_info=True)
                self._fresh.suspect(added)


@asynccontextmanager
async def open_redis_bus(
    hub: Receiver,
    store: Store,
    *,
    connect: Connect,
    prefix: str,
    timeout: float = 2.0,
    max_message: int = 64 * 1024,
    reconcile_interval: float = 1.0,
    connect_timeout: float | None = None,
) -> AsyncIterator[RedisBus]:
    """Join the notice bus of every worker that uses the Redis that ``connect`` reaches, under
    ``prefix`` (``store.redis_prefix``: the channels are ``<prefix>bus:<stream>``); leave it when
    the block exits.

    Returns once the PUB/SUB connection is subscribed, or after ``connect_timeout`` seconds
    (default ``timeout``) if Redis cannot be reached (it is retried in the background). Every
    command waits at most ``timeout`` seconds. The caller must pass every change its store commits
    to :meth:`RedisBus.publish`. ``max_message`` bounds a message in bytes (events that do not fit
    travel as hints); ``reconcile_interval`` (seconds, 0: off) paces the store reads that repair
    lost notices.
    """
    if max_message < 1024 or reconcile_interval < 0 or timeout <= 0:
        raise ValueError("max_message >= 1024, reconcile_interval >= 0, timeout > 0")
    async with connect() as client:
        bus = RedisBus(
            client,
            hub,
            store,
            prefix=prefix,
            timeout=timeout,
            max_message=max_message,
            reconcile_interval=reconcile_interval,
        )
        hub.set_interest_listener(bus.declare_interest)
        try:
            with lone_error_unwrapped():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(bus._pubsub_loop)
                    nursery.start_soon(bus._send_loop)
                    nursery.start_soon(bus._interest_loop)
                    nursery.start_soon(bus._recon.run)
                    with trio.move_on_after(timeout if connect_timeout is None else connect_timeout):
                        await bus._connected.wait()
                    try:
                        yield bus
                    finally:
                        with trio.move_on_after(timeout) as scope:
                            scope.shield = True
                            await bus._send(bus._outbox.take())  # what is queued still goes
                        bus._leave()
                        with trio.move_on_after(timeout) as scope:
                            scope.shield = True
                            await bus._left.wait()
                        nursery.cancel_scope.cancel()
        finally:
            hub.set_interest_listener(None)
