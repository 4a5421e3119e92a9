"""Slow HTTP/2 clients: a trickled header block or client preface (slowloris over HTTP/2) is cut
at ``header_timeout`` with GOAWAY ENHANCE_YOUR_CALM; a trickled request body gets 408 at
``body_timeout``. The clock is trio's mock clock (``autojump_clock``); the sockets are real.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import partial

import h2.events
import trio
import trio.testing
from h2.errors import ErrorCodes

from server.http.base import HttpLimits
from server.http.server import HttpServer
from tests.abuse_helpers import PREFACE, goaway_code, h2_frame, h2_frames
from tests.http_helpers import H2Client, H2Response, connect, h2_client, read_until_eof, running_server

_HEADERS = 0x1
_SETTINGS = 0x4
_PUSH_PROMISE = 0x5
_CONTINUATION = 0x9
_END_STREAM = 0x1
_END_HEADERS = 0x4
CALM = int(ErrorCodes.ENHANCE_YOUR_CALM)


def header_block(client: H2Client, path: str, *, pad: int = 0) -> tuple[int, int, bytes]:
    """Have ``client``'s h2 encode a GET for ``path`` and take the HEADERS frame back unsent:
    ``(stream id, flags, HPACK block)``, for the caller to send in pieces (h2's HPACK state stays
    right; ``pad`` adds a header of that many bytes so the block has room to trickle)."""
    assert not client.conn.data_to_send()  # nothing else queued: the next frame is this HEADERS
    sid = client.request(path, headers=[("x-pad", "p" * pad)] if pad else None)
    ((kind, flags, frame_sid, block),) = list(h2_frames(client.conn.data_to_send()))
    assert (kind, frame_sid) == (_HEADERS, sid) and flags & _END_HEADERS
    return sid, flags, block


def split_block(sid: int, flags: int, block: bytes, sizes: list[int]) -> list[bytes]:
    """``block`` as HEADERS then CONTINUATION frames of ``sizes`` bytes (the rest in the last),
    END_HEADERS on the last only."""
    pieces: list[bytes] = []
    pos = 0
    for size in [*sizes, len(block)]:
        pieces.append(block[pos : pos + size])
        pos += size
        if pos >= len(block):
            break
    frames = [h2_frame(_HEADERS, flags & ~_END_HEADERS, sid, pieces[0])]
    frames += [h2_frame(_CONTINUATION, 0, sid, piece) for piece in pieces[1:]]
    last = frames[-1]
    return [*frames[:-1], last[:4] + bytes([last[4] | _END_HEADERS]) + last[5:]]


async def trickle(sock: trio.socket.SocketType, pieces: list[bytes], interval: float, sent: trio.Event) -> None:
    """Send ``pieces`` one every ``interval`` seconds (the first at once); set ``sent`` after the
    second; stop quietly once the server has closed the connection.

    Nagle is off: a small segment held back for a delayed ACK (real time) would reach the server
    only after the mock clock had jumped past its deadlines."""
    sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
    for i, piece in enumerate(pieces):
        if i:
            await trio.sleep(interval)
        try:
            await sock.send(piece)
        except OSError:
            return
        if i == 1:
            sent.set()


async def goaway_then_eof(client: H2Client) -> int | None:
    """Read ``client``'s connection to EOF through its h2 (without sending anything: no frame may
    interleave with an open header block); the GOAWAY error code, if one came."""
    code = None
    while True:
        try:
            data = await client.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            return code
        for event in client.conn.receive_data(data):
            if isinstance(event, h2.events.ConnectionTerminated):
                code = int(event.error_code or 0)


async def served_meanwhile(server: HttpServer, port: int) -> None:
    """A bystander on another connection gets its answer while the slow one is still open."""
    bystander = await h2_client(port)
    sid = bystander.request("/echo?who=bystander")
    await bystander.flush()
    await bystander.pump_until(lambda: bystander.finished(sid))
    response = bystander.responses[sid]
    assert response.headers[b":status"] == b"200"
    assert json.loads(response.data)["query"] == {"who": "bystander"}
    assert server.stats.header_timeouts == 0  # the slow block was not cut yet
    bystander.sock.close()


async def cut_while_trickling(
    server: HttpServer,
    port: int,
    sock: trio.socket.SocketType,
    pieces: list[bytes],
    read: Callable[[], Awaitable[int | None]],
) -> None:
    """Trickle ``pieces`` one a second on ``sock`` (``header_timeout`` is 5 s): a bystander is
    served meanwhile, and ``read`` (to the end of the connection) sees GOAWAY ENHANCE_YOUR_CALM
    between 5 and 6 s after the first piece, counted once in ``header_timeouts``."""
    start = trio.current_time()
    sent = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle, sock, pieces, 1.0, sent)
        await sent.wait()
        await served_meanwhile(server, port)
        code = await read()
        nursery.cancel_scope.cancel()
    assert code == CALM
    assert 5.0 <= trio.current_time() - start < 6.0
    assert server.stats.header_timeouts == 1


async def goaway_of(sock: trio.socket.SocketType) -> int | None:
    """The GOAWAY error code in what ``sock`` receives until EOF."""
    return goaway_code(await read_until_eof(sock))


async def test_trickled_header_block_is_cut_even_with_a_stream_open(autojump_clock: trio.testing.MockClock) -> None:
    limits = HttpLimits(header_timeout=5.0)
    with trio.fail_after(60):
        async with running_server(limits=limits) as (server, port, app):
            client = await h2_client(port)
            busy = client.request("/forever")  # before the fix, an open stream meant no deadline at all
            await client.flush()
            await client.pump_until(lambda: bool(client.responses[busy].data))
            await app.state.started.wait()
            sid, flags, block = header_block(client, "/echo", pad=100)
            pieces = split_block(sid, flags, block, [1] * len(block))[:-1]  # 1 byte a second; never END_HEADERS
            assert len(pieces) > 20
            await cut_while_trickling(server, port, client.sock, pieces, partial(goaway_then_eof, client))
            await app.state.cancelled.wait()  # the open stream's handler was cancelled with the connection
            assert server.stats.h2_calm == 1
            assert server.stats.protocol_errors == 0


async def test_one_headers_frame_trickled_is_cut(autojump_clock: trio.testing.MockClock) -> None:
    """END_HEADERS already set, but the frame's payload arrives a byte a second: the same stall."""
    limits = HttpLimits(header_timeout=5.0)
    with trio.fail_after(60):
        async with running_server(limits=limits) as (server, port, _app):
            client = await h2_client(port)
            await client.pump_until(lambda: client.remote_settings_seen)
            sid, flags, block = header_block(client, "/echo", pad=100)
            frame = h2_frame(_HEADERS, flags, sid, block)
            pieces = [frame[:10], *(frame[i : i + 1] for i in range(10, len(frame) - 1))]  # never the last byte
            await cut_while_trickling(server, port, client.sock, pieces, partial(goaway_then_eof, client))


