"""The hot path: a synchronous publish loop over many subscribers costs no task switch per
subscriber (HTTP/1.1: direct socket sends) and one flush per HTTP/2 connection."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from server.core.frame import Frame
from server.http import h2conn
from tests.http_helpers import connect, h2_client, running_server


async def test_http11_publish_goes_straight_to_the_kernel() -> None:
    count = 40
    with trio.fail_after(10):
        async with running_server() as (server, port, app):
            app.state.expected_subscribers = count
            socks = []
            for _ in range(count):
                sock = await connect(port)
                await sock.send(b"GET /sub HTTP/1.1\r\nHost: t\r\n\r\n")
                socks.append(sock)
            await app.state.subscribed.wait()
            frame = Frame(b"data: published\n\n")
            for stream in app.state.subscribers:  # one synchronous loop, no checkpoint
                assert stream.send_frame(frame)
                assert stream.buffered == 0  # handed to the kernel during the call
            for sock in socks:
                data = b""
                while frame.chunked not in data:
                    chunk = await sock.recv(65536)
                    assert chunk
                    data += chunk
            assert server.stats.connections_open == count


async def test_http2_publish_flushes_each_connection_once(monkeypatch: pytest.MonkeyPatch) -> None:
    streams = 50
    pulls: list[int] = []
    original = h2conn.ServerH2Connection.data_to_send

    def counting(self: h2conn.ServerH2Connection, amount: int | None = None) -> bytes:
        data = original(self, amount)
        pulls.append(len(data))
        return data

    monkeypatch.setattr(h2conn.ServerH2Connection, "data_to_send", counting)
    with trio.fail_after(10):
        async with running_server() as (_, port, app):
            app.state.expected_subscribers = streams
            client = await h2_client(port)
            sids = [client.request("/sub") for _ in range(streams)]
            await client.flush()
            await client.pump_until(lambda: all(client.responses[s].headers for s in sids))
            await app.state.subscribed.wait()
            await trio.testing.wait_all_tasks_blocked()
            pulls.clear()
            frame = Frame(b"data: published\n\n")
            for stream in app.state.subscribers:
                assert stream.send_frame(frame)
            assert pulls == []  # nothing flushed per stream
            await trio.testing.wait_all_tasks_blocked()
            assert len(pulls) == 1  # one flush for the whole connection
            await client.pump_until(lambda: all(client.responses[s].data == frame.raw for s in sids))
