"""The server's one clock for request heads (server.http.headtimer), and what it ends on real
connections: keep-alive idle and slow heads, plain and over TLS, and a close request while idle."""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from server.http.base import HttpLimits
from server.http.headtimer import TICK, HeadTimer
from server.http.tls import make_server_ssl_context
from tests.http_helpers import client_socket, connect, read_response, read_until_eof, running_server


class Waiter:
    def __init__(self, name: str, log: list[tuple[str, float]]) -> None:
        self.name = name
        self.head_slot = -1
        self.log = log
        self.on_expiry: list[object] = []

    def head_expired(self) -> None:
        self.log.append((self.name, trio.current_time()))
        for action in self.on_expiry:
            action()  # type: ignore[operator]


async def _with_timer(body: object) -> None:
    timer = HeadTimer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run)
        await body(timer)  # type: ignore[operator]
        nursery.cancel_scope.cancel()


async def test_a_deadline_fires_once_never_early_and_within_a_tick(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[str, float]] = []

    async def body(timer: HeadTimer) -> None:
        start = trio.current_time()
        a, b = Waiter("a", log), Waiter("b", log)
        timer.arm(a, start + 1.01)
        timer.arm(b, start + 3.0)
        await trio.sleep(10)
        assert [name for name, _ in log] == ["a", "b"]
        for (_, fired), deadline in zip(log, (start + 1.01, start + 3.0), strict=True):
            assert deadline <= fired <= deadline + TICK + 1e-9
        assert a.head_slot == b.head_slot == -1

    with trio.fail_after(60):
        await _with_timer(body)


async def test_disarm_and_rearm(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[str, float]] = []

    async def body(timer: HeadTimer) -> None:
        start = trio.current_time()
        a, b = Waiter("a", log), Waiter("b", log)
        timer.arm(a, start + 1.0)
        timer.arm(b, start + 1.0)
        timer.disarm(a)
        timer.disarm(a)  # twice: a no-op
        timer.arm(b, start + 5.0)  # moved later: not fired at 1 s
        await trio.sleep(2)
        assert log == []
        await trio.sleep(4)
        assert [name for name, _ in log] == ["b"]
        assert log[0][1] >= start + 5.0

    with trio.fail_after(60):
        await _with_timer(body)


async def test_an_earlier_deadline_wakes_the_sleeping_timer(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[str, float]] = []

    async def body(timer: HeadTimer) -> None:
        start = trio.current_time()
        timer.arm(Waiter("late", log), start + 60.0)
        await trio.sleep(1)  # the timer sleeps until 60 s now
        timer.arm(Waiter("early", log), start + 2.0)
        await trio.sleep(2 + TICK)
        assert [name for name, _ in log] == ["early"]

    with trio.fail_after(120):
        await _with_timer(body)


async def test_a_waiter_disarmed_by_another_expiry_is_not_called(autojump_clock: trio.testing.MockClock) -> None:
    log: list[tuple[str, float]] = []

    async def body(timer: HeadTimer) -> None:
        start = trio.current_time()
        a, b = Waiter("a", log), Waiter("b", log)
        a.on_expiry.append(lambda: timer.disarm(b))
        b.on_expiry.append(lambda: timer.disarm(a))
        timer.arm(a, start + 1.0)
        timer.arm(b, start + 1.0)  # same slot: whichever fires first disarms the other
        a.on_expiry.append(lambda: timer.arm(a, trio.current_time() + 1.0))  # and a re-arms itself
        await trio.sleep(1.5)
        assert len(log) == 1

    with trio.fail_after(60):
        await _with_timer(body)


async def test_idle_then_slow_head_on_one_keep_alive_connection(autojump_clock: trio.testing.MockClock) -> None:
    # The idle deadline is replaced by the (shorter) head deadline once the head's first bytes come.
    limits = HttpLimits(idle_timeout=30.0, header_timeout=4.0)
    with trio.fail_after(120):
        async with running_server(limits=limits) as (_, port, _app):
            sock = await connect(port)
            buf = bytearray()
            await sock.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await read_response(sock, buf))[0] == 200
            await trio.sleep(20)  # idle, within idle_timeout
            start = trio.current_time()
            await sock.send(b"GET /echo HTTP/1.1\r\n")
            reply = await read_until_eof(sock)
            assert reply.startswith(b"HTTP/1.1 408 ")
            assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"] == "timeout"
            assert 4.0 <= trio.current_time() - start <= 4.0 + 2 * TICK


