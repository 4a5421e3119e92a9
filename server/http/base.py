"""The neutral request/response interface transports are written against.

The engine (HTTP/1.1 via llhttp, HTTP/2 via h2, WebSocket via wsproto) implements these protocols,
so SSE over HTTP/1.1 and over HTTP/2 is one piece of transport code.

Threading model: everything runs on the worker's trio thread. ``send``/``send_frame`` are
synchronous and never block: they hand bytes to the connection's single writer (trying a direct
non-blocking socket send first where the transport allows it) and return ``False`` once the
response can take no more: the client went away, or the bounded send buffer overflowed (a slow
consumer), in which case the engine has already started tearing the response down and will cancel
the handler. Handlers run inside a cancel scope the engine cancels when the client disconnects.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from server.core.frame import Frame


class HTTPError(Exception):
    """Raised by handlers (or the engine) to answer with a JSON error ``{"error", "message"}``."""

    def __init__(self, status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []


class BodyTooLarge(HTTPError):
    """The request body exceeded the limit given to :meth:`Request.read_body` (413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, "too_large", f"request body exceeds {limit} bytes")


class WebSocketClosed(Exception):
    """The WebSocket is closed (by the peer, by a protocol error, or locally)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"websocket closed: {code} {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Every size and deadline the engine enforces. All are configurable (config ``[http]``)."""

    max_header_bytes: int = 16 * 1024  # request line + headers; over -> 431
    max_headers: int = 100  # header count; over -> 431
    header_timeout: float = 10.0  # seconds to receive a complete request head
    body_timeout: float = 30.0  # seconds to receive a complete request body
    idle_timeout: float = 60.0  # keep-alive connection with no request in flight
    send_timeout: float = 30.0  # a pending write that makes no progress this long kills the conn
    send_buffer: int = 1024 * 1024  # bytes queued per connection before it counts as a slow consumer
    send_low_water: int = 64 * 1024  # ``drain`` returns once the queue is at or below this
    h2_max_concurrent_streams: int = 128
    h2_max_inbound_frame: int = 16 * 1024
    ws_max_message: int = 2 * 1024 * 1024  # inbound message size; over -> close 1009
    ws_ping_interval: float = 30.0  # server pings an idle WebSocket this often (0: never)
    max_connection_age: float = 0.0  # seconds after accept when a connection is asked to close (0: never)
    max_connection_age_jitter: float = 0.1  # each connection's age limit is scaled by a random 1 +/- this


@dataclass(slots=True)
class Request:
    """One HTTP request head, protocol-neutral. Header names are lower-case; repeated headers are
    joined with ``", "`` (``cookie`` with ``"; "``). ``query`` keeps the first value of each key,
    percent-decoded. ``path`` is the raw path without the query string."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    client: tuple[str, int]
    scheme: str = "http"
    http_version: str = "1.1"
    # Set by the engine: reads the body, raising BodyTooLarge past ``limit`` bytes.
    body_reader: Callable[[int], Awaitable[bytes]] | None = field(default=None, repr=False)

    async def read_body(self, limit: int) -> bytes:
        """Return the whole body; raise :class:`BodyTooLarge` (413) if it exceeds ``limit``.

        Enforces ``HttpLimits.body_timeout`` (408 on expiry)."""
        if self.body_reader is None:
            return b""
        return await self.body_reader(limit)


class ResponseStream(Protocol):
    """A streaming response body (SSE, chunked on HTTP/1.1, DATA frames on HTTP/2)."""

    def send(self, data: bytes) -> bool:
        """Queue ``data``; ``False`` if the response is dead (see module docstring)."""

    def send_frame(self, frame: Frame) -> bool:
        """Queue a shared pre-encoded payload (``frame.raw``; HTTP/1.1 writes ``frame.chunked``)."""

    @property
    def buffered(self) -> int:
        """Bytes queued and not yet handed to the kernel for this response's connection."""

    def fell_behind(self) -> bool:
        """True once the response (or its connection) was cut for falling behind: a slow
        consumer or a stalled write, not the client leaving."""

    async def drain(self) -> None:
        """Wait until the connection's queue is at or below the low-water mark.

        Raises ``trio.BrokenResourceError`` if the response died meanwhile."""

    async def finish(self) -> None:
        """End the response cleanly (HTTP/1.1 last chunk, HTTP/2 END_STREAM) and flush it."""


class WebSocket(Protocol):
    """An accepted WebSocket (HTTP/1.1 upgrade). Inbound messages are size-capped by the engine."""

    @property
    def subprotocol(self) -> str | None:
        """The negotiated subprotocol."""

    async def receive(self) -> str | bytes:
        """Return the next complete message; raise :class:`WebSocketClosed` once closed."""

    def receive_nowait(self) -> str | bytes | None:
        """The next complete message if one has arrived already, else ``None``; never waits."""

    def send_message(self, data: str | bytes) -> bool:
        """Queue one text (``str``) or binary (``bytes``) message; ``False`` if the socket is dead."""

    def send_frame(self, frame: Frame) -> bool:
        """Queue a complete pre-built unmasked frame (``frame.raw``); ``False`` if dead."""

    @property
    def buffered(self) -> int:
        """Bytes queued and not yet handed to the kernel."""

    def fell_behind(self) -> bool:
        """As :meth:`ResponseStream.fell_behind`."""

    async def drain(self) -> None:
        """As :meth:`ResponseStream.drain`."""

    def take_ping(self) -> bool:
        """Charge an application-level ping to the socket's ping bucket (the one Ping frames use);
        ``False`` when the peer pings too fast and the socket should close with 1008."""

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame with ``code``/``reason`` and end the connection (bounded wait)."""


class Exchange(Protocol):
    """One request and the means to answer it. Exactly one of the answering calls is made."""

    request: Request

    async def respond(self, status: int, headers: list[tuple[str, str]], body: bytes = b"") -> None:
        """Send a complete response (``content-length`` is added by the engine)."""

    async def open_stream(self, status: int, headers: list[tuple[str, str]]) -> ResponseStream:
        """Send the response head and return the body stream. An engine may drop the request's
        headers once the head is sent (HTTP/1.1 does, for long streams): read them before."""

    @property
    def websocket_requested(self) -> bool:
        """True for an HTTP/1.1 request that asks for a WebSocket upgrade."""

    def offered_subprotocols(self) -> list[str]:
        """The subprotocols the client offered (``Sec-WebSocket-Protocol``), in its order."""

    async def accept_websocket(self, subprotocol: str | None) -> WebSocket:
        """Complete the upgrade (101) with ``subprotocol`` and return the socket."""

    def on_close_request(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once when the server asks this exchange's connection to wind down
        (a drain or a connection rotation), so a long-lived response can end cleanly and early.

        If the connection was already asked before this registration, ``callback`` is called at
        once, synchronously, before this returns. Callbacks run on the trio thread from inside the
        engine and must not block or raise (an exception is logged and ignored); several may be
        registered. A WebSocket on the connection is additionally closed by the engine (1012).
        """


Handler = Callable[[Exchange], Awaitable[None]]
"""The application: called once per request (HTTP/1.1: in the connection's task; HTTP/2: in the
stream's own task), and cancelled when the client goes away or resets the request.

A handler that raises :class:`HTTPError` before answering gets that JSON error; any other
exception before answering is a 500 (logged); after answering, the connection is closed."""
