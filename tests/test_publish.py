"""Publish, batches, idempotency, info, close, delete, routing and bad input (HTTP/1.1)."""

from __future__ import annotations

import msgpack
import trio

from tests.client import Running, open_sse, publish, request

TEXT = {"content-type": "text/plain"}


async def test_single_batch_and_info(sluice: Running) -> None:
    with trio.fail_after(10):
        first = await publish(sluice.port, "p:1", "one")
        nd = b'{"type":"token","data":"a"}\n\n{"data":{"k":1}}\n{"type":"bin","data":"AAE=","encoding":"base64"}\n'
        r = await request(sluice.port, "POST", "/v1/streams/p:1", nd, {"content-type": "application/x-ndjson"})
        assert r.status == 201
        ids = r.json()["ids"]
        assert len(ids) == 3 and sorted(ids) == ids and ids[0] > first
        mp = msgpack.packb([{"type": "m", "data": b"\x00\xff"}, {"data": "text"}])
        r = await request(sluice.port, "POST", "/v1/streams/p:1", mp, {"content-type": "application/msgpack"})
        assert r.status == 201 and len(r.json()["ids"]) == 2
        info = (await request(sluice.port, "GET", "/v1/streams/p:1/info")).json()
        assert info["first_id"] == first and info["last_id"] == r.json()["ids"][-1]
        assert info["length"] == 6 and info["closed"] is False and info["last_id"].startswith(info["epoch"])
        async with open_sse(sluice.port, "/v1/streams/p:1?from=start") as sse:
            evs = await sse.take(6)
        assert [(e.event, e.data) for e in evs] == [
            ("message", "one"),
            ("token", "a"),
            ("message", '{"k":1}'),
            ("bin", "AAE="),
            ("m", "AP8="),
            ("message", "text"),
        ]


async def test_idempotency_key(sluice: Running) -> None:
    with trio.fail_after(10):
        a = await publish(sluice.port, "idem", "x", idempotency_key="k1")
        b = await publish(sluice.port, "idem", "x", idempotency_key="k1")
        c = await publish(sluice.port, "idem", "x", idempotency_key="k2")
        assert a == b != c
        info = (await request(sluice.port, "GET", "/v1/streams/idem/info")).json()
        assert info["length"] == 2


REUSED = {"error": "idempotency_key_reused", "message": "this Idempotency-Key was already used for a different request"}


async def test_a_reused_idempotency_key_with_a_different_request_is_422(sluice: Running) -> None:
    port = sluice.port
    with trio.fail_after(20):
        first = await publish(port, "reuse:a", "x", type_="t", idempotency_key="k")
        different = [
            ("/v1/streams/reuse:a?type=t", b"y", TEXT),  # data
            ("/v1/streams/reuse:a?type=u", b"x", TEXT),  # type
            ("/v1/streams/reuse:a?type=t", b"x", {"content-type": "application/octet-stream"}),  # encoding
            ("/v1/streams/reuse:b?type=t", b"x", TEXT),  # stream
        ]
        for path, body, headers in different:
            r = await request(port, "POST", path, body, {**headers, "idempotency-key": "k"})
            assert (r.status, r.json()) == (422, REUSED), (path, r.status, r.body)
            assert r.headers["content-type"].startswith("application/json")
        assert await publish(port, "reuse:a", "x", type_="t", idempotency_key="k") == first
        info = (await request(port, "GET", "/v1/streams/reuse:a/info")).json()
        assert info["length"] == 1
        assert (await request(port, "GET", "/v1/streams/reuse:b/info")).status == 404


async def test_a_batch_retry_must_repeat_the_whole_batch(sluice: Running) -> None:
    port = sluice.port
    nd = {"content-type": "application/x-ndjson", "idempotency-key": "b1"}
    batch = b'{"type":"a","data":"1"}\n{"data":{"k":1}}\n'
    with trio.fail_after(20):
        r = await request(port, "POST", "/v1/streams/reuse:batch", batch, nd)
        assert r.status == 201
        ids = r.json()["ids"]
        respelt = b'{"type":"a","data":"1"}\n{"data":{"k": 1}}'
        again = await request(port, "POST", "/v1/streams/reuse:batch", respelt, nd)
        assert (again.status, again.json()) == (201, {"ids": ids})  # the same events, spelt otherwise
        for body in (b'{"type":"a","data":"1"}\n', batch + b'{"data":"3"}\n'):
            r = await request(port, "POST", "/v1/streams/reuse:batch", body, nd)
            assert (r.status, r.json()) == (422, REUSED)
        mp = msgpack.packb([{"type": "a", "data": "1"}, {"data": '{"k":1}'}])
        r = await request(port, "POST", "/v1/streams/reuse:batch", mp, {**nd, "content-type": "application/msgpack"})
        assert (r.status, r.json()) == (201, {"ids": ids})
        info = (await request(port, "GET", "/v1/streams/reuse:batch/info")).json()
        assert info["length"] == 2


