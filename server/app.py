"""Composition root: the only module that picks the concrete store, hub and transports.

``serve(config)`` runs one worker: it opens the configured store, wires the store's commit
listener to the hub (and, given a ``peers_dir``, to the bus that tells the host's other workers),
and serves the HTTP engine on the configured listening socket(s).
Each worker process (``server.process.worker``) runs ``serve`` on the sockets its supervisor
hands it; tests run it in-process.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, ExitStack, asynccontextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from server.app_edge import Admission, edge_hooks
from server.bus.local import open_local_bus
from server.bus.redis import open_redis_bus
from server.config import Config
from server.core.hub import Hub
from server.core.ports.bus import Bus, BusOpener
from server.core.ports.store import Listener, Notice, Store
from server.http.listener import bind_tcp_listener
from server.http.server import HttpServer, serve_http
from server.http.tls import make_server_ssl_context
from server.observability.host import HostMetrics, metrics_dir
from server.observability.metrics import Samples, add_connection_refusals, collect
from server.store.memory import MemoryStore
from server.store.redis import RedisStore, open_redis_store
from server.store.redis_client import open_client as open_redis_client
from server.store.sqlite import open_sqlite_store
from server.transports.context import Context, Settings
from server.transports.guard import Guard
from server.transports.router import make_handler

log = logging.getLogger(__name__)

TRIM_INTERVAL = 60.0  # seconds between retention sweeps for age limits


def guard_from(config: Config) -> Guard | None:
    """The worker's auth / rate-limit / CORS guard for the streams API (``None``: nothing to guard)."""
    return Guard.from_config(config.auth, config.limits, config.cors)


def settings_from(config: Config) -> Settings:
    """The transports' view of the configuration."""
    s = config.server
    return Settings(
        max_event_bytes=s.max_event_bytes,
        max_body_bytes=s.max_body_bytes,
        max_batch_events=s.max_batch_events,
        retry_ms=config.sse.retry_ms,
        retry_jitter_ms=config.sse.retry_jitter_ms,
        heartbeat=config.sse.heartbeat,
        poll_default_timeout=config.longpoll.default_timeout,
        poll_max_timeout=config.longpoll.max_timeout,
        poll_max_events=config.longpoll.max_events,
        ws_max_subscriptions=config.websocket.max_subscriptions,
        sse_gzip=config.compression.sse_gzip,
        gzip_level=config.compression.gzip_level,
    )


