"""WebSocket sessions over an upgraded HTTP/1.1 connection, driven by wsproto's frame layer.

Extensions come only from ``EdgeHooks.ws_extensions`` (the edge's bounded permessage-deflate,
which inflates at most up to ``ws_max_message`` and fails the connection with 1009 past it);
without that hook none is negotiated and inbound frames are never inflated. Inbound messages
are reassembled under ``ws_max_message`` (past it: close 1009), counted as they arrive, so a
message split into many fragments is bounded too; protocol violations close with wsproto's code
(1002, or 1007 for bad UTF-8) and end the connection; pings are answered, each charged to the
``EdgeHooks.ws_ping_bucket`` (empty: close 1008); an idle peer is pinged every
``ws_ping_interval`` and dropped if a whole further interval passes in silence.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, cast

import trio
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.handshake import server_extensions_handshake
from wsproto.utilities import generate_accept_token

from server.core.frame import Frame
from server.http.base import HttpLimits, WebSocketClosed
from server.http.connection import Connection
from server.http.hooks import BucketLike
from server.http.stats import HttpStats

log = logging.getLogger(__name__)

CLOSE_WAIT = 5.0  # seconds to wait for the peer's close frame (or EOF) after ours
INBOX_MESSAGES = 16  # inbound messages held for the handler before reading pauses
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
ABNORMAL = 1006
SERVICE_RESTART = 1012
PING_PAYLOAD = b"sluice"


def negotiate_extensions(offered: str, extensions: list[Any]) -> bytes | None:
    """Let ``extensions`` (fresh wsproto extension objects) accept what the client offered in
    ``Sec-WebSocket-Extensions``; return the response header's value, or ``None`` if none was
    agreed. Each extension that accepted is enabled and takes part in the session."""
    offers = [offer.strip() for offer in offered.split(",") if offer.strip()]
    if not offers or not extensions:
        return None
    try:
        value: bytes | None = server_extensions_handshake(offers, extensions)
    except ValueError:  # an unusable offer (UnicodeError included): no extension
        return None
    return value


def accept_headers(key: str, subprotocol: str | None, extensions: bytes | None = None) -> list[tuple[bytes, bytes]]:
    """The headers of a 101 answering ``Sec-WebSocket-Key: key`` (``extensions``: the agreed
    ``Sec-WebSocket-Extensions`` value, if any)."""
    headers = [
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", generate_accept_token(key.strip().encode("latin-1"))),
    ]
    if subprotocol is not None:
        headers.append((b"sec-websocket-protocol", subprotocol.encode("latin-1")))
    if extensions:
        headers.append((b"sec-websocket-extensions", extensions))
    return headers


class WsSession:
    """An accepted WebSocket (:class:`~server.http.base.WebSocket`).

    ``send_message``/``send_frame`` are synchronous and return ``False`` once the socket is
    closing or dead. ``receive`` returns whole messages and raises ``WebSocketClosed`` once the
    session is over (after any messages already received).
    """

    __slots__ = (
        "_closed",
        "_conn",
        "_discard",
        "_finished",
        "_inbox",
        "_limits",
        "_open",
        "_outbox",
        "_parts",
        "_ping_bucket",
        "_reader_scope",
        "_receiver",
        "_room",
        "_size",
        "_stats",
        "_subprotocol",
        "_ws",
    )

    def __init__(
        self,
        conn: Connection,
        limits: HttpLimits,
        stats: HttpStats,
        subprotocol: str | None,
        extensions: list[Any] | None = None,
    ) -> None:
        self._conn = conn
        self._outbox = conn.outbox
        self._limits = limits
        self._stats = stats
        self._subprotocol = subprotocol
        self._ws = WsConnection(ConnectionType.SERVER, extensions)  # wsproto keeps the enabled ones
        factory = conn.hooks.ws_ping_bucket
        self._ping_bucket: BucketLike | None = factory() if factory is not None else None
        self._open = True  # we may still send messages
        self._closed: tuple[int, str] | None = None
        self._inbox: deque[str | bytes] = deque()
        self._parts: list[str | bytes | bytearray] = []
        self._size = 0
        self._discard = False  # a too-big message is being skipped
        self._receiver: trio.Event | None = None
        self._room: trio.Event | None = None
        self._reader_scope = trio.CancelScope()
        self._finished = trio.Event()

    @property
    def subprotocol(self) -> str | None:
        """The negotiated subprotocol."""
        return self._subprotocol

    @property
    def buffered(self) -> int:
        """Bytes queued and not yet handed to the kernel."""
        return self._outbox.buffered

    def fell_behind(self) -> bool:
        """True once the connection was cut as a slow consumer (or for a stalled write)."""
        return self._outbox.fell_behind

    async def drain(self) -> None:
        """Wait until the connection's queue is at or below the low-water mark."""
        await self._outbox.drain()

    def take_ping(self) -> bool:
        """Charge one ping from the peer (a Ping frame, or an application-level ping message the
        caller answers) to this socket's ping bucket. False once the bucket is empty: the peer
        pings faster than allowed, it is counted in ``ws_ping_floods`` and the caller closes the
        socket with 1008."""
        bucket = self._ping_bucket
        if bucket is None or bucket.take(trio.current_time()) == 0:
            return True
        self._stats.ws_ping_floods += 1
        log.info("websocket peer %s sends pings too fast: closing 1008", self._conn.client)
        return False

    def send_message(self, data: str | bytes) -> bool:
        """Queue one text (``str``) or binary (``bytes``) message."""
        if not self._open:
            return False
        event: TextMessage | BytesMessage = TextMessage(data=data) if isinstance(data, str) else BytesMessage(data=data)
        return self._outbox.write(self._ws.send(event))

    def send_frame(self, frame: Frame) -> bool:
        """Queue a complete pre-built unmasked frame (``frame.raw``) as is."""
        if not self._open:
            return False
        return self._outbox.write(frame.raw)

    async def receive(self) -> str | bytes:
        """Return the next complete message; raise :class:`WebSocketClosed` once closed."""
        while True:
            message = self.receive_nowait()
            if message is not None:
                return message
            if self._closed is not None:
                raise WebSocketClosed(*self._closed)
            self._receiver = trio.Event()
            await self._receiver.wait()

    def receive_nowait(self) -> str | bytes | None:
        """The next complete message if one has arrived already, else ``None`` (never waits;
        once the socket is closed, :meth:`receive` says so)."""
        if not self._inbox:
            return None
        message = self._inbox.popleft()
        if self._room is not None:
            self._room.set()
        return message

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame and wait (at most ``CLOSE_WAIT`` seconds) for the peer's close or EOF."""
        self._send_close(code, reason)
        await self._finished.wait()

    # -- engine side ---------------------------------------------------------------------------

    async def wait_finished(self) -> None:
        """Wait until :meth:`run` has ended."""
        await self._finished.wait()

    def going_away(self) -> None:
        """Start closing with 1012 (service restart: reconnect and resume); the reader finishes it."""
        if self._open:
            self._send_close(SERVICE_RESTART, "server restarting")

    def _send_close(self, code: int, reason: str) -> None:
        if self._ws.state is ConnectionState.OPEN:
            self._outbox.write(self._ws.send(CloseConnection(code=code, reason=reason)))
        self._open = False
        if self._closed is None:
            self._closed = (code, reason)
        self._reader_scope.deadline = min(self._reader_scope.deadline, trio.current_time() + CLOSE_WAIT)
        self._wake()

    def _wake(self) -> None:
        if self._receiver is not None:
            self._receiver.set()
            self._receiver = None
        if self._room is not None:
            self._room.set()

    async def run(self, trailing: bytes, eof: bool) -> None:
        """Read frames until the session is over; the caller then closes the connection."""
        ws = self._ws
        interval = self._limits.ws_ping_interval
        pinged = False
        try:
            with self._reader_scope:
                if trailing:
                    ws.receive_data(trailing)
                if eof:
                    ws.receive_data(None)
                while self._handle_events():
                    while len(self._inbox) >= INBOX_MESSAGES and not self._discard:
                        self._room = trio.Event()
                        await self._room.wait()
                    self._room = None
                    if interval > 0:
                        with trio.move_on_after(interval) as timer:
                            data = await self._conn.receive()
                        if timer.cancelled_caught:
                            if pinged:
                                log.info("websocket peer %s silent after ping: dropping it", self._conn.client)
                                self._closed = self._closed or (ABNORMAL, "ping timeout")
                                self._conn.abort("websocket ping timeout")
                                return
                            pinged = True
                            if ws.state is ConnectionState.OPEN:
                                self._outbox.write(ws.send(Ping(payload=PING_PAYLOAD)))
                            continue
                        pinged = False
                    else:
                        data = await self._conn.receive()
                    ws.receive_data(data or None)
        finally:
            self._open = False
            if self._closed is None:
                self._closed = (ABNORMAL, "connection lost")
            self._wake()
            self._finished.set()

    def _handle_events(self) -> bool:
        """Process what wsproto parsed; False once the session is over."""
        ws = self._ws
        for event in ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                self._on_message(event)
            elif isinstance(event, Ping):
                if not self.take_ping():
                    self._send_close(POLICY_VIOLATION, "too many pings")
                    return False
                if ws.state is ConnectionState.OPEN:
                    self._outbox.write(ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                state = ws.state
                if state is ConnectionState.REMOTE_CLOSING:
                    if self._closed is None:
                        self._closed = (event.code, event.reason or "")
                    self._outbox.write(ws.send(event.response()))
                    self._open = False
                elif state is not ConnectionState.CLOSED:
                    # wsproto reports a protocol violation, and an extension's refusal (1009 from
                    # the bounded permessage-deflate), as a CloseConnection in state OPEN: the
                    # close frame is ours to send
                    if event.code == MESSAGE_TOO_BIG:
                        log.info("websocket message from %s too big after inflation", self._conn.client)
                        self._send_close(MESSAGE_TOO_BIG, "message too big")
                    else:
                        self._stats.protocol_errors += 1
                        log.info("websocket protocol error from %s: %s", self._conn.client, event.reason)
                        self._send_close(event.code, event.reason or "")
                return False
        return True

    def _on_message(self, event: TextMessage | BytesMessage) -> None:
        if self._discard:
            if event.message_finished:
                self._discard = False
            return
        data = event.data
        self._size += len(data.encode()) if isinstance(data, str) else len(data)
        if self._size > self._limits.ws_max_message:
            self._parts = []
            self._size = 0
            self._discard = not event.message_finished
            if self._open:
                self._send_close(MESSAGE_TOO_BIG, "message too big")
            return
        if not event.message_finished:
            self._parts.append(data)
            return
        joined: str | bytes
        if self._parts:
            self._parts.append(data)
            parts = self._parts
            self._parts = []
            if isinstance(data, str):
                joined = "".join(cast("list[str]", parts))
            else:
                joined = b"".join(cast("list[bytes]", parts))
        else:
            joined = data if isinstance(data, str) else bytes(data)
        self._size = 0
        if self._open:
            self._inbox.append(joined)
            if self._receiver is not None:
                self._receiver.set()
                self._receiver = None
