"""HTTP/1.1 framing the engine must refuse (400 and close, never read out of step), and pipelined
requests split at every byte boundary. Raw sockets against the real engine."""

from __future__ import annotations

import json

import pytest
import trio

from server.http.base import HttpLimits
from server.http.h1parse import H1Parser
from tests.http_helpers import connect, read_response, read_until_eof, running_server

# sent after each bad request: if the engine lost the framing, this would get an answer
SMUGGLED = b"GET /echo?smuggled=1 HTTP/1.1\r\nHost: t\r\n\r\n"
CHUNKED = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"

BAD = {
    "cl-and-te": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-and-cl": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    "two-content-lengths": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 40\r\n\r\nabc",
    "content-length-list": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3, 40\r\n\r\nabc",
    "content-length-sign": b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: +3\r\n\r\nabc",
    "obs-fold": b"POST /echo HTTP/1.1\r\nHost: t\r\nX-A: a\r\n Content-Length: 40\r\n\r\n",
    "obs-fold-tab": b"GET /echo HTTP/1.1\r\nHost: t\r\nX-A: a\r\n\tb\r\n\r\n",
    "space-first-line": b"GET /echo HTTP/1.1\r\n Host: t\r\n\r\n",
    "bare-lf-request-line": b"GET /echo HTTP/1.1\nHost: t\r\n\r\n",
    "bare-lf-header": b"GET /echo HTTP/1.1\r\nHost: t\nX-A: b\r\n\r\n",
    "bare-lf-end": b"GET /echo HTTP/1.1\r\nHost: t\r\n\n",
    "bare-cr": b"GET /echo HTTP/1.1\r\nHost: t\rX-A: b\r\n\r\n",
    "chunk-size-not-hex": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    "chunk-size-overflow": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"10000000000000003\r\nabc\r\n0\r\n\r\n",
    "chunk-size-negative": CHUNKED + b"-3\r\nabc\r\n0\r\n\r\n",
    "chunk-size-space": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3 ;x\r\nabc\r\n0\r\n\r\n",
    "chunk-ext-control": CHUNKED + b"3;\x01\r\nabc\r\n0\r\n\r\n",
    "chunk-ext-open-quote": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'3;a="b\r\nabc\r\n0\r\n\r\n',
    "chunk-data-too-long": CHUNKED + b"3\r\nabcd\r\n0\r\n\r\n",
    "te-gzip": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "te-chunked-then-gzip": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "te-twice-chunked": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-chunkedx": b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunkedx\r\n\r\n0\r\n\r\n",
    "header-name-space": b"GET /echo HTTP/1.1\r\nHost: t\r\nX A: b\r\n\r\n",
    "header-name-space-before-colon": b"GET /echo HTTP/1.1\r\nHost: t\r\nX-A : b\r\n\r\n",
    "header-name-separator": b"GET /echo HTTP/1.1\r\nHost: t\r\nX(A): b\r\n\r\n",
    "header-name-empty": b"GET /echo HTTP/1.1\r\nHost: t\r\n: b\r\n\r\n",
    "header-value-nul": b"GET /echo HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n",
    "header-value-cr": b"GET /echo HTTP/1.1\r\nHost: t\r\nX-A: a\rb\r\n\r\n",
    "version-1.2": b"GET /echo HTTP/1.2\r\nHost: t\r\n\r\n",
    "version-2.0": b"GET /echo HTTP/2.0\r\nHost: t\r\n\r\n",
    "version-0.9": b"GET /echo HTTP/0.9\r\nHost: t\r\n\r\n",
    "version-missing": b"GET /echo\r\nHost: t\r\n\r\n",
    "version-lower-case": b"GET /echo http/1.1\r\nHost: t\r\n\r\n",
    "version-letters": b"GET /echo HTTP/x.y\r\nHost: t\r\n\r\n",
    "version-trailing-space": b"GET /echo HTTP/1.1 \r\nHost: t\r\n\r\n",
    "no-host": b"GET /echo HTTP/1.1\r\nX-A: b\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", list(BAD.values()), ids=list(BAD))