async def test_a_close_request_ends_an_idle_keep_alive_connection_at_once() -> None:
    with trio.fail_after(10):
        async with running_server(limits=HttpLimits(idle_timeout=300.0)) as (server, port, _app):
            sock = await connect(port)
            buf = bytearray()
            await sock.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await read_response(sock, buf))[0] == 200
            server.request_close_all()
            assert await read_until_eof(sock) == b""  # closed without an answer, long before 300 s
            sock.close()


async def test_a_head_that_completes_after_its_first_bytes_is_served(autojump_clock: trio.testing.MockClock) -> None:
    limits = HttpLimits(header_timeout=4.0)
    with trio.fail_after(60):
        async with running_server(limits=limits) as (_, port, _app):
            sock = await connect(port)
            # pieces go out at once (no Nagle wait in real time for an ACK while the clock jumps)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = bytearray()
            for _ in range(3):  # requests in pieces, each within the head deadline
                await sock.send(b"GET /echo?x=1 HTTP/1.1\r\n")
                await trio.sleep(3.0)
                await sock.send(b"Host: t\r\n\r\n")
                status, _, body = await read_response(sock, buf)
                assert status == 200 and json.loads(body)["query"] == {"x": "1"}
            sock.close()


@pytest.fixture
def tls_pair(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    client.set_alpn_protocols(["http/1.1"])
    return make_server_ssl_context(str(pem)), client


async def test_over_tls_a_slow_head_is_408_and_an_idle_connection_closes(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext], autojump_clock: trio.testing.MockClock
) -> None:
    server_context, client_context = tls_pair
    limits = HttpLimits(idle_timeout=6.0, header_timeout=3.0)
    with trio.fail_after(120):
        async with running_server(ssl_context=server_context, limits=limits) as (_, port, _app):
            for partial in (b"GET /echo HTTP/1.1\r\nHost: t\r\n", b""):
                stream = await trio.open_ssl_over_tcp_stream(
                    "127.0.0.1", port, ssl_context=client_context, https_compatible=True
                )
                await stream.send_all(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
                data = b""
                while b"}" not in data:
                    data += await stream.receive_some(65536)
                assert data.startswith(b"HTTP/1.1 200 ")
                start = trio.current_time()
                if partial:
                    await stream.send_all(partial)
                rest = b""
                try:
                    while chunk := await stream.receive_some(65536):
                        rest += chunk
                except trio.BrokenResourceError:
                    pass
                waited = trio.current_time() - start
                if partial:
                    assert rest.startswith(b"HTTP/1.1 408 ") and 3.0 <= waited <= 3.0 + 2 * TICK
                else:
                    assert rest == b"" and 6.0 <= waited <= 6.0 + 2 * TICK
                await stream.aclose()


async def test_an_idle_deadline_waits_for_the_last_response_to_be_flushed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The whole response is queued at once (a low-water mark above its size) and the client reads
    # none of it until well past the idle deadline, whose wait started at once: it still gets all
    # of it, then EOF.
    size = 24_000_000
    limits = HttpLimits(idle_timeout=2.0, send_timeout=120.0, send_buffer=4 * size, send_low_water=2 * size)
    with trio.fail_after(300):
        async with running_server(limits=limits) as (server, port, _app):
            sock = client_socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", port))
            await sock.send(b"GET /big?size=%d HTTP/1.1\r\nHost: t\r\n\r\n" % size)
            await trio.sleep(10)  # well past idle_timeout, nothing read
            assert server.stats.connections_open == 1
            reply = await read_until_eof(sock, limit=2 * size)
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and len(body) == size
            sock.close()
