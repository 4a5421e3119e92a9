"""One HTTP/2 request stream: the :class:`~server.http.base.Exchange` and its response stream.

The stream holds the request body (flow-control credit is handed back only as the handler reads
it) and the response's pending bytes (what the peer's flow-control window does not admit yet).
All HTTP/2 framing goes through :class:`~server.http.h2conn.H2Driver`, which owns the h2 state.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import h2.stream
import trio

from server.core.frame import Frame
from server.http.base import BodyTooLarge, HTTPError, Request, WebSocket
from server.http.common import JSON_TYPE, call_close_callbacks, json_error

if TYPE_CHECKING:
    from server.http.h2conn import H2Driver

BODY_SLICE = 64 * 1024
_NO_BODY_STATUS = frozenset({204, 304})


class H2Stream:
    """One request on an HTTP/2 connection; also the ResponseStream returned by ``open_stream``."""

    __slots__ = (
        "_answered",
        "_body",
        "_body_event",
        "_body_result",
        "_close_callbacks",
        "_d",
        "_discard_body",
        "_head_only",
        "_reading",
        "_streaming",
        "_unacked",
        "_waiter",
        "body_done",
        "dead",
        "end_after_pending",
        "ended",
        "h2s",
        "handler_finished",
        "pending",
        "pending_bytes",
        "request",
        "scope",
        "sid",
        "slow",
    )

    def __init__(self, driver: H2Driver, sid: int, request: Request, h2s: h2.stream.H2Stream) -> None:
        self._d = driver
        self.sid = sid
        self.h2s = h2s  # h2's record of the stream (flow-control window, state)
        self.request = request
        request.body_reader = self._read_body
        self.scope = trio.CancelScope()
        self._answered = False
        self._streaming = False
        self._head_only = request.method == "HEAD"
        self.dead = False  # reset (by either side) or the connection is gone
        self.slow = False  # reset by the server for falling behind
        self.ended = False  # END_STREAM sent
        self.end_after_pending = False
        self.handler_finished = False
        self.pending: deque[bytes | memoryview] = deque()
        self.pending_bytes = 0
        self._waiter: trio.Event | None = None
        self._body = bytearray()
        self._body_result: bytes | None = None
        self.body_done = False
        self._body_event: trio.Event | None = None
        self._unacked = 0
        self._reading = False
        self._discard_body = False
        self._close_callbacks: list[Callable[[], None]] | None = None

    # -- driver callbacks ----------------------------------------------------------------------

    def on_data(self, data: bytes, flow_controlled: int) -> None:
        """DATA arrived for this stream."""
        if self._discard_body or self.handler_finished:
            self._d.ack(self.sid, flow_controlled)
            return
        self._body += data
        if self._reading:
            self._d.ack(self.sid, flow_controlled)
            self._wake_body()
        else:
            self._unacked += flow_controlled

    def on_end(self) -> None:
        """The client ended its side of the stream."""
        self.body_done = True
        self._wake_body()

    def on_dead(self) -> None:
        """The stream was reset or the connection is gone: cancel the handler, drop pending data."""
        self.dead = True
        self._streaming = False
        self.pending.clear()
        self.pending_bytes = 0
        self.scope.cancel()
        self._wake_body()
        self.wake()

    def wind_down(self) -> None:
        """The connection was asked to close: call the handler's close-request callbacks."""
        callbacks, self._close_callbacks = self._close_callbacks, None
        call_close_callbacks(callbacks)

    def wake(self) -> None:
        """Progress on the send side (window opened, data or END_STREAM went out, or death)."""
        if self._waiter is not None:
            self._waiter.set()
            self._waiter = None

    def _wake_body(self) -> None:
        if self._body_event is not None:
            self._body_event.set()
            self._body_event = None

    # -- request body --------------------------------------------------------------------------

    async def _read_body(self, limit: int) -> bytes:
        if self._body_result is not None:
            if len(self._body_result) > limit:
                raise BodyTooLarge(limit)
            return self._body_result
        if self._answered or self._reading:
            raise RuntimeError("read the request body once, before answering")
        self._reading = True
        try:
            await self._collect_body(limit)
        except BaseException:
            self._discard_body = True
            self._body = bytearray()
            raise
        finally:
            self._reading = False
        self._body_result = result = bytes(self._body)
        self._body = bytearray()
        return result

    async def _collect_body(self, limit: int) -> None:
        length = self.request.headers.get("content-length", "")
        if (length.isdigit() and int(length) > limit) or len(self._body) > limit:
            raise BodyTooLarge(limit)
        if self._unacked:
            self._d.ack(self.sid, self._unacked)
            self._unacked = 0
        with trio.move_on_after(self._d.limits.body_timeout) as timer:
            while not self.body_done:
                if len(self._body) > limit:
                    raise BodyTooLarge(limit)
                if self.dead:
                    raise trio.BrokenResourceError("stream reset")
                self._body_event = trio.Event()
                await self._body_event.wait()
        if timer.cancelled_caught:
            raise HTTPError(408, "timeout", "request body not received in time")
        if len(self._body) > limit:
            raise BodyTooLarge(limit)

    # -- Exchange ------------------------------------------------------------------------------

    @property
    def answered(self) -> bool:
        """True once the response head has been sent."""
        return self._answered

    def _head(self, status: int, headers: list[tuple[str, str]], length: int | None) -> bool:
        """Send HEADERS; True if a body follows."""
        if self._answered:
            raise RuntimeError("this request has already been answered")
        self._answered = True
        has_body = not self._head_only and status not in _NO_BODY_STATUS and length != 0
        if self.dead:
            return False
        self._d.send_headers(self, status, headers, length, end_stream=not has_body)
        if not has_body:
            self.ended = True
        return has_body

    async def respond(self, status: int, headers: list[tuple[str, str]], body: bytes = b"") -> None:
        """Send a complete response; the body respects the peer's flow control."""
        if not self._head(status, headers, len(body)):
            await trio.lowlevel.checkpoint()
            return
        view = memoryview(body)
        for start in range(0, len(body), BODY_SLICE):
            if not self._d.send_data(self, view[start : start + BODY_SLICE]):
                raise trio.BrokenResourceError("stream reset")
            if self.pending_bytes > self._d.limits.send_low_water:
                await self._wait_pending(self._d.limits.send_low_water)
        await self._end()

    async def open_stream(self, status: int, headers: list[tuple[str, str]]) -> H2Stream:
        """Send the response head and return this stream as the body."""
        self._head(status, headers, None)
        self._streaming = not self.dead  # a bodiless response (HEAD, 204, 304) discards what is sent
        await trio.lowlevel.checkpoint()
        return self

    async def send_error(self, status: int, code: str, message: str, headers: list[tuple[str, str]]) -> None:
        """Answer with ``{"error": code, "message": message}``."""
        if not self._answered:
            await self.respond(status, [*headers, JSON_TYPE], json_error(code, message))

    def abort_response(self) -> None:
        """Reset the stream (INTERNAL_ERROR): a response that started cannot be repaired."""
        self._streaming = False
        self._d.reset(self, internal=True)

    async def complete(self) -> None:
        """End an open response the handler returned without finishing."""
        if self._streaming:
            await self.finish()

    def handler_done(self) -> None:
        """The handler task is over: settle flow control and forget the stream."""
        self.handler_finished = True
        self._streaming = False
        self._d.stream_done(self, self._unacked)
        self._unacked = 0

    def on_close_request(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once when the connection is asked to close; at once if it already was."""
        if self._d.draining:
            call_close_callbacks([callback])
        elif self._close_callbacks is None:
            self._close_callbacks = [callback]
        else:
            self._close_callbacks.append(callback)

    @property
    def websocket_requested(self) -> bool:
        """Always False: WebSockets over HTTP/2 (RFC 8441) are not offered."""
        return False

    def offered_subprotocols(self) -> list[str]:
        """Always empty on HTTP/2."""
        return []

    async def accept_websocket(self, subprotocol: str | None) -> WebSocket:
        """Not available on HTTP/2."""
        raise RuntimeError("WebSocket upgrades are HTTP/1.1 only")

    # -- ResponseStream ------------------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        """Queue ``data`` as DATA for this stream; ``False`` once finished, reset or dead."""
        if not self._streaming:
            return False
        if self.ended:
            return True
        return self._d.send_data(self, data)

    def send_frame(self, frame: Frame) -> bool:
        """Queue the shared payload ``frame.raw`` for this stream (flushed once per wake-up)."""
        if not self._streaming:
            return False
        if self.ended:
            return True
        return self._d.send_data(self, frame.raw)

    @property
    def buffered(self) -> int:
        """Bytes waiting for this stream's flow-control window plus the connection's queue."""
        return self.pending_bytes + self._d.outbox.buffered

    def fell_behind(self) -> bool:
        """True once this stream was reset as a slow consumer, or its connection was cut as one."""
        return self.slow or self._d.outbox.fell_behind

    async def drain(self) -> None:
        """Wait until this stream's pending bytes and the connection queue are at low water."""
        if self.dead:
            raise trio.BrokenResourceError("stream reset")
        low = self._d.limits.send_low_water
        if self.pending_bytes > low:
            await self._wait_pending(low)
        await self._d.outbox.drain()

    async def finish(self) -> None:
        """End the response (END_STREAM once pending data has gone out)."""
        if not self._streaming:
            return
        self._streaming = False
        await self._end()

    async def _end(self) -> None:
        if self.dead:
            raise trio.BrokenResourceError("stream reset")
        if self.pending:
            self.end_after_pending = True
            await self._wait_pending(0)
        elif not self.ended:
            self._d.end_stream(self)
        await trio.lowlevel.checkpoint()

    async def _wait_pending(self, level: int) -> None:
        """Wait until at most ``level`` bytes are pending; a window stuck for send_timeout resets."""
        timeout = self._d.limits.send_timeout
        while self.pending_bytes > level or (level == 0 and self.pending):
            if self.dead:
                raise trio.BrokenResourceError("stream reset")
            self._waiter = event = trio.Event()
            with trio.move_on_after(timeout) as timer:
                await event.wait()
            if timer.cancelled_caught:
                self._d.reset(self, slow=True)
                raise trio.BrokenResourceError("peer's flow-control window stayed closed")
        if self.dead:
            raise trio.BrokenResourceError("stream reset")
