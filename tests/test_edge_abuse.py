"""Abuse at the edge: each attack ends with the right answer for the attacker, while a bystander
keeps being served (:func:`tests.abuse_helpers.bystander`: at least one publish-to-receipt round
completes while the attack is under way, each within a 5-second liveness bound; the latencies are
printed, see ``pytest -s``) and memory grows by at most 50 MiB.

Memory is measured on this test process (``/proc/self/status``), where the worker runs: the peak
RSS (``VmHWM``, reset before the attack through ``/proc/self/clear_refs``) or, where that reset
is not permitted, the RSS afterwards; see :class:`tests.abuse_helpers.MemoryWatch`.

A malformed ``Last-Event-ID`` (200 + ``sluice.reset`` with reason ``invalid``) is covered by
``tests/test_sse.py::test_reset_for_garbage_foreign_epoch_and_gone``.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import hpack
import trio
from h2.errors import ErrorCodes

from tests.abuse_helpers import (
    MIB,
    PREFACE,
    MemoryWatch,
    bystander,
    check_memory,
    client_frame,
    connect_from,
    deflate_zeros,
    goaway_code,
    h2_frame,
    h2_frames,
    read_to_eof,
    send_ignoring_close,
    ws_close_code,
    ws_read_frame,
    ws_upgrade,
)
from tests.client import Running, request, start_sluice

SOURCES = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
HEADERS, RST_STREAM, SETTINGS, CONTINUATION = 0x1, 0x3, 0x4, 0x9
END_STREAM, END_HEADERS = 0x1, 0x4


async def no_connections_but(s: Running, count: int) -> None:
    """Wait until the worker holds ``count`` connections (the caller sets the deadline)."""
    while len(s.worker.http.connections) > count:
        await trio.sleep(0.01)


# -- WebSocket --------------------------------------------------------------------------------


async def test_permessage_deflate_bomb_closes_1009(nursery: trio.Nursery, tmp_path: Path) -> None:
    s = await start_sluice(nursery, tmp_path, "memory")
    bomb = deflate_zeros(64 * MIB)  # built before measuring; ~64 KiB
    assert len(bomb) < 128 * 1024
    with trio.fail_after(30):
        async with bystander(s) as by:
            watch = MemoryWatch()
            stream = await trio.open_tcp_stream("127.0.0.1", s.port)
            async with stream:
                head, buf = await ws_upgrade(stream, "/v1/ws", protocol="sluice.json.v1", deflate=True)
                assert b"sec-websocket-extensions: permessage-deflate" in head.lower()
                async with trio.open_nursery() as attack:
                    attack.start_soon(send_ignoring_close, stream, client_frame(0x1, bomb, rsv1=True))
                    await by.fresh_round()
                code, reason, _ = await ws_close_code(stream, buf)
                assert (code, reason) == (1009, "message too big"), by.summary()
                assert await read_to_eof(stream) == b""  # and the server ends the connection
        await no_connections_but(s, 0)
    check_memory("permessage-deflate bomb", watch, by)


async def test_deflate_still_works_for_normal_messages(nursery: trio.Nursery, tmp_path: Path) -> None:
    s = await start_sluice(nursery, tmp_path, "memory")
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", s.port)
        async with stream:
            _, buf = await ws_upgrade(stream, "/v1/ws", protocol="sluice.json.v1", deflate=True)
            comp = zlib.compressobj(6, zlib.DEFLATED, -15)
            body = comp.compress(b'{"op": "ping"}') + comp.flush(zlib.Z_SYNC_FLUSH)
            await stream.send_all(client_frame(0x1, body[:-4], rsv1=True))
            frame = await ws_read_frame(stream, buf)
            assert frame is not None
            opcode, payload = frame
            assert opcode == 0x1
            # the server may answer compressed (RSV1) or not: a pre-built frame goes out as is
            if not payload.startswith(b"{"):
                payload = zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")
            text = payload
            assert b'"pong"' in text


async def test_ws_ping_flood_closes_1008(nursery: trio.Nursery, tmp_path: Path) -> None:
    s = await start_sluice(nursery, tmp_path, "memory", limits={"ws_max_pings_per_second": 5, "ws_ping_burst": 20})
    flood = b"".join(client_frame(0x9, b"p%d" % i) for i in range(200))
    with trio.fail_after(20):
        async with bystander(s) as by:
            watch = MemoryWatch()
            stream = await trio.open_tcp_stream("127.0.0.1", s.port)
            async with stream:
                _, buf = await ws_upgrade(stream, "/v1/ws", protocol="sluice.json.v1")
                async with trio.open_nursery() as attack:
                    attack.start_soon(send_ignoring_close, stream, flood)
                    await by.fresh_round()
                code, reason, seen = await ws_close_code(stream, buf)
                assert code == 1008 and reason == "too many pings", by.summary()
                assert 20 <= seen.count(0xA) <= 25  # the burst was answered, then the socket closed
            assert s.worker.http.stats.ws_ping_floods == 1
    check_memory("WebSocket ping flood", watch, by)


async def test_fragmented_uncompressed_message_is_capped(nursery: trio.Nursery, tmp_path: Path) -> None:
    s = await start_sluice(
        nursery, tmp_path, "memory", http={"ws_max_message": 64 * 1024}, server={"max_event_bytes": 32 * 1024}
    )
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", s.port)
        async with stream:
            _, buf = await ws_upgrade(stream, "/v1/ws", protocol="sluice.json.v1")
            frames = [client_frame(0x1, b"x" * 1000, fin=False)]
            frames += [client_frame(0x0, b"x" * 1000, fin=False) for _ in range(200)]
            await send_ignoring_close(stream, b"".join(frames))
            code, _, _ = await ws_close_code(stream, buf)
            assert code == 1009


# -- HTTP/2 -----------------------------------------------------------------------------------


def _sse_request(encoder: hpack.Encoder, path: str) -> bytes:
    return encoder.encode(
        [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "t"), ("accept", "text/event-stream")]
    )


def rapid_reset(pairs: int, first_sid: int = 1, encoder: hpack.Encoder | None = None) -> bytes:
    """``pairs`` times: HEADERS opening an SSE request, then RST_STREAM (CANCEL) for it."""
    encoder = encoder or hpack.Encoder()
    out = bytearray()
    for i in range(pairs):
        sid = first_sid + 2 * i
        out += h2_frame(HEADERS, END_HEADERS | END_STREAM, sid, _sse_request(encoder, "/v1/streams/rr"))
        out += h2_frame(RST_STREAM, 0, sid, int(ErrorCodes.CANCEL).to_bytes(4, "big"))
    return bytes(out)


async def _status_of(stream: trio.SocketStream, sid: int) -> tuple[str, bytes]:
    """Read HTTP/2 frames until stream ``sid``'s response HEADERS: its ``:status`` and every byte read."""
    data = bytearray()
    decoder = hpack.Decoder()
    while True:
        chunk = await stream.receive_some(65536)
        assert chunk
        data += chunk
        for kind, _flags, fsid, payload in h2_frames(bytes(data)):
            if kind == HEADERS and fsid == sid:
                return dict(decoder.decode(payload))[":status"], bytes(data)


