"""One HTTP/1.1 request as handlers see it: the Exchange, its request body and its response.

The body is read by the handler's own task through the connection's parser (the body parsed so
far is in the request's :class:`~server.http.h1parse.Message`). Responses are written by hand
(:mod:`server.http.h1wire`): a complete one with ``content-length``, a stream chunked for
HTTP/1.1 clients (a shared frame's ``chunked`` form goes straight into the outbox) and
close-delimited for HTTP/1.0 ones.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from server.core.frame import Frame
from server.http.base import BodyTooLarge, HTTPError, Request, WebSocket
from server.http.common import (
    JSON_TYPE,
    call_close_callbacks,
    encode_headers,
    header_dict,
    json_error,
    split_target,
)
from server.http.h1parse import Message
from server.http.h1wire import CONTINUE, LAST_CHUNK, head_bytes, wants_close
from server.http.ws import WsSession, accept_headers, negotiate_extensions

if TYPE_CHECKING:
    from server.http.h1 import H1Driver

BODY_SLICE = 64 * 1024  # large full responses are written in slices of this size, with backpressure
_NO_BODY_STATUS = frozenset({204, 304})
_CLOSING_STATUS = frozenset({408, 413})  # errors about the request body: the connection ends after them


def _read_message() -> Message:
    msg = Message(b"", b"", [], True)
    msg.complete = True
    return msg


_READ = _read_message()
"""What an exchange whose request was read in full keeps in place of its request's record while
its stream runs (shared, never changed: nothing parses into it)."""


class H1Exchange:
    """One HTTP/1.1 request: the :class:`~server.http.base.Exchange` and its response stream."""

    __slots__ = (
        "_answered",
        "_body",
        "_body_ok",
        "_body_reading",
        "_chunked",
        "_close_after",
        "_close_callbacks",
        "_close_sent",
        "_d",
        "_http11",
        "_outbox",
        "_parked",
        "_streaming",
        "_watch_done",
        "_watch_scope",
        "body_settled",
        "broken",
        "finished",
        "message",
        "request",
        "scope",
        "watching",
        "ws",
    )

    def __init__(self, driver: H1Driver, msg: Message) -> None:
        self._d = driver
        self._outbox = driver.conn.outbox
        self.message = msg
        target, query = split_target(msg.target.decode("latin-1"))
        headers = header_dict(msg.headers)
        self._http11 = msg.http11
        self.request = Request(
            method=msg.method.decode("latin-1"),
            path=target,
            query=query,
            headers=headers,
            client=driver.conn.client,
            scheme=driver.scheme,
            http_version="1.1" if msg.http11 else "1.0",
            body_reader=self._read_body,
        )
        self.scope: trio.CancelScope | None = None  # the handler runs in the connection's task and scope
        self.watching = False  # the driver watches the input while the handler runs
        self._watch_scope: trio.CancelScope | None = None  # TLS: the watcher task's scope
        self._watch_done: trio.Event | None = None  # TLS: set when the watcher task has ended
        self.ws: WsSession | None = None
        self.finished = False  # the handler task is over
        self.broken = False  # the response was torn down mid-way
        self._answered = False
        self._close_after = False  # answer with connection: close
        self._close_sent = False  # the response said connection: close
        self._close_callbacks: list[Callable[[], None]] | None = None
        self._streaming = False  # open_stream called and not finished
        self._parked = False  # the driver parked its parser for this stream (see server.http.h1)
        self._chunked = False
        self._body_ok = True
        self._body: bytes | None = None
        self._body_reading = False
        self.body_settled = self._collect_buffered_body()

    # -- request body --------------------------------------------------------------------------

    def _collect_buffered_body(self) -> bool:
        """Parse the body input already held; True once the whole body is in."""
        msg = self.message
        self._d.parser.pull_body(msg)
        if msg.complete:
            self._body = b"".join(msg.body)
            msg.body = []
            return True
        return False

    async def _read_body(self, limit: int) -> bytes:
        if self._body is not None:
            if len(self._body) > limit:
                raise BodyTooLarge(limit)
            return self._body
        if self._answered or self._body_reading:
            raise RuntimeError("read the request body once, before answering")
        self._body_reading = True
        try:
            return await self._receive_body(limit)
        finally:
            self._body_reading = False
            self._settle()

    async def _receive_body(self, limit: int) -> bytes:
        d = self._d
        msg = self.message
        length = self.request.headers.get("content-length", "")
        if msg.error is None and ((length.isdigit() and int(length) > limit) or msg.body_size > limit):
            raise BodyTooLarge(limit)
        if msg.expect_continue and msg.body_size == 0 and msg.error is None:
            self._outbox.write(CONTINUE)
        parser = d.parser
        with trio.move_on_after(d.limits.body_timeout) as timer:
            while True:
                parser.pull_body(msg)
                if msg.error is not None:
                    d.stats.protocol_errors += 1
                    raise HTTPError(400, "bad_request", msg.error)
                if msg.body_size > limit:
                    raise BodyTooLarge(limit)
                if msg.complete:
                    break
                data = await d.conn.receive()
                if not data:
                    d.conn.abort("client went away")
                    await trio.lowlevel.checkpoint()
                    raise trio.BrokenResourceError("client went away")
                parser.add(data)
        if timer.cancelled_caught:
            raise HTTPError(408, "timeout", "request body not received in time")
        self._body = body = b"".join(msg.body)
        msg.body = []
        return body

    def _settle(self) -> None:
        """The body is read, abandoned (the response started) or the handler is done: from now
        on the driver watches the input while the handler runs."""
        if not self.body_settled:
            self.body_settled = True
            if not self.finished:
                self._d.watch(self)

    # -- the TLS input watcher (plain TCP uses the server's shared watcher, no task) ------------

    def start_watch_task(self, watch: Callable[[H1Exchange], Awaitable[None]]) -> None:
        """Run ``watch(self)`` in a task of the connection until :meth:`stop_watch_task`."""
        self._watch_scope = trio.CancelScope()
        self._watch_done = trio.Event()
        self._d.nursery.start_soon(self._run_watch, watch)

    async def _run_watch(self, watch: Callable[[H1Exchange], Awaitable[None]]) -> None:
        assert self._watch_scope is not None and self._watch_done is not None
        try:
            with self._watch_scope:
                await watch(self)
        finally:
            self._watch_done.set()

    def stop_watch_task(self) -> None:
        """Cancel the watcher task, if one runs."""
        if self._watch_scope is not None:
            self._watch_scope.cancel()

    async def watch_stopped(self) -> None:
        """Wait until the watcher task (if one was started) has ended; it must have been stopped."""
        if self._watch_done is not None:
            await self._watch_done.wait()

    # -- answering -----------------------------------------------------------------------------

    @property
    def answered(self) -> bool:
        """True once a response head (or a 101) has been sent."""
        return self._answered

    def _head(self, status: int, headers: list[tuple[str, str]], length: int | None) -> bytes:
        """The response head; ``length`` ``None``: a stream (chunked for an HTTP/1.1 client).

        Every field is checked before anything is sent: a bad one leaves the request unanswered
        (the handler's failure becomes a 500)."""
        if self._answered:
            raise RuntimeError("this request has already been answered")
        fields = encode_headers(headers)
        msg = self.message
        body_ok = self.request.method != "HEAD" and status not in _NO_BODY_STATUS and status >= 200
        if length is not None:
            framing = b"" if status == 204 else b"content-length: %d\r\n" % length  # RFC 9110 8.6
        elif status in _NO_BODY_STATUS:
            framing = b""
        elif self._http11:
            framing = b"transfer-encoding: chunked\r\n"
        else:
            framing = b""  # HTTP/1.0: the body ends when the connection does
        close = (
            self._body is None
            or self._close_after
            or self._d.closing
            or not msg.keep_alive
            or self._d.parser.eof
            or (length is None and not self._http11)
            or wants_close(fields)
        )
        data = head_bytes(status, fields, framing, close)
        self._answered = True
        self._close_sent = close
        self._settle()
        self._body_ok = body_ok
        return data

    @property
    def reusable(self) -> bool:
        """True if the connection may serve another request after this exchange: the request
        was read in full and the response completed without asking to close."""
        return self._answered and self.ws is None and not self._close_sent and not self._streaming and not self.broken

    async def respond(self, status: int, headers: list[tuple[str, str]], body: bytes = b"") -> None:
        """Send a complete response with ``content-length``; large bodies go out with backpressure."""
        data = self._head(status, headers, len(body))
        outbox = self._outbox
        if not self._body_ok or not body:
            outbox.write(data)
            return
        if len(body) <= BODY_SLICE:
            outbox.write(data + body)
            return
        outbox.write(data)
        for start in range(0, len(body), BODY_SLICE):
            if outbox.buffered > self._d.limits.send_low_water:
                await outbox.drain()
            if not outbox.write(body[start : start + BODY_SLICE]):
                raise trio.BrokenResourceError("client went away")

    async def open_stream(self, status: int, headers: list[tuple[str, str]]) -> H1Exchange:
        """Send the head of a streaming response (chunked for HTTP/1.1 clients) and return it.

        If the request was read in full, the driver parks its parser until the stream ends, and
        the request's headers are dropped (``request.headers`` is empty from then on: a handler
        reads what it needs of them before it opens the stream)."""
        data = self._head(status, headers, None)
        self._streaming = True
        self._chunked = self._http11 and self._body_ok
        self._outbox.write(data)
        if self._body is not None:
            self._d.park()
            self._parked = True
            # the request is parsed and read: its record, raw header fields and decoded headers
            # (about 1.5 KiB for a browser's request) need not outlive the head for the whole of
            # a long stream
            if not self.message.upgrade:
                self.message = _READ
                self.request.headers = {}
        await trio.lowlevel.checkpoint()
        return self

    async def send_error(self, status: int, code: str, message: str, headers: list[tuple[str, str]]) -> None:
        """Answer with ``{"error": code, "message": message}``."""
        if self._answered:
            return
        if status in _CLOSING_STATUS:
            self._close_after = True
        await self.respond(status, [*headers, JSON_TYPE], json_error(code, message))

    def abort_response(self) -> None:
        """Tear the connection down: a response (or WebSocket) that started cannot be repaired."""
        self.broken = True
        self._streaming = False
        self._d.conn.abort("handler failed mid-response")

    async def complete(self) -> None:
        """End what the handler left open: the chunked body, or the WebSocket (close 1000)."""
        if self.ws is not None:
            await self.ws.close(1000)
        elif self._streaming:
            await self.finish()

    @property
    def streaming(self) -> bool:
        """True while a streaming response is open (its body not yet ended)."""
        return self._streaming

    def handler_done(self) -> None:
        """The handler is over: stop watching the input."""
        self.finished = True
        self.body_settled = True
        self._d.unwatch(self)

    # -- ResponseStream ------------------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        """Queue ``data`` as one chunk; ``False`` once the response is finished or dead."""
        if not self._streaming:
            return False
        if not data or not self._body_ok:
            return self._outbox.alive
        if self._chunked:
            return self._outbox.write(b"%x\r\n%b\r\n" % (len(data), data))
        return self._outbox.write(data)

    def send_frame(self, frame: Frame) -> bool:
        """Queue a shared frame: ``frame.chunked`` straight into the outbox."""
        if not self._streaming:
            return False
        if self._chunked and frame.raw:
            return self._outbox.write(frame.chunked)
        return self.send(frame.raw)

    @property
    def buffered(self) -> int:
        """Bytes queued on this connection and not yet handed to the kernel."""
        return self._outbox.buffered

    def fell_behind(self) -> bool:
        """True once the connection was cut as a slow consumer (or for a stalled write)."""
        return self._outbox.fell_behind

    async def drain(self) -> None:
        """Wait until the connection's queue is at or below the low-water mark."""
        await self._outbox.drain()

    async def finish(self) -> None:
        """Send the last chunk and wait until everything is handed to the kernel."""
        if not self._streaming:
            return
        self._streaming = False
        if self._chunked:
            self._outbox.write(LAST_CHUNK)
        await self._outbox.flush()

    # -- winding down --------------------------------------------------------------------------

    def on_close_request(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once when the connection is asked to close; at once if it already was."""
        if self._d.closing:
            call_close_callbacks([callback])
        elif self._close_callbacks is None:
            self._close_callbacks = [callback]
        else:
            self._close_callbacks.append(callback)

    def wind_down(self) -> None:
        """The connection was asked to close: tell the handler, and close a WebSocket with 1012."""
        callbacks, self._close_callbacks = self._close_callbacks, None
        call_close_callbacks(callbacks)
        if self.ws is not None:
            self.ws.going_away()

    # -- WebSocket -----------------------------------------------------------------------------

    @property
    def websocket_requested(self) -> bool:
        """True for a GET that asks for a WebSocket (version 13) upgrade."""
        hd = self.request.headers
        return (
            self._http11
            and self.request.method == "GET"
            and "websocket" in hd.get("upgrade", "").lower()
            and "upgrade" in hd.get("connection", "").lower()
            and len(hd.get("sec-websocket-key", "").strip()) == 24  # base64 of 16 bytes
            and hd.get("sec-websocket-version", "").strip() == "13"
        )

    def offered_subprotocols(self) -> list[str]:
        """The subprotocols offered in ``Sec-WebSocket-Protocol``, in the client's order."""
        raw = self.request.headers.get("sec-websocket-protocol", "")
        return [p.strip() for p in raw.split(",") if p.strip()]

    async def accept_websocket(self, subprotocol: str | None) -> WebSocket:
        """Send the 101 and return the socket. Extensions (permessage-deflate) are negotiated only
        with what ``EdgeHooks.ws_extensions`` provides (bounded inflation); without it, none."""
        if not self.websocket_requested or self._body is None or not self.message.upgrade:
            raise RuntimeError("this request is not a WebSocket upgrade")
        if subprotocol is not None and subprotocol not in self.offered_subprotocols():
            raise ValueError(f"subprotocol {subprotocol!r} was not offered")
        if self._answered:
            raise RuntimeError("this request has already been answered")
        self._answered = True
        d = self._d
        factory = d.conn.hooks.ws_extensions
        offered = self.request.headers.get("sec-websocket-extensions", "")
        extensions = factory() if factory is not None and offered else []
        agreed = negotiate_extensions(offered, extensions)
        headers = accept_headers(self.request.headers["sec-websocket-key"], subprotocol, agreed)
        self._outbox.write(head_bytes(101, [(n.lower(), v) for n, v in headers], b"", False))
        d.unwatch(self)
        self.ws = WsSession(d.conn, d.limits, d.stats, subprotocol, extensions if agreed else None)
        self.body_settled = True
        d.nursery.start_soon(d.run_ws, self)
        await trio.lowlevel.checkpoint()
        return self.ws
