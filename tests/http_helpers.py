"""Helpers for the HTTP engine tests: a small test application, a server starter, raw clients."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from server.core.frame import Frame
from server.http.base import Exchange, HTTPError, HttpLimits, ResponseStream, WebSocketClosed
from server.http.listener import bind_tcp_listener
from server.http.server import HttpServer, serve_http


@dataclass
class AppState:
    """What the test application observed, for assertions."""

    cancelled: trio.Event = field(default_factory=trio.Event)
    started: trio.Event = field(default_factory=trio.Event)
    max_buffered: int = 0
    flood_result: str = ""
    flood_done: trio.Event = field(default_factory=trio.Event)
    ws_closed: list[int] = field(default_factory=list)
    subscribers: list[ResponseStream] = field(default_factory=list)
    subscribed: trio.Event = field(default_factory=trio.Event)
    expected_subscribers: int = 0
    release: trio.Event = field(default_factory=trio.Event)


class App:
    """A test application: echo, streams, errors, a WebSocket echo."""

    def __init__(self) -> None:
        self.state = AppState()

    async def __call__(self, ex: Exchange) -> None:
        req = ex.request
        path = req.path
        if path == "/echo":
            limit = int(req.query.get("limit", "1000000"))
            body = await req.read_body(limit)
            info = {
                "method": req.method,
                "path": req.path,
                "query": req.query,
                "headers": req.headers,
                "version": req.http_version,
                "scheme": req.scheme,
                "body": body.decode("latin-1"),
            }
            await ex.respond(200, [("Content-Type", "application/json")], json.dumps(info).encode())
        elif path == "/big":
            size = int(req.query.get("size", "1000000"))
            await ex.respond(200, [("content-type", "application/octet-stream")], b"x" * size)
        elif path == "/stream":
            await self._stream(ex, int(req.query.get("n", "5")), req.query.get("tag", "e"))
        elif path == "/forever":
            stream = await ex.open_stream(200, [("content-type", "text/event-stream")])
            try:
                stream.send(b"data: hello\n\n")
                self.state.started.set()
                await trio.sleep_forever()
            finally:
                self.state.cancelled.set()
        elif path == "/flood":
            await self._flood(ex, int(req.query.get("size", "65536")), req.query.get("drain") == "1")
        elif path == "/sub":
            stream = await ex.open_stream(200, [("content-type", "text/event-stream")])
            self.state.subscribers.append(stream)
            if len(self.state.subscribers) == self.state.expected_subscribers:
                self.state.subscribed.set()
            await self.state.release.wait()
        elif path == "/ws":
            await self._ws(ex)
        elif path == "/teapot":
            raise HTTPError(418, "teapot", "short and stout", [("x-extra", "1")])
        elif path == "/crash":
            raise RuntimeError("boom")
        elif path == "/silent":
            return
        elif path == "/header":  # a response with one header field as the query gives it
            await ex.respond(200, [("x-value", req.query.get("v", ""))], b"ok")
        elif path == "/empty":
            await ex.respond(204, [("x-done", "1")])
        else:
            raise HTTPError(404, "not_found", "no such path")

    async def _stream(self, ex: Exchange, n: int, tag: str) -> None:
        stream = await ex.open_stream(200, [("content-type", "text/event-stream")])
        for i in range(n):
            assert stream.send_frame(Frame(f"data: {tag}-{i}\n\n".encode()))
            await trio.sleep(0)
        await stream.finish()

    async def _flood(self, ex: Exchange, size: int, drain: bool) -> None:
        frame = Frame(b"x" * size)
        stream = await ex.open_stream(200, [("content-type", "application/octet-stream")])
        self.state.started.set()
        try:
            while True:
                ok = stream.send_frame(frame)
                self.state.max_buffered = max(self.state.max_buffered, stream.buffered)
                if not ok:
                    self.state.flood_result = "send returned False"
                    return
                if drain:
                    await stream.drain()
                else:
                    await trio.sleep(0)
        except trio.BrokenResourceError:
            self.state.flood_result = "broken"
        finally:
            if not self.state.flood_result:
                self.state.flood_result = "cancelled"
            self.state.flood_done.set()

    async def _ws(self, ex: Exchange) -> None:
        if not ex.websocket_requested:
            raise HTTPError(426, "upgrade_required", "websocket only")
        offered = ex.offered_subprotocols()
        ws = await ex.accept_websocket(offered[0] if offered else None)
        try:
            while True:
                message = await ws.receive()
                if message == "close-me":
                    await ws.close(4000, "asked")
                    return
                ws.send_message(message)
        except WebSocketClosed as exc:
            self.state.ws_closed.append(exc.code)


@asynccontextmanager
async def running_server(
    app: App | None = None,
    *,
    limits: HttpLimits | None = None,
    ssl_context: object = None,
    allow_plaintext: bool = False,
) -> AsyncIterator[tuple[HttpServer, int, App]]:
    """Serve ``app`` on 127.0.0.1, port 0; yields (server, port, app) and stops on exit."""
    app = app or App()
    sock = bind_tcp_listener("127.0.0.1", 0)
    port = sock.getsockname()[1]
    try:
        async with trio.open_nursery() as nursery:
            server: HttpServer = await nursery.start(
                lambda task_status: serve_http(
                    [sock],
                    app,
                    limits=limits or HttpLimits(),
                    ssl_context=ssl_context,  # type: ignore[arg-type]
                    allow_plaintext=allow_plaintext,
                    task_status=task_status,
                )
            )
            yield server, port, app
            nursery.cancel_scope.cancel()
    finally:
        sock.close()
        while _client_sockets:
            _client_sockets.pop().close()


_client_sockets: list[trio.socket.SocketType] = []


def client_socket() -> trio.socket.SocketType:
    """A new TCP trio socket, closed when the enclosing :func:`running_server` exits."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _client_sockets.append(sock)
    return sock


