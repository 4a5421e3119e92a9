"""Plaintext on a TLS port: refused by default (HTTP/1.1 gets a short 400, h2c prior knowledge is
closed), served beside TLS with ``server.tls_allow_plaintext``; HTTPS is not affected."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest
import trio
import trustme

from server.http.h2conn import PREFACE
from tests.client import Running, start_sluice
from tests.http_helpers import read_until_eof

CURL = "/usr/bin/curl"


@pytest.fixture
def cert(tmp_path: Path) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    return ca, pem


async def _tls_sluice(nursery: trio.Nursery, tmp_path: Path, pem: Path, **server: object) -> Running:
    return await start_sluice(nursery, tmp_path, server={"tls_cert": str(pem), "tls_key": str(pem), **server})


async def _curl(*args: str) -> tuple[int, bytes]:
    """curl's HTTP status (``-w %{http_code}``) and body."""
    result = await trio.run_process(
        [CURL, "-sS", "--max-time", "10", "-w", "\n%{http_code}", *args], capture_stdout=True, capture_stderr=True
    )
    body, _, code = result.stdout.rpartition(b"\n")
    return int(code), body


async def _raw(port: int, data: bytes) -> bytes:
    """Send ``data`` on a fresh plaintext connection; everything the server sends until it closes."""
    sock = trio.socket.socket()
    with sock:
        await sock.connect(("127.0.0.1", port))
        await sock.send(data)
        return await read_until_eof(sock)


async def test_plaintext_is_refused_on_a_tls_port_by_default(
    nursery: trio.Nursery, tmp_path: Path, cert: tuple[trustme.CA, Path]
) -> None:
    ca, pem = cert
    with trio.fail_after(30):
        s = await _tls_sluice(nursery, tmp_path, pem)
        stats = s.worker.http.stats
        # an HTTPS connection open across the refusals keeps working
        client = ssl.create_default_context()
        ca.configure_trust(client)
        held = await trio.open_ssl_over_tcp_stream("127.0.0.1", s.port, ssl_context=client, https_compatible=True)
        await held.send_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await held.receive_some(65536)).startswith(b"HTTP/1.1 200 ")

        status, body = await _curl(f"http://127.0.0.1:{s.port}/healthz")
        assert status == 400
        assert json.loads(body) == {"error": "tls_required", "message": "this port serves HTTPS only"}
        answer = await _raw(s.port, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert b"\r\nConnection: close\r\n" in answer
        assert await _raw(s.port, PREFACE) == b""  # h2c prior knowledge: just closed
        assert stats.plaintext_refused == 3

        for flag in ("--http1.1", "--http2"):
            status, body = await _curl("--cacert", _ca_file(ca, tmp_path), flag, f"https://127.0.0.1:{s.port}/healthz")
            assert (status, json.loads(body)["status"]) == (200, "ok")
        await held.send_all(b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert (await read_all(held)).startswith(b"HTTP/1.1 200 ")


async def test_plaintext_beside_tls_when_allowed(
    nursery: trio.Nursery, tmp_path: Path, cert: tuple[trustme.CA, Path]
) -> None:
    ca, pem = cert
    with trio.fail_after(30):
        s = await _tls_sluice(nursery, tmp_path, pem, tls_allow_plaintext=True)
        for flag in ("--http1.1", "--http2-prior-knowledge"):
            status, body = await _curl(flag, f"http://127.0.0.1:{s.port}/healthz")
            assert (status, json.loads(body)["status"]) == (200, "ok")
        status, body = await _curl("--cacert", _ca_file(ca, tmp_path), f"https://127.0.0.1:{s.port}/healthz")
        assert (status, json.loads(body)["status"]) == (200, "ok")
        assert s.worker.http.stats.plaintext_refused == 0


async def test_plaintext_without_tls_is_served(sluice: Running) -> None:
    with trio.fail_after(10):
        status, _ = await _curl(f"{sluice.base}/healthz")
        assert status == 200


def _ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything ``stream`` delivers until EOF."""
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data