async def _attack(s: Running, source: str, payload: bytes) -> int | None:
    stream = await connect_from(source, s.port)
    async with stream:
        await send_ignoring_close(stream, PREFACE + h2_frame(SETTINGS, 0, 0) + payload)
        return goaway_code(await read_to_eof(stream))


async def test_h2_rapid_reset_from_several_addresses(nursery: trio.Nursery, tmp_path: Path) -> None:
    s = await start_sluice(nursery, tmp_path, "memory")  # default buckets: 200 resets, 400 streams
    codes: dict[str, int | None] = {}
    payload = rapid_reset(2000)
    with trio.fail_after(30):
        async with bystander(s) as by:
            watch = MemoryWatch()

            async def one(source: str) -> None:
                codes[source] = await _attack(s, source, payload)

            async with trio.open_nursery() as attackers:
                for source in SOURCES:
                    attackers.start_soon(one, source)
                await by.fresh_round()
        await no_connections_but(s, 0)
        assert not s.ctx.hub._watchers.get("rr")  # no subscription left behind
    assert codes == dict.fromkeys(SOURCES, int(ErrorCodes.ENHANCE_YOUR_CALM)), by.summary()
    assert s.worker.http.stats.h2_calm == len(SOURCES)
    check_memory("HTTP/2 rapid reset", watch, by)


