"""HTTP/1.1 engine tests over real sockets: raw trio sockets and curl."""

from __future__ import annotations

import json
import socket
import subprocess

import h11
import pytest
import trio

from server.http.base import Exchange, HttpLimits
from tests.http_helpers import App, client_socket, connect, read_response, read_until_eof, running_server

CURL = "/usr/bin/curl"


async def test_keep_alive_two_requests_on_one_connection() -> None:
    with trio.fail_after(10):
        async with running_server() as (server, port, _):
            sock = await connect(port)
            buf = bytearray()
            await sock.send(b"GET /echo?a=1&a=2&b=%20x HTTP/1.1\r\nHost: t\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n")
            status, headers, body = await read_response(sock, buf)
            assert status == 200
            info = json.loads(body)
            assert info["query"] == {"a": "1", "b": " x"}
            assert info["headers"]["cookie"] == "a=1; b=2"
            assert info["version"] == "1.1"
            assert "date" not in headers
            await sock.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
            status, _, body = await read_response(sock, buf)
            assert status == 200
            assert json.loads(body)["body"] == "hello"
            assert server.stats.connections_total == 1
            sock.close()


async def test_pipelined_requests_are_answered_in_order() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, port, _app):
            sock = await connect(port)
            await sock.send(
                b"GET /echo?i=1 HTTP/1.1\r\nHost: t\r\n\r\n"
                b"GET /stream?n=3 HTTP/1.1\r\nHost: t\r\n\r\n"
                b"POST /echo?i=3 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            )
            buf = bytearray()
            _, _, body = await read_response(sock, buf)
            assert json.loads(body)["query"] == {"i": "1"}
            _, headers, body = await read_response(sock, buf)
            assert headers["transfer-encoding"] == "chunked"
            assert body == b"data: e-0\n\ndata: e-1\n\ndata: e-2\n\n"
            _status, _, body = await read_response(sock, buf)
            assert json.loads(body)["body"] == "abc"
            sock.close()


async def test_after_a_stream_ends_the_connection_serves_the_next_request() -> None:
    # While a stream runs, h11's state is parked; a request sent after the stream's last chunk,
    # and one pipelined while it ran, are both served on the same connection.
    with trio.fail_after(10):
        async with running_server() as (server, port, _app):
            sock = await connect(port)
            buf = bytearray()
            await sock.send(b"GET /stream?n=2 HTTP/1.1\r\nHost: t\r\n\r\n")
            _, headers, body = await read_response(sock, buf)
            assert headers["transfer-encoding"] == "chunked"
            assert body == b"data: e-0\n\ndata: e-1\n\n"
            await sock.send(b"GET /stream?n=1 HTTP/1.1\r\nHost: t\r\n\r\nGET /echo?i=2 HTTP/1.1\r\nHost: t\r\n\r\n")
            _, _, body = await read_response(sock, buf)
            assert body == b"data: e-0\n\n"
            _, _, body = await read_response(sock, buf)
            assert json.loads(body)["query"] == {"i": "2"}
            assert server.stats.connections_total == 1
            sock.close()


class _HeadersAfterOpen(App):
    """Reports the request's headers before and after its streaming response's head is sent."""

    async def __call__(self, ex: Exchange) -> None:
        if ex.request.path != "/held":
            return await super().__call__(ex)
        before = dict(ex.request.headers)
        stream = await ex.open_stream(200, [("content-type", "application/json")])
        stream.send(json.dumps({"before": before, "after": dict(ex.request.headers)}).encode())
        await stream.finish()


async def test_a_long_stream_holds_no_request_headers_and_the_next_request_has_its_own() -> None:
    with trio.fail_after(10):
        async with running_server(_HeadersAfterOpen()) as (_, port, _app):
            sock = await connect(port)
            buf = bytearray()
            await sock.send(b"GET /held HTTP/1.1\r\nHost: t\r\nUser-Agent: " + b"u" * 500 + b"\r\n\r\n")
            _, _, body = await read_response(sock, buf)
            seen = json.loads(body)
            assert seen["before"]["user-agent"] == "u" * 500
            assert seen["after"] == {}  # dropped once the head was sent: not held for the stream
            await sock.send(b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Next: 1\r\n\r\n")
            _, _, body = await read_response(sock, buf)
            assert json.loads(body)["headers"] == {"host": "t", "x-next": "1"}
            sock.close()


async def test_a_stream_asked_with_connection_close_ends_the_connection() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, port, _app):
            sock = await connect(port)
            await sock.send(
                b"GET /stream?n=2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\nGET /echo HTTP/1.1\r\nHost: t\r\n\r\n"
            )
            reply = await read_until_eof(sock)  # the pipelined request is not served
            assert reply.endswith(b"data: e-1\n\n\r\n0\r\n\r\n"), reply
            assert reply.count(b"HTTP/1.1 ") == 1


async def test_streaming_response_arrives_incrementally_with_curl() -> None:
    with trio.fail_after(15):
        async with running_server() as (server, port, app):
            proc = await trio.lowlevel.open_process(
                [CURL, "-sS", "-N", f"http://127.0.0.1:{port}/forever"], stdout=subprocess.PIPE
            )
            try:
                assert proc.stdout is not None
                seen = b""
                while b"data: hello" not in seen:
                    chunk = await proc.stdout.receive_some(1024)
                    assert chunk, "curl ended before the first event"
                    seen += chunk
                # the response is still open: the handler is still running
                assert not app.state.cancelled.is_set()
            finally:
                proc.kill()
                await proc.wait()
            await app.state.cancelled.wait()  # the client went away: the handler was cancelled
            assert server.stats.connections_total == 1


async def test_client_disconnect_cancels_the_handler() -> None:
    with trio.fail_after(10):
        async with running_server() as (server, port, app):
            sock = await connect(port)
            await sock.send(b"GET /forever HTTP/1.1\r\nHost: t\r\n\r\n")
            data = b""
            while b"data: hello" not in data:
                data += await sock.recv(1024)
            sock.close()
            await app.state.cancelled.wait()
            assert server.stats.connections_total == 1


async def test_full_and_streamed_curl_requests() -> None:
    with trio.fail_after(15):
        async with running_server() as (_, port, _app):
            result = await trio.run_process(
                [CURL, "-sS", "-N", f"http://127.0.0.1:{port}/stream?n=4&tag=c"], capture_stdout=True
            )
            assert result.stdout == b"".join(f"data: c-{i}\n\n".encode() for i in range(4))
            result = await trio.run_process(
                [
                    CURL,
                    "-sS",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %{size_download}",
                    f"http://127.0.0.1:{port}/big?size=3000000",
                ],
                capture_stdout=True,
            )
            assert result.stdout == b"200 3000000"


@pytest.mark.parametrize(
    "head",
    [
        b"GET /echo HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(20)) + b"\r\n",
        b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n",
    ],
    ids=["too-many", "too-large"],
)
async def test_431_for_oversized_heads(head: bytes) -> None:
    limits = HttpLimits(max_headers=10, max_header_bytes=2048)
    with trio.fail_after(10):
        async with running_server(limits=limits) as (server, port, _):
            sock = await connect(port)
            await sock.send(head)
            reply = await read_until_eof(sock)
            assert reply.startswith(b"HTTP/1.1 431 ")
            body = json.loads(reply.partition(b"\r\n\r\n")[2])
            assert body["error"] == "headers_too_large"
            assert "message" in body
            assert server.stats.protocol_errors == 1


@pytest.mark.parametrize("chunked", [False, True])
async def test_413_for_a_big_body_then_close(chunked: bool) -> None:
    with trio.fail_after(10):
        async with running_server() as (_, port, _app):
            sock = await connect(port)
            # only the first part of a 5000-byte body: the server must not wait for the rest
            if chunked:
                head = b"POST /echo?limit=50 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1388\r\n"
            else:
                head = b"POST /echo?limit=50 HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n"
            await sock.send(head + b"z" * 100)
            reply = await read_until_eof(sock)
            assert reply.startswith(b"HTTP/1.1 413 ")
            assert b"connection: close" in reply.lower()
            assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"] == "too_large"


async def test_413_for_a_complete_body_also_closes() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, port, _app):
            sock = await connect(port)
            await sock.send(b"POST /echo?limit=50 HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"z" * 100)
            reply = await read_until_eof(sock)
            assert reply.startswith(b"HTTP/1.1 413 ")
            assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"] == "too_large"


async def test_expect_100_continue() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, port, _app):
            sock = await connect(port)
            await sock.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                data += await sock.recv(1024)
            assert data.startswith(b"HTTP/1.1 100 ")
            await sock.send(b"abc")
            buf = bytearray(data.partition(b"\r\n\r\n")[2])
            status, _, body = await read_response(sock, buf)
            assert status == 200
            assert json.loads(body)["body"] == "abc"


