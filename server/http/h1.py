"""HTTP/1.1 on one connection, driven by h11: keep-alive, chunked streaming, WebSocket upgrade.

The connection's own task parses requests one at a time and runs each request's handler itself,
inside the request's cancel scope: an idle SSE response costs this one task. While a handler runs
(once its request body is read), the connection's input is watched by the server's shared
:class:`~server.http.readwatch.ReadWatch` (over TLS: by a watcher task), so a client that goes
away (EOF or reset) cancels its handler at once; bytes that arrive meanwhile (a pipelined
request) are buffered up to ``max_header_bytes``, then reading pauses. A WebSocket upgrade starts
one reader task for the session's frames beside the handler.

While a streaming response (SSE) runs after its request was read in full, h11's state is parked:
the h11 connection is dropped (about 1 KiB an idle stream need not keep), pipelined bytes are held
as they are, and the chunked body is ended by hand (``0 CRLF CRLF``). When the stream ends, a keep-
alive connection gets a fresh h11 connection fed with the held bytes: h11's state after a finished
exchange is just that of a new connection. A small complete response to a request read in full
(a publish's ``201``) is written by hand the same way (``H1Exchange._by_hand``): building it
through h11 costs more than the rest of the answer.
"""

from __future__ import annotations

import logging

import h11
import trio

from server.http.base import Handler, HttpLimits
from server.http.common import json_error, reason_phrase, run_handler
from server.http.connection import Connection
from server.http.h1exchange import H1Exchange
from server.http.stats import HttpStats

log = logging.getLogger(__name__)


def _head_size(event: h11.Request) -> int:
    """The size of a request head as sent: request line plus ``name: value CRLF`` lines."""
    size = len(event.method) + len(event.target) + 12
    for name, value in event.headers:
        size += len(name) + len(value) + 4
    return size