async def test_push_promise_block_is_cut(autojump_clock: trio.testing.MockClock) -> None:
    """A client may not push, but h2 holds the block whole before it can say so."""
    limits = HttpLimits(header_timeout=5.0)
    with trio.fail_after(60):
        async with running_server(limits=limits) as (server, port, _app):
            sock = await connect(port)
            opening = PREFACE + h2_frame(_SETTINGS, 0, 0) + h2_frame(_PUSH_PROMISE, 0, 1, b"\x00\x00\x00\x02\x82")
            pieces = [opening, *(h2_frame(_CONTINUATION, 0, 1, b"\x84") for _ in range(30))]
            await cut_while_trickling(server, port, sock, pieces, partial(goaway_of, sock))


async def test_slow_header_blocks_finished_in_time_are_served(autojump_clock: trio.testing.MockClock) -> None:
    """The deadline runs from each block's first frame: two blocks of 4 s each (8 s in all, past
    the 5 s header_timeout) on one connection are both served, and the connection stays."""
    limits = HttpLimits(header_timeout=5.0)
    with trio.fail_after(60):
        async with running_server(limits=limits) as (server, port, _app):
            client = await h2_client(port)
            await client.pump_until(lambda: client.remote_settings_seen)
            await client.flush()
            for n in range(2):
                sid, flags, block = header_block(client, f"/echo?n={n}")
                pieces = split_block(sid, flags, block, [2, 2, 2, 2])
                assert len(pieces) == 5
                start = trio.current_time()
                await trickle(client.sock, pieces, 1.0, trio.Event())
                assert 4.0 <= trio.current_time() - start < 5.0  # each block took 4 s, under header_timeout
                await client.pump_until(lambda sid=sid: client.finished(sid))
                response: H2Response = client.responses[sid]
                assert response.headers[b":status"] == b"200"
                assert json.loads(response.data)["query"] == {"n": str(n)}
                await client.flush()
            assert not client.closed and client.goaway is None
            assert server.stats.header_timeouts == 0
            assert server.stats.protocol_errors == 0