@asynccontextmanager
async def open_store(config: Config) -> AsyncIterator[Store]:
    """Open the configured store backend; closed on exit."""
    if config.store.backend == "memory":
        store: Store = MemoryStore(config.retention())
        try:
            yield store
        finally:
            await store.aclose()
        return
    if config.store.backend == "redis":
        async with open_redis_store_for(config) as redis_store:
            yield redis_store
        return
    path = Path(config.store.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    async with open_sqlite_store(str(path), config.retention(), sync=config.store.sync) as sqlite_store:
        yield sqlite_store


def open_redis_store_for(config: Config) -> AbstractAsyncContextManager[RedisStore]:
    """The Redis store that ``[store]`` describes (``redis_url`` or ``redis_sentinels``)."""
    s = config.store
    return open_redis_store(
        s.redis_url,
        config.retention(),
        sentinels=s.redis_sentinels,
        master=s.redis_master,
        prefix=s.redis_prefix,
        timeout=s.redis_timeout,
        wait_replicas=s.redis_wait_replicas,
    )


async def _periodic(interval: float, fn: Any) -> None:
    while True:
        await trio.sleep(interval)
        await fn()


async def _trim(store: Store) -> None:
    try:
        dropped = await store.trim_expired()
    except Exception:
        log.exception("retention sweep failed")
        return
    if dropped:
        log.info("retention: dropped %d expired events", dropped)


@dataclass(frozen=True, slots=True)
class Worker:
    """A running worker, as handed to ``serve``'s caller: its context, HTTP server and sockets.

    ``bus`` is its end of the host's notice bus (``None`` without ``peers_dir``); its ``stats``
    count what crossed between workers. ``metrics`` answers ``/metrics`` (host-wide totals, from
    the workers' snapshots under ``peers_dir``: :mod:`server.observability.host`).
    """

    ctx: Context
    http: HttpServer
    listeners: list[socket.socket]
    bus: Bus | None = None
    metrics: HostMetrics | None = None


def bus_opener(config: Config, peers_dir: str | None) -> BusOpener | None:
    """How the worker joins the notice bus: with the Redis store, Redis PUB/SUB (the workers of
    every host that shares the Redis, :mod:`server.bus.redis`); else the Unix-datagram bus of
    the host's workers in ``peers_dir``, or ``None`` without ``peers_dir`` or with the memory
    store (whose history no other process can read, so a notice could not be repaired)."""
    b, s = config.bus, config.store
    if s.backend == "redis":
        connect = partial(open_redis_client, s.redis_url, s.redis_sentinels, s.redis_master, s.redis_timeout, 4)
        return partial(
            open_redis_bus,
            connect=connect,
            prefix=s.redis_prefix,
            timeout=s.redis_timeout,
            max_message=b.max_datagram,
            reconcile_interval=b.reconcile_interval,
        )
    if peers_dir is None or s.backend == "memory":
        return None
    return partial(
        open_local_bus,
        peers_dir,
        max_datagram=b.max_datagram,
        reconcile_interval=b.reconcile_interval,
        rescan_interval=b.rescan_interval,
        max_peers=b.max_peers,
        max_interest=b.max_interest,
    )


def _open_bus(opener: BusOpener | None, hub: Hub, store: Store) -> AbstractAsyncContextManager[Bus | None]:
    """The async context of the worker's bus (``None``: no bus)."""
    return nullcontext(None) if opener is None else opener(hub, store)


def _samples(ctx: Context, engine: list[HttpServer], bus: Bus | None, admission: Admission | None = None) -> Samples:
    """This worker's live counters: hub, engine, guard, bus, store (a store with a ``stats``
    record) and the connection caps' refusals."""
    guard = ctx.guard
    http = engine[0].stats if engine else None
    store = getattr(ctx.store, "stats", None)
    samples = collect(ctx.hub.stats, http, guard.stats if guard else None, bus.stats if bus else None, store)
    if admission is not None:
        add_connection_refusals(samples, admission.refused)
    return samples


def store_listener(hub: Hub, bus: Bus | None) -> Listener:
    """What the store calls on each commit: the hub, then (even if the hub failed) the bus."""
    if bus is None:
        return hub.on_notice
    on_notice, publish = hub.on_notice, bus.publish

    def listen(notice: Notice) -> None:
        try:
            on_notice(notice)
        finally:
            publish(notice)

    return listen


async def serve(
    config: Config,
    *,
    listeners: list[socket.socket] | None = None,
    peers_dir: str | None = None,
    task_status: trio.TaskStatus[Worker] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one worker forever; ``task_status.started(Worker(...))`` once accepting.

    With ``peers_dir`` (the runtime directory shared by the host's workers) and the sqlite store,
    the worker joins the host's notice bus before it accepts, so publishes on any worker reach
    subscribers on this one (see :mod:`server.bus.local`).
    """
    with ExitStack() as owned:
        if listeners is None:  # ours to close; sockets handed in belong to the caller
            listeners = [owned.enter_context(bind_tcp_listener(config.server.host, config.server.port))]
        await _serve(config, listeners, peers_dir, task_status)


async def _serve(
    config: Config, listeners: list[socket.socket], peers_dir: str | None, task_status: trio.TaskStatus[Worker]
) -> None:
    ssl_context = None
    if config.server.tls_cert and config.server.tls_key:
        ssl_context = make_server_ssl_context(config.server.tls_cert, config.server.tls_key)
    async with open_store(config) as store:
        hub = Hub(
            store,
            replay_page=config.hub.replay_page,
            coalesce=config.hub.coalesce,
            replay_buffer=config.hub.replay_buffer,
            replay_buffer_total=config.hub.replay_buffer_total,
            replay_buffer_bytes=config.hub.replay_buffer_bytes,
            reorder_window=config.hub.reorder_window,
        )
        store.set_listener(hub.on_notice)
        async with _open_bus(bus_opener(config, peers_dir), hub, store) as bus, trio.open_nursery() as nursery:
            store.set_listener(store_listener(hub, bus))
            ctx = Context(store=store, hub=hub, settings=settings_from(config), guard=guard_from(config))
            engine: list[HttpServer] = []  # filled once the engine runs (its stats are its own)
            limits = config.limits
            admission = Admission(config) if limits.max_connections or limits.max_connections_per_address else None
            metrics = HostMetrics(metrics_dir(peers_dir), partial(_samples, ctx, engine, bus, admission))
            handler = make_handler(ctx, metrics=metrics.render)
            http: HttpServer = await nursery.start(
                partial(
                    serve_http,
                    listeners,
                    handler,
                    limits=config.http_limits(),
                    ssl_context=ssl_context,
                    hooks=edge_hooks(config, admission),
                    allow_plaintext=config.server.tls_allow_plaintext,
                )
            )
            engine.append(http)
            nursery.start_soon(hub.run)  # heartbeats
            nursery.start_soon(metrics.run)  # snapshots for the other workers' /metrics
            nursery.start_soon(_periodic, TRIM_INTERVAL, lambda: _trim(store))
            addrs = ", ".join(str(s.getsockname()[:2]) for s in listeners)
            log.info("sluice worker %d serving on %s (store: %s)", os.getpid(), addrs, config.store.backend)
            task_status.started(Worker(ctx, http, listeners, bus, metrics))
