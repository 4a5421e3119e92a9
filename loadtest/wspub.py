"""Publishing over a WebSocket (``sluice.json.v1``), as a producer holding a socket does: one
``publish`` op per event, sent back to back when several are due (of any streams), and their
``published`` acks read in order (Sluice handles a socket's publishes in order, so each
stream's numbering stays the server's order).

A WebSocket publish has no idempotency key, so a publish lost with its socket is not sent again:
it is counted as a failure, and the socket is reopened for the next one.
"""

from __future__ import annotations

import json

import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection

from loadtest.clients.common import Endpoint, connect_tcp
from loadtest.clients.ws import JSON_PROTOCOL, open_ws
from loadtest.wire import ProtocolError


class WsPubConn:
    """One publishing WebSocket, opened on first use (its reader task in ``nursery``) and reopened
    after it breaks."""

    def __init__(self, endpoint: Endpoint, source: str, timeout: float, nursery: trio.Nursery) -> None:
        self.endpoint = endpoint
        self.source = source
        self.timeout = timeout
        self.nursery = nursery
        self.ws: WebSocketConnection | None = None
        self.ref = 0

    async def _open(self) -> WebSocketConnection:
        ep = self.endpoint
        sock = await connect_tcp(ep.host, ep.port, self.source, self.timeout)
        try:
            return await open_ws(ep, self.timeout, self.nursery, trio.SocketStream(sock), JSON_PROTOCOL)
        except BaseException as exc:
            sock.close()  # its reader task, if one was started, ends with it
            if isinstance(exc, HandshakeError):
                raise ProtocolError(f"WebSocket handshake failed: {exc!r}") from exc
            raise

    async def publish(self, items: list[tuple[str, str]]) -> list[str | None]:
        """Publish each ``(stream, data)`` of ``items``, in order, sent back to back, and wait for
        every answer: per item ``None`` (appended) or the ``code`` of its ``error`` op. Raises
        ``ConnectionClosed`` or ``OSError`` when the socket broke (it is reopened next time),
        ``trio.TooSlowError`` after ``timeout``."""
        with trio.fail_after(self.timeout):
            if self.ws is None:
                self.ws = await self._open()
            ws = self.ws
            try:
                first = self.ref + 1
                for stream, data in items:
                    self.ref += 1
                    op = {"op": "publish", "stream": stream, "data": data, "ref": self.ref}
                    await ws.send_message(json.dumps(op, separators=(",", ":")))
                return await self._answers(ws, first, self.ref)
            except (ConnectionClosed, OSError, trio.TooSlowError):
                self.ws = None
                await ws.aclose()
                raise

    async def _answers(self, ws: WebSocketConnection, first: int, last: int) -> list[str | None]:
        """Read messages until the answers to refs ``first``..``last`` have come, in order."""
        codes: list[str | None] = []
        while len(codes) <= last - first:
            msg = json.loads(await ws.get_message())
            if msg.get("ref") != first + len(codes):
                continue  # not an answer to these publishes (this socket subscribes to nothing)
            codes.append(None if msg.get("op") == "published" else str(msg.get("code")))
        return codes

    async def aclose(self) -> None:
        """Close the socket, if open."""
        if self.ws is not None:
            await self.ws.aclose()
            self.ws = None
