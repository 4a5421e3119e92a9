"""The edge, composed for one worker: :func:`edge_hooks` turns the ``[proxy]``, ``[limits]`` and
``[compression]`` sections into the engine's :class:`~server.http.hooks.EdgeHooks` (``http`` and
``edge`` never import each other; this module, part of the composition root, joins them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from server.config import Config
from server.edge.deflate import BoundedPerMessageDeflate
from server.edge.proxy_protocol import ProxyHeaderParser, TrustedProxies
from server.http.hooks import EdgeHooks, ProxyParserLike


def edge_hooks(config: Config) -> EdgeHooks:
    """The engine hooks of one worker: a PROXY parser for trusted peers, connection caps (one
    counter per worker), per-connection HTTP/2 and WebSocket ping buckets, and bounded
    permessage-deflate when ``compression.ws_deflate`` is on."""
    limits = config.limits
    return EdgeHooks(
        proxy_parser=_proxy_parser(config),
        admit=_admit(config),
        retry_after=limits.retry_after_seconds,
        h2_reset_bucket=limits.h2_reset_bucket,
        h2_stream_bucket=limits.h2_stream_bucket,
        ws_ping_bucket=limits.ws_ping_bucket,
        ws_extensions=_ws_extensions(config),
    )


def _proxy_parser(config: Config) -> Callable[[str], ProxyParserLike | None] | None:
    if not config.proxy.trusted:
        return None
    trusted = TrustedProxies(config.proxy.trusted)
    max_v2 = config.proxy.max_v2_bytes

    def parser(peer_ip: str) -> ProxyParserLike | None:
        return ProxyHeaderParser(max_v2_length=max_v2) if trusted.contains(peer_ip) else None

    return parser


def _admit(config: Config) -> Callable[[str], Callable[[], None] | None] | None:
    limits = config.limits
    if limits.max_connections == 0 and limits.max_connections_per_address == 0:
        return None
    counter = limits.connection_counter()

    def admit(client_ip: str) -> Callable[[], None] | None:
        ticket = counter.try_acquire(client_ip)
        return None if ticket is None else ticket.release

    return admit


def _ws_extensions(config: Config) -> Callable[[], list[Any]] | None:
    compression = config.compression
    if not compression.ws_deflate:
        return None
    cap = config.http.ws_max_message
    bits = compression.ws_window_bits

    def extensions() -> list[Any]:
        return [BoundedPerMessageDeflate(cap, server_max_window_bits=bits)]

    return extensions
