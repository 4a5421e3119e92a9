"""HTTP/2 engine tests: h2c with prior knowledge, with curl and with the h2 library as client."""

from __future__ import annotations

import json

import trio
from h2.errors import ErrorCodes

from server.http.base import HttpLimits
from tests.http_helpers import connect, h2_client, read_response, running_server

CURL = "/usr/bin/curl"


async def test_curl_prior_knowledge_stream_and_echo() -> None:
    with trio.fail_after(15):
        async with running_server() as (_, port, _app):
            result = await trio.run_process(
                [CURL, "-sS", "-N", "--http2-prior-knowledge", f"http://127.0.0.1:{port}/stream?n=3&tag=p"],
                capture_stdout=True,
            )
            assert result.stdout == b"data: p-0\n\ndata: p-1\n\ndata: p-2\n\n"
            result = await trio.run_process(
                [
                    CURL,
                    "-sS",
                    "--http2-prior-knowledge",
                    "-H",
                    "Cookie: a=1",
                    "-H",
                    "Cookie: b=2",
                    "--data-binary",
                    "hello",
                    f"http://127.0.0.1:{port}/echo?x=y",
                ],
                capture_stdout=True,
            )
            info = json.loads(result.stdout)
            assert (info["method"], info["body"], info["version"], info["scheme"]) == ("POST", "hello", "2", "http")
            assert info["query"] == {"x": "y"}
            assert info["headers"]["host"] == f"127.0.0.1:{port}"
            assert info["headers"]["cookie"] == "a=1; b=2"


async def test_fifty_concurrent_streams_on_one_connection() -> None:
    with trio.fail_after(20):
        async with running_server() as (server, port, _app):
            client = await h2_client(port)
            sids = {client.request(f"/stream?n=20&tag=s{i}"): i for i in range(60)}
            await client.flush()
            await client.pump_until(lambda: all(client.finished(sid) for sid in sids))
            for sid, i in sids.items():
                response = client.responses[sid]
                assert response.ended and response.reset is None
                assert response.headers[b":status"] == b"200"
                assert bytes(response.data) == b"".join(f"data: s{i}-{k}\n\n".encode() for k in range(20))
            assert server.stats.connections_total == 1


async def test_tiny_flow_control_window_still_gets_everything() -> None:
    with trio.fail_after(20):
        async with running_server() as (_, port, _app):
            client = await h2_client(port, window=7)
            sids = [client.request(f"/stream?n=30&tag=w{i}") for i in range(3)]
            big = client.request("/big?size=3000")
            await client.flush()
            await client.pump_until(lambda: all(client.finished(s) for s in [*sids, big]))
            for i, sid in enumerate(sids):
                response = client.responses[sid]
                assert bytes(response.data) == b"".join(f"data: w{i}-{k}\n\n".encode() for k in range(30))
                assert response.chunks > 30  # the 12-byte events were split to fit the window
            assert bytes(client.responses[big].data) == b"x" * 3000


async def test_request_body_and_413_on_a_stream() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, port, _app):
            client = await h2_client(port)
            ok = client.request("/echo", method="POST", body=b"b" * 100000)
            big = client.request("/echo?limit=10", method="POST", body=b"b" * 1000)
            empty = client.request("/empty")
            await client.flush()
            await client.pump_until(lambda: all(client.finished(s) for s in (ok, big, empty)))
            assert client.responses[empty].headers[b":status"] == b"204"
            assert client.responses[empty].ended and not client.responses[empty].data
            assert json.loads(client.responses[ok].data)["body"] == "b" * 100000
            assert client.responses[big].headers[b":status"] == b"413"
            assert json.loads(client.responses[big].data)["error"] == "too_large"


async def test_431_on_a_stream_keeps_the_connection() -> None:
    limits = HttpLimits(max_headers=5)
    with trio.fail_after(10):
        async with running_server(limits=limits) as (_, port, _app):
            client = await h2_client(port)
            bad = client.request("/echo", headers=[(f"x-h{i}", "v") for i in range(10)])
            good = client.request("/echo")
            await client.flush()
            await client.pump_until(lambda: client.finished(bad) and client.finished(good))
            assert client.responses[bad].headers[b":status"] == b"431"
            assert json.loads(client.responses[bad].data)["error"] == "headers_too_large"
            assert client.responses[good].headers[b":status"] == b"200"


