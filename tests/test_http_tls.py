"""TLS on the shared port: ALPN h2 and http/1.1, curl and a Python client, plaintext beside it
only when allowed."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest
import trio
import trustme

from server.http.base import HttpLimits
from server.http.h2conn import PREFACE
from server.http.tls import make_server_ssl_context
from tests.http_helpers import connect, read_response, read_until_eof, running_server

CURL = "/usr/bin/curl"


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_context(ca: trustme.CA, tmp_path: Path) -> ssl.SSLContext:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    pem = tmp_path / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    return make_server_ssl_context(str(pem))


def _client_context(ca: trustme.CA, alpn: list[str]) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(alpn)
    return context


@pytest.mark.parametrize(("alpn", "expected"), [(["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1")])
async def test_alpn_selects_the_protocol(
    ca: trustme.CA, server_context: ssl.SSLContext, alpn: list[str], expected: str
) -> None:
    with trio.fail_after(10):
        async with running_server(ssl_context=server_context) as (server, port, _):
            stream = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", port, ssl_context=_client_context(ca, alpn), https_compatible=True
            )
            await stream.do_handshake()
            assert stream.selected_alpn_protocol() == expected
            if expected == "http/1.1":
                await stream.send_all(b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := await stream.receive_some(65536):
                    data += chunk
                assert data.startswith(b"HTTP/1.1 200 ")
                info = json.loads(data.partition(b"\r\n\r\n")[2])
                assert (info["scheme"], info["version"]) == ("https", "1.1")
            await stream.aclose()
            assert server.stats.connections_total == 1


async def test_curl_over_tls_h2_and_http11(server_context: ssl.SSLContext) -> None:
    with trio.fail_after(20):
        async with running_server(ssl_context=server_context) as (_, port, _app):
            url = f"https://127.0.0.1:{port}"
            result = await trio.run_process(
                [CURL, "-sS", "-k", "--http2", "-w", "\n%{http_version}", f"{url}/echo"], capture_stdout=True
            )
            body, _, version = result.stdout.rpartition(b"\n")
            assert version == b"2"
            assert (json.loads(body)["scheme"], json.loads(body)["version"]) == ("https", "2")
            result = await trio.run_process(
                [CURL, "-sS", "-k", "-N", "--http2", f"{url}/stream?n=3&tag=t"], capture_stdout=True
            )
            assert result.stdout == b"data: t-0\n\ndata: t-1\n\ndata: t-2\n\n"
            result = await trio.run_process(
                [CURL, "-sS", "-k", "--http1.1", "-w", "\n%{http_version}", f"{url}/big?size=300000"],
                capture_stdout=True,
            )
            body, _, version = result.stdout.rpartition(b"\n")
            assert (version, body) == (b"1.1", b"x" * 300000)


async def test_plaintext_and_tls_share_the_port_when_allowed(server_context: ssl.SSLContext) -> None:
    with trio.fail_after(10):
        async with running_server(ssl_context=server_context, allow_plaintext=True) as (_, port, _app):
            sock = await connect(port)
            await sock.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            status, _, body = await read_response(sock, bytearray())
            assert status == 200
            assert json.loads(body)["scheme"] == "http"


async def test_plaintext_on_the_tls_port_is_refused_by_default(ca: trustme.CA, server_context: ssl.SSLContext) -> None:
    with trio.fail_after(10):
        async with running_server(ssl_context=server_context) as (server, port, _app):
            sock = await connect(port)
            await sock.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            answer = await read_until_eof(sock)
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 ")
            assert json.loads(body)["error"] == "tls_required"
            sock = await connect(port)
            await sock.send(PREFACE)
            assert await read_until_eof(sock) == b""
            assert server.stats.plaintext_refused == 2
            stream = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", port, ssl_context=_client_context(ca, ["http/1.1"]), https_compatible=True
            )
            await stream.send_all(b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200 ")


async def test_tls_without_a_context_is_closed() -> None:
    with trio.fail_after(10):
        async with running_server() as (server, port, _):
            sock = await connect(port)
            await sock.send(b"\x16\x03\x01\x00\x05hello")
            assert await read_until_eof(sock) == b""
            assert server.stats.protocol_errors == 1


async def test_tls_slow_consumer_is_disconnected(ca: trustme.CA, server_context: ssl.SSLContext) -> None:
    limits = HttpLimits(send_buffer=256 * 1024, send_low_water=16 * 1024)
    with trio.fail_after(20):
        async with running_server(limits=limits, ssl_context=server_context) as (server, port, app):
            stream = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", port, ssl_context=_client_context(ca, ["http/1.1"]), https_compatible=True
            )
            await stream.send_all(b"GET /flood?size=65536 HTTP/1.1\r\nHost: t\r\n\r\n")
            await app.state.flood_done.wait()  # never reading: the server gives up on us
            assert server.stats.slow_consumers == 1
            assert app.state.max_buffered <= limits.send_buffer
            await trio.aclose_forcefully(stream)
