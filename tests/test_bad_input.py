"""Bad input on every layer gets the right answer while another client keeps being served."""

from __future__ import annotations

import json
from pathlib import Path

import h2.errors
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from tests.client import Running, SSEClient, open_sse, publish, start_sluice, wait_live
from tests.h2client import open_h2


async def still_served(s: Running, sse: SSEClient, n: int) -> None:
    eid = await publish(s.port, "bystander", f"still here {n}")
    ev = await sse.next()
    assert (ev.id, ev.data) == (eid, f"still here {n}")


async def raw_exchange(port: int, payload: bytes) -> bytes:
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    async with sock:
        await sock.send_all(payload)
        out = bytearray()
        while chunk := await sock.receive_some(65536):
            out += chunk
        return bytes(out)


async def test_bad_input_everywhere_while_others_are_served(sluice: Running) -> None:
    with trio.fail_after(30):
        async with open_sse(sluice.port, "/v1/streams/bystander") as sse:
            await wait_live(sluice.ctx, "bystander")
            # oversized headers and too many headers: 431
            big = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20000 + b"\r\n\r\n"
            assert (await raw_exchange(sluice.port, big)).startswith(b"HTTP/1.1 431 ")
            many = b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + b"".join(b"x-%d: 1\r\n" % i for i in range(150)) + b"\r\n"
            answer = await raw_exchange(sluice.port, many)
            assert answer.startswith(b"HTTP/1.1 431 ")
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "headers_too_large"
            await still_served(sluice, sse, 1)
            # garbage instead of HTTP: 400
            # a TLS record on a plaintext-only port: closed without an answer
            assert await raw_exchange(sluice.port, b"\x16\x03\x01garbage") == b""
            assert (await raw_exchange(sluice.port, b"NOT HTTP AT ALL\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
            await still_served(sluice, sse, 2)
            # malformed WebSocket frame (reserved bits set, unmasked): close 1002
            async with open_websocket_url(f"ws://127.0.0.1:{sluice.port}/v1/ws", subprotocols=["sluice.json.v1"]) as ws:
                await ws._stream.send_all(b"\xf1\x05hello")  # RSV1-3 set, not masked
                try:
                    await ws.get_message()
                except ConnectionClosed as exc:
                    assert exc.reason.code == 1002
                else:
                    raise AssertionError("the server accepted a malformed frame")
            await still_served(sluice, sse, 3)
            # an HTTP/2 client that breaks the protocol: GOAWAY PROTOCOL_ERROR for that connection only
            c = await open_h2(sluice.port)
            good = await c.get("/v1/streams/bystander")
            await c.until(lambda: c.streams[good].status == 200)
            await c.sock.send_all(b"\x00\x00\x08\x00\x00\x00\x00\x00\x00garbage!")  # DATA on stream 0
            await c.until(lambda: c.goaway is not None)
            assert c.goaway is not None and c.goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
            await still_served(sluice, sse, 4)


async def test_slow_consumer_is_dropped_and_counted(nursery: trio.Nursery, tmp_path: Path) -> None:
    s = await start_sluice(nursery, tmp_path, "memory", http={"send_buffer": 256 * 1024, "send_low_water": 16 * 1024})
    with trio.fail_after(30):
        stalled = await trio.open_tcp_stream("127.0.0.1", s.port)
        stalled.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
        await stalled.send_all(b"GET /v1/streams/flood HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n")
        async with open_sse(s.port, "/v1/streams/bystander") as sse:
            await wait_live(s.ctx, "flood")
            await wait_live(s.ctx, "bystander")
            chunk = "x" * 60_000
            for _ in range(200):
                await publish(s.port, "flood", chunk)
                if s.ctx.hub.stats.dropped:
                    break
            assert s.ctx.hub.stats.dropped == 1
            assert s.ctx.hub.watcher_count("flood") == 0
            await still_served(s, sse, 1)
        await stalled.aclose()