async def test_400_for_garbage_and_the_server_keeps_serving() -> None:
    with trio.fail_after(10):
        async with running_server() as (server, port, _):
            sock = await connect(port)
            await sock.send(b"\x00\x01garbage garbage\r\n\r\n")
            reply = await read_until_eof(sock)
            assert reply.startswith(b"HTTP/1.1 400 ")
            assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"] == "bad_request"
            assert server.stats.protocol_errors == 1
            other = await connect(port)
            await other.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            status, _, _ = await read_response(other, bytearray())
            assert status == 200


async def test_handler_errors_become_json() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, port, _app):
            sock = await connect(port)
            buf = bytearray()
            await sock.send(b"GET /teapot HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, body = await read_response(sock, buf)
            assert (status, headers["x-extra"], headers["content-type"]) == (418, "1", "application/json")
            assert json.loads(body) == {"error": "teapot", "message": "short and stout"}
            await sock.send(b"GET /crash HTTP/1.1\r\nHost: t\r\n\r\n")
            status, _, body = await read_response(sock, buf)
            assert status == 500
            assert json.loads(body)["error"] == "internal"
            await sock.send(b"GET /silent HTTP/1.1\r\nHost: t\r\n\r\n")
            status, _, body = await read_response(sock, buf)
            assert status == 500
            await sock.send(b"GET /empty HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, body = await read_response(sock, buf)
            assert (status, body, headers["x-done"]) == (204, b"", "1")
            assert "content-length" not in headers
            await sock.send(b"HEAD /big?size=10 HTTP/1.1\r\nHost: t\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                data += await sock.recv(1024)
            assert data.startswith(b"HTTP/1.1 200 ")
            assert b"content-length: 10\r\n" in data
            assert data.endswith(b"\r\n\r\n")  # no body after a HEAD response


async def _raw_response(sock: trio.socket.SocketType, body_size: int) -> bytes:
    """One response's bytes as sent: its head and a ``body_size`` byte body."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < body_size:
        more = await sock.recv(65536)
        assert more, f"EOF in a response: {data!r}"
        data += more
    return data


async def test_a_small_complete_response_is_the_bytes_h11_would_write() -> None:
    # Written by hand (H1Exchange._by_hand), the bytes must be h11's, and the connection goes on.
    with trio.fail_after(10):
        async with running_server() as (server, port, _app):
            sock = await connect(port)
            for value in (b"a", b"b  c", b""):
                request = b"GET /header?v=" + value.replace(b" ", b"%20") + b" HTTP/1.1\r\nHost: t\r\n\r\n"
                h = h11.Connection(h11.SERVER)
                h.receive_data(request)
                assert isinstance(h.next_event(), h11.Request) and h.next_event() == h11.EndOfMessage()
                headers = [(b"x-value", value), (b"content-length", b"2")]
                expected = h.send(h11.Response(status_code=200, headers=headers, reason=b"OK"))
                expected += h.send(h11.Data(data=b"ok")) + h.send(h11.EndOfMessage())
                await sock.send(request)
                assert await _raw_response(sock, 2) == expected
            assert server.stats.connections_total == 1
            sock.close()


async def test_a_header_value_h11_refuses_is_never_written() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, port, _app):
            sock = await connect(port)
            buf = bytearray()
            await sock.send(b"GET /header?v=a%0D%0Ax-injected:%201 HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, body = await read_response(sock, buf)
            assert status == 500 and "x-injected" not in headers and "x-value" not in headers
            await sock.send(b"GET /header?v=fine HTTP/1.1\r\nHost: t\r\n\r\n")  # the connection goes on
            status, headers, body = await read_response(sock, buf)
            assert (status, headers["x-value"], body) == (200, "fine", b"ok")
            sock.close()


async def test_http10_streaming_is_close_delimited() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, port, _app):
            sock = await connect(port)
            await sock.send(b"GET /stream?n=2 HTTP/1.0\r\n\r\n")
            reply = await read_until_eof(sock)
            head, _, body = reply.partition(b"\r\n\r\n")
            assert b"transfer-encoding" not in head.lower()
            assert body == b"data: e-0\n\ndata: e-1\n\n"


async def test_slowloris_header_timeout(autojump_clock: trio.testing.MockClock) -> None:
    limits = HttpLimits(header_timeout=5.0)
    with trio.fail_after(60):
        async with running_server(limits=limits) as (_, port, _app):
            sock = await connect(port)
            start = trio.current_time()
            await sock.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n")
            reply = await read_until_eof(sock)
            assert reply.startswith(b"HTTP/1.1 408 ")
            assert trio.current_time() - start >= 5.0


async def test_idle_keep_alive_connection_is_closed(autojump_clock: trio.testing.MockClock) -> None:
    limits = HttpLimits(idle_timeout=7.0)
    with trio.fail_after(60):
        async with running_server(limits=limits) as (_, port, _app):
            sock = await connect(port)
            await sock.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            buf = bytearray()
            status, _, _ = await read_response(sock, buf)
            assert status == 200
            start = trio.current_time()
            assert await read_until_eof(sock) == b""  # closed silently
            assert trio.current_time() - start >= 7.0


async def test_body_timeout_is_408(autojump_clock: trio.testing.MockClock) -> None:
    limits = HttpLimits(body_timeout=3.0)
    with trio.fail_after(60):
        async with running_server(limits=limits) as (_, port, _app):
            sock = await connect(port)
            await sock.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
            reply = await read_until_eof(sock)
            assert reply.startswith(b"HTTP/1.1 408 ")
            assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"] == "timeout"


def _tiny_receive_buffer(sock: trio.socket.SocketType) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)


async def test_slow_consumer_is_disconnected_and_memory_stays_bounded() -> None:
    limits = HttpLimits(send_buffer=256 * 1024, send_low_water=16 * 1024)
    frame_size = 64 * 1024
    with trio.fail_after(20):
        async with running_server(limits=limits) as (server, port, app):
            sock = client_socket()
            _tiny_receive_buffer(sock)
            await sock.connect(("127.0.0.1", port))
            await sock.send(b"GET /flood?size=%d HTTP/1.1\r\nHost: t\r\n\r\n" % frame_size)
            await app.state.flood_done.wait()  # never reading: the server gives up on us
            assert app.state.flood_result in ("send returned False", "cancelled")
            assert server.stats.slow_consumers == 1
            assert app.state.max_buffered <= limits.send_buffer
            sock.close()


async def test_stalled_writer_hits_send_timeout(autojump_clock: trio.testing.MockClock) -> None:
    limits = HttpLimits(send_timeout=4.0, send_buffer=256 * 1024, send_low_water=16 * 1024)
    with trio.fail_after(120):
        async with running_server(limits=limits) as (server, port, app):
            sock = client_socket()
            _tiny_receive_buffer(sock)
            await sock.connect(("127.0.0.1", port))
            await sock.send(b"GET /flood?size=16384&drain=1 HTTP/1.1\r\nHost: t\r\n\r\n")
            await app.state.flood_done.wait()
            assert server.stats.send_timeouts == 1
            assert server.stats.slow_consumers == 0
            assert app.state.max_buffered <= limits.send_buffer
            sock.close()