async def test_no_settings_after_the_preface_is_cut(autojump_clock: trio.testing.MockClock) -> None:
    """The preface's magic came (so the connection is HTTP/2) but not the SETTINGS that must follow."""
    limits = HttpLimits(header_timeout=5.0, idle_timeout=60.0)
    with trio.fail_after(60):
        async with running_server(limits=limits) as (server, port, _app):
            sock = await connect(port)
            settings = h2_frame(_SETTINGS, 0, 0, b"\x00\x03\x00\x00\x00\x64")
            pieces = [PREFACE, *(settings[i : i + 1] for i in range(len(settings) - 1))]
            await cut_while_trickling(server, port, sock, pieces, partial(goaway_of, sock))


async def test_partial_preface_is_cut_at_header_timeout(autojump_clock: trio.testing.MockClock) -> None:
    """Bounded before any HTTP/2 starts: protocol detection waits at most header_timeout."""
    limits = HttpLimits(header_timeout=5.0, idle_timeout=60.0)
    with trio.fail_after(60):
        async with running_server(limits=limits) as (server, port, _app):
            sock = await connect(port)
            sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)  # see trickle()
            start = trio.current_time()
            await sock.send(PREFACE[:10])
            await served_meanwhile(server, port)
            await read_until_eof(sock)
            assert trio.current_time() - start < 6.0
            while server.connections:
                await trio.sleep(0.1)


async def test_trickled_body_is_408_at_body_timeout(autojump_clock: trio.testing.MockClock) -> None:
    limits = HttpLimits(header_timeout=5.0, body_timeout=3.0)
    with trio.fail_after(60):
        async with running_server(limits=limits) as (server, port, _app):
            client = await h2_client(port)
            client.sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)  # see trickle()
            sid = client.conn.get_next_available_stream_id()
            head = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"t"), (b":path", b"/echo")]
            client.conn.send_headers(sid, [*head, (b"content-length", b"1000")])
            client.responses[sid] = H2Response()
            await client.flush()
            start = trio.current_time()

            async def trickle_body() -> None:
                for _ in range(999):  # a byte every half second: the whole body would take 500 s
                    await trio.sleep(0.5)
                    if client.finished(sid):
                        return
                    client.conn.send_data(sid, b"x")
                    await client.flush()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle_body)
                await client.pump_until(lambda: client.finished(sid))
                elapsed = trio.current_time() - start
                nursery.cancel_scope.cancel()
            response = client.responses[sid]
            assert response.headers[b":status"] == b"408"
            assert json.loads(response.data)["error"] == "timeout"
            assert 3.0 <= elapsed < 4.0
            # only the stream failed: the connection serves the next request
            other = client.request("/echo?after=1")
            await client.flush()
            await client.pump_until(lambda: client.finished(other))
            assert client.responses[other].headers[b":status"] == b"200"
            assert client.goaway is None
            assert server.stats.header_timeouts == 0


async def test_idle_timeout_starts_when_the_last_stream_ends(autojump_clock: trio.testing.MockClock) -> None:
    """The reader waits with no deadline while a stream is open; when that stream's handler ends,
    ``idle_timeout`` is armed on the read in progress, and the silent connection is closed."""
    limits = HttpLimits(idle_timeout=10.0)
    with trio.fail_after(120):
        async with running_server(limits=limits) as (server, port, app):
            app.state.expected_subscribers = 1
            client = await h2_client(port, auto_ack=False)  # it sends nothing once the response ended
            sid = client.request("/sub")
            await client.flush()
            await app.state.subscribed.wait()
            await trio.sleep(30)  # longer than idle_timeout: an open stream is not idle
            assert server.stats.connections_open == 1
            app.state.release.set()
            await client.pump_until(lambda: client.finished(sid))
            released = trio.current_time()
            assert await goaway_then_eof(client) == int(ErrorCodes.NO_ERROR)
            assert 10.0 <= trio.current_time() - released < 11.0
