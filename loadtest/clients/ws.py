"""WebSocket load clients on ``trio-websocket``: ``sluice.json.v1`` (text frames, JSON, data as a
string) and ``sluice.msgpack.v1`` (binary frames, msgpack, data as raw bytes). Every track of a
connection is one subscription on one socket.

A close by the server (``1012`` on drain, ``1000``...) ends the session normally, so the
connection is reconnected and every track not yet ended resumes after its last id.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, wrap_client_stream

from loadtest.clients.common import Conn, Endpoint, Load, open_socket
from loadtest.track import Track
from loadtest.wire import ProtocolError

JSON_PROTOCOL = "sluice.json.v1"
MSGPACK_PROTOCOL = "sluice.msgpack.v1"
PATH = "/v1/ws"
MAX_MESSAGE = 4 * 1024 * 1024  # above the server's largest event (1 MiB by default) with its envelope
QUEUE = 64  # messages the reader task may get ahead of the receive loop
RECV = 65_536
CLOSE_TIMEOUT = 2.0

Encode = Callable[[dict[str, str]], str | bytes]
Decode = Callable[[str | bytes], Any]


def _encode_json(msg: dict[str, str]) -> str:
    return json.dumps(msg, separators=(",", ":"))


def _encode_msgpack(msg: dict[str, str]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def _decode_msgpack(frame: str | bytes) -> Any:
    if isinstance(frame, str):
        raise ProtocolError("text frame on a msgpack WebSocket")
    return msgpack.unpackb(frame, raw=False)


def subscribe_message(track: Track) -> dict[str, str]:
    """The subscribe op for ``track``: from the start, or after its last id."""
    if track.last_id is None:
        return {"op": "subscribe", "stream": track.stream, "from": "start"}
    return {"op": "subscribe", "stream": track.stream, "last_event_id": track.last_id}


async def session_json(load: Load, conn: Conn) -> None:
    """One WebSocket with the ``sluice.json.v1`` subprotocol carrying every track of ``conn``."""
    await _session(load, conn, JSON_PROTOCOL, _encode_json, json.loads)


async def session_msgpack(load: Load, conn: Conn) -> None:
    """One WebSocket with the ``sluice.msgpack.v1`` subprotocol carrying every track of ``conn``."""
    await _session(load, conn, MSGPACK_PROTOCOL, _encode_msgpack, _decode_msgpack)


async def _session(load: Load, conn: Conn, protocol: str, encode: Encode, decode: Decode) -> None:
    tracks = [t for t in conn.tracks if not t.ended]
    if not tracks:
        return
    sock = await open_socket(load, conn.source)
    with sock:
        failure: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                try:
                    ws = await open_ws(load.endpoint, load.timeout, nursery, trio.SocketStream(sock), protocol)
                    for track in tracks:
                        await ws.send_message(encode(subscribe_message(track)))
                    load.up(conn)
                    await _receive(load, conn, ws, decode)
                except ConnectionClosed:
                    pass  # closed by the server: reconnect and resume
                except Exception as exc:  # raised below, outside the nursery, as itself (not a group)
                    failure = exc
                nursery.cancel_scope.cancel()  # the reader task
        except BaseExceptionGroup as group:  # from the reader task: a refused handshake, mostly
            errors = [e for e in _leaves(group) if not isinstance(e, (ConnectionClosed, trio.Cancelled))]
            if not errors:
                if any(isinstance(e, trio.Cancelled) for e in _leaves(group)):
                    raise
                return
            first = errors[0]
            if isinstance(first, HandshakeError):
                raise ProtocolError(f"WebSocket handshake failed: {first!r}") from first
            raise first from group
        if failure is not None:
            raise failure


async def open_ws(ep: Endpoint, timeout: float, nursery: trio.Nursery, stream: trio.SocketStream,
                  protocol: str) -> WebSocketConnection:
    """The WebSocket handshake to ``ep`` on ``stream`` (with its auth headers) within ``timeout``,
    its reader task in ``nursery``; ``ProtocolError`` if the server chose another subprotocol."""
    with trio.fail_after(timeout):
        ws = await wrap_client_stream(
            nursery, stream, f"{ep.host}:{ep.port}", PATH, subprotocols=[protocol], message_queue_size=QUEUE,
            max_message_size=MAX_MESSAGE, receive_buffer_size=RECV,
            extra_headers=[(n.encode(), v.encode()) for n, v in ep.auth_headers()],
        )
    if ws.subprotocol != protocol:
        raise ProtocolError(f"server chose subprotocol {ws.subprotocol!r}, not {protocol}")
    return ws


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


async def _receive(load: Load, conn: Conn, ws: WebSocketConnection, decode: Decode) -> None:
    """Feed what arrives to the load's counters until the socket closes or every track ended."""
    by_stream = {t.stream: t for t in conn.tracks}
    get_message = ws.get_message
    deliver = load.deliver
    while True:
        try:
            frame = await get_message()
        except ConnectionClosed:
            return
        now = time.monotonic_ns()
        try:
            msg = decode(frame)
            op = msg["op"]
            if op == "event":
                deliver(by_stream[msg["stream"]], msg["id"], msg["data"], now)
            elif op == "end":
                load.end(by_stream[msg["stream"]])
                if conn.done():
                    with trio.move_on_after(CLOSE_TIMEOUT):
                        await ws.aclose(1000)
                    return
            elif op == "reset":
                load.reset(by_stream[msg["stream"]])
            elif op == "error":
                raise ProtocolError(f"server error {msg.get('code')}: {msg.get('message')}")
        except (KeyError, TypeError) as exc:
            raise ProtocolError(f"unexpected message {frame[:100]!r}") from exc
