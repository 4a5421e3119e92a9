"""The engine's entry point: accept on the given listeners, detect the protocol, run a driver.

One port serves everything: a first byte of 0x16 is a TLS ClientHello (HTTP/2 or HTTP/1.1 by
ALPN; closed if no TLS context is configured); plaintext that starts with the HTTP/2 connection
preface is h2c with prior knowledge; anything else is HTTP/1.1. With a TLS context, plaintext is
refused unless ``allow_plaintext``: HTTP/1.1 gets the fixed ``400`` of
:data:`~server.http.tls.TLS_REQUIRED_RESPONSE`, an h2c preface is closed (both counted in
``stats.plaintext_refused``).

Before that, the edge has its say (see :mod:`server.http.hooks`): a peer that is a trusted load
balancer must open with a PROXY v1/v2 header, read without touching the bytes after it, which
names the real client (``Connection.client``: logs, caps, rate limits and handlers see it); a
connection over a cap is turned away before any request is read, with a fixed HTTP/1.1 ``503``
on plaintext (h2c prior-knowledge clients get the same bytes: the refusal happens before the
preface is read, and an HTTP/2 client fails such a connection as it would a GOAWAY) and closed
without a handshake over TLS.

Every connection runs in its own nursery, spawned into the server's connection nursery; the
connection's tasks (reader, lazily started writer, handlers) all live in that nursery, so
cancelling it ends everything the connection owns.

Winding down: :meth:`HttpServer.drain` stops accepting (the listening sockets stay open, so what
is queued on them waits for the next worker on the same socket) and asks the open connections to
close, paced over a window, before a hard deadline; with ``max_connection_age`` set, one sweeper
task asks each connection to close once it reaches its (jittered) age, so long-lived clients
move to newer workers and hosts over time.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import random
import socket
import ssl
from typing import Any, NoReturn

import trio

from server.http.base import Handler, HttpLimits
from server.http.connection import Connection
from server.http.h1 import H1Driver
from server.http.h2conn import PREFACE, H2Driver
from server.http.headtimer import HeadTimer
from server.http.hooks import NO_HOOKS, EdgeHooks, ProxyParserLike
from server.http.listener import accept_loop
from server.http.readwatch import ReadWatch
from server.http.refusal import refusal_response, websocket_refusal
from server.http.stats import HttpStats
from server.http.tls import TLS_REQUIRED_RESPONSE

log = logging.getLogger(__name__)

DEFAULT_LIMITS = HttpLimits()
TLS_RECORD_HANDSHAKE = 0x16
ROTATION_TICK = 1.0  # the age sweeper looks for connections past their age at least this often
ABORT_GRACE = 1.0  # seconds connections cut at a drain's deadline get to unwind before drain returns
# what a send or wait on a connection whose client has left raises (logged at debug, not as a failure)
PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)


class HttpServer:
    """One engine instance: its handler, limits, counters and registry of live connections.

    ``connections`` holds every connection from accept until its task ends (a drain walks it and
    calls :meth:`Connection.request_close`); ``stats`` holds the counters. ``allow_plaintext``
    (only meaningful with ``ssl_context``): serve HTTP/1.1 and h2c beside TLS instead of refusing.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        limits: HttpLimits = DEFAULT_LIMITS,
        ssl_context: ssl.SSLContext | None = None,
        hooks: EdgeHooks = NO_HOOKS,
        allow_plaintext: bool = False,
    ) -> None:
        self.handler = handler
        self.allow_plaintext = allow_plaintext
        self.hooks = hooks
        self.limits = limits
        self.ssl_context = ssl_context
        self.stats = HttpStats()
        self._refusal = refusal_response(hooks.retry_after)
        self.connections: set[Connection] = set()
        self._nursery: trio.Nursery | None = None
        self._watch: ReadWatch | None = None  # input of busy HTTP/1.1 connections (see readwatch)
        self._heads = HeadTimer()  # deadlines of HTTP/1.1 connections waiting for a request head
        self._accept_scope = trio.CancelScope()
        self._draining = False
        self._drain_done: trio.Event | None = None
        self._gone: trio.Event | None = None  # set when the last connection ends, while someone waits
        self._ages: list[tuple[float, int, Connection]] = []  # heap of (close-at, tie-break, conn)
        self._age_seq = 0

    @property
    def accepting(self) -> bool:
        """False once :meth:`stop_accepting` was called."""
        return not self._accept_scope.cancel_called

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` started."""
        return self._draining

    async def serve(
        self,
        listeners: list[trio.socket.SocketType] | list[socket.socket],
        *,
        task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Accept on ``listeners`` until :meth:`stop_accepting`, serve connections until cancelled;
        ``task_status.started(self)`` once accepting.

        The listeners stay owned by the caller (they are never closed here); trio sockets are
        accepted on through a duplicate descriptor, closed once accepting stops."""
        socks: list[socket.socket] = []
        owned: list[socket.socket] = []
        for listener in listeners:
            if isinstance(listener, socket.socket):
                listener.setblocking(False)
                socks.append(listener)
            else:
                dup = socket.socket(fileno=os.dup(listener.fileno()))
                dup.setblocking(False)
                owned.append(dup)
                socks.append(dup)
        try:
            async with trio.open_nursery() as connections:
                self._nursery = connections
                self._watch = ReadWatch()
                connections.start_soon(self._watch.run)
                connections.start_soon(self._heads.run)
                if self.limits.max_connection_age > 0:
                    connections.start_soon(self._rotate)
                with self._accept_scope:
                    async with trio.open_nursery() as acceptors:
                        for sock in socks:
                            acceptors.start_soon(accept_loop, sock, self._spawn, self.stats)
                        task_status.started(self)
                for sock in owned:  # our duplicates only: the listening sockets stay open
                    sock.close()
                await trio.sleep_forever()  # accepting stopped: keep serving what is open
        finally:
            self._nursery = None
            self._watch = None
            for sock in owned:
                sock.close()
        raise AssertionError("serve never returns")

    def stop_accepting(self) -> None:
        """Stop the accept loops for good (synchronously; idempotent; also before ``serve``).

        The listening sockets are not closed: they belong to the caller and may be shared with a
        replacement worker, so connections waiting in their queues are accepted there, never
        reset. Connections already accepted keep being served."""
        self._accept_scope.cancel()

    async def drain(self, window: float, deadline: float) -> None:
        """Wind the server down without losing anything; returns once no connection is left
        (at the latest ``deadline`` seconds after the start, plus ``ABORT_GRACE`` for the cut ones).

        Stops accepting, then calls :meth:`Connection.request_close` on every open connection, in
        random order, connection ``i`` of ``N`` at ``i * window / N`` seconds after the start (by
        trio's clock), so clients reconnect elsewhere in a steady trickle, not a storm;
        connections accepted meanwhile are asked at once. A request being processed is answered
        before its connection closes; streaming responses are told through
        ``Exchange.on_close_request``. Then waits until every connection is gone, or until
        ``deadline`` seconds after the start, when the rest are aborted (counted in
        ``stats.drain_aborted``). A second call waits for the first to finish.
        """
        if self._drain_done is not None:
            await self._drain_done.wait()
            return
        done = self._drain_done = trio.Event()
        try:
            start = trio.current_time()
            self.stop_accepting()
            self._draining = True
            with trio.move_on_at(start + deadline):
                await self._close_paced(start, window)
                await self._wait_gone()
            left = list(self.connections)
            if left:
                self.stats.drain_aborted += len(left)
                log.warning("drain deadline (%.1fs) reached: cutting %d connections", deadline, len(left))
                for conn in left:
                    conn.abort("drain deadline")
                with trio.move_on_after(ABORT_GRACE):
                    await self._wait_gone()
        finally:
            done.set()

    async def _close_paced(self, start: float, window: float) -> None:
        """Ask the connections open now to close, evenly over ``window`` seconds from ``start``."""
        pending = list(self.connections)
        random.shuffle(pending)
        count = len(pending)
        step = window / count if count else 0.0
        i = 0
        while pending and self.connections:  # done early once every connection has gone
            now = trio.current_time()
            while pending and start + i * step <= now:
                pending.pop().request_close()  # pop: a closed connection is not kept alive here
                i += 1
            if pending:
                with trio.move_on_at(start + i * step):
                    await self._wait_gone()

    async def _wait_gone(self) -> None:
        while self.connections:
            self._gone = trio.Event()
            await self._gone.wait()
        self._gone = None

    async def _rotate(self) -> None:
        """The one age sweeper: asks connections past their jittered ``max_connection_age`` to close."""
        heap = self._ages
        stats = self.stats
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                conn = heapq.heappop(heap)[2]
                if not conn.close_requested and not conn.closed:
                    stats.connections_rotated += 1
                    conn.request_close()
            if len(heap) > 2 * len(self.connections) + 1024:  # mostly connections that already ended
                heap[:] = [entry for entry in heap if not entry[2].closed]
                heapq.heapify(heap)
            wake = now + ROTATION_TICK
            if heap and heap[0][0] < wake:
                wake = heap[0][0]
            await trio.sleep_until(wake)

    def request_close_all(self) -> None:
        """Ask every live connection to end gracefully (see :meth:`Connection.request_close`)."""
        for conn in list(self.connections):
            conn.request_close()

    def _spawn(self, sock: socket.socket, addr: Any) -> None:
        """Register a just-accepted connection (synchronously, so the registry is always exact)
        and start its task."""
        assert self._nursery is not None
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = (str(addr[0]), int(addr[1])) if isinstance(addr, tuple) and len(addr) >= 2 else ("", 0)
        stats = self.stats
        conn = Connection(sock, client, self.limits, stats, self._watch, hooks=self.hooks)
        self.connections.add(conn)
        stats.connections_open += 1
        stats.connections_total += 1
        limits = self.limits
        if limits.max_connection_age > 0:
            jitter = limits.max_connection_age_jitter
            age = limits.max_connection_age * (1.0 + random.uniform(-jitter, jitter))
            self._age_seq += 1
            heapq.heappush(self._ages, (trio.current_time() + age, self._age_seq, conn))
        if self._draining:
            conn.request_close()
        self._nursery.start_soon(self._connection, conn)

    async def _connection(self, conn: Connection) -> None:
        stats = self.stats
        try:
            async with trio.open_nursery() as nursery:
                conn.attach(nursery)
                driver = await self._dispatch(conn, nursery)
                if driver is not None:  # awaited here, not in _dispatch: one frame less per connection
                    await driver.run()
                await conn.close_gracefully()
                nursery.cancel_scope.cancel()
        except* PEER_GONE as group:  # the client left mid-answer: normal, counted, no traceback
            stats.peer_gone += 1
            log.debug("connection from %s ended by the peer: %r", conn.client, group.exceptions[0])
        except* Exception as group:
            log.exception("connection from %s failed (%d errors)", conn.client, len(group.exceptions))
        finally:
            conn.abort()
            conn.on_close_request(None)  # the driver's hook: a reference cycle (see server.app's GC notes)
            release = conn.release
            if release is not None:  # the connection cap's ticket: returned exactly once, however it ended
                conn.release = None
                release()
            self.connections.discard(conn)
            stats.connections_open -= 1
            if self._gone is not None and not self.connections:
                self._gone.set()

    async def _dispatch(self, conn: Connection, nursery: trio.Nursery) -> H1Driver | H2Driver | None:
        """Read a PROXY header if the peer must send one, apply the connection caps, detect the
        protocol (TLS handshake included) and return its driver; ``None``: close.

        One deadline, ``header_timeout`` after the start, covers the PROXY header, the TLS
        handshake and (in the driver) the first request head."""
        limits = self.limits
        deadline = trio.current_time() + limits.header_timeout
        hooks = conn.hooks
        if hooks.proxy_parser is not None:
            parser = hooks.proxy_parser(conn.client[0])
            if parser is not None and not await self._read_proxy(conn, parser, deadline):
                return None
        if hooks.admit is not None:
            release = hooks.admit(conn.client[0])
            if release is None:
                await self._refuse(conn, deadline)
                return None
            conn.release = release  # no await since admit: _connection's finally returns it
        first = b""
        with trio.move_on_at(deadline):
            first = await conn.peek()
        if not first:
            return None
        if first[0] == TLS_RECORD_HANDSHAKE:
            if self.ssl_context is None:
                self.stats.protocol_errors += 1
                return None
            stream = conn.start_tls(self.ssl_context)
            with trio.move_on_at(deadline) as timer:
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    log.debug("TLS handshake with %s failed: %s", conn.client, exc.__cause__ or exc)
                    return None
            if timer.cancelled_caught:
                return None
            if stream.selected_alpn_protocol() == "h2":
                return H2Driver(conn, nursery, self.handler, limits, self.stats, scheme="https", initial=b"")
            return H1Driver(
                conn,
                nursery,
                self.handler,
                limits,
                self.stats,
                scheme="https",
                initial=b"",
                head_deadline=deadline,
                timer=self._heads,
            )
        data = b""
        with trio.move_on_at(deadline):
            data = await conn.receive()
            while data and len(data) < len(PREFACE) and PREFACE.startswith(data):
                more = await conn.receive()
                if not more:
                    return None
                data += more
        if not data:
            return None
        if self.ssl_context is not None and not self.allow_plaintext:
            self.stats.plaintext_refused += 1
            if not data.startswith(PREFACE):  # h2c prior knowledge: closed without an answer
                conn.outbox.write(TLS_REQUIRED_RESPONSE)
            log.debug("plaintext from %s on a TLS port: refused", conn.client)
            return None
        if data.startswith(PREFACE):
            return H2Driver(conn, nursery, self.handler, limits, self.stats, scheme="http", initial=data)
        return H1Driver(
            conn,
            nursery,
            self.handler,
            limits,
            self.stats,
            scheme="http",
            initial=data,
            head_deadline=deadline,
            timer=self._heads,
        )

    async def _read_proxy(self, conn: Connection, parser: ProxyParserLike, deadline: float) -> bool:
        """Read the PROXY header a trusted peer must open with and take the client address from
        it (the peer's own stays for LOCAL/UNKNOWN); False (connection aborted, counted as a
        protocol error) if it is malformed or not complete by ``deadline``."""
        peer = conn.client
        result = None
        reason = "no PROXY header in time"
        with trio.move_on_at(deadline):
            try:
                result = await conn.read_proxy_header(parser)
            except ValueError as exc:
                reason = f"bad PROXY header: {exc}"
            else:
                reason = "connection ended before a complete PROXY header"
        if result is None:
            self.stats.protocol_errors += 1
            conn.abort(reason)
            return False
        source = result.source
        if source is not None:
            conn.client = (str(source[0]), int(source[1]))
        log.debug("PROXY v%s header from %s: client %s", result.version, peer, conn.client)
        return True

    async def _refuse(self, conn: Connection, deadline: float) -> None:
        """Turn away a connection over a cap before reading any request: plaintext (HTTP/1.1 and
        h2c alike) gets the fixed ``503`` with ``Retry-After`` (then the graceful close, which
        discards the request), a WebSocket handshake complete in the first read gets close
        ``1013`` (:mod:`server.http.refusal`); TLS is closed without a handshake, since the handshake is the
        expensive work the cap exists to avoid."""
        self.stats.connections_refused += 1
        first = b""
        with trio.move_on_at(deadline):
            first = await conn.peek()
        if not first:
            conn.abort("over the connection cap (nothing sent)")
        elif first[0] == TLS_RECORD_HANDSHAKE:
            conn.abort("over the connection cap (TLS: closed before the handshake)")
        else:
            data = b""
            with trio.move_on_at(deadline):
                data = await conn.receive()  # one read: a WebSocket handshake comes whole
            answer = websocket_refusal(data, self.hooks.retry_after)
            log.debug("connection from %s over the connection cap: %s", conn.client, "1013" if answer else "503")
            conn.outbox.write(answer or self._refusal)


async def serve_http(
    listeners: list[trio.socket.SocketType] | list[socket.socket],
    handler: Handler,
    *,
    limits: HttpLimits = DEFAULT_LIMITS,
    ssl_context: ssl.SSLContext | None = None,
    hooks: EdgeHooks = NO_HOOKS,
    allow_plaintext: bool = False,
    task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``handler`` on ``listeners`` forever (HTTP/1.1, h2c, and with ``ssl_context`` TLS
    with ALPN h2/http/1.1, all on each port; with ``ssl_context``, plaintext is refused unless
    ``allow_plaintext``). ``task_status.started(server)`` hands back the
    :class:`HttpServer` (stats, live connections) once accepting. Cancel to stop: every
    connection and handler is cancelled with it. ``hooks``: the edge's say (see
    :mod:`server.http.hooks`)."""
    server = HttpServer(handler, limits=limits, ssl_context=ssl_context, hooks=hooks, allow_plaintext=allow_plaintext)
    await server.serve(listeners, task_status=task_status)
