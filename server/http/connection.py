"""The engine's record of one accepted connection."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any

import trio
from trio.lowlevel import wait_readable

from server.http.base import HttpLimits
from server.http.hooks import NO_HOOKS, EdgeHooks, ProxyParserLike
from server.http.outbox import SLOW_CONSUMER, Outbox
from server.http.readwatch import ReadWatch
from server.http.stats import HttpStats

log = logging.getLogger(__name__)

RECV_SIZE = 64 * 1024
LINGER_SECONDS = 2.0  # after a graceful close, how long to read and discard what the peer still sends
LINGER_BYTES = 256 * 1024
FRESH_GRACE = 1.0  # a connection younger than this that sent nothing yet may still have a request on the way
PROXY_PEEK = 512  # bytes looked at per step while reading a PROXY header (haproxy's v2 headers: 28-100)
_TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class Connection:
    """One live client connection as the server's registry sees it.

    Promises: :meth:`receive` never raises for transport failures (it returns ``b""``, as for
    EOF); :meth:`abort` is synchronous, idempotent, cancels everything running for the
    connection (its handlers included) and closes the socket; :meth:`request_close` is
    synchronous and takes effect once (later calls are no-ops).
    """

    __slots__ = (
        "_closed",
        "_input_seen",
        "_on_close_request",
        "_recv_scope",
        "_scope",
        "_sock",
        "_stream",
        "_watch",
        "_watched",
        "accepted_at",
        "client",
        "close_requested",
        "hooks",
        "outbox",
        "protocol",
        "release",
        "tls",
    )

    def __init__(
        self,
        sock: socket.socket,
        client: tuple[str, int],
        limits: HttpLimits,
        stats: HttpStats,
        watch: ReadWatch | None = None,
        *,
        hooks: EdgeHooks = NO_HOOKS,
    ) -> None:
        self._sock = sock  # non-blocking; waited on with trio.lowlevel.wait_readable/writable
        self._watch = watch
        self._watched = False  # registered with ``watch`` (see watch_input)
        self._input_seen = False  # the peer has sent something (the first peek returned data)
        self.accepted_at = trio.current_time()
        self._stream: trio.SSLStream[trio.SocketStream] | None = None
        self._scope: trio.CancelScope | None = None
        self._recv_scope: trio.CancelScope | None = None  # TLS: the receive in progress (see interrupt_receive)
        self._closed = False
        self._on_close_request: Callable[[], None] | None = None
        self.close_requested = False  # request_close was called (drivers check it when they start)
        self.client = client  # the real client: a trusted load balancer's PROXY header replaces the peer
        self.hooks = hooks  # the edge's say (PROXY protocol, caps, per-connection buckets)
        self.release: Callable[[], None] | None = None  # a connection cap's ticket, returned once at the end
        self.protocol = "new"  # "http/1.1", "h2" or "websocket" once known
        self.tls = False
        self.outbox = Outbox(sock, limits, stats, self._outbox_died)

    def attach(self, nursery: trio.Nursery) -> None:
        """Bind the connection to its nursery: its cancel scope covers all the connection's tasks."""
        self._scope = nursery.cancel_scope
        self.outbox.attach(nursery)

    async def peek(self) -> bytes:
        """Return the first byte the peer sent without consuming it (``b""`` on EOF or error)."""
        data = await self._recv(1, socket.MSG_PEEK)
        self._input_seen = bool(data)
        return data

    async def read_proxy_header(self, parser: ProxyParserLike) -> Any:
        """Read one PROXY header with ``parser`` and return its result; ``None`` on EOF.

        Consumes exactly the header: each step peeks (``MSG_PEEK``) at what arrived, feeds it to
        the parser and then takes off the socket only the bytes that belong to the header (all
        of them while the header is incomplete), so what follows it (a TLS ClientHello, HTTP)
        stays in the kernel for the next reader. ``ValueError`` from the parser propagates."""
        sock = self._sock
        while True:
            data = await self._recv(PROXY_PEEK, socket.MSG_PEEK)
            if not data:
                return None
            result = parser.feed(data)
            used = len(data) if result is None else len(data) - len(parser.remainder)
            try:  # the bytes are queued already: this never blocks and takes all of them
                taken = len(sock.recv(used)) if used else 0
            except OSError:
                return None
            if taken != used:
                return None
            if result is not None:
                return result

    def start_tls(self, context: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
        """Read and write through a server-side TLS stream from now on (handshake not yet done)."""
        tsock = trio.socket.from_stdlib_socket(self._sock)
        stream = trio.SSLStream(trio.SocketStream(tsock), context, server_side=True, https_compatible=True)
        self._stream = stream
        self.tls = True
        self.outbox.use_stream(stream)
        return stream

    async def receive(self, *, interruptible: bool = False) -> bytes:
        """Return the next bytes from the peer; ``b""`` on EOF, reset or a closed socket, or when
        :meth:`interrupt_receive` ends the wait (``interruptible``: over TLS, the receive runs in
        a cancel scope for it; plain TCP needs none)."""
        stream = self._stream
        if stream is None:
            return await self._recv(RECV_SIZE, 0)
        data: bytes | bytearray = b""
        try:
            if interruptible:
                with trio.CancelScope() as self._recv_scope:
                    data = await stream.receive_some(RECV_SIZE)
                self._recv_scope = None
            else:
                data = await stream.receive_some(RECV_SIZE)
        except _TRANSPORT_ERRORS:
            self._recv_scope = None
            return b""
        return data if isinstance(data, bytes) else bytes(data)

    def interrupt_receive(self) -> bool:
        """Make a :meth:`receive` waiting now (over TLS, an ``interruptible`` one) return ``b""`` at
        once, closing nothing; False (nothing done) while the send side has bytes queued, whose
        writer may be waiting on the socket too (try again later).

        On plain TCP the waiter is woken through ``trio.lowlevel.notify_closing`` (the socket stays
        open and usable); over TLS the receive is cancelled, as a deadline would cancel it."""
        if self._closed or self.outbox.buffered:
            return False
        if self._stream is not None:
            if self._recv_scope is not None:
                self._recv_scope.cancel()
        else:
            trio.lowlevel.notify_closing(self._sock)
        return True

    async def _recv(self, size: int, flags: int) -> bytes:
        """``recv`` on the non-blocking socket, waiting for readability as needed; a checkpoint.

        EOF, a reset or a closed socket give ``b""``."""
        sock = self._sock
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            try:
                data = sock.recv(size, flags)
            except BlockingIOError:
                try:
                    await wait_readable(sock)
                except (trio.ClosedResourceError, OSError):
                    return b""
                waited = True
                continue
            except OSError:
                data = b""
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    def receive_now(self) -> bytes | None:
        """What the peer sent, without waiting (plain TCP only): ``None`` if nothing is there
        yet, ``b""`` on EOF, reset or a closed socket."""
        try:
            return self._sock.recv(RECV_SIZE)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def watch_input(self, callback: Callable[[], None]) -> bool:
        """Have the server's shared watcher call ``callback()`` when input (or EOF) arrives, until
        :meth:`unwatch_input`; False (nothing watched) for TLS, a closed socket or no watcher.
        The callback must consume the input (:meth:`receive_now`) or unwatch."""
        if self._watch is None or self._stream is not None or self._closed:
            return False
        self._watched = self._watch.add(self._sock.fileno(), callback)
        return self._watched

    def unwatch_input(self) -> None:
        """Stop the callbacks of :meth:`watch_input` (a no-op if none are registered)."""
        if self._watched:
            self._watched = False
            assert self._watch is not None
            self._watch.remove(self._sock.fileno())

    def on_close_request(self, hook: Callable[[], None] | None) -> None:
        """Set what :meth:`request_close` does for the protocol currently on this connection.

        Setting a hook does not replay an earlier request: a driver that starts on a connection
        whose :attr:`close_requested` is already set applies it itself."""
        self._on_close_request = hook

    def request_close(self) -> None:
        """Ask the connection to end gracefully; only the first call on a live connection acts.

        HTTP/1.1: no further requests; an idle connection closes now, a busy one after the
        current response (whose handler is told through ``Exchange.on_close_request``). HTTP/2:
        new streams are refused, open streams are told, GOAWAY once they are done. WebSocket:
        close 1012. A connection that has sent nothing for ``FRESH_GRACE`` seconds since it was
        accepted closes now; a younger one (its request may be on the way) or one whose protocol
        is not known yet although bytes came (TLS handshake, a partial HTTP/2 preface) serves its
        first request, then closes (the wait for it is bounded by ``header_timeout``).
        """
        if self.close_requested or self._closed:
            return
        self.close_requested = True
        hook = self._on_close_request
        if hook is not None:
            hook()
        elif trio.current_time() - self.accepted_at >= FRESH_GRACE and not self._has_input():
            self.abort("close requested before any request")

    def _has_input(self) -> bool:
        """True if the peer sent anything: seen already, or waiting in the kernel right now."""
        if self._input_seen or self._stream is not None:
            return True
        try:
            return bool(self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # BlockingIOError: nothing yet
            return False

    @property
    def closed(self) -> bool:
        """True once the socket is closed (the connection may still be unwinding its tasks)."""
        return self._closed

    def abort(self, reason: str = "", *, reset: bool = False) -> None:
        """Cancel every task of this connection and close its socket (with an RST if ``reset``)."""
        if self._scope is not None:
            self._scope.cancel()
        if self._closed:
            return
        self._closed = True
        self.unwatch_input()
        sock = self._sock
        if reset:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.outbox.close()
        trio.lowlevel.notify_closing(sock)
        sock.close()
        if reason:
            log.debug("connection from %s closed: %s", self.client, reason)

    async def close_gracefully(self) -> None:
        """Flush what is queued, signal end of data, discard late input briefly, then close."""
        if self._closed:
            return
        try:
            await self.outbox.flush()
        except trio.BrokenResourceError:
            self.abort()
            return
        with trio.move_on_after(LINGER_SECONDS):
            if self._stream is not None:
                with contextlib.suppress(*_TRANSPORT_ERRORS):
                    await self._stream.aclose()
            else:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_WR)
                    discarded = 0
                    while discarded < LINGER_BYTES:
                        data = await self.receive()
                        if not data:
                            break
                        discarded += len(data)
        self.abort()

    def _outbox_died(self, reason: str) -> None:
        self.abort(reason, reset=reason == SLOW_CONSUMER)
