"""The engine's entry point: accept on the given listeners, detect the protocol, run a driver.

One port serves everything: a first byte of 0x16 is a TLS ClientHello (HTTP/2 or HTTP/1.1 by
ALPN; closed if no TLS context is configured); plaintext that starts with the HTTP/2 connection
preface is h2c with prior knowledge; anything else is HTTP/1.1.

Every connection runs in its own nursery, spawned into the server's connection nursery; the
connection's tasks (reader, lazily started writer, handlers) all live in that nursery, so
cancelling it ends everything the connection owns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
from typing import Any, NoReturn

import trio

from server.http.base import Handler, HttpLimits
from server.http.connection import Connection
from server.http.h1 import H1Driver
from server.http.h2conn import PREFACE, H2Driver
from server.http.listener import accept_loop
from server.http.stats import HttpStats

log = logging.getLogger(__name__)

DEFAULT_LIMITS = HttpLimits()
TLS_RECORD_HANDSHAKE = 0x16


class HttpServer:
    """One engine instance: its handler, limits, counters and registry of live connections.

    ``connections`` holds every connection from accept until its socket is closed (a drain can
    walk it and call :meth:`Connection.request_close`); ``stats`` holds the counters.
    """

    def __init__(
        self, handler: Handler, *, limits: HttpLimits = DEFAULT_LIMITS, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.ssl_context = ssl_context
        self.stats = HttpStats()
        self.connections: set[Connection] = set()
        self._nursery: trio.Nursery | None = None

    async def serve(
        self,
        listeners: list[trio.socket.SocketType] | list[socket.socket],
        *,
        task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Accept on ``listeners`` forever; ``task_status.started(self)`` once accepting.

        The listeners stay owned by the caller (they are not closed here); trio sockets are
        accepted on through a duplicate descriptor, closed on exit."""
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
                async with trio.open_nursery() as acceptors:
                    for sock in socks:
                        acceptors.start_soon(accept_loop, sock, self._spawn, self.stats)
                    task_status.started(self)
        finally:
            self._nursery = None
            for sock in owned:
                sock.close()
        raise AssertionError("the accept loops never return")

    def request_close_all(self) -> None:
        """Ask every live connection to end gracefully (see :meth:`Connection.request_close`)."""
        for conn in list(self.connections):
            conn.request_close()

    def _spawn(self, sock: socket.socket, addr: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._connection, sock, addr)

    async def _connection(self, sock: socket.socket, addr: Any) -> None:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = (str(addr[0]), int(addr[1])) if isinstance(addr, tuple) and len(addr) >= 2 else ("", 0)
        conn = Connection(trio.socket.from_stdlib_socket(sock), sock, client, self.limits, self.stats)
        stats = self.stats
        self.connections.add(conn)
        stats.connections_open += 1
        stats.connections_total += 1
        try:
            async with trio.open_nursery() as nursery:
                conn.attach(nursery)
                await self._dispatch(conn, nursery)
                await conn.close_gracefully()
                nursery.cancel_scope.cancel()
        except* Exception as group:
            log.exception("connection from %s failed (%d errors)", client, len(group.exceptions))
        finally:
            conn.abort()
            self.connections.discard(conn)
            stats.connections_open -= 1

    async def _dispatch(self, conn: Connection, nursery: trio.Nursery) -> None:
        limits = self.limits
        deadline = trio.current_time() + limits.header_timeout
        first = b""
        with trio.move_on_at(deadline):
            first = await conn.peek()
        if not first:
            return
        if first[0] == TLS_RECORD_HANDSHAKE:
            if self.ssl_context is None:
                self.stats.protocol_errors += 1
                return
            stream = conn.start_tls(self.ssl_context)
            with trio.move_on_at(deadline) as timer:
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    log.debug("TLS handshake with %s failed: %s", conn.client, exc.__cause__ or exc)
                    return
            if timer.cancelled_caught:
                return
            if stream.selected_alpn_protocol() == "h2":
                await H2Driver(conn, nursery, self.handler, limits, self.stats, scheme="https", initial=b"").run()
            else:
                await H1Driver(
                    conn, nursery, self.handler, limits, self.stats, scheme="https", initial=b"", head_deadline=deadline
                ).run()
            return
        data = b""
        with trio.move_on_at(deadline):
            data = await conn.receive()
            while data and len(data) < len(PREFACE) and PREFACE.startswith(data):
                more = await conn.receive()
                if not more:
                    return
                data += more
        if not data:
            return
        if data.startswith(PREFACE):
            await H2Driver(conn, nursery, self.handler, limits, self.stats, scheme="http", initial=data).run()
        else:
            await H1Driver(
                conn, nursery, self.handler, limits, self.stats, scheme="http", initial=data, head_deadline=deadline
            ).run()


async def serve_http(
    listeners: list[trio.socket.SocketType] | list[socket.socket],
    handler: Handler,
    *,
    limits: HttpLimits = DEFAULT_LIMITS,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``handler`` on ``listeners`` forever (HTTP/1.1, h2c, and with ``ssl_context`` TLS
    with ALPN h2/http/1.1, all on each port). ``task_status.started(server)`` hands back the
    :class:`HttpServer` (stats, live connections) once accepting. Cancel to stop: every
    connection and handler is cancelled with it."""
    server = HttpServer(handler, limits=limits, ssl_context=ssl_context)
    await server.serve(listeners, task_status=task_status)
