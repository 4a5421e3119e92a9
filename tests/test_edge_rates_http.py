"""Rate rules (``[limits] rules``) over real HTTP and WebSocket: 429 + Retry-After, refill with
time, keys by address, header and JWT claim, ``publish_bytes``, per-stream patterns."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from tests.client import Response, Running, request, start_sluice, ws_json, ws_ops_together

SECRET = b"r" * 40


def rules(*items: dict[str, Any]) -> dict[str, object]:
    return {"rules": list(items)}


async def post(s: Running, stream: str, body: bytes = b"x", headers: dict[str, str] | None = None) -> Response:
    return await request(
        s.port, "POST", f"/v1/streams/{stream}", body, {"content-type": "text/plain", **(headers or {})}
    )


def assert_limited(resp: Response, retry_after: str = "1") -> None:
    assert resp.status == 429, resp.body
    assert resp.json() == {"error": "rate_limited", "message": "too many requests"}
    assert resp.headers["retry-after"] == retry_after


async def test_publish_limit_by_address_then_refill(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    s = await start_sluice(nursery, tmp_path, "memory", limits=rules({"route": "publish", "rate": 0.5, "burst": 2}))
    with trio.fail_after(60):
        assert [(await post(s, "a")).status for _ in range(2)] == [201, 201]
        assert_limited(await post(s, "b"), "2")  # one address, every stream
        assert (await request(s.port, "GET", "/v1/streams/a/info")).status == 200  # not a publish
        await trio.sleep(2)
        assert (await post(s, "a")).status == 201
        assert_limited(await post(s, "a"), "2")


async def test_keys_by_header_and_by_claim_are_independent(nursery: trio.Nursery, tmp_path: Path) -> None:
    (tmp_path / "hs.key").write_bytes(SECRET)
    s = await start_sluice(
        nursery,
        tmp_path,
        "memory",
        auth={"enabled": True, "keys": [{"alg": "HS256", "file": str(tmp_path / "hs.key")}]},
        limits=rules(
            {"route": "publish", "rate": 0.001, "burst": 1, "key": "claim:sub", "streams": "c:**"},
            {"route": "publish", "rate": 0.001, "burst": 1, "key": "header:x-client", "streams": "h:**"},
        ),
    )

    def bearer(sub: str) -> dict[str, str]:
        claims = {"sub": sub, "exp": time.time() + 600, "sluice": {"publish": ["**"]}}
        return {"authorization": "Bearer " + jwt.encode(claims, SECRET, algorithm="HS256")}

    with trio.fail_after(30):
        alice, bob = bearer("alice"), bearer("bob")
        assert (await post(s, "c:1", headers=alice)).status == 201
        assert (await post(s, "c:1", headers=bob)).status == 201
        assert (await post(s, "c:2", headers=bearer("alice"))).status == 429  # a new token, the same sub
        assert (await post(s, "c:2", headers=bob)).status == 429
        assert (await post(s, "h:1", headers={**alice, "x-client": "one"})).status == 201
        assert (await post(s, "h:1", headers={**alice, "x-client": "two"})).status == 201
        resp = await post(s, "h:1", headers={**bob, "x-client": "one"})
        assert resp.status == 429 and int(resp.headers["retry-after"]) > 1


async def test_publish_bytes_and_stream_patterns(nursery: trio.Nursery, tmp_path: Path) -> None:
    s = await start_sluice(
        nursery,
        tmp_path,
        "memory",
        limits=rules(
            {"route": "publish_bytes", "rate": 0.01, "burst": 10},
            {"route": "publish", "rate": 0.01, "burst": 1, "streams": "hot:*"},
        ),
    )
    with trio.fail_after(30):
        assert (await post(s, "cold", b"12345678")).status == 201
        assert_limited(await post(s, "cold", b"12345678"), "600")
        resp = await post(s, "cold", b"x" * 11)  # more than the burst: can never pass
        assert (resp.status, resp.json()["error"]) == (413, "too_large")
        assert (await post(s, "cold", b"12")).status == 201  # what is left of the budget
        # the per-stream rule applies to hot:* only, per stream pattern (not per stream)
        assert (await post(s, "hot:a", b"")).status == 201
        assert (await post(s, "hot:b", b"")).status == 429
        assert (await post(s, "hot:a:x", b"")).status == 201  # not matched by hot:*


async def test_connect_and_subscribe_rules(nursery: trio.Nursery, tmp_path: Path) -> None:
    s = await start_sluice(
        nursery,
        tmp_path,
        "memory",
        limits=rules({"route": "connect", "rate": 0.01, "burst": 4}, {"route": "subscribe", "rate": 0.01, "burst": 1}),
    )
    with trio.fail_after(30):
        assert (await request(s.port, "GET", "/v1/streams/s/poll?timeout=0")).status == 200
        assert_limited(await request(s.port, "GET", "/v1/streams/s/poll?timeout=0"), "100")  # subscribe
        assert (await request(s.port, "GET", "/v1/streams/s/info")).status == 404  # connect: 3 of 4
        assert (await post(s, "s")).status == 201  # connect: 4 of 4
        assert_limited(await post(s, "s"), "100")
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await request(s.port, "GET", path)).status == 200  # never limited
        try:
            async with open_websocket_url(f"ws://127.0.0.1:{s.port}/v1/ws", subprotocols=["sluice.json.v1"]):
                raise AssertionError("the upgrade should be refused")
        except ConnectionRejected as exc:
            assert exc.status_code == 429
            assert dict(exc.headers)[b"retry-after"] == b"100"


async def test_websocket_ops_are_rate_limited(nursery: trio.Nursery, tmp_path: Path) -> None:
    s = await start_sluice(
        nursery,
        tmp_path,
        "memory",
        limits=rules(
            {"route": "publish", "rate": 0.01, "burst": 2},
            {"route": "subscribe", "rate": 0.01, "burst": 1},
            {"route": "publish_bytes", "rate": 0.01, "burst": 5, "streams": "big"},
        ),
    )
    with trio.fail_after(30):
        async with open_websocket_url(f"ws://127.0.0.1:{s.port}/v1/ws", subprotocols=["sluice.json.v1"]) as ws:

            async def op(msg: dict[str, Any]) -> dict[str, Any]:
                await ws.send_message(json.dumps(msg))
                return await ws_json(ws)

            err = await op({"op": "publish", "stream": "big", "data": "123456", "ref": 0})
            assert (err["op"], err["code"], err["ref"]) == ("error", "too_large", 0)
            assert (await op({"op": "publish", "stream": "w", "data": "1", "ref": 1}))["op"] == "published"
            # the refused "big" publish gave its publish token back: a second one passes
            assert (await op({"op": "publish", "stream": "w", "data": "2", "ref": 2}))["op"] == "published"
            err = await op({"op": "publish", "stream": "w", "data": "3", "ref": 3})
            assert (err["op"], err["code"], err["ref"]) == ("error", "rate_limited", 3)
            assert "retry after 100 s" in err["message"]
            assert (await op({"op": "subscribe", "stream": "w", "from": "start"}))["op"] == "event"
            assert (await ws_json(ws))["data"] == "2"
            err = await op({"op": "subscribe", "stream": "y"})
            assert (err["op"], err["code"]) == ("error", "rate_limited")
            assert await op({"op": "ping"}) == {"op": "pong"}  # the socket stays open
        assert (await request(s.port, "GET", "/v1/streams/w/info")).json()["length"] == 2
    assert s.ctx.guard is not None  # refused operations are counted for /metrics
    assert s.ctx.guard.stats.rate_limited == {(413, "publish_bytes"): 1, (429, "publish"): 1, (429, "subscribe"): 1}


async def test_publishes_that_arrive_together_are_each_charged_and_answered_in_order(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    s = await start_sluice(nursery, tmp_path, "sqlite", limits=rules({"route": "publish", "rate": 0.01, "burst": 2}))
    ops = [{"op": "publish", "stream": "w", "data": str(i), "ref": i} for i in range(4)]
    with trio.fail_after(30):
        answers = await ws_ops_together(s.port, ops, 4)
        assert (await request(s.port, "GET", "/v1/streams/w/info")).json()["length"] == 2
    assert [(a["op"], a["ref"], a.get("code")) for a in answers] == [
        ("published", 0, None),
        ("published", 1, None),
        ("error", 2, "rate_limited"),
        ("error", 3, "rate_limited"),
    ]


async def test_a_publish_refused_on_its_size_gives_its_publish_token_back(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    s = await start_sluice(
        nursery,
        tmp_path,
        "memory",
        limits=rules(
            {"route": "publish", "rate": 0.001, "burst": 2}, {"route": "publish_bytes", "rate": 0.001, "burst": 8}
        ),
    )
    with trio.fail_after(30):
        assert (await post(s, "p", b"12345678")).status == 201  # 1 of 2 publishes, all 8 bytes
        for _ in range(3):  # refused on bytes: neither rule keeps what it charged
            assert_limited(await post(s, "p", b"1"), "1000")
        assert (await post(s, "p", b"")).status == 201  # the second publish token is still there
        assert_limited(await post(s, "p", b""), "1000")
        async with open_websocket_url(f"ws://127.0.0.1:{s.port}/v1/ws", subprotocols=["sluice.json.v1"]) as ws:
            await ws.send_message(json.dumps({"op": "publish", "stream": "p", "data": "x", "ref": 1}))
            err = json.loads(await ws.get_message())
            assert (err["op"], err["code"]) == ("error", "rate_limited")


async def test_websocket_ping_ops_are_charged_to_the_ping_bucket(nursery: trio.Nursery, tmp_path: Path) -> None:
    """``{"op": "ping"}`` costs what a Ping frame costs: a flood of them closes the socket 1008."""
    s = await start_sluice(nursery, tmp_path, "memory", limits={"ws_max_pings_per_second": 0.01, "ws_ping_burst": 5})
    with trio.fail_after(30):
        async with open_websocket_url(f"ws://127.0.0.1:{s.port}/v1/ws", subprotocols=["sluice.json.v1"]) as ws:
            for _ in range(5):
                await ws.send_message(json.dumps({"op": "ping"}))
                assert json.loads(await ws.get_message()) == {"op": "pong"}
            await ws.send_message(json.dumps({"op": "ping"}))
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason is not None
            assert (closed.value.reason.code, closed.value.reason.reason) == (1008, "too many pings")
        assert s.worker.http.stats.ws_ping_floods == 1
        assert (await request(s.port, "GET", "/healthz")).status == 200