class H1Driver:
    """Serves HTTP/1.1 requests on one connection until it should close.

    :meth:`run` returns when the connection should be closed gracefully (the caller flushes and
    closes); a client that vanishes makes it abort the connection instead.
    """

    __slots__ = (
        "_budget",
        "_current",
        "_head_deadline",
        "_held",
        "_idle_scope",
        "_keep",
        "closing",
        "conn",
        "h",
        "handler",
        "limits",
        "nursery",
        "scheme",
        "stats",
    )

    def __init__(
        self,
        conn: Connection,
        nursery: trio.Nursery,
        handler: Handler,
        limits: HttpLimits,
        stats: HttpStats,
        *,
        scheme: str,
        initial: bytes,
        head_deadline: float,
    ) -> None:
        self.conn = conn
        self.nursery = nursery
        self.handler = handler
        self.limits = limits
        self.stats = stats
        self.scheme = scheme
        self.h = self._new_h11(initial)
        self._held: bytes | None = None  # parked (see the module doc): the input held meanwhile
        self._keep = False  # parked: whether the connection may serve another request afterwards
        self._head_deadline = head_deadline
        self._idle_scope: trio.CancelScope | None = None
        self._current: H1Exchange | None = None  # the exchange being served
        self._budget = 0  # bytes the input watch may still buffer for the exchange being served
        self.closing = False  # no further requests on this connection

    async def run(self) -> None:
        """Serve requests until the connection should close.

        The first request is always served, also when a close was requested while the connection
        was new (its request is probably on the wire already); it is answered with
        ``connection: close``."""
        self.conn.protocol = "http/1.1"
        self.conn.on_close_request(self._close_requested)
        if self.conn.close_requested:
            self.closing = True
        first = True
        while first or not self.closing:
            ex = self._exchange(await self._read_head(first))
            if ex is None:
                return
            first = False
            self._current = ex
            try:
                if ex.body_settled:
                    self.watch(ex)
                try:
                    await run_handler(self.handler, ex)
                finally:
                    self.unwatch(ex)
                await ex.watch_stopped()
                if ex.ws is not None:
                    await ex.ws.wait_finished()  # the session's reader task (run_ws) ends it
                    return
                if ex.broken:
                    return
            finally:
                self._current = None
                ex.request.body_reader = None  # the exchange is over; and no cycle outlives it
            if self._held is not None:
                if not self._keep or ex.streaming:
                    return
                self.h = self._new_h11(self._held)
                self._held = None
                continue
            h = self.h
            if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
                return
            h.start_next_cycle()

    def _new_h11(self, data: bytes) -> h11.Connection:
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        if data:
            h.receive_data(data)
        return h

    def park(self) -> None:
        """Drop h11's state for a streaming response whose request was read in full and whose head
        is sent (see the module doc); the exchange then ends the body by hand."""
        h = self.h
        assert h.our_state is h11.SEND_BODY and h.their_state in (h11.DONE, h11.MUST_CLOSE)
        self._set_aside()

    def drop_h11(self) -> None:
        """Drop h11's state after a complete response the exchange wrote by hand (see
        ``H1Exchange._by_hand``: the request was read in full and the connection stays open); as
        after a parked stream, the next request gets a fresh h11 connection fed with the held
        input."""
        h = self.h
        assert h.our_state is h11.SEND_RESPONSE and h.their_state is h11.DONE
        self._set_aside()

    def _set_aside(self) -> None:
        """Hold h11's unread input and whether the connection may go on; drop the rest."""
        h = self.h
        held, closed = h.trailing_data
        self._keep = h.their_state is h11.DONE and not closed
        self._held = held
        self.h = _PARKED

    def _take_input(self, data: bytes) -> None:
        """Input that arrived while a handler runs (a pipelined request): into h11, or held."""
        if self._held is None:
            self.h.receive_data(data)
        else:
            self._held += data

    def _exchange(self, event: h11.Request | None) -> H1Exchange | None:
        """The exchange for a request head, or ``None`` (answered with 431 if the head is too big).

        The parsed head is not kept: the exchange holds what handlers need."""
        if event is None:
            return None
        if len(event.headers) > self.limits.max_headers:
            self.stats.protocol_errors += 1
            self._reject(431, "headers_too_large", f"more than {self.limits.max_headers} header fields")
            return None
        if _head_size(event) > self.limits.max_header_bytes:
            # h11 only checks its buffer while a head is incomplete; one large read slips past
            self.stats.protocol_errors += 1
            self._reject(431, "headers_too_large", f"request head exceeds {self.limits.max_header_bytes} bytes")
            return None
        return H1Exchange(self, event)

    def _close_requested(self) -> None:
        self.closing = True
        if self._idle_scope is not None:
            self._idle_scope.cancel()
        if self._current is not None:
            self._current.wind_down()

    # -- request heads -------------------------------------------------------------------------

    async def _read_head(self, first: bool) -> h11.Request | None:
        h = self.h
        now = trio.current_time()
        if first:
            deadline = self._head_deadline
            started = True
        else:
            started = bool(h.trailing_data[0])
            deadline = now + (self.limits.header_timeout if started else self.limits.idle_timeout)
        eof = False
        head_by: float | None = None  # the head's deadline, once its first bytes came while idle
        with trio.CancelScope(deadline=deadline) as scope:
            if not started:
                self._idle_scope = scope
            while True:
                try:
                    event = h.next_event()
                except h11.RemoteProtocolError as exc:
                    if not eof:
                        self.stats.protocol_errors += 1
                        status = exc.error_status_hint
                        if status == 431:
                            limit = self.limits.max_header_bytes
                            self._reject(431, "headers_too_large", f"request head exceeds {limit} bytes")
                        else:
                            self._reject(status, "bad_request", str(exc) or "malformed request")
                    return None
                if event is h11.NEED_DATA:
                    if head_by is not None:  # narrowed only when the head did not come whole
                        scope.deadline = min(scope.deadline, head_by)
                        head_by = None
                    data = await self.conn.receive()
                    if not data:
                        eof = True
                    elif not started:
                        started = True
                        self._idle_scope = None
                        head_by = trio.current_time() + self.limits.header_timeout
                    h.receive_data(data)
                    continue
                self._idle_scope = None
                return event if isinstance(event, h11.Request) else None
        self._idle_scope = None
        if started and not self.closing:
            self._reject(408, "timeout", "request head not received in time")
        return None

    def _reject(self, status: int, code: str, message: str) -> None:
        """Answer a request the engine refuses before any handler ran; the connection then closes."""
        h = self.h
        if h.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = json_error(code, message)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"connection", b"close"),
        ]
        try:
            data = h.send(h11.Response(status_code=status, headers=headers, reason=reason_phrase(status)))
            data += h.send(h11.Data(data=body)) + h.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return
        self.conn.outbox.write(data)

    # -- one request ---------------------------------------------------------------------------

    def watch(self, ex: H1Exchange) -> None:
        """Notice the client going away (and buffer a pipelined request) while ``ex``'s handler
        runs: on plain TCP through the server's shared input watcher, no task involved; over TLS
        in a watcher task. Called once the request body is settled."""
        if ex.finished or ex.ws is not None or ex.watching:
            return
        ex.watching = True
        self._budget = self.limits.max_header_bytes
        if self.conn.watch_input(self._on_input):
            return
        if self.conn.tls:
            ex.start_watch_task(self._watch_stream)
        else:
            ex.watching = False  # the server is shutting down: nothing to watch with

    def unwatch(self, ex: H1Exchange) -> None:
        """Stop watching the input for ``ex`` (its handler is done, or a WebSocket takes over)."""
        if ex.watching:
            ex.watching = False
            self.conn.unwatch_input()
            ex.stop_watch_task()

    def _on_input(self) -> None:
        """Input (or EOF) arrived while a handler runs: called by the shared watcher."""
        conn = self.conn
        data = conn.receive_now()
        if data is None:
            return
        if not data:
            conn.abort("client went away")  # cancels the connection's task: the handler with it
            return
        self._take_input(data)
        self._budget -= len(data)
        if self._budget <= 0:  # a pipelined request is buffered in full: read no more for now
            conn.unwatch_input()

    async def _watch_stream(self, ex: H1Exchange) -> None:
        """The TLS form of the input watch: read until EOF or the budget is spent."""
        budget = self.limits.max_header_bytes
        while budget > 0:
            data = await self.conn.receive()
            if not data:
                self.conn.abort("client went away")
                await trio.lowlevel.checkpoint()
                return
            self._take_input(data)
            budget -= len(data)
        await trio.sleep_forever()

    async def run_ws(self, ex: H1Exchange) -> None:
        """Read the upgraded connection's WebSocket frames (a task, beside the handler)."""
        ws = ex.ws
        assert ws is not None
        await ex.watch_stopped()
        self.conn.protocol = "websocket"
        if self.closing:
            ws.going_away()
        trailing, closed = self.h.trailing_data
        await ws.run(trailing, closed)


_PARKED = h11.Connection(h11.SERVER)
"""What a parked driver's ``h`` points at: one shared h11 connection that is never used (any call
on it would be a bug, and h11 would refuse most of them in its IDLE state)."""