async def test_bad_framing_is_400_and_the_connection_closes(request_bytes: bytes) -> None:
    with trio.fail_after(10):
        async with running_server() as (server, port, _):
            sock = await connect(port)
            await sock.send(request_bytes + SMUGGLED)
            reply = await read_until_eof(sock)
            assert reply.startswith(b"HTTP/1.1 400 "), reply
            assert reply.count(b"HTTP/1.1 ") == 1, reply  # nothing answered after it
            assert b"smuggled" not in reply
            assert b"connection: close\r\n" in reply
            assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"] == "bad_request"
            assert server.stats.protocol_errors == 1


async def test_a_coding_before_chunked_is_501_and_closes() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, port, _app):
            sock = await connect(port)
            await sock.send(
                b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n" + SMUGGLED
            )
            reply = await read_until_eof(sock)
            assert reply.startswith(b"HTTP/1.1 501 "), reply
            assert reply.count(b"HTTP/1.1 ") == 1


async def test_a_bad_request_after_good_ones_answers_those_first() -> None:
    with trio.fail_after(10):
        async with running_server() as (_, port, _app):
            sock = await connect(port)
            await sock.send(b"GET /echo?i=1 HTTP/1.1\r\nHost: t\r\n\r\n" + BAD["obs-fold"] + SMUGGLED)
            buf = bytearray()
            status, _, body = await read_response(sock, buf)
            assert (status, json.loads(body)["query"]) == (200, {"i": "1"})
            rest = bytes(buf) + await read_until_eof(sock)
            assert rest.startswith(b"HTTP/1.1 400 ") and rest.count(b"HTTP/1.1 ") == 1


async def test_an_upgrade_request_with_a_body_is_not_read_out_of_step() -> None:
    # llhttp would hand the body over as the upgraded protocol's bytes; a request that is not
    # switched reads it as its body, and the next request after it is served as one
    body = b"GET /echo?smuggled=1 HTTP/1.1\r\nHost: t\r\n\r\n"
    with trio.fail_after(10):
        async with running_server() as (_, port, _app):
            sock = await connect(port)
            await sock.send(
                b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (len(body), body) + b"GET /echo?i=2 HTTP/1.1\r\nHost: t\r\n\r\n"
            )
            buf = bytearray()
            status, _, answer = await read_response(sock, buf)
            assert (status, json.loads(answer)["body"]) == (200, body.decode())
            status, _, answer = await read_response(sock, buf)
            assert (status, json.loads(answer)["query"]) == (200, {"i": "2"})


def _publishes() -> bytes:
    return (
        b"POST /echo?i=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
        b"POST /echo?i=2 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        b"POST /echo?i=3 HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"
    )


def _parse(parts: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The (target, body) of each request the parser gives when fed ``parts`` one by one."""
    parser = H1Parser(HttpLimits())
    got = []
    current = None
    for part in parts:
        parser.add(part)
        while True:
            if current is None:
                current = parser.next_head()
                if current is None:
                    break
            parser.pull_body(current)
            if not current.complete:
                break
            got.append((current.target, b"".join(current.body)))
            current = None
    assert parser.error is None, parser.error
    return got


def test_the_parser_gives_the_same_requests_at_every_split_point() -> None:
    data = _publishes()
    expected = [(b"/echo?i=1", b"hello"), (b"/echo?i=2", b"abcde"), (b"/echo?i=3", b"")]
    assert _parse([data[i : i + 1] for i in range(len(data))]) == expected
    for cut in range(len(data) + 1):
        assert _parse([data[:cut], data[cut:]]) == expected, cut


async def _answers_in_order(port: int, parts: list[bytes]) -> None:
    sock = await connect(port)
    for part in parts:
        await sock.send(part)
    buf = bytearray()
    for i, body in ((1, "hello"), (2, "abcde"), (3, "")):
        status, _, answer = await read_response(sock, buf)
        info = json.loads(answer)
        assert (status, info["query"], info["body"]) == (200, {"i": str(i)}, body)
    sock.close()


async def test_pipelined_publishes_sent_a_byte_at_a_time_are_answered_in_order() -> None:
    data = _publishes()
    with trio.fail_after(30):
        async with running_server() as (_, port, _app):
            await _answers_in_order(port, [data[i : i + 1] for i in range(len(data))])


async def test_pipelined_publishes_split_at_every_point_are_answered_in_order() -> None:
    data = _publishes()
    with trio.fail_after(60):
        async with running_server() as (_, port, _app):
            for cut in range(1, len(data)):
                await _answers_in_order(port, [data[:cut], data[cut:]])
