"""What the engine asks of the edge, as plain protocols: ``http`` and ``edge`` never import each
other; ``server.app`` builds an :class:`EdgeHooks` from ``server.edge`` objects and hands it in.

Every hook is optional: ``EdgeHooks()`` is an engine with no PROXY protocol, no connection caps,
no per-connection rate bounds and no WebSocket compression.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


class ProxyParserLike(Protocol):
    """A PROXY protocol header parser (``server.edge.proxy_protocol.ProxyHeaderParser``)."""

    def feed(self, data: bytes) -> Any:
        """Return the parsed header (with ``.source``: ``(ip, port)`` or ``None``) or ``None``
        while more bytes are needed; raise ``ValueError`` for anything that is not a header."""
        ...

    @property
    def remainder(self) -> bytes:
        """The bytes after the header (the start of TLS or HTTP)."""
        ...


class BucketLike(Protocol):
    """A token bucket (``server.edge.buckets.TokenBucket``)."""

    def take(self, now: float, cost: float = 1.0) -> float:
        """0 if allowed, else the seconds until it would be."""
        ...


@dataclass(frozen=True, slots=True)
class EdgeHooks:
    """The edge's say in the engine; see the module docstring.

    * ``proxy_parser(peer_ip)``: a fresh parser when ``peer_ip`` is a trusted load balancer that must
      open with a PROXY header, else ``None`` (the connection's bytes are never sniffed for one).
    * ``admit(client_ip)``: called once the client address is known, before any request is read;
      returns a release callback (called exactly once when the connection ends), or ``None``
      when a connection cap is reached: the engine answers ``503`` with ``Retry-After:
      retry_after`` (HTTP/1.1 and h2c; over TLS the connection is closed) and closes.
    * ``h2_reset_bucket()`` / ``h2_stream_bucket()``: a bucket per HTTP/2 connection bounding
      stream resets and streams opened; when empty the connection gets ``GOAWAY``
      (``ENHANCE_YOUR_CALM``).
    * ``ws_ping_bucket()``: a bucket per WebSocket bounding the client's pings (empty: close 1008).
    * ``ws_extensions()``: fresh wsproto extensions per WebSocket (bounded permessage-deflate).
    """

    proxy_parser: Callable[[str], ProxyParserLike | None] | None = None
    admit: Callable[[str], Callable[[], None] | None] | None = None
    retry_after: int = 5
    h2_reset_bucket: Callable[[], BucketLike] | None = None
    h2_stream_bucket: Callable[[], BucketLike] | None = None
    ws_ping_bucket: Callable[[], BucketLike] | None = None
    ws_extensions: Callable[[], list[Any]] | None = None


NO_HOOKS = EdgeHooks()
