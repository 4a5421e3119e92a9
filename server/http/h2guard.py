"""Per-connection bounds on what an HTTP/2 peer may make the server do, checked on raw input.

:class:`FrameGuard` walks the 9-byte frame headers as bytes arrive, before h2 buffers anything:

* a frame longer than ``SETTINGS_MAX_FRAME_SIZE`` is refused at its header (h2 only checks a
  frame's length once the whole frame is buffered);
* a header block (HEADERS or PUSH_PROMISE plus its CONTINUATION frames) is refused once its
  announced payload passes ``max_header_block``. h2 itself caps a block at 64 CONTINUATION
  frames, which with a 16 KiB frame size is still ~1 MiB buffered per connection
  (CVE-2024-27316 class); this bound is the engine's header limits instead;
* every RST_STREAM frame is counted, to be charged to the connection's reset bucket;
* the connection's head must complete within ``HttpLimits.header_timeout``: the client preface
  and its first SETTINGS from the driver's start (:attr:`FrameGuard.settled`, set by the driver on
  h2's ``RemoteSettingsChanged``), and every header block (HEADERS or PUSH_PROMISE, its
  CONTINUATION frames, up to the last byte of the frame with END_HEADERS) from its first frame
  header. h2 buffers an open block whole and, per RFC 9113 section 6.10, no other frame may
  interleave with it, so a block trickled in (slowloris over HTTP/2) would otherwise stall every
  stream of the connection for as long as the peer likes. :attr:`FrameGuard.head_deadline` is
  the reader's deadline; past it the driver ends the connection (see :data:`HEAD_TIMEOUT`).

:class:`H2Caps` holds the edge's per-connection token buckets (resets and streams opened,
created lazily and only when the hook is set). When one refuses, the driver sends GOAWAY with
ENHANCE_YOUR_CALM and closes the connection.
"""

from __future__ import annotations

import h2.connection
from hyperframe.frame import Frame, RstStreamFrame

from server.http.base import HttpLimits
from server.http.hooks import BucketLike, EdgeHooks

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_HEADERS = 0x1
_RST_STREAM = 0x3
_PUSH_PROMISE = 0x5
_CONTINUATION = 0x9
_END_HEADERS = 0x4

FRAME_TOO_LARGE = "a frame larger than SETTINGS_MAX_FRAME_SIZE"
HEADER_BLOCK_TOO_LARGE = "a header block larger than the header limits (CONTINUATION flood)"
# Answered with GOAWAY ENHANCE_YOUR_CALM, not PROTOCOL_ERROR: RFC 9113 sets no deadline on a header
# block or the preface, so a slow one breaks no rule of the protocol; it is load the peer imposes
# (the connection's input blocked, a decoder buffer held), our local policy like the size bound
# above, which is exactly what ENHANCE_YOUR_CALM (RFC 9113 section 7) says. It also lands in
# ``HttpStats.h2_calm`` with the other HTTP/2 abuse, besides its own ``header_timeouts``.
HEAD_TIMEOUT = "a header block or the client preface not complete within header_timeout (slowloris)"


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
    ``limits`` gives the frame size and ``header_timeout``; ``now`` (the constructor's and
    :meth:`feed`'s) is trio's clock, the time the connection's HTTP/2 began and the input came.
    """

    __slots__ = (
        "_block",
        "_block_since",
        "_head",
        "_max_block",
        "_max_frame",
        "_open",
        "_preface_deadline",
        "_skip",
        "_timeout",
        "resets",
        "settled",
    )

    def __init__(self, limits: HttpLimits, max_header_block: int, now: float) -> None:
        self._max_frame = limits.h2_max_inbound_frame
        self._max_block = max_header_block
        self._skip = len(PREFACE)
        self._head = b""
        self._block = 0  # payload bytes of the header block in progress
        self._open = False  # a header block awaits its END_HEADERS
        self._block_since: float | None = None  # when the header block in progress began
        self._timeout = limits.header_timeout
        self._preface_deadline = now + limits.header_timeout
        self.resets = 0
        self.settled = False  # the preface and the client's first SETTINGS arrived (set by the driver)

    @property
    def head_deadline(self) -> float:
        """When the preface or the header block in progress must be complete (``inf``: none due)."""
        deadline = float("inf") if self.settled else self._preface_deadline
        if self._block_since is not None:
            deadline = min(deadline, self._block_since + self._timeout)
        return deadline

    def feed(self, data: bytes, now: float) -> str | None:
        """Account for ``data`` (received at ``now``); the reason to refuse the connection, or ``None``."""
        pos = 0
        end = len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                if not self._skip and not self._open:
                    self._block_since = None  # the block's last frame is complete (or not in a block)
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
            if kind in (_HEADERS, _PUSH_PROMISE) or (kind == _CONTINUATION and self._open):
                if kind == _CONTINUATION:
                    self._block += length
                else:
                    self._block = length
                    self._block_since = now
                if self._block > self._max_block:
                    return HEADER_BLOCK_TOO_LARGE
                self._open = not head[4] & _END_HEADERS
            elif kind == _RST_STREAM:
                self.resets += 1
            self._skip = length
            if not length and not self._open:
                self._block_since = None
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