async def test_client_reset_cancels_the_handler() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, port, app):
            client = await h2_client(port)
            sid = client.request("/forever")
            await client.flush()
            await client.pump_until(lambda: client.responses[sid].data)
            client.conn.reset_stream(sid, ErrorCodes.CANCEL)
            await client.flush()
            await app.state.cancelled.wait()
            other = client.request("/echo")
            await client.flush()
            await client.pump_until(lambda: client.finished(other))
            assert client.responses[other].headers[b":status"] == b"200"


async def test_streams_past_the_limit_are_refused() -> None:
    limits = HttpLimits(h2_max_concurrent_streams=4)
    with trio.fail_after(10):
        async with running_server(limits=limits) as (_, port, _app):
            client = await h2_client(port)
            sids = [client.request("/forever") for _ in range(7)]  # sent before our SETTINGS arrive
            await client.flush()
            await client.pump_until(
                lambda: (
                    sum(client.responses[s].reset is not None for s in sids) == 3
                    and sum(bool(client.responses[s].headers) for s in sids) == 4
                )
            )
            refused = [s for s in sids if client.responses[s].reset is not None]
            assert all(client.responses[s].reset == ErrorCodes.REFUSED_STREAM for s in refused)
            assert client.goaway is None


async def test_protocol_violation_gets_goaway_and_others_are_still_served() -> None:
    with trio.fail_after(10):
        async with running_server() as (server, port, _app):
            healthy = await h2_client(port)
            victim = await h2_client(port)
            await victim.pump_until(lambda: victim.remote_settings_seen)
            await victim.sock.send(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")  # DATA on stream 0
            await victim.pump_until(lambda: False)  # until the server closes it
            assert victim.goaway == ErrorCodes.PROTOCOL_ERROR
            assert server.stats.protocol_errors == 1
            sid = healthy.request("/stream?n=2")
            await healthy.flush()
            await healthy.pump_until(lambda: healthy.finished(sid))
            assert bytes(healthy.responses[sid].data) == b"data: e-0\n\ndata: e-1\n\n"
            plain = await connect(port)
            await plain.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            status, _, _ = await read_response(plain, bytearray())
            assert status == 200


async def test_garbage_after_the_preface_gets_goaway() -> None:
    with trio.fail_after(10):
        async with running_server() as (server, port, _app):
            sock = await connect(port)
            await sock.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64)
            client = await h2_client(port)  # a second, well-behaved connection
            sid = client.request("/echo")
            await client.flush()
            await client.pump_until(lambda: client.finished(sid))
            assert client.responses[sid].headers[b":status"] == b"200"
            data = b""
            while True:
                chunk = await sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            assert b"\x07\x00\x00\x00\x00\x00" in data  # a GOAWAY frame header (type 7, stream 0)
            assert server.stats.protocol_errors == 1


async def test_stream_that_never_opens_its_window_is_reset_as_slow_consumer() -> None:
    limits = HttpLimits(send_buffer=128 * 1024, send_low_water=16 * 1024)
    with trio.fail_after(10):
        async with running_server(limits=limits) as (server, port, app):
            client = await h2_client(port, window=1024, auto_ack=False)
            sid = client.request("/flood?size=16384")
            await client.flush()
            await client.pump_until(lambda: client.finished(sid))
            assert client.responses[sid].reset == ErrorCodes.CANCEL
            await app.state.flood_done.wait()
            assert server.stats.slow_consumers == 1
            assert app.state.max_buffered <= limits.send_buffer + 16384
            other = client.request("/echo")  # the connection itself is fine
            await client.flush()
            await client.pump_until(lambda: client.finished(other))
            assert client.responses[other].headers[b":status"] == b"200"
