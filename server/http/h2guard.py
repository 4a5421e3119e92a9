"""Per-connection bounds on what an HTTP/2 peer may make the server do, checked on raw input.

:class:`FrameGuard` walks the 9-byte frame headers as bytes arrive, before h2 buffers anything:

* a frame longer than ``SETTINGS_MAX_FRAME_SIZE`` is refused at its header (h2 only checks a
  frame's length once the whole frame is buffered);
* a header block (HEADERS plus its CONTINUATION frames) is refused once its announced payload
  passes ``max_header_block``. h2 itself caps a block at 64 CONTINUATION frames, which with a
  16 KiB frame size is still ~1 MiB buffered per connection (CVE-2024-27316 class); this bound
  is the engine's header limits instead;
* every RST_STREAM frame is counted, to be charged to the connection's reset bucket.

:class:`H2Caps` holds the edge's per-connection token buckets (resets and streams opened,
created lazily and only when the hook is set). When one refuses, the driver sends GOAWAY with
ENHANCE_YOUR_CALM and closes the connection.
"""

from __future__ import annotations

import h2.connection
from hyperframe.frame import Frame, RstStreamFrame

from server.http.hooks import BucketLike, EdgeHooks

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_HEADERS = 0x1
_RST_STREAM = 0x3
_CONTINUATION = 0x9
_END_HEADERS = 0x4

FRAME_TOO_LARGE = "a frame larger than SETTINGS_MAX_FRAME_SIZE"
HEADER_BLOCK_TOO_LARGE = "a header block larger than the header limits (CONTINUATION flood)"


class ServerH2Connection(h2.connection.H2Connection):
    """h2's connection with its own stream-count check disabled and sent resets counted.

    h2 answers a HEADERS frame past SETTINGS_MAX_CONCURRENT_STREAMS with a connection error
    (GOAWAY); RFC 9113 section 5.1.2 allows refusing just that stream, which is what the driver does
    (RST_STREAM with REFUSED_STREAM), so a client that races our SETTINGS keeps its connection.

    :attr:`resets_sent` counts every RST_STREAM frame queued, also those h2 queues on its own
    while processing input (frames on a stream closed by a reset); the driver charges the ones
    queued in response to input to the connection's reset bucket. (Hooks h2 4.x's private
    ``_prepare_for_sending``, through which every frame but the driver's own DATA fast path goes.)
    """

    resets_sent = 0

    @property
    def open_inbound_streams(self) -> int:
        """Always 0 for h2's own check; reading the base property still prunes closed streams."""
        _ = super().open_inbound_streams
        return 0

    def _prepare_for_sending(self, frames: list[Frame]) -> None:
        for frame in frames:
            if type(frame) is RstStreamFrame:
                self.resets_sent += 1
        super()._prepare_for_sending(frames)


class FrameGuard:
    """Checks frame headers as bytes arrive; see the module docstring.

    :meth:`feed` returns ``None`` while the input is acceptable, else the reason to end the
    connection. :attr:`resets` counts the RST_STREAM frames seen since the driver last took them.
    """

    __slots__ = ("_block", "_head", "_max_block", "_max_frame", "_open", "_skip", "resets")

    def __init__(self, max_frame: int, max_header_block: int) -> None:
        self._max_frame = max_frame
        self._max_block = max_header_block
        self._skip = len(PREFACE)
        self._head = b""
        self._block = 0  # payload bytes of the header block in progress
        self._open = False  # a header block awaits its END_HEADERS
        self.resets = 0

    def feed(self, data: bytes) -> str | None:
        """Account for ``data``; the reason to refuse the connection, or ``None``."""
        pos = 0
        end = len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            need = 9 - len(self._head)
            self._head += data[pos : pos + need]
            pos += need
            if len(self._head) < 9:
                break
            head = self._head
            self._head = b""
            length = int.from_bytes(head[:3], "big")
            if length > self._max_frame:
                return FRAME_TOO_LARGE
            kind = head[3]
            if kind == _HEADERS or (kind == _CONTINUATION and self._open):
                self._block = (self._block if kind == _CONTINUATION else 0) + length
                if self._block > self._max_block:
                    return HEADER_BLOCK_TOO_LARGE
                self._open = not head[4] & _END_HEADERS
            elif kind == _RST_STREAM:
                self.resets += 1
            self._skip = length
        return None

    def take_resets(self) -> int:
        """The RST_STREAM frames counted since the last call."""
        count, self.resets = self.resets, 0
        return count


class H2Caps:
    """The edge's per-connection HTTP/2 buckets (``EdgeHooks.h2_reset_bucket`` and
    ``h2_stream_bucket``), each created on first use and only if its hook is set."""

    __slots__ = ("_hooks", "_resets", "_streams")

    def __init__(self, hooks: EdgeHooks) -> None:
        self._hooks = hooks
        self._resets: BucketLike | None = None
        self._streams: BucketLike | None = None

    def resets_allowed(self, now: float, count: int) -> bool:
        """Charge ``count`` stream resets (either direction); False once the bucket refuses."""
        factory = self._hooks.h2_reset_bucket
        if count <= 0 or factory is None:
            return True
        if self._resets is None:
            self._resets = factory()
        return self._resets.take(now, count) == 0

    def stream_allowed(self, now: float) -> bool:
        """Charge one new stream; False once the bucket refuses."""
        factory = self._hooks.h2_stream_bucket
        if factory is None:
            return True
        if self._streams is None:
            self._streams = factory()
        return self._streams.take(now, 1) == 0
