"""The registry's graceful-close hook: idle connections close, in-flight responses finish first."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from h2.errors import ErrorCodes
from trio_websocket import ConnectionClosed, open_websocket_url

from tests.http_helpers import connect, h2_client, read_response, read_until_eof, running_server


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
