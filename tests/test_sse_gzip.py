"""gzip SSE end to end: negotiated by Accept-Encoding, every event decodable the moment it
arrives, a valid gzip member (CRC and length) when the stream ends, readable by curl."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import h11
import trio

from tests.client import Running, _receive, publish, request, start_sluice

CURL = "/usr/bin/curl"


Opened = tuple[h11.Connection, trio.SocketStream, h11.Response]


async def _open(port: int, path: str, accept_encoding: str | None) -> Opened:
    sock = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    headers = [("host", "t"), ("accept", "text/event-stream")]
    if accept_encoding is not None:
        headers.append(("accept-encoding", accept_encoding))
    await sock.send_all(conn.send(h11.Request(method="GET", target=path, headers=headers)))
    await sock.send_all(conn.send(h11.EndOfMessage()))
    head = await _receive(conn, sock)
    assert isinstance(head, h11.Response)
    return conn, sock, head


async def _chunk(conn: h11.Connection, sock: trio.SocketStream) -> bytes | None:
    event = await _receive(conn, sock)
    if isinstance(event, h11.Data):
        return bytes(event.data)
    assert isinstance(event, h11.EndOfMessage), event
    return None


async def test_gzip_events_decode_as_they_arrive_and_the_member_is_valid(sluice: Running) -> None:
    with trio.fail_after(10):
        conn, sock, head = await _open(sluice.port, "/v1/streams/gz?from=start", "br;q=1.0, gzip;q=0.8")
        async with sock:
            headers = {k.decode(): v.decode() for k, v in head.headers}
            assert head.status_code == 200
            assert headers["content-encoding"] == "gzip"
            assert "accept-encoding" in headers["vary"]
            decoder = zlib.decompressobj(31)
            body = b""
            first = await _chunk(conn, sock)
            assert first is not None
            body += first
            assert decoder.decompress(first).startswith(b"retry: ")  # nothing held back
            big = "token " * 500
            for data in ("one", big):
                await publish(sluice.port, "gz", data)
                chunk = await _chunk(conn, sock)
                assert chunk is not None
                body += chunk
                text = decoder.decompress(chunk)
                assert f"data: {data}\n".encode() in text
                if data == big:
                    assert len(chunk) < len(text) // 4
            assert (await request(sluice.port, "POST", "/v1/streams/gz/close")).status == 204
            while (chunk := await _chunk(conn, sock)) is not None:
                body += chunk
            whole = gzip.decompress(body)  # checks the CRC-32 and the length of the trailer
            assert b"event: sluice.end" in whole
            assert whole.count(b"data: one\n") == 1


async def test_plain_without_accept_encoding_or_when_disabled(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(10):
        on = await start_sluice(nursery, tmp_path / "on")
        conn, sock, head = await _open(on.port, "/v1/streams/p", None)
        async with sock:
            assert all(k != b"content-encoding" for k, _ in head.headers)
            assert (await _chunk(conn, sock) or b"").startswith(b"retry: ")
        conn, sock, head = await _open(on.port, "/v1/streams/p", "gzip;q=0, identity")
        async with sock:
            assert all(k != b"content-encoding" for k, _ in head.headers)
        off = await start_sluice(nursery, tmp_path / "off", compression={"sse_gzip": False})
        conn, sock, head = await _open(off.port, "/v1/streams/p", "gzip")
        async with sock:
            assert all(k != b"content-encoding" for k, _ in head.headers)


async def test_curl_reads_a_gzip_stream(sluice: Running) -> None:
    with trio.fail_after(15):
        for i in range(3):
            await publish(sluice.port, "curl", f"event {i} " + "x" * 300)
        assert (await request(sluice.port, "POST", "/v1/streams/curl/close")).status == 204
        url = f"http://127.0.0.1:{sluice.port}/v1/streams/curl?from=start"
        argv = [CURL, "-sS", "--compressed", "--max-time", "10", "-D", "-", url]
        done = await trio.run_process(argv, capture_stdout=True)
        out = done.stdout.decode()
        assert "content-encoding: gzip" in out.lower()
        assert [f"data: event {i} " in out for i in range(3)] == [True] * 3
        assert "event: sluice.end" in out
