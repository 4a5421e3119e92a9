"""PROXY protocol in the engine: a real haproxy (v1 and v2) in front, raw headers from trusted and
untrusted peers, headers split over writes, TLS after the header."""

from __future__ import annotations

import logging
import ssl
import struct
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from server.edge.proxy_protocol import V2_SIGNATURE
from tests.client import Running, start_sluice
from tests.haproxy import SendProxy, get, open_from, read_head, read_to_eof, running_haproxy

PROXY_LOGGER = "server.http.server"
PROBE = "127.0.0.1"  # where haproxy's readiness probes come from


def v2_header(source: tuple[str, int], destination: tuple[str, int], *, local: bool = False) -> bytes:
    """A PROXY v2 header for TCP over IPv4 (``local``: the LOCAL command)."""
    addresses = trio.socket.inet_aton(source[0]) + trio.socket.inet_aton(destination[0])
    addresses += struct.pack("!HH", source[1], destination[1])
    return V2_SIGNATURE + bytes([0x20 if local else 0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


def clients(running: Running, ignore: str = "") -> list[str]:
    """The client addresses of the worker's open connections, but ``ignore`` (haproxy's own
    readiness probes arrive as clients from 127.0.0.1, at a moment the test cannot see)."""
    return sorted(conn.client[0] for conn in running.worker.http.connections if conn.client[0] != ignore)


async def wait_for_clients(running: Running, expected: list[str], ignore: str = "") -> None:
    """Wait (the caller bounds it) until the worker's open connections come from ``expected``;
    polls, since a client cannot see when the worker has finished closing its side."""
    while clients(running, ignore) != sorted(expected):
        await trio.sleep(0.01)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_section(ca: trustme.CA, tmp_path: Path) -> dict[str, object]:
    """``[server]`` settings for TLS with a certificate for 127.0.0.1 from ``ca``."""
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    return {"tls_cert": str(pem), "tls_key": str(pem)}


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(["http/1.1"])
    return context


@pytest.mark.parametrize("send_proxy", ["send-proxy-v2", "send-proxy"])
async def test_haproxy_hands_over_the_real_client_address(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, send_proxy: SendProxy
) -> None:
    """Behind haproxy the worker sees 127.0.0.2, not haproxy's 127.0.0.1: a per-address cap of 1
    turns away a second client from 127.0.0.2 while 127.0.0.3 is served."""
    caplog.set_level(logging.DEBUG, logger=PROXY_LOGGER)
    running = await start_sluice(
        nursery, tmp_path, "memory", proxy={"trusted": ["127.0.0.1"]}, limits={"max_connections_per_address": 1}
    )
    with trio.fail_after(20):
        async with running_haproxy(tmp_path, running.port, send_proxy) as port:
            first = await open_from("127.0.0.2", port)
            status, _, _ = await get(first)
            assert status == 200
            assert clients(running, PROBE) == ["127.0.0.2"]
            version = "v2" if send_proxy == "send-proxy-v2" else "v1"
            logged = [r.getMessage() for r in caplog.records]
            assert any(
                f"PROXY {version} header from ('127.0.0.1'," in m and "client ('127.0.0.2'," in m for m in logged
            )

            second = await open_from("127.0.0.2", port)
            await second.send_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            reply = await read_to_eof(second)
            assert reply.startswith(b"HTTP/1.1 503 ")
            assert b"\r\nRetry-After: 5\r\n" in reply
            assert reply.endswith(b'{"error":"overloaded","message":"too many connections"}')
            await second.aclose()

            other = await open_from("127.0.0.3", port)
            status, _, _ = await get(other)
            assert status == 200
            await other.aclose()

            await first.aclose()
            await wait_for_clients(running, [], PROBE)
            again = await open_from("127.0.0.2", port)
            status, _, _ = await get(again)
            assert status == 200
            await again.aclose()
    assert running.worker.http.stats.protocol_errors == 0


async def test_tls_through_haproxy_after_a_v2_header(
    nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA, tls_section: dict[str, object]
) -> None:
    running = await start_sluice(nursery, tmp_path, "memory", server=tls_section, proxy={"trusted": ["127.0.0.1"]})
    with trio.fail_after(20):
        async with running_haproxy(tmp_path, running.port, "send-proxy-v2") as port:
            raw = await open_from("127.0.0.7", port)
            stream = trio.SSLStream(raw, client_context(ca), server_hostname="127.0.0.1", https_compatible=True)
            status, _, body = await get(stream)
            assert status == 200
            assert b'"status":"ok"' in body.replace(b" ", b"")
            assert clients(running, PROBE) == ["127.0.0.7"]
            assert [c.tls for c in running.worker.http.connections if c.client[0] == "127.0.0.7"] == [True]
            await stream.aclose()


async def test_tls_after_a_raw_v1_header(
    nursery: trio.Nursery, tmp_path: Path, ca: trustme.CA, tls_section: dict[str, object]
) -> None:
    """The ClientHello sent in the same write as the header is left for the TLS layer."""
    running = await start_sluice(nursery, tmp_path, "memory", server=tls_section, proxy={"trusted": ["127.0.0.1"]})
    with trio.fail_after(10):
        raw = await open_from("127.0.0.1", running.port)
        stream = trio.SSLStream(raw, client_context(ca), server_hostname="127.0.0.1", https_compatible=True)
        header = b"PROXY TCP4 192.0.2.9 192.0.2.1 40000 443\r\n"
        await raw.send_all(header)  # small header, then the ClientHello right behind it
        status, _, _ = await get(stream)
        assert status == 200
        assert clients(running) == ["192.0.2.9"]
        await stream.aclose()


async def test_forged_header_from_an_untrusted_peer_is_a_bad_request(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Only 127.0.0.1 is trusted: from 127.0.0.4 a PROXY line is just a malformed request."""
    running = await start_sluice(nursery, tmp_path, "memory", proxy={"trusted": ["127.0.0.1"]})
    with trio.fail_after(10):
        forged = await open_from("127.0.0.4", running.port)
        await forged.send_all(b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\r\nGET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        buf = bytearray()
        status, _ = await read_head(forged, buf)
        assert status == 400
        await forged.aclose()
        other = await open_from("127.0.0.4", running.port)
        status, _, _ = await get(other)
        assert status == 200
        assert clients(running) == ["127.0.0.4"]
        await other.aclose()


@pytest.mark.parametrize(
    "sent",
    [
        b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n",  # no header at all
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 99999\r\nGET /healthz HTTP/1.1\r\nHost: t\r\n\r\n",  # bad port
        b"\x00\x01\x02garbage" * 10,
        V2_SIGNATURE + b"\x21\x11\x00",  # then EOF inside the header
        b"",  # silent until header_timeout
    ],
    ids=["http", "bad-v1", "garbage", "truncated-v2", "silent"],
)
async def test_trusted_peer_without_a_valid_header_is_closed_unanswered(
    nursery: trio.Nursery, tmp_path: Path, sent: bytes
) -> None:
    running = await start_sluice(
        nursery, tmp_path, "memory", proxy={"trusted": ["127.0.0.1"]}, http={"header_timeout": 0.5}
    )
    with trio.fail_after(10):
        stream = await open_from("127.0.0.1", running.port)
        if sent:
            await stream.send_all(sent)
        if sent.startswith(V2_SIGNATURE):
            await stream.send_eof()
        assert await read_to_eof(stream) == b""
        await stream.aclose()
        await wait_for_clients(running, [])
        assert running.worker.http.stats.protocol_errors == 1
        # the worker keeps serving trusted peers that do send a header
        good = await open_from("127.0.0.1", running.port)
        await good.send_all(b"PROXY TCP4 192.0.2.5 192.0.2.1 1234 80\r\n")
        status, _, _ = await get(good)
        assert status == 200
        await good.aclose()


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 192.0.2.44 192.0.2.1 51000 80\r\n",
        v2_header(("192.0.2.44", 51000), ("192.0.2.1", 80)),
    ],
    ids=["v1", "v2"],
)
async def test_header_split_across_writes(nursery: trio.Nursery, tmp_path: Path, header: bytes) -> None:
    """Each piece reaches the worker, which has read it and waits for more, before the next
    one is sent; the last piece carries the request right after the header."""
    running = await start_sluice(nursery, tmp_path, "memory", proxy={"trusted": ["127.0.0.1"]})
    with trio.fail_after(10):
        stream = await open_from("127.0.0.1", running.port)
        stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
        request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
        for piece in (header[:1], header[1:6], header[6:13], header[13:-1]):
            await stream.send_all(piece)
            await trio.testing.wait_all_tasks_blocked()
            assert clients(running) == ["127.0.0.1"]  # not known yet
        await stream.send_all(header[-1:] + request)
        buf = bytearray()
        status, _ = await read_head(stream, buf)
        assert status == 200
        assert clients(running) == ["192.0.2.44"]
        await stream.aclose()


async def test_local_command_keeps_the_peer_address(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A v2 LOCAL header (a health check of the balancer itself) names no client: the peer stays."""
    running = await start_sluice(nursery, tmp_path, "memory", proxy={"trusted": ["127.0.0.0/8"]})
    with trio.fail_after(10):
        stream = await open_from("127.0.0.8", running.port)
        await stream.send_all(v2_header(("10.9.9.9", 1), ("10.9.9.10", 2), local=True))
        status, _, _ = await get(stream)
        assert status == 200
        assert clients(running) == ["127.0.0.8"]
        await stream.aclose()
