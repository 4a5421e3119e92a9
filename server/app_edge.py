"""The edge, composed for one worker: :func:`edge_hooks` turns the ``[proxy]``, ``[limits]`` and
``[compression]`` sections into the engine's :class:`~server.http.hooks.EdgeHooks` (``http`` and
``edge`` never import each other; this module, part of the composition root, joins them)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from server.config import Config
from server.edge.deflate import BoundedPerMessageDeflate
from server.edge.proxy_protocol import ProxyHeaderParser, TrustedProxies
from server.http.hooks import EdgeHooks, ProxyParserLike

log = logging.getLogger(__name__)


class Admission:
    """One worker's connection caps (:meth:`admit` is the engine's ``admit`` hook).

    ``max_connections`` applies per worker; ``max_connections_per_address`` per host, of which
    this worker, one of ``config.server.workers`` (0, as in a single in-process worker, counts as
    1), admits its share (:meth:`~server.edge.limits.LimitsConfig.per_address_per_worker`). A
    per-address refusal is logged as a warning naming the address and the cap, at most once per
    ``limits.refusal_log_interval`` per address; :attr:`refused` counts refusals by reason."""

    def __init__(self, config: Config, clock: Callable[[], float] = trio.current_time) -> None:
        limits = config.limits
        self.workers = max(1, config.server.workers)
        self.host_cap = limits.max_connections_per_address
        self._counter = limits.connection_counter(self.workers)
        self._log = limits.refusal_log()
        self._clock = clock

    @property
    def refused(self) -> dict[str, int]:
        """Connections this worker turned away, by reason (``per_address``, ``total``): a copy."""
        return dict(self._counter.refused)

    def admit(self, client_ip: str) -> Callable[[], None] | None:
        """A release callback for an admitted connection from ``client_ip``, or ``None`` (refused)."""
        ticket = self._counter.try_acquire(client_ip)
        if ticket is not None:
            return ticket.release
        if self._counter.refusal(client_ip) == "per_address":
            self._warn(client_ip)
        return None

    def _warn(self, client_ip: str) -> None:
        held_back = self._log.note(client_ip, self._clock())
        if held_back is None:
            return
        share = self._counter.max_per_address
        more = f"; {held_back} more refused since the last warning" if held_back else ""
        log.warning(
            "refused a connection from %s: limits.max_connections_per_address (%d per host, %d on this worker"
            " of %d) reached%s; if that is a load balancer that sends no PROXY header, list it in proxy.trusted"
            " (and enable PROXY protocol on it) or raise the cap",
            client_ip,
            self.host_cap,
            share,
            self.workers,
            more,
        )


def edge_hooks(config: Config, admission: Admission | None = None) -> EdgeHooks:
    """The engine hooks of one worker: a PROXY parser for trusted peers, connection caps
    (``admission``, or a fresh :class:`Admission`; none when both caps are 0), per-connection
    HTTP/2 and WebSocket ping buckets, and bounded permessage-deflate when
    ``compression.ws_deflate`` is on."""
    limits = config.limits
    if admission is None and (limits.max_connections or limits.max_connections_per_address):
        admission = Admission(config)
    return EdgeHooks(
        proxy_parser=_proxy_parser(config),
        admit=admission.admit if admission is not None else None,
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


def _ws_extensions(config: Config) -> Callable[[], list[Any]] | None:
    compression = config.compression
    if not compression.ws_deflate:
        return None
    cap = config.http.ws_max_message
    bits = compression.ws_window_bits

    def extensions() -> list[Any]:
        return [BoundedPerMessageDeflate(cap, server_max_window_bits=bits)]

    return extensions
