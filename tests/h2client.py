"""A small HTTP/2 client on the ``h2`` library over a trio socket (h2c or TLS with ALPN h2)."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import trio

from server.core.sse import SSEEvent, SSEParser


@dataclass
class H2Stream:
    """One request's response as received so far."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    parser: SSEParser = field(default_factory=SSEParser)
    events: list[SSEEvent] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None


class H2Client:
    """Drives one HTTP/2 connection from the test task (no background task needed)."""

    def __init__(self, stream: trio.abc.Stream, window: int = 1 << 24) -> None:
        self.sock = stream
        cfg = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config=cfg)
        self.conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(window)
        self.streams: dict[int, H2Stream] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.sock.send_all(data)

    async def get(self, path: str, headers: dict[str, str] | None = None, authority: str = "127.0.0.1") -> int:
        """Send a GET; return its stream id."""
        sid = self.conn.get_next_available_stream_id()
        hdrs = [
            (":method", "GET"),
            (":path", path),
            (":scheme", "http"),
            (":authority", authority),
            ("accept", "text/event-stream"),
            *(headers or {}).items(),
        ]
        self.conn.send_headers(sid, hdrs, end_stream=True)
        self.streams[sid] = H2Stream()
        await self.flush()
        return sid

    async def post(self, path: str, body: bytes, content_type: str = "text/plain") -> int:
        """Send a POST with a body; return its stream id."""
        sid = self.conn.get_next_available_stream_id()
        hdrs = [
            (":method", "POST"),
            (":path", path),
            (":scheme", "http"),
            (":authority", "127.0.0.1"),
            ("content-type", content_type),
            ("content-length", str(len(body))),
        ]
        self.conn.send_headers(sid, hdrs)
        self.conn.send_data(sid, body, end_stream=True)
        self.streams[sid] = H2Stream()
        await self.flush()
        return sid

    def cancel(self, sid: int) -> None:
        """Reset a stream (the client goes away from that request only)."""
        self.conn.reset_stream(sid)

    async def pump(self) -> None:
        """Read once from the socket and process what arrived."""
        data = await self.sock.receive_some(65536)
        if not data:
            self.closed = True
            return
        for ev in self.conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                st = self.streams[ev.stream_id]
                st.headers = {k: v for k, v in ev.headers}
                st.status = int(st.headers[":status"])
            elif isinstance(ev, h2.events.DataReceived):
                st = self.streams[ev.stream_id]
                st.body += ev.data
                st.events += st.parser.feed(ev.data)
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                self.streams[ev.stream_id].ended = True
            elif isinstance(ev, h2.events.StreamReset):
                if ev.stream_id in self.streams:
                    self.streams[ev.stream_id].reset = ev.error_code
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev
        await self.flush()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Pump until ``predicate()`` holds (callers set the deadline)."""
        while not predicate():
            if self.closed:
                raise EOFError("connection closed")
            await self.pump()


async def open_h2(port: int, ssl_context: ssl.SSLContext | None = None) -> H2Client:
    """Connect with prior knowledge (h2c) or, with ``ssl_context``, TLS + ALPN h2."""
    sock: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
    if ssl_context is not None:
        tls = trio.SSLStream(sock, ssl_context, server_hostname="localhost")
        await tls.do_handshake()
        assert tls.selected_alpn_protocol() == "h2"
        sock = tls
    client = H2Client(sock)
    await client.flush()
    return client
