"""WebSocket tests: trio-websocket as the client, plus raw frames over a trio socket."""

from __future__ import annotations

import base64
import os
import struct

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from server.core.frame import Frame
from server.http.base import Exchange, HttpLimits
from tests.http_helpers import App, connect, read_until_eof, running_server


def _code(exc: ConnectionClosed) -> int:
    assert exc.reason is not None
    return int(exc.reason.code)


def _reason(exc: ConnectionClosed) -> str | None:
    assert exc.reason is not None
    return exc.reason.reason


def _masked(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A client frame (masked) with a payload shorter than 126 bytes."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + mask + body


async def _upgrade(port: int, protocols: str = "") -> tuple[trio.socket.SocketType, bytes]:
    """A raw socket after a completed upgrade to /ws; returns it and any bytes read past the 101."""
    sock = await connect(port)
    key = base64.b64encode(os.urandom(16))
    extra = f"Sec-WebSocket-Protocol: {protocols}\r\n".encode() if protocols else b""
    await sock.send(
        b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate\r\n" + extra + b"\r\n"
    )
    data = b""
    while b"\r\n\r\n" not in data:
        data += await sock.recv(4096)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"sec-websocket-extensions" not in head.lower()  # permessage-deflate is never negotiated
    return sock, rest


async def _read_frame(sock: trio.socket.SocketType, buf: bytearray) -> tuple[int, bytes]:
    """Read one unmasked server frame: (opcode, payload)."""
    while True:
        if len(buf) >= 2:
            length = buf[1] & 0x7F
            offset = 2
            if length == 126:
                length = struct.unpack("!H", buf[2:4])[0]
                offset = 4
            elif length == 127:
                length = struct.unpack("!Q", buf[2:10])[0]
                offset = 10
            if len(buf) >= offset + length:
                opcode = buf[0] & 0x0F
                payload = bytes(buf[offset : offset + length])
                del buf[: offset + length]
                return opcode, payload
        data = await sock.recv(65536)
        assert data, "EOF before a complete frame"
        buf += data


async def test_echo_text_and_binary_with_subprotocol() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, port, _app):
            url = f"ws://127.0.0.1:{port}/ws"
            async with open_websocket_url(url, subprotocols=["sluice.json.v1", "other"]) as ws:
                assert ws.subprotocol == "sluice.json.v1"
                await ws.send_message("hello ✓")
                assert await ws.get_message() == "hello ✓"
                await ws.send_message(b"\x00\x01binary")
                assert await ws.get_message() == b"\x00\x01binary"
                big = "y" * 200_000
                await ws.send_message(big)
                assert await ws.get_message() == big


async def test_plain_get_on_a_websocket_path_gets_the_handler_answer() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, port, _app):
            sock = await connect(port)
            await sock.send(b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            assert (await read_until_eof(sock)).startswith(b"HTTP/1.1 426 ")


async def test_oversized_message_closes_1009() -> None:
    limits = HttpLimits(ws_max_message=1000)
    with trio.fail_after(10):
        async with running_server(limits=limits) as (_, port, app):
            async with open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
                await ws.send_message("ok")
                assert await ws.get_message() == "ok"
                await ws.send_message("x" * 5000)
                with pytest.raises(ConnectionClosed) as info:
                    await ws.get_message()
                assert _code(info.value) == 1009
            assert app.state.ws_closed == [1009]


async def test_fragmented_message_is_reassembled_under_the_cap() -> None:
    limits = HttpLimits(ws_max_message=100)
    with trio.fail_after(10):
        async with running_server(limits=limits) as (_, port, _app):
            sock, rest = await _upgrade(port)
            buf = bytearray(rest)
            await sock.send(_masked(0x1, b"frag", fin=False) + _masked(0x9, b"p") + _masked(0x0, b"mented"))
            assert await _read_frame(sock, buf) == (0xA, b"p")  # a ping between fragments is answered
            assert await _read_frame(sock, buf) == (0x1, b"fragmented")
            # 60 + 60 bytes in two fragments: each fits, the message does not
            await sock.send(_masked(0x2, b"a" * 60, fin=False) + _masked(0x0, b"b" * 60))
            opcode, payload = await _read_frame(sock, buf)
            assert opcode == 0x8
            assert struct.unpack("!H", payload[:2])[0] == 1009


async def test_malformed_frame_closes_1002_and_others_are_served() -> None:
    with trio.fail_after(10):
        async with running_server() as (server, port, _app):
            sock, rest = await _upgrade(port)
            buf = bytearray(rest)
            await sock.send(b"\x81\x05hello")  # unmasked client frame: a protocol violation
            opcode, payload = await _read_frame(sock, buf)
            assert opcode == 0x8
            assert struct.unpack("!H", payload[:2])[0] == 1002
            assert await read_until_eof(sock) == b""  # and the connection ends
            assert server.stats.protocol_errors == 1
            async with open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
                await ws.send_message("still here")
                assert await ws.get_message() == "still here"


async def test_server_initiated_close() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, port, _app), open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.send_message("close-me")
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            assert (_code(info.value), _reason(info.value)) == (4000, "asked")


async def test_idle_socket_is_pinged_then_dropped(autojump_clock: trio.testing.MockClock) -> None:
    limits = HttpLimits(ws_ping_interval=10.0)
    with trio.fail_after(100):
        async with running_server(limits=limits) as (_, port, _app):
            sock, rest = await _upgrade(port)
            buf = bytearray(rest)
            start = trio.current_time()
            opcode, _ = await _read_frame(sock, buf)
            assert opcode == 0x9
            assert trio.current_time() - start >= 10.0
            assert await read_until_eof(sock) == b""  # silent for another interval: dropped
            assert trio.current_time() - start >= 20.0


async def test_send_frame_writes_prebuilt_frames() -> None:
    frame = Frame(b"\x81\x05hello")  # a complete unmasked server text frame

    class Pusher(App):
        async def __call__(self, ex: Exchange) -> None:
            ws = await ex.accept_websocket(None)
            assert ws.send_frame(frame)
            assert ws.send_message("after")
            await ws.close()

    with trio.fail_after(10):
        async with (
            running_server(Pusher()) as (_, port, _app),
            open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws,
        ):
            assert await ws.get_message() == "hello"
            assert await ws.get_message() == "after"
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            assert _code(info.value) == 1000
