"""What every load client shares: the connection record, the per-process counters and the
reconnect loop. A transport module only has to implement one *session*: connect, subscribe every
track of the connection (resuming after ``track.last_id`` when it has one), and feed what arrives
to :meth:`Load.deliver` until the connection ends.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from loadtest import payload
from loadtest.track import Track
from loadtest.wire import ChunkedDecoder, Head, parse_head

MAX_ERRORS_KEPT = 20
IP_BIND_ADDRESS_NO_PORT = 24  # Linux <netinet/in.h>; not exported by the socket module
RECV = 65_536


@dataclass(frozen=True)
class Endpoint:
    """Where the server is and what it speaks."""

    host: str
    port: int
    kind: str = "sluice"  # sluice | uvicorn | nchan
    path_prefix: str = "/v1/streams/"
    token: str | None = None  # sent as Authorization: Bearer on every request and handshake

    def stream_path(self, stream: str) -> str:
        """The path of a stream's resource."""
        return self.path_prefix + stream

    def auth_headers(self) -> list[tuple[str, str]]:
        """``[("authorization", "Bearer <token>")]`` with a token, else ``[]``."""
        return [("authorization", f"Bearer {self.token}")] if self.token else []


class Conn:
    """One client connection carrying one or more subscriptions (tracks)."""

    __slots__ = ("down_since", "dropped", "index", "is_up", "retry_ms", "scope", "source", "tracks")

    def __init__(self, index: int, tracks: list[Track], source: str) -> None:
        self.index = index
        self.tracks = tracks
        self.source = source  # local address to bind, spreading connections over 127.0.0.0/8
        self.scope: trio.CancelScope | None = None
        self.down_since: float | None = None  # when it last lost its connection
        self.retry_ms: int | None = None  # the server's SSE retry hint
        self.dropped = False  # cut on purpose (storm): reconnect at once
        self.is_up = False

    def done(self) -> bool:
        """True when every track has seen its stream's end."""
        return all(t.ended for t in self.tracks)


class Load:
    """The counters of one load process and the hot path every client calls."""

    def __init__(self, endpoint: Endpoint, *, limits: dict[str, float] | None = None) -> None:
        self.endpoint = endpoint
        self.limits = limits or {}
        self.connected = 0  # connections currently up
        self.connects = 0
        self.connect_failures = 0
        self.disconnects = 0
        self.reconnects = 0
        self.events = 0
        self.latencies: list[int] = []  # ns, since the last tick
        self.resumes: list[float] = []  # seconds from disconnect to resubscribed, since the last tick
        self.resume_max = 0.0
        self.heartbeats = 0
        self.errors: dict[str, int] = {}
        self.stopping = False
        self.connect_limiter = trio.CapacityLimiter(int(self.limits.get("connecting", 200)))
        self.timeout = self.limits.get("timeout", 30.0)  # deadline for connecting and for a response head

    # --- the hot path -------------------------------------------------------------------------
    def deliver(self, track: Track, event_id: str | None, data: bytes | str, now_ns: int) -> None:
        """Record one delivered event."""
        if event_id is not None:
            track.last_id = event_id
        try:
            seq, t_ns = payload.decode(data)
        except ValueError:
            track.foreign += 1
            self.error(ValueError(f"event data not from this run: {data[:32]!r} (id {event_id})"))
            return
        track.on_event(seq)
        self.events += 1
        self.latencies.append(now_ns - t_ns)

    def reset(self, track: Track) -> None:
        """The server said history was lost (a ``sluice.reset``)."""
        track.resets += 1

    def end(self, track: Track) -> None:
        """The stream was closed and everything was delivered."""
        track.ended = True

    # --- connection life ----------------------------------------------------------------------
    def up(self, conn: Conn) -> None:
        """The connection is subscribed (its response head or handshake arrived)."""
        if conn.is_up:
            return
        conn.is_up = True
        self.connected += 1
        self.connects += 1
        if conn.down_since is not None:
            took = time.monotonic() - conn.down_since
            self.reconnects += 1
            self.resumes.append(took)
            self.resume_max = max(self.resume_max, took)
            conn.down_since = None

    def down(self, conn: Conn) -> None:
        """The connection, which was up, ended."""
        conn.is_up = False
        self.connected -= 1
        self.disconnects += 1
        if conn.down_since is None:
            conn.down_since = time.monotonic()

    def failed(self, conn: Conn) -> None:
        """A connection attempt failed before it was subscribed."""
        self.connect_failures += 1
        if conn.down_since is None and conn.tracks[0].last_id is not None:
            conn.down_since = time.monotonic()

    def error(self, exc: BaseException) -> None:
        """Count an error by kind (a few kinds kept with an example)."""
        key = f"{type(exc).__name__}: {str(exc)[:80]}"
        if key in self.errors or len(self.errors) < MAX_ERRORS_KEPT:
            self.errors[key] = self.errors.get(key, 0) + 1

    def retry_delay(self, conn: Conn) -> float:
        """How long to wait before reconnecting: at once after a storm drop, else the server's
        SSE ``retry:`` hint (as EventSource does), else a short random delay."""
        if conn.dropped:
            conn.dropped = False
            return 0.0
        if conn.retry_ms is not None:
            return min(conn.retry_ms / 1000, self.limits.get("max_retry", 10.0))
        return random.uniform(0.05, self.limits.get("reconnect_jitter", 1.0))


