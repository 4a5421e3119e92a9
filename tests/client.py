"""Test clients over real sockets: plain HTTP and SSE via h11, a worker starter, small helpers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, TextMessage
from wsproto.events import Request as WsRequest

from server.app import Worker, serve
from server.config import load_config
from server.core.sse import SSEEvent, SSEParser
from server.transports.context import Context


@dataclass
class Running:
    """A worker started by :func:`start_sluice`."""

    port: int
    ctx: Context
    worker: Worker

    @property
    def base(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"


async def start_sluice(
    nursery: trio.Nursery, tmp_path: Path, backend: str = "sqlite", **sections: Mapping[str, object]
) -> Running:
    """Start a worker in ``nursery`` on 127.0.0.1 port 0; ``sections`` override config sections."""
    overrides: dict[str, dict[str, object]] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "store": {"backend": backend, "path": str(tmp_path / "sluice.db")},
    }
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    config = load_config(overrides, environ={})
    worker: Worker = await nursery.start(serve, config)
    return Running(worker.listeners[0].getsockname()[1], worker.ctx, worker)


@dataclass
class Response:
    """A complete HTTP response."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


def _headers(resp: h11.Response) -> dict[str, str]:
    return {k.decode().lower(): v.decode() for k, v in resp.headers}


async def _receive(conn: h11.Connection, sock: trio.SocketStream) -> Any:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await sock.receive_some(65536)
            conn.receive_data(data)
            continue
        return event


async def request(
    port: int, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
) -> Response:
    """One HTTP/1.1 request on a fresh connection (10 s deadline)."""
    with trio.fail_after(10):
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        async with sock:
            conn = h11.Connection(h11.CLIENT)
            hdrs = [("host", f"127.0.0.1:{port}"), ("connection", "close")]
            hdrs += list((headers or {}).items())
            if body or method in ("POST", "PUT"):
                hdrs.append(("content-length", str(len(body))))
            await sock.send_all(conn.send(h11.Request(method=method, target=path, headers=hdrs)))
            if body:
                await sock.send_all(conn.send(h11.Data(data=body)))
            await sock.send_all(conn.send(h11.EndOfMessage()))
            head = await _receive(conn, sock)
            assert isinstance(head, h11.Response), head
            chunks = []
            while True:
                event = await _receive(conn, sock)
                if isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
            return Response(head.status_code, _headers(head), b"".join(chunks))


async def publish(port: int, stream: str, data: str | bytes, *, type_: str | None = None, **headers: str) -> str:
    """Publish one text event; return its id."""
    path = f"/v1/streams/{stream}" + (f"?type={type_}" if type_ else "")
    body = data.encode() if isinstance(data, str) else data
    hdrs = {"content-type": "text/plain", **{k.replace("_", "-"): v for k, v in headers.items()}}
    resp = await request(port, "POST", path, body, hdrs)
    assert resp.status == 201, (resp.status, resp.body)
    return str(resp.json()["id"])


@dataclass
class SSEClient:
    """An open SSE response read incrementally with the reference parser."""

    status: int
    headers: dict[str, str]
    _conn: h11.Connection
    _sock: trio.SocketStream
    parser: SSEParser = field(default_factory=SSEParser)
    _pending: list[SSEEvent] = field(default_factory=list)
    finished: bool = False

    async def next(self) -> SSEEvent:
        """The next event (raises EOFError if the response ended first)."""
        while not self._pending:
            if self.finished:
                raise EOFError("SSE response ended")
            event = await _receive(self._conn, self._sock)
            if isinstance(event, h11.Data):
                self._pending.extend(self.parser.feed(bytes(event.data)))
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                self.finished = True
        return self._pending.pop(0)

    async def next_or_none(self, timeout: float) -> SSEEvent | None:
        """The next event, or ``None`` if none arrives within ``timeout`` seconds."""
        with trio.move_on_after(timeout):
            return await self.next()
        return None

    async def take(self, n: int) -> list[SSEEvent]:
        """The next ``n`` events."""
        return [await self.next() for _ in range(n)]

    async def until_end(self) -> list[SSEEvent]:
        """Every event until ``sluice.end`` (included) or the end of the response."""
        out: list[SSEEvent] = []
        while True:
            try:
                ev = await self.next()
            except EOFError:
                return out
            out.append(ev)
            if ev.event == "sluice.end":
                return out


@asynccontextmanager
async def open_sse(port: int, path: str, headers: Mapping[str, str] | None = None) -> AsyncIterator[SSEClient]:
    """Open an SSE request over HTTP/1.1; closing the context disconnects."""
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    async with sock:
        conn = h11.Connection(h11.CLIENT)
        hdrs = [("host", f"127.0.0.1:{port}"), ("accept", "text/event-stream"), *list((headers or {}).items())]
        await sock.send_all(conn.send(h11.Request(method="GET", target=path, headers=hdrs)))
        await sock.send_all(conn.send(h11.EndOfMessage()))
        head = await _receive(conn, sock)
        assert isinstance(head, h11.Response), head
        client = SSEClient(head.status_code, _headers(head), conn, sock)
        yield client


def data_of(events: list[SSEEvent]) -> list[str]:
    """The data of the non-control events."""
    return [e.data for e in events if not e.event.startswith("sluice.")]


async def wait_live(ctx: Context, stream: str, count: int = 1) -> None:
    """Wait until ``count`` subscriptions to ``stream`` on this worker are live (caught up)."""
    while True:
        watchers = ctx.hub._watchers.get(stream, {})
        if sum(1 for w in watchers if getattr(w, "live", False)) >= count:
            return
        await trio.sleep(0.005)


WS_MARKERS = ("subscribed", "live")
"""The ops that tell a WebSocket subscriber where it starts and that it is live."""


async def ws_json(ws: Any) -> dict[str, Any]:
    """The next ``sluice.json.v1`` message on a trio-websocket connection, skipping the
    ``subscribed`` and ``live`` markers."""
    while True:
        msg: dict[str, Any] = json.loads(await ws.get_message())
        if msg.get("op") not in WS_MARKERS:
            return msg


async def ws_ops_together(port: int, ops: list[dict[str, Any]], answers: int) -> list[dict[str, Any]]:
    """Open a ``sluice.json.v1`` WebSocket, send every op of ``ops`` in one write (so they
    arrive together), and return the first ``answers`` messages the server sends back (the
    ``subscribed`` and ``live`` markers left out)."""
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    async with sock:
        ws = WSConnection(ConnectionType.CLIENT)
        await sock.send_all(ws.send(WsRequest(host="127.0.0.1", target="/v1/ws", subprotocols=["sluice.json.v1"])))
        got: list[dict[str, Any]] = []
        while len(got) < answers:
            data = await sock.receive_some(65536)
            assert data, "the server closed the connection"
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    await sock.send_all(b"".join(ws.send(TextMessage(data=json.dumps(op))) for op in ops))
                elif isinstance(event, TextMessage):
                    msg = json.loads(event.data)
                    if msg.get("op") not in WS_MARKERS:
                        got.append(msg)
        return got
