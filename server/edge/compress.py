"""Compression negotiation for streamed responses: whether a client takes gzip
(:func:`accepts_gzip`) and the ``[compression]`` section. The gzip bytes of SSE are built once
per event and shared by every subscriber (:mod:`server.core.gzipsse`); a per-response
compressor would cost each connection 40-260 KiB (measured with tracemalloc: 38,920 bytes at
window 12 / memLevel 5, 268,296 at zlib's defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CompressionConfig", "accepts_gzip"]


@dataclass(frozen=True, slots=True)
class CompressionConfig:
    """``[compression]``: gzip for SSE (``sse_gzip``, ``gzip_level``) and permessage-deflate for
    WebSocket (``ws_deflate``, ``ws_window_bits``: the largest window the server keeps)."""

    sse_gzip: bool = True
    gzip_level: int = 6
    ws_deflate: bool = True
    ws_window_bits: int = 12


_GZIP_NAMES = frozenset({b"gzip", b"x-gzip"})


def _qvalue(params: list[bytes]) -> float | None:
    """The q of one Accept-Encoding member (1.0 when absent); ``None`` when malformed."""
    for param in params:
        name, sep, value = param.partition(b"=")
        if name.strip().lower() != b"q":
            continue
        if not sep:
            return None
        try:
            q = float(value.strip().decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None
        return q if 0.0 <= q <= 1.0 else None
    return 1.0


def accepts_gzip(accept_encoding: bytes | None) -> bool:
    """True when an ``Accept-Encoding`` value permits a gzip response.

    ``gzip`` (or ``x-gzip``) listed with q > 0 wins; listed with ``q=0`` it is refused even if
    ``*`` would allow it. Otherwise ``*`` with q > 0 permits gzip. A member with a malformed
    q-value is ignored. ``None`` or an empty value means no.
    """
    if not accept_encoding:
        return False
    explicit: float | None = None
    star: float | None = None
    for member in accept_encoding.split(b","):
        coding, *params = member.split(b";")
        name = coding.strip().lower()
        if not name:
            continue
        q = _qvalue(params)
        if q is None:
            continue
        if name in _GZIP_NAMES:
            explicit = q if explicit is None else max(explicit, q)
        elif name == b"*":
            star = q if star is None else max(star, q)
    if explicit is not None:
        return explicit > 0.0
    return star is not None and star > 0.0