async def test_h2_resets_within_budget_leave_no_handlers(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Bursts below the bucket: the connection stays, and no handler of a reset stream lingers."""
    s = await start_sluice(nursery, tmp_path, "memory", limits={"h2_reset_burst": 1000, "h2_stream_burst": 1000})
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", s.port)
        async with stream:
            encoder = hpack.Encoder()
            await stream.send_all(PREFACE + h2_frame(SETTINGS, 0, 0))
            sid = 1
            for _ in range(5):
                await stream.send_all(rapid_reset(100, sid, encoder))
                sid += 200
            # a last, ordinary request on the same connection is answered: everything before it was read
            await stream.send_all(
                h2_frame(
                    HEADERS,
                    END_HEADERS | END_STREAM,
                    sid,
                    encoder.encode(
                        [(":method", "GET"), (":path", "/healthz"), (":scheme", "http"), (":authority", "t")]
                    ),
                )
            )
            status, data = await _status_of(stream, sid)
            assert status == "200"
            assert goaway_code(bytes(data)) is None
            while s.ctx.hub._watchers.get("rr"):  # reset streams' handlers are gone
                await trio.sleep(0.01)
    assert s.worker.http.stats.h2_calm == 0


async def test_h2_continuation_flood_gets_goaway(nursery: trio.Nursery, tmp_path: Path) -> None:
    s = await start_sluice(nursery, tmp_path, "memory")
    block = _sse_request(hpack.Encoder(), "/v1/streams/cf")
    flood = h2_frame(HEADERS, END_STREAM, 1, block)  # no END_HEADERS: the block stays open
    flood += b"".join(h2_frame(CONTINUATION, 0, 1, b"\x40" * 16384) for _ in range(300))  # ~4.9 MB
    # empty CONTINUATION frames: h2 itself stops at 64 of them (PROTOCOL_ERROR)
    empty = h2_frame(HEADERS, END_STREAM, 1, block) + h2_frame(CONTINUATION, 0, 1) * 10000
    codes: dict[str, int | None] = {}
    with trio.fail_after(20):
        async with bystander(s) as by:
            watch = MemoryWatch()

            async def one(source: str, payload: bytes) -> None:
                codes[source] = await _attack(s, source, payload)

            async with trio.open_nursery() as attackers:
                attackers.start_soon(one, "127.0.0.2", flood)
                attackers.start_soon(one, "127.0.0.3", empty)
                await by.fresh_round()
        await no_connections_but(s, 0)
    assert codes == {"127.0.0.2": ErrorCodes.ENHANCE_YOUR_CALM, "127.0.0.3": ErrorCodes.PROTOCOL_ERROR}, by.summary()
    assert s.worker.http.stats.h2_calm == 1
    check_memory("HTTP/2 CONTINUATION flood", watch, by)


async def test_h2_huge_header_list_is_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Headers past the limits within one frame-sized block get a 431 on that stream; an HPACK
    block that inflates past twice the advertised list size (indexed repeats of one large
    header) ends the connection with ENHANCE_YOUR_CALM."""
    s = await start_sluice(nursery, tmp_path, "memory", http={"max_header_bytes": 4096})
    with trio.fail_after(20):
        async with bystander(s) as by:
            watch = MemoryWatch()
            encoder = hpack.Encoder()
            fields = [(":method", "GET"), (":path", "/healthz"), (":scheme", "http"), (":authority", "t")]
            big = encoder.encode([*fields, ("x-big", "v" * 3000), ("x-big", "v" * 3000)])
            stream = await trio.open_tcp_stream("127.0.0.1", s.port)
            async with stream:
                await stream.send_all(PREFACE + h2_frame(SETTINGS, 0, 0) + h2_frame(HEADERS, 0x5, 1, big))
                status, data = await _status_of(stream, 1)
                assert status == "431"
                # the second x-big is in the encoder's dynamic table: each repeat costs ~1 byte
                bomb = encoder.encode([*fields, *[("x-big", "v" * 3000)] * 200])
                async with trio.open_nursery() as attack:
                    attack.start_soon(send_ignoring_close, stream, h2_frame(HEADERS, 0x5, 3, bomb))
                    await by.fresh_round()
                code = goaway_code(bytes(data) + await read_to_eof(stream))
                assert code == ErrorCodes.ENHANCE_YOUR_CALM, by.summary()
        await no_connections_but(s, 0)
    assert s.worker.http.stats.h2_calm == 1
    check_memory("HTTP/2 header flood (HPACK bomb)", watch, by)


# -- HTTP/1.1 ---------------------------------------------------------------------------------


async def test_64_mib_publish_is_413_and_nothing_is_stored(nursery: trio.Nursery, tmp_path: Path) -> None:
    s = await start_sluice(nursery, tmp_path, "memory")
    size = 64 * MIB
    with trio.fail_after(30):
        async with bystander(s) as by:
            watch = MemoryWatch()
            stream = await trio.open_tcp_stream("127.0.0.1", s.port)
            async with stream:
                head = (
                    f"POST /v1/streams/big HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
                    f"Content-Length: {size}\r\n\r\n"
                ).encode()
                chunk = b"z" * MIB

                async def body() -> None:
                    await send_ignoring_close(stream, head)
                    for _ in range(size // MIB):
                        await send_ignoring_close(stream, chunk)

                async with trio.open_nursery() as sender:
                    sender.start_soon(body)
                    await by.fresh_round()
                    reply = await read_to_eof(stream)
                    sender.cancel_scope.cancel()
            assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
        info = await request(s.port, "GET", "/v1/streams/big/info")
        assert info.status == 404 or info.json()["length"] == 0
    check_memory("64 MiB publish", watch, by)