async def connect_tcp(host: str, port: int, source: str, timeout: float) -> trio.socket.SocketType:
    """A TCP connection to ``host:port`` from ``source`` (a 127.x.y.z address, or "" for any)
    within ``timeout`` seconds."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
        if source:
            # let connect() pick the port: a bind to port 0 searches the whole ephemeral range
            # for a port free for every destination, which gets slow with thousands of sockets
            sock.setsockopt(trio.socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            await sock.bind((source, 0))
        with trio.fail_after(timeout):
            await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def open_socket(load: Load, source: str) -> trio.socket.SocketType:
    """A TCP connection to the load's endpoint from ``source``, under the process's limit on
    connects in progress and the load's deadline."""
    async with load.connect_limiter:
        return await connect_tcp(load.endpoint.host, load.endpoint.port, source, load.timeout)


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    """Write all of ``data``."""
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


async def read_response(sock: trio.socket.SocketType, buf: bytes) -> tuple[Head, bytes, bytes] | None:
    """``(head, body, bytes after it)`` of the next response, whose first bytes may already be in
    ``buf``; None when the connection closed before any byte of it."""
    # After a chunked body the final CRLF may come late; no trailers are expected.
    buf = buf.lstrip(b"\r\n")
    while (parsed := parse_head(buf)) is None:
        data = await sock.recv(RECV)
        if not data:
            if not buf:
                return None
            raise EOFError("connection closed in a response head")
        buf = (buf + data).lstrip(b"\r\n") if not buf else buf + data
    head, used = parsed
    body = bytearray(buf[used:])
    length = 0 if head.status in (204, 304) or head.status < 200 else head.length
    if length is not None:
        while len(body) < length:
            data = await sock.recv(max(RECV, length - len(body)))
            if not data:
                raise EOFError("connection closed in a response body")
            body += data
        return head, bytes(body[:length]), bytes(body[length:])
    if head.chunked:
        chunked = ChunkedDecoder()
        out = bytearray(chunked.feed(bytes(body)))
        while not chunked.done:
            data = await sock.recv(RECV)
            if not data:
                raise EOFError("connection closed in a chunked body")
            out += chunked.feed(data)
        return head, bytes(out), chunked.tail
    while data := await sock.recv(RECV):  # no length: the body runs to the end of the connection
        body += data
    return head, bytes(body), b""



Session = Callable[[Load, Conn], Awaitable[None]]
CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError, trio.BrokenResourceError, trio.ClosedResourceError, ValueError, EOFError, trio.TooSlowError,
)


async def keep_connected(load: Load, conn: Conn, session: Session) -> None:
    """Run ``session`` for ``conn`` again and again, resuming, until its tracks end or the load
    stops. ``session`` calls ``load.up(conn)`` once subscribed, and returns or raises when the
    connection ends; a session that never came up counts as a failed connect."""
    while not load.stopping and not conn.done():
        with trio.CancelScope() as conn.scope:
            try:
                await session(load, conn)
            except CLIENT_ERRORS as exc:
                load.error(exc)
        conn.scope = None
        if conn.is_up:
            load.down(conn)
        elif not load.stopping:
            load.failed(conn)
        if load.stopping or conn.done():
            return
        delay = load.retry_delay(conn)
        if delay:
            await trio.sleep(delay)
