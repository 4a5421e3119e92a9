"""The registry's graceful-close hook (idle connections close, in-flight responses finish first),
``Exchange.on_close_request``, ``HttpServer.stop_accepting`` / ``drain`` and connection rotation."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from h2.errors import ErrorCodes
from trio_websocket import ConnectionClosed, open_websocket_url

from server.http.base import Exchange, HttpLimits
from server.http.connection import FRESH_GRACE
from server.http.h2conn import PREFACE
from server.http.listener import bind_tcp_listener
from server.http.server import HttpServer, serve_http
from tests.http_helpers import App, H2Client, connect, h2_client, read_response, read_until_eof, running_server


class WindDownApp(App):
    """``/wind`` streams until the connection is asked to close, then says so and finishes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.opened = 0
        self.all_open = trio.Event()
        self.expected = 1

    async def __call__(self, ex: Exchange) -> None:
        if ex.request.path != "/wind":
            await super().__call__(ex)
            return
        stream = await ex.open_stream(200, [("content-type", "text/event-stream")])
        asked = trio.Event()

        def first() -> None:
            self.calls.append("first")
            asked.set()

        ex.on_close_request(first)
        ex.on_close_request(lambda: self.calls.append("second"))
        self.opened += 1
        if self.opened == self.expected:
            self.all_open.set()
        await asked.wait()
        late: list[str] = []
        ex.on_close_request(lambda: late.append("late"))
        assert late == ["late"]  # registered after the request: called at once
        stream.send(b"data: bye\n\n")
        await stream.finish()


async def test_http11_idle_closes_and_busy_finishes_first() -> None:
    with trio.fail_after(10):
        async with running_server() as (server, port, app):
            app.state.expected_subscribers = 1
            idle = await connect(port)
            await idle.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            status, _, _ = await read_response(idle, bytearray())
            assert status == 200
            busy = await connect(port)
            await busy.send(b"GET /sub HTTP/1.1\r\nHost: t\r\n\r\n")
            await app.state.subscribed.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert len(server.connections) == 2
            server.request_close_all()
            assert await read_until_eof(idle) == b""
            stream = app.state.subscribers[0]
            assert stream.send(b"data: last\n\n")
            await stream.finish()
            app.state.release.set()
            reply = await read_until_eof(busy)  # the response ends, then the connection
            assert reply.endswith(b"data: last\n\n\r\n0\r\n\r\n")


async def test_http2_streams_finish_new_ones_are_refused_then_goaway() -> None:
    with trio.fail_after(10):
        async with running_server() as (server, port, app):
            app.state.expected_subscribers = 2
            client = await h2_client(port)
            sids = [client.request("/sub"), client.request("/sub")]
            await client.flush()
            await app.state.subscribed.wait()
            server.request_close_all()
            late = client.request("/echo")
            await client.flush()
            await client.pump_until(lambda: client.finished(late))
            assert client.responses[late].reset == ErrorCodes.REFUSED_STREAM
            for stream in app.state.subscribers:
                assert stream.send(b"data: bye\n\n")
                await stream.finish()
            app.state.release.set()
            await client.pump_until(lambda: False)  # until the server closes the connection
            assert client.goaway == ErrorCodes.NO_ERROR
            assert all(client.responses[s].ended and client.responses[s].data == b"data: bye\n\n" for s in sids)


async def test_websocket_gets_1012() -> None:
    with trio.fail_after(10):
        async with (
            running_server() as (server, port, _app),
            open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws,
        ):
            await ws.send_message("hi")
            assert await ws.get_message() == "hi"
            server.request_close_all()
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            assert info.value.reason is not None
            assert info.value.reason.code == 1012


async def test_http11_exchange_is_told_once_then_the_connection_closes() -> None:
    app = WindDownApp()
    with trio.fail_after(10):
        async with running_server(app) as (server, port, _):
            sock = await connect(port)
            await sock.send(b"GET /wind HTTP/1.1\r\nHost: t\r\n\r\n")
            await app.all_open.wait()
            server.request_close_all()
            server.request_close_all()  # a second request changes nothing
            reply = await read_until_eof(sock)
            assert reply.endswith(b"data: bye\n\n\r\n0\r\n\r\n")
            assert app.calls == ["first", "second"]


