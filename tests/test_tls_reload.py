"""Certificate reload without dropping connections, and WebSocket over TLS (``wss://``).

In-process: :func:`reload_certificate` swaps the certificate of a live context. Whole server: a
``sluice serve`` supervisor told SIGUSR1 (or SIGHUP with ``server.sighup = "certificate"``) makes
every worker present the new certificate to new handshakes while an open TLS SSE response keeps
flowing; a pair that does not load is refused.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
from pathlib import Path

import pytest
import trio
import trustme
from trio_websocket import open_websocket_url

from server.http.tls import make_server_ssl_context, reload_certificate
from tests.client import start_sluice
from tests.supervised import supervisor


def _issue(ca: trustme.CA, path: Path) -> None:
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(path))


def _trusting(ca: trustme.CA, alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


async def _handshake(port: int, ca: trustme.CA) -> trio.SSLStream[trio.SocketStream]:
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=_trusting(ca), https_compatible=True)
    await stream.do_handshake()
    return stream


async def _handshake_fails(port: int, ca: trustme.CA) -> bool:
    try:
        stream = await _handshake(port, ca)
    except trio.BrokenResourceError as exc:
        return isinstance(exc.__cause__, ssl.SSLCertVerificationError)
    await stream.aclose()
    return False


def test_reload_certificate_checks_the_pair_first(tmp_path: Path) -> None:
    first, second = trustme.CA(), trustme.CA()
    pem = tmp_path / "a.pem"
    _issue(first, pem)
    context = make_server_ssl_context(str(pem))
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ssl.SSLError):
        reload_certificate(context, str(bad))
    other = tmp_path / "b.pem"
    _issue(second, other)
    reload_certificate(context, str(other))  # a good pair loads


async def _read_until(stream: trio.SSLStream[trio.SocketStream], marker: bytes, seen: bytes = b"") -> bytes:
    while marker not in seen:
        chunk = await stream.receive_some(65536)
        assert chunk, "connection closed"
        seen += chunk
    return seen


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "extra"),
    [(signal.SIGUSR1, ()), (signal.SIGHUP, ("--set", "server.sighup=certificate"))],
    ids=["SIGUSR1", "SIGHUP-certificate"],
)
async def test_certificate_reload_in_every_worker_keeps_connections(
    tmp_path: Path, signum: signal.Signals, extra: tuple[str, ...]
) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert = tmp_path / "cert.pem"
    _issue(old_ca, cert)
    args = ("--workers", "2", "--set", f"server.tls_cert={cert}", "--set", f"server.tls_key={cert}", *extra)
    with trio.fail_after(60):
        async with supervisor(tmp_path, *args) as sup:
            await sup.ready()
            port = sup.port
            # an open SSE response over TLS, on whichever worker took it
            sse = await _handshake(port, old_ca)
            await sse.send_all(
                b"GET /v1/streams/tls?from=start HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n"
            )
            await _read_until(sse, b"retry:")

            new_pem = tmp_path / "new.pem"
            _issue(new_ca, new_pem)
            os.replace(new_pem, cert)
            os.kill(sup.proc.pid, signum)
            while sup.log().count("certificate reloaded from") < 2:
                await trio.sleep(0.05)  # polling the log file: the only signal a subprocess gives
            # new handshakes, on both workers (several tries), present the new certificate
            for _ in range(6):
                stream = await _handshake(port, new_ca)
                await stream.aclose()
                assert await _handshake_fails(port, old_ca)
            # the connection opened before the reload still delivers
            pub = await _handshake(port, new_ca)
            await pub.send_all(
                b"POST /v1/streams/tls HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
            )
            answer = await _read_until(pub, b"\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 201 ")
            assert b"data: hello" in await _read_until(sse, b"data: hello")

            # a pair that does not load is refused once by the supervisor: workers keep the new one
            cert.write_text("garbage\n")
            os.kill(sup.proc.pid, signum)
            while "certificate reload: " not in sup.log():
                await trio.sleep(0.05)
            stream = await _handshake(port, new_ca)
            await stream.aclose()
            assert sup.log().count("certificate reloaded from") == 2
            assert "reload queued" not in sup.log()  # no rolling restart: the workers are the first ones
            await sse.aclose()


async def test_websocket_over_tls(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = tmp_path / "cert.pem"
    _issue(ca, cert)
    with trio.fail_after(10):
        running = await start_sluice(nursery, tmp_path, server={"tls_cert": str(cert), "tls_key": str(cert)})
        url = f"wss://127.0.0.1:{running.port}/v1/ws"
        async with open_websocket_url(url, ssl_context=_trusting(ca), subprotocols=["sluice.json.v1"]) as ws:
            await ws.send_message(json.dumps({"op": "subscribe", "stream": "secure", "from": "start"}))
            await ws.send_message(json.dumps({"op": "publish", "stream": "secure", "data": "over tls", "ref": "r1"}))
            seen: dict[str, dict[str, object]] = {}
            while not {"published", "event"} <= set(seen):
                msg = json.loads(await ws.get_message())
                seen[msg["op"]] = msg
            assert seen["event"]["data"] == "over tls"
            assert seen["published"]["ref"] == "r1"