async def connect(port: int) -> trio.socket.SocketType:
    """A raw trio socket connected to 127.0.0.1:``port`` (closed with the server)."""
    sock = client_socket()
    await sock.connect(("127.0.0.1", port))
    return sock


async def read_until_eof(sock: trio.socket.SocketType, limit: int = 10_000_000) -> bytes:
    """Everything the peer sends until it closes (a reset counts as the end)."""
    chunks = []
    total = 0
    while total < limit:
        try:
            data = await sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


async def read_response(
    sock: trio.socket.SocketType, buf: bytearray, *, head_only: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response with content-length or chunked framing from ``sock``.

    ``buf`` carries bytes read past this response over to the next call. ``head_only``: the
    answer to a ``HEAD``, whose framing headers describe GET's body: only the head is read."""
    while b"\r\n\r\n" not in buf:
        data = await sock.recv(65536)
        assert data, f"EOF before the response head: {bytes(buf)!r}"
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    del buf[:]
    buf += rest
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if head_only:
        return status, headers, b""
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(buf) < length:
            data = await sock.recv(65536)
            assert data
            buf += data
        body = bytes(buf[:length])
        del buf[:length]
        return status, headers, body
    if headers.get("transfer-encoding") == "chunked":
        body_parts = []
        while True:
            while b"\r\n" not in buf:
                data = await sock.recv(65536)
                assert data
                buf += data
            size_line, _, _ = bytes(buf).partition(b"\r\n")
            size = int(size_line, 16)
            need = len(size_line) + 2 + size + 2
            while len(buf) < need:
                data = await sock.recv(65536)
                assert data
                buf += data
            body_parts.append(bytes(buf[len(size_line) + 2 : len(size_line) + 2 + size]))
            del buf[:need]
            if size == 0:
                return status, headers, b"".join(body_parts)
    return status, headers, b""


@dataclass
class H2Response:
    """What an :class:`H2Client` received on one stream."""

    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    chunks: int = 0
    ended: bool = False
    reset: int | None = None


class H2Client:
    """A minimal HTTP/2 client (h2, prior knowledge) over a raw trio socket."""

    def __init__(self, sock: trio.socket.SocketType, *, window: int | None = None, auto_ack: bool = True) -> None:
        import h2.config
        import h2.connection
        import h2.settings

        self.sock = sock
        self.auto_ack = auto_ack
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        if window is not None:
            self.conn.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
            )
        self.responses: dict[int, H2Response] = {}
        self.goaway: int | None = None
        self.closed = False
        self.remote_settings_seen = False
        self.bodies: dict[int, bytes] = {}

    async def start(self) -> None:
        """Send the preface and SETTINGS."""
        self.conn.initiate_connection()
        await self.flush()

    async def flush(self) -> None:
        """Send what h2 queued."""
        data = self.conn.data_to_send()
        while data:
            sent = await self.sock.send(data)
            data = data[sent:]

    def request(
        self, path: str, *, method: str = "GET", headers: list[tuple[str, str]] | None = None, body: bytes | None = None
    ) -> int:
        """Queue a request (call :meth:`flush`); returns its stream id."""
        sid: int = self.conn.get_next_available_stream_id()
        raw = [(b":method", method.encode()), (b":scheme", b"http"), (b":authority", b"test")]
        raw.append((b":path", path.encode()))
        raw += [(n.encode(), v.encode()) for n, v in headers or []]
        self.conn.send_headers(sid, raw, end_stream=body is None)
        self.responses[sid] = H2Response()
        if body is not None:
            self.bodies[sid] = body
            self._send_bodies()
        return sid

    def _send_bodies(self) -> None:
        for sid, queued in list(self.bodies.items()):
            body = queued
            while True:
                size = min(len(body), self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
                if not size and body:
                    self.bodies[sid] = body
                    break
                self.conn.send_data(sid, body[:size], end_stream=size == len(body))
                body = body[size:]
                if not body:
                    del self.bodies[sid]
                    break

    async def pump(self) -> None:
        """Read once from the socket and process the events."""
        import h2.events

        try:
            data = await self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.responses[event.stream_id].headers = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                response = self.responses[event.stream_id]
                response.data += event.data
                response.chunks += 1
                if self.auto_ack:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.responses[event.stream_id].ended = True
            elif isinstance(event, h2.events.StreamReset):
                self.responses[event.stream_id].reset = int(event.error_code or 0)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = int(event.error_code or 0)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self.remote_settings_seen = True
        self._send_bodies()
        await self.flush()

    async def pump_until(self, done: object) -> None:
        """Pump until ``done()`` is true or the connection closes."""
        while not done() and not self.closed:  # type: ignore[operator]
            await self.pump()

    def finished(self, sid: int) -> bool:
        """True once stream ``sid`` ended or was reset."""
        response = self.responses[sid]
        return response.ended or response.reset is not None


async def h2_client(port: int, **kwargs: object) -> H2Client:
    """A started :class:`H2Client` connected to 127.0.0.1:``port``."""
    client = H2Client(await connect(port), **kwargs)  # type: ignore[arg-type]
    await client.start()
    return client