async def test_http2_streams_are_told_then_goaway() -> None:
    app = WindDownApp()
    app.expected = 2
    with trio.fail_after(10):
        async with running_server(app) as (server, port, _):
            client = await h2_client(port)
            sids = [client.request("/wind"), client.request("/wind")]
            await client.flush()
            await app.all_open.wait()
            server.request_close_all()
            await client.pump_until(lambda: False)
            assert client.goaway == ErrorCodes.NO_ERROR
            assert all(client.responses[s].ended and client.responses[s].data == b"data: bye\n\n" for s in sids)
            assert app.calls == ["first", "second"] * 2


async def test_only_silent_old_connections_close_at_once(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with running_server() as (server, port, _):
            silent = await connect(port)
            partial = await connect(port)
            await partial.send(PREFACE[:10])  # HTTP/2 prior knowledge, preface not complete yet
            await trio.sleep(FRESH_GRACE)  # (virtual time) silent is no longer new
            fresh = await connect(port)  # its request may be on the way
            await trio.testing.wait_all_tasks_blocked()
            assert len(server.connections) == 3  # all accepted, protocols not known yet
            server.request_close_all()
            assert await read_until_eof(silent) == b""
            await fresh.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, _ = await read_response(fresh, bytearray())
            assert (status, headers.get("connection")) == (200, "close")
            assert await read_until_eof(fresh) == b""
            client = H2Client(partial)
            client.conn.initiate_connection()
            sid = client.request("/echo")
            data = client.conn.data_to_send()
            assert data.startswith(PREFACE[:10])
            await partial.send(data[10:])
            await client.pump_until(lambda: False)  # served, then GOAWAY and the end
            assert client.responses[sid].ended and client.responses[sid].headers[b":status"] == b"200"
            assert client.goaway == ErrorCodes.NO_ERROR


async def test_stop_accepting_leaves_the_queue_to_the_next_server() -> None:
    listener = bind_tcp_listener("127.0.0.1", 0)
    port = listener.getsockname()[1]
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                first: HttpServer = await nursery.start(serve_http, [listener], App())
                first.stop_accepting()
                assert not first.accepting
                await trio.testing.wait_all_tasks_blocked()
                sock = await connect(port)  # completes in the kernel's queue
                await sock.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
                await trio.testing.wait_all_tasks_blocked()
                assert not first.connections and first.stats.connections_total == 0
                second: HttpServer = await nursery.start(serve_http, [listener], App())
                status, _, _ = await read_response(sock, bytearray())
                assert status == 200 and second.stats.connections_total == 1
                nursery.cancel_scope.cancel()
    finally:
        listener.close()


async def test_drain_cuts_what_is_left_at_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        async with running_server() as (server, port, app):
            stuck = await connect(port)
            await stuck.send(b"GET /forever HTTP/1.1\r\nHost: t\r\n\r\n")
            idle = await connect(port)
            await idle.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await read_response(idle, bytearray()))[0] == 200
            await app.state.started.wait()
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            await server.drain(2.0, 5.0)
            assert 5.0 <= trio.current_time() - start <= 5.0 + 1.0
            assert app.state.cancelled.is_set() and not server.connections
            assert server.stats.drain_aborted == 1
            assert await read_until_eof(idle) == b""


async def test_idle_connection_rotates_at_its_age(autojump_clock: trio.testing.MockClock) -> None:
    limits = HttpLimits(max_connection_age=30.0, max_connection_age_jitter=0.0, idle_timeout=300.0)
    with trio.fail_after(120):
        async with running_server(limits=limits) as (server, port, _):
            start = trio.current_time()
            sock = await connect(port)
            await sock.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await read_response(sock, bytearray()))[0] == 200
            assert await read_until_eof(sock) == b""
            assert trio.current_time() - start == pytest.approx(30.0, abs=0.01)
            assert server.stats.connections_rotated == 1
