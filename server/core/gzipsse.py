"""gzip for SSE, encoded once per event and shared by every subscriber (pure; no I/O).

A streamed gzip body is usually one compressor per response, flushed after every event; that
costs each connection a compressor (~40-260 KiB) and each delivery a compression. Here every
shared payload (:class:`~server.core.frame.Frame`) is compressed once, on first use, by a fresh
raw-deflate compressor ended with ``Z_SYNC_FLUSH``: a byte-aligned run of non-final deflate
blocks with no back-reference before its own start. Such runs concatenate into one valid deflate
stream in any order, so each response only writes the 10-byte gzip header first, then the shared
runs, then :meth:`GzipFraming.trailer` (an empty final block, the CRC-32 and the length of what
it sent). Per connection that is two integers; per delivery one CRC-32 update. Each run is
decodable as soon as it arrives: nothing waits for a compression block to fill.

The price is ratio: no history is shared between events, so a small event compresses little
(under 128 bytes it is sent stored, 5 bytes of framing, no compression work); a run of events
(a batch) or one large event compresses well.
"""

from __future__ import annotations

import struct
import zlib

from server.core.frame import Frame

GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name/mtime, unknown OS
_FINAL_EMPTY_BLOCK = b"\x03\x00"  # BFINAL=1, fixed Huffman, end-of-block
_WINDOW_BITS = -12  # raw deflate; a 4 KiB window bounds the (short-lived) compressor's memory
_MEM_LEVEL = 5
MIN_COMPRESS = 128  # smaller payloads are sent as stored blocks


def deflate_run(data: bytes, level: int = 6) -> bytes:
    """``data`` as a self-contained, byte-aligned run of non-final deflate blocks (see module):
    compressed when that is smaller, else as stored blocks (5 bytes per 64 KiB of overhead; data
    under ``MIN_COMPRESS`` bytes is always stored: it cannot gain)."""
    if len(data) >= MIN_COMPRESS:
        c = zlib.compressobj(level, zlib.DEFLATED, _WINDOW_BITS, _MEM_LEVEL)
        packed = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
        if len(packed) < len(data):
            return packed
    return _stored(data)


def _stored(data: bytes) -> bytes:
    """``data`` as non-final stored blocks (header byte, LEN, NLEN, bytes), byte-aligned."""
    out = []
    for i in range(0, len(data), 0xFFFF):
        part = data[i : i + 0xFFFF]
        out.append(struct.pack("<BHH", 0, len(part), len(part) ^ 0xFFFF) + part)
    return b"".join(out)


def deflated(frame: Frame, level: int = 6) -> Frame:
    """The shared compressed form of ``frame`` (built on first use, then kept on the frame; the
    first ``level`` asked for is the one kept, one per process in practice)."""
    d = frame.deflated
    if d is None:
        d = frame.deflated = Frame(deflate_run(frame.raw, level))
    return d


class GzipFraming:
    """One response's gzip member: what it sent so far (CRC-32 and length) and its trailer."""

    __slots__ = ("crc", "level", "size")

    def __init__(self, level: int = 6) -> None:
        self.crc = 0
        self.size = 0
        self.level = level

    def frame(self, frame: Frame) -> Frame:
        """Count ``frame`` as sent and return its shared compressed form."""
        raw = frame.raw
        self.crc = zlib.crc32(raw, self.crc)
        self.size += len(raw)
        return deflated(frame, self.level)

    def data(self, data: bytes) -> bytes:
        """Count this connection's own ``data`` as sent and return it compressed (not shared)."""
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return deflate_run(data, self.level)

    def start(self, data: bytes) -> bytes:
        """The gzip header followed by ``data`` compressed: the first bytes of the body."""
        return GZIP_HEADER + self.data(data)

    def trailer(self) -> bytes:
        """The end of the member: an empty final block, CRC-32 and length (mod 2**32)."""
        return _FINAL_EMPTY_BLOCK + struct.pack("<II", self.crc & 0xFFFFFFFF, self.size & 0xFFFFFFFF)