async def test_bad_input_gets_clear_errors_and_nothing_is_appended(sluice: Running) -> None:
    port = sluice.port
    with trio.fail_after(20):
        await publish(port, "ok", "before")
        cases = [
            ("POST", "/v1/streams/bad%20name", b"x", TEXT, 400, "bad_stream"),
            ("POST", "/v1/streams/a::b", b"x", TEXT, 400, "bad_stream"),
            ("POST", "/v1/streams/" + "x" * 201, b"x", TEXT, 400, "bad_stream"),
            ("POST", "/v1/streams/ok?type=sluice.end", b"x", TEXT, 400, "bad_type"),
            ("POST", "/v1/streams/ok?type=has%20space", b"x", TEXT, 400, "bad_type"),
            ("POST", "/v1/streams/ok", b"\xff\xfe", TEXT, 400, "bad_encoding"),
            ("POST", "/v1/streams/ok", b"x" * (1024 * 1024 + 1), TEXT, 413, "too_large"),
            (
                "POST",
                "/v1/streams/ok",
                b'{"data":"a"}\n{bad json}\n',
                {"content-type": "application/x-ndjson"},
                400,
                "bad_batch",
            ),
            ("POST", "/v1/streams/ok", b"\xc1\xc1", {"content-type": "application/msgpack"}, 400, "bad_batch"),
            (
                "POST",
                "/v1/streams/ok",
                msgpack.packb([{"data": "a"}, 3]),
                {"content-type": "application/msgpack"},
                400,
                "bad_batch",
            ),
            ("GET", "/v1/nope", b"", {}, 404, "not_found"),
            ("GET", "/v1/streams/ok/nope", b"", {}, 404, "not_found"),
            ("GET", "/v1/streams/missing/info", b"", {}, 404, "not_found"),
            ("PUT", "/v1/streams/ok", b"x", TEXT, 405, "method_not_allowed"),
            ("GET", "/v1/streams/ok/close", b"", {}, 405, "method_not_allowed"),
            ("GET", "/v1/streams/ok?from=yesterday", b"", {"accept": "text/event-stream"}, 400, "bad_from"),
        ]
        for method, path, body, headers, status, code in cases:
            r = await request(port, method, path, body, headers)
            assert (r.status, r.json()["error"]) == (status, code), (method, path, r.status, r.body)
            assert r.json()["message"]
        r = await request(port, "PUT", "/v1/streams/ok", b"x", TEXT)
        assert "POST" in r.headers["allow"]
        info = (await request(port, "GET", "/v1/streams/ok/info")).json()
        assert info["length"] == 1  # nothing from the rejected publishes was appended


async def test_close_and_delete(sluice: Running) -> None:
    with trio.fail_after(10):
        old = await publish(sluice.port, "d", "a")
        assert (await request(sluice.port, "POST", "/v1/streams/d/close")).status == 204
        assert (await request(sluice.port, "POST", "/v1/streams/d/close")).status == 204
        assert (await request(sluice.port, "GET", "/v1/streams/d/info")).json()["closed"] is True
        assert (await request(sluice.port, "DELETE", "/v1/streams/d")).status == 204
        assert (await request(sluice.port, "GET", "/v1/streams/d/info")).status == 404
        new = await publish(sluice.port, "d", "b")  # recreated: a new epoch
        assert new.split("-")[0] != old.split("-")[0]


async def test_health_and_ready(sluice: Running) -> None:
    with trio.fail_after(10):
        assert (await request(sluice.port, "GET", "/healthz")).status == 200
        assert (await request(sluice.port, "GET", "/readyz")).status == 200
        sluice.ctx.draining = True
        assert (await request(sluice.port, "GET", "/readyz")).status == 503
        metrics = await request(sluice.port, "GET", "/metrics")
        assert metrics.status == 200 and b"sluice_delivered_total" in metrics.body
