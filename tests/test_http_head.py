"""HEAD wherever GET works (RFC 9110 9.3.2): GET's status and headers, no body, over HTTP/1.1
and HTTP/2; an SSE HEAD never subscribes and a long-poll HEAD never waits."""

from __future__ import annotations

import json

import trio

from tests.client import Running, publish, request
from tests.h2client import H2Stream, open_h2
from tests.http_helpers import read_response

CURL = "/usr/bin/curl"


async def _curl_head(url: str, *flags: str) -> tuple[int, dict[str, str], bytes]:
    """``curl -sS -I``: the status, the headers (lower-case names) and anything after the head."""
    result = await trio.run_process(
        [CURL, "-sS", "-I", "--max-time", "10", *flags, url], capture_stdout=True, capture_stderr=True, check=False
    )
    assert result.returncode == 0, result.stderr
    head, _, rest = result.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, rest


async def test_curl_head_on_every_get_route(sluice: Running) -> None:
    with trio.fail_after(30):
        await publish(sluice.port, "headed", "one")
        for path in ("/healthz", "/readyz", "/metrics", "/v1/streams/headed/info"):
            get = await request(sluice.port, "GET", path)
            for flags in (("--http1.1",), ("--http2-prior-knowledge",)):
                status, headers, rest = await _curl_head(f"{sluice.base}{path}", *flags)
                assert (status, rest) == (get.status, b""), (path, flags)
                assert headers["content-type"] == get.headers["content-type"], (path, flags)
                if path != "/metrics":  # the counters move between the two requests
                    assert headers["content-length"] == str(len(get.body)), (path, flags)


async def test_head_on_sse_answers_the_headers_without_subscribing(sluice: Running) -> None:
    with trio.fail_after(30):
        stats = sluice.ctx.hub.stats
        for flags in (("--http1.1",), ("--http2-prior-knowledge",)):
            status, headers, rest = await _curl_head(f"{sluice.base}/v1/streams/sse-head", *flags)
            assert (status, rest) == (200, b"")
            assert headers["content-type"] == "text/event-stream"
            assert headers["cache-control"] == "no-store"
        assert stats.subscriptions_total == 0
        # GET's refusals too: a bad start position is 400 for HEAD as for GET
        status, _, _ = await _curl_head(f"{sluice.base}/v1/streams/sse-head?from=nonsense")
        assert status == (await request(sluice.port, "GET", "/v1/streams/sse-head?from=nonsense")).status == 400


async def test_head_on_long_poll_does_not_wait(sluice: Running) -> None:
    with trio.fail_after(5):  # the poll's own timeout is 60 s: the HEAD must not wait for it
        for flags in (("--http1.1",), ("--http2-prior-knowledge",)):
            status, headers, rest = await _curl_head(f"{sluice.base}/v1/streams/poll-head/poll?timeout=60", *flags)
            assert (status, rest) == (200, b"")
            assert headers["content-type"] == "application/json"
            assert "content-length" not in headers  # the body GET would send is not known yet
        assert sluice.ctx.hub.stats.subscriptions_total == 0
        status, _, _ = await _curl_head(f"{sluice.base}/v1/streams/poll-head/poll?timeout=soon")
        assert status == 400


async def test_h2_head_sends_headers_and_end_stream_only(sluice: Running) -> None:
    with trio.fail_after(10):
        c = await open_h2(sluice.port)
        sids = {}
        for path in ("/healthz", "/v1/streams/h2head", "/v1/streams/h2head/poll?timeout=60"):
            sid = c.conn.get_next_available_stream_id()
            hdrs = [(":method", "HEAD"), (":path", path), (":scheme", "http"), (":authority", "127.0.0.1")]
            c.conn.send_headers(sid, hdrs, end_stream=True)
            c.streams[sid] = H2Stream()
            sids[sid] = path
        await c.flush()
        await c.until(lambda: all(c.streams[sid].ended for sid in sids))
        for sid, path in sids.items():
            st = c.streams[sid]
            assert (st.status, bytes(st.body)) == (200, b""), path
        health = next(sid for sid, path in sids.items() if path == "/healthz")
        get = await request(sluice.port, "GET", "/healthz")
        assert c.streams[health].headers["content-length"] == str(len(get.body))
        assert sluice.ctx.hub.stats.subscriptions_total == 0


async def test_http11_keep_alive_after_head(sluice: Running) -> None:
    with trio.fail_after(10):
        await publish(sluice.port, "ka", "there")  # /info of a stream never published to is 404
        sock = trio.socket.socket()
        with sock:
            await sock.connect(("127.0.0.1", sluice.port))
            buf = bytearray()
            for path in ("/healthz", "/v1/streams/ka", "/v1/streams/ka/poll?timeout=60", "/v1/streams/ka/info"):
                await sock.send(f"HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                status, headers, body = await read_response(sock, buf, head_only=True)
                assert (status, body) == (200, b""), path
                assert headers.get("connection") != "close", path
            await sock.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            status, _, body = await read_response(sock, buf)
            assert status == 200
            assert json.loads(body)["status"] == "ok"
            assert not buf


async def test_other_methods_still_405_with_head_in_allow(sluice: Running) -> None:
    with trio.fail_after(10):
        for path, allow in (
            ("/healthz", "GET, HEAD"),
            ("/readyz", "GET, HEAD"),
            ("/metrics", "GET, HEAD"),
            ("/v1/streams/x", "DELETE, GET, HEAD, POST"),
            ("/v1/streams/x/info", "GET, HEAD"),
            ("/v1/streams/x/poll", "GET, HEAD"),
            ("/v1/streams/x/close", "POST"),
            ("/v1/ws", "GET, HEAD"),
        ):
            resp = await request(sluice.port, "PUT", path)
            assert resp.status == 405, path
            assert resp.headers["allow"] == allow, path


async def test_head_on_websocket_endpoint_does_what_get_does(sluice: Running) -> None:
    with trio.fail_after(10):
        get = await request(sluice.port, "GET", "/v1/ws")
        status, headers, rest = await _curl_head(f"{sluice.base}/v1/ws")
        assert (status, rest) == (get.status, b"")
        assert headers["content-length"] == str(len(get.body))
