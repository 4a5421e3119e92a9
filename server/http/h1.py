"""HTTP/1.1 on one connection, parsed by llhttp: keep-alive, chunked streaming, WebSocket upgrade.

The connection's own task parses requests one at a time and runs each request's handler itself,
inside the request's cancel scope: an idle SSE response costs this one task. While a handler runs
(once its request body is read), the connection's input is watched by the server's shared
:class:`~server.http.readwatch.ReadWatch` (over TLS: by a watcher task), so a client that goes
away (EOF or reset) cancels its handler at once; bytes that arrive meanwhile (a pipelined
request) are held unparsed up to ``max_header_bytes``, then reading pauses. A WebSocket upgrade
starts one reader task for the session's frames beside the handler; the bytes after the upgrade
request go to it.

Parsing is :class:`~server.http.h1parse.H1Parser` (llhttp through ``httptools``, strict, plus the
engine's own checks); responses are written by hand (:mod:`server.http.h1wire`). While a
streaming response (SSE) runs after its request was read in full, the parser's llhttp object is
dropped unless a pipelined request is half parsed: an idle stream keeps only the bytes held
behind it. A connection goes on to its next request only if the request was read in full, the
response was complete and neither side asked to close.
"""

from __future__ import annotations

import logging

import trio

from server.http.base import Handler, HttpLimits
from server.http.common import json_error, run_handler
from server.http.connection import Connection
from server.http.h1exchange import H1Exchange
from server.http.h1parse import H1Parser, Message
from server.http.h1wire import head_bytes
from server.http.headtimer import TICK, HeadTimer
from server.http.stats import HttpStats

log = logging.getLogger(__name__)


class H1Driver:
    """Serves HTTP/1.1 requests on one connection until it should close.

    :meth:`run` returns when the connection should be closed gracefully (the caller flushes and
    closes); a client that vanishes makes it abort the connection instead.
    """

    __slots__ = (
        "_budget",
        "_current",
        "_head_deadline",
        "_idle",
        "_timer",
        "_woken",
        "closing",
        "conn",
        "handler",
        "head_slot",
        "limits",
        "nursery",
        "parser",
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
        timer: HeadTimer,
    ) -> None:
        self.conn = conn
        self.nursery = nursery
        self.handler = handler
        self.limits = limits
        self.stats = stats
        self.scheme = scheme
        self.parser = H1Parser(limits, initial)
        self._head_deadline = head_deadline
        self._timer = timer
        self.head_slot = -1  # the timer's slot while a head is awaited (see server.http.headtimer)
        self._idle = False  # waiting for a request that has not started: a close request ends the wait
        self._woken = False  # the head's wait was ended (deadline or close request): stop waiting
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
        # The request loop is here, not in a method of its own: one coroutine frame less held
        # by every connection for as long as it is open.
        try:
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
                if not ex.reusable:
                    return
                if ex.message.upgrade:  # answered without switching: HTTP goes on after it
                    self.parser.resume()
        finally:
            self.parser.close()  # llhttp refers back to the parser: no cycle outlives the connection

    def park(self) -> None:
        """A streaming response whose request was read in full has sent its head: keep no llhttp
        object meanwhile unless a pipelined request is half parsed (see the module doc)."""
        self.parser.rest()

    def _take_input(self, data: bytes) -> None:
        """Input that arrived while a handler runs (a pipelined request): held for the parser."""
        self.parser.add(data)

    def _exchange(self, msg: Message | None) -> H1Exchange | None:
        """The exchange for a request head, or ``None`` (the connection closes)."""
        if msg is None:
            return None
        return H1Exchange(self, msg)

    def _close_requested(self) -> None:
        self.closing = True
        if self._idle:
            self._wake()
        if self._current is not None:
            self._current.wind_down()

    def head_expired(self) -> None:
        """The head's deadline passed (called by the server's :class:`HeadTimer`)."""
        self._wake()

    def _wake(self) -> None:
        """End the wait for a head; while a response is still being flushed (its writer may wait
        on the socket too), try again a tick later."""
        self._woken = True
        if not self.conn.interrupt_receive() and not self.conn.closed:
            self._timer.arm(self, trio.current_time() + TICK)

    # -- request heads -------------------------------------------------------------------------

    async def _read_head(self, first: bool) -> Message | None:
        """The next request's head, or ``None``: the connection closes (refused heads are
        answered: 400, 431, 501, or 408 when the head does not come in time).

        The wait is bounded by the server's :class:`HeadTimer`, not by a cancel scope: on its
        deadline, or on a close request while no request has started, the pending receive is
        interrupted and the wait ends."""
        p = self.parser
        limits = self.limits
        if first:
            deadline = self._head_deadline
            started = True
        else:
            started = p.started
            deadline = trio.current_time() + (limits.header_timeout if started else limits.idle_timeout)
        timer = self._timer
        timer.arm(self, deadline)
        self._idle = not started
        narrow = False  # the head's first bytes came while idle: narrow the deadline if it is not whole
        try:
            while True:
                msg = p.next_head()
                if msg is not None:
                    return msg
                if p.error is not None:
                    if not p.eof:
                        self.stats.protocol_errors += 1
                        self._reject(*p.error)
                    return None
                if p.eof or p.upgraded or self._woken:
                    break
                if narrow:
                    narrow = False
                    deadline = min(deadline, trio.current_time() + limits.header_timeout)
                    timer.arm(self, deadline)
                data = await self.conn.receive(interruptible=True)
                if not data and self._woken:
                    break
                if data and not started:
                    started = narrow = True
                    self._idle = False
                p.add(data)
        finally:
            timer.disarm(self)
            self._idle = False
            woken, self._woken = self._woken, False  # a wake that came with the head's last bytes is moot
        if woken and started and not self.closing:
            self._reject(408, "timeout", "request head not received in time")
        return None

    def _reject(self, status: int, code: str, message: str) -> None:
        """Answer a request the engine refuses before any handler ran; the connection then closes."""
        body = json_error(code, message)
        framing = b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)
        self.conn.outbox.write(head_bytes(status, [], framing, True) + body)

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
        await ws.run(self.parser.trailing(), self.parser.eof)
