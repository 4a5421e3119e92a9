"""Connection caps in the engine: a flood from one address against the per-address cap, the total
cap, and how refusals look on HTTP/1.1, h2c and TLS."""

from __future__ import annotations

import os
import re
import resource
import ssl
from pathlib import Path

import pytest
import trio
import trustme
from trio_websocket import ConnectionClosed, open_websocket_url

from server.http.h2conn import PREFACE
from tests.abuse_helpers import ROUND_DEADLINE, MemoryWatch, bystander, check_memory
from tests.client import Running, start_sluice
from tests.haproxy import get, open_from, read_head, read_to_eof
from tests.supervised import supervisor

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
REFUSED_BODY = b'{"error":"overloaded","message":"too many connections"}'
FD_MARGIN = 200  # descriptors left for everything else in the process
MAX_BATCH = 500  # connection attempts in flight at once


def admitted(running: Running, address: str | None = None) -> int:
    """Connections holding a cap ticket (from ``address``, or from anywhere)."""
    return sum(
        1
        for conn in running.worker.http.connections
        if conn.release is not None and (address is None or conn.client[0] == address)
    )


def batch_size(held: int) -> int:
    """Attempts to run at once within the descriptor budget: each costs two (both ends are in
    this process), as does each held connection."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    budget = (soft - in_use - FD_MARGIN) // 2 - held
    assert budget >= 10, f"too few file descriptors for this test: limit {soft}, {in_use} in use"
    return min(MAX_BATCH, budget)


async def wait_until_admitted(running: Running, count: int) -> None:
    """Wait (the caller bounds it) until exactly ``count`` connections hold a ticket; polls, since
    a client cannot see when the worker has finished closing its side of a connection."""
    while admitted(running) != count:
        await trio.sleep(0.01)


def assert_refusal(reply: bytes, retry_after: int) -> None:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 503 Service Unavailable"
    assert sorted(lines[1:]) == sorted(
        [
            b"Retry-After: %d" % retry_after,
            b"Content-Type: application/json",
            b"Content-Length: %d" % len(REFUSED_BODY),
            b"Connection: close",
        ]
    )
    assert body == REFUSED_BODY


async def attempt(port: int, source: str) -> bytes:
    """One connection from ``source``: a request, then everything until the worker closes."""
    stream = await open_from(source, port)
    try:
        await stream.send_all(REQUEST)
        return await read_to_eof(stream)
    finally:
        await stream.aclose()


async def hold(port: int, source: str, count: int) -> list[trio.SocketStream]:
    """``count`` admitted keep-alive connections from ``source`` (each answered one request)."""
    streams = []
    for _ in range(count):
        stream = await open_from(source, port)
        streams.append(stream)
        status, _, _ = await get(stream)
        assert status == 200
    return streams


async def test_flood_from_one_address_is_capped_per_address(nursery: trio.Nursery, tmp_path: Path) -> None:
    """10,000 attempts from 127.0.0.5 against a cap of 50: never more than 50 admitted, every
    other attempt gets the 503, other addresses are served throughout (a bystander from 127.0.0.1
    completes a round during every fourth batch, and a plain GET from 127.0.0.6 is answered in
    each of those batches), memory grows by at most 50 MiB, and afterwards the count is back to
    zero (exactly 50 new connections from 127.0.0.5 are admitted again)."""
    cap, total = 50, 10_000
    running = await start_sluice(
        nursery, tmp_path, "memory", limits={"max_connections_per_address": cap, "retry_after_seconds": 3}
    )
    port = running.port
    with trio.fail_after(30):
        held = await hold(port, "127.0.0.5", cap)
    assert admitted(running, "127.0.0.5") == cap
    replies: list[bytes] = []
    most = 0

    async def one(i: int) -> None:
        nonlocal most
        reply = await attempt(port, "127.0.0.5")
        if i % 50 == 0:
            most = max(most, admitted(running, "127.0.0.5"))
            assert_refusal(reply, 3)
        replies.append(reply[:13])

    async def other_address() -> None:
        with trio.fail_after(ROUND_DEADLINE):
            stream = await open_from("127.0.0.6", port)
            status, _, _ = await get(stream)
            assert status == 200
            await stream.aclose()

    size = batch_size(cap)
    start = 0
    checked_batches = 0
    async with bystander(running, pause=0.01) as by:
        watch = MemoryWatch()
        while start < total:
            count = min(size, total - start)
            with trio.fail_after(60):
                async with trio.open_nursery() as batch:
                    for i in range(start, start + count):
                        batch.start_soon(one, i)
                    if (start // size) % 4 == 0:
                        batch.start_soon(other_address)
                        batch.start_soon(by.fresh_round)
                        checked_batches += 1
            start += count
    assert len(replies) == total, by.summary()
    assert set(replies) == {b"HTTP/1.1 503 "}
    assert most == cap
    assert checked_batches >= 5
    check_memory("10,000 attempts from one address", watch, by)

    with trio.fail_after(30):
        for stream in held:
            await stream.aclose()
        await wait_until_admitted(running, 0)
        again = await hold(port, "127.0.0.5", cap)
        assert_refusal(await attempt(port, "127.0.0.5"), 3)
        for stream in again:
            await stream.aclose()
        await wait_until_admitted(running, 0)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


async def test_total_cap_refuses_http11_h2c_and_tls(nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA) -> None:
    """With 10 connections open in total, every other address is refused: 503 on HTTP/1.1 and
    h2c (the same HTTP/1.1 bytes), close 1013 on a WebSocket, TLS closed before any handshake;
    one closing frees a slot."""
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    cap = 10
    running = await start_sluice(
        nursery,
        tmp_path,
        "memory",
        server={"tls_cert": str(pem), "tls_key": str(pem), "tls_allow_plaintext": True},  # plaintext beside TLS
        limits={"max_connections": cap, "retry_after_seconds": 7},
    )
    port = running.port
    with trio.fail_after(30):
        held = [stream for i in range(cap) for stream in await hold(port, f"127.0.1.{i + 1}", 1)]
        assert admitted(running) == cap

        async with trio.open_nursery() as batch:
            for i in range(300):
                batch.start_soon(_refused, port, f"127.0.2.{i % 250 + 1}")
        assert admitted(running) == cap

        h2c = await open_from("127.0.0.20", port)
        await h2c.send_all(PREFACE)
        assert_refusal(await read_to_eof(h2c), 7)
        await h2c.aclose()

        context = ssl.create_default_context()
        ca.configure_trust(context)
        tls = trio.SSLStream(await open_from("127.0.0.21", port), context, server_hostname="127.0.0.1")
        with pytest.raises(trio.BrokenResourceError):
            await tls.do_handshake()
        await tls.transport_stream.aclose()
        # a WebSocket client gets its handshake answered and the close code 1013 (Try Again Later)
        url = f"ws://127.0.0.1:{port}/v1/ws"
        async with open_websocket_url(url, subprotocols=["sluice.json.v1"]) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
        reason = closed.value.reason
        assert reason is not None and (reason.code, reason.reason) == (1013, "too many connections; retry after 7 s")
        assert running.worker.http.stats.connections_open >= cap
        assert running.worker.http.stats.connections_refused == 300 + 3  # HTTP/1.1, h2c, TLS, WebSocket

        await held.pop().aclose()
        await wait_until_admitted(running, cap - 1)
        newcomer = await open_from("127.0.0.22", port)
        status, _, _ = await get(newcomer)
        assert status == 200
        assert_refusal(await attempt(port, "127.0.0.23"), 7)
        for stream in [*held, newcomer]:
            await stream.aclose()
        await wait_until_admitted(running, 0)


async def _refused(port: int, source: str) -> None:
    stream = await open_from(source, port)
    await stream.send_all(REQUEST)
    buf = bytearray()
    status, headers = await read_head(stream, buf)
    assert (status, headers["retry-after"]) == (503, "7")
    await stream.aclose()


@pytest.mark.slow
async def test_the_per_address_cap_is_per_host_over_two_workers(tmp_path: Path) -> None:
    """Two workers with a per-address cap of 4 per host admit 4 connections from one address in
    all (each its share, 2; SO_REUSEPORT spreads the connections), not 8; the refusals are
    logged at most once per worker and address, and counted in /metrics."""
    cap, attempts, source = 4, 24, "127.0.3.1"
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    args = ("--workers", "2", "--set", f"limits.max_connections_per_address={cap}")
    with trio.fail_after(60):
        async with supervisor(tmp_path, *args, env={"RUNTIME_DIRECTORY": str(run)}) as sup:
            await sup.ready()
            held: list[trio.SocketStream] = []
            for _ in range(attempts):  # one at a time: the kernel picks the worker by the source port
                stream = await open_from(source, sup.port)
                status, _, _ = await get(stream)
                if status == 200:
                    held.append(stream)
                else:
                    assert status == 503
                    await stream.aclose()
            assert len(held) == cap
            bystander_stream = await open_from("127.0.3.2", sup.port)  # other addresses are not held back
            assert (await get(bystander_stream))[0] == 200

            refused = attempts - cap
            sample = 'sluice_edge_connections_refused_total{reason="per_address"}'
            while True:  # host totals: the other worker's count arrives with its next snapshot
                scraper = await open_from("127.0.3.3", sup.port)
                status, _, body = await get(scraper, "/metrics")
                await scraper.aclose()
                assert status == 200
                found = re.search(rf"^{re.escape(sample)} (\d+)$", body.decode(), re.M)
                if found and int(found.group(1)) == refused:
                    break
                assert found is None or int(found.group(1)) < refused, body.decode()
                await trio.sleep(0.1)

            warnings = re.findall(rf"WARNING .*refused a connection from {re.escape(source)}: (.*)", sup.log())
            assert 1 <= len(warnings) <= 2, warnings  # at most once per worker within refusal_log_interval
            expected = f"limits.max_connections_per_address ({cap} per host, 2 on this worker of 2)"
            assert all(w.startswith(expected) for w in warnings), warnings
            for stream in [*held, bystander_stream]:
                await stream.aclose()
