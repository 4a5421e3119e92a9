"""Pre-encoded payloads shared by every connection that sends them."""

from __future__ import annotations


class Frame:
    """Bytes built once and written to many connections.

    ``raw`` is the payload as HTTP/2 DATA or a complete WebSocket frame carries it; ``chunked`` is
    the same payload framed as one HTTP/1.1 chunk, built on first use and then kept;
    ``deflated`` is the payload's shared gzip form (see :mod:`server.core.gzipsse`), once built.
    """

    __slots__ = ("_chunked", "deflated", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._chunked: bytes | None = None
        self.deflated: Frame | None = None

    @property
    def chunked(self) -> bytes:
        """``raw`` as one HTTP/1.1 chunk (``<hex len>\\r\\n<raw>\\r\\n``)."""
        c = self._chunked
        if c is None:
            c = self._chunked = b"%x\r\n%b\r\n" % (len(self.raw), self.raw)
        return c

    def __len__(self) -> int:
        return len(self.raw)
