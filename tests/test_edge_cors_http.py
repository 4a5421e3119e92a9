"""CORS (``[cors]``) over real HTTP: preflights, headers on every streams API answer (errors
too), and the ``Origin`` check of WebSocket upgrades."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from tests.client import Running, open_sse, publish, request, start_sluice, wait_live

APP = "https://app.example"
EVIL = "https://evil.example"
SECRET = b"c" * 40


@pytest.fixture
async def cors(nursery: trio.Nursery, tmp_path: Path) -> Running:
    """A worker with CORS for :data:`APP` and auth (anonymous subscribe, publish needs a token)."""
    (tmp_path / "hs.key").write_bytes(SECRET)
    return await start_sluice(
        nursery,
        tmp_path,
        "memory",
        cors={"allow_origins": [APP]},
        auth={
            "enabled": True,
            "keys": [{"alg": "HS256", "file": str(tmp_path / "hs.key")}],
            "anonymous_subscribe": ["**"],
        },
    )


def bearer() -> str:
    claims = {"sub": "p", "exp": time.time() + 600, "sluice": {"publish": ["**"]}}
    return "Bearer " + jwt.encode(claims, SECRET, algorithm="HS256")


def assert_cors(headers: dict[str, str]) -> None:
    assert headers["access-control-allow-origin"] == APP
    assert headers["vary"] == "Origin"
    assert "retry-after" in headers["access-control-expose-headers"]


async def test_preflight_allowed_and_denied(cors: Running) -> None:
    ask = {"origin": APP, "access-control-request-method": "POST"}
    with trio.fail_after(30):
        resp = await request(
            cors.port,
            "OPTIONS",
            "/v1/streams/chat",
            headers={**ask, "access-control-request-headers": "authorization, content-type"},
        )
        assert resp.status == 204
        assert resp.headers["access-control-allow-origin"] == APP
        assert "POST" in resp.headers["access-control-allow-methods"]
        assert "authorization" in resp.headers["access-control-allow-headers"]
        assert int(resp.headers["access-control-max-age"]) > 0
        for denied in (
            {**ask, "origin": EVIL},
            {**ask, "access-control-request-method": "PUT"},
            {**ask, "access-control-request-headers": "x-evil"},
            {"origin": APP},  # not a preflight
        ):
            resp = await request(cors.port, "OPTIONS", "/v1/streams/chat/poll", headers=denied)
            assert resp.status == 403, denied
            assert resp.json()["error"] == "forbidden"
            assert "access-control-allow-methods" not in resp.headers
        # no preflight is needed (or answered) outside the streams API
        assert (await request(cors.port, "OPTIONS", "/healthz", headers=ask)).status == 405


async def test_headers_on_sse_publish_and_errors(cors: Running) -> None:
    origin = {"origin": APP}
    with trio.fail_after(30):
        async with open_sse(cors.port, "/v1/streams/c", origin) as sse:
            assert sse.status == 200
            assert_cors(sse.headers)
            assert sse.headers["content-type"] == "text/event-stream"
            await wait_live(cors.ctx, "c")
            eid = await publish(cors.port, "c", "hi", authorization=bearer(), origin=APP)
            assert (await sse.next()).id == eid
        resp = await request(cors.port, "POST", "/v1/streams/c", b"x", {**origin, "authorization": bearer()})
        assert resp.status == 201
        assert_cors(resp.headers)
        for method, path, status in (
            ("POST", "/v1/streams/c", 401),  # no token
            ("GET", "/v1/streams/nope/info", 404),
            ("GET", "/v1/streams/bad%20name", 400),
            ("PUT", "/v1/streams/c", 405),
            ("GET", "/v1/nothing", 404),
        ):
            resp = await request(cors.port, method, path, b"x" if method in ("POST", "PUT") else b"", origin)
            assert resp.status == status, (method, path)
            assert_cors(resp.headers)
            assert set(resp.json()) == {"error", "message"}
        resp = await request(cors.port, "GET", "/v1/streams/c/poll?from=start&timeout=0", headers=origin)
        assert resp.status == 200
        assert_cors(resp.headers)
        # an origin not on the list is served without CORS headers (the browser hides the answer)
        resp = await request(cors.port, "GET", "/v1/streams/c/poll?from=start&timeout=0", headers={"origin": EVIL})
        assert resp.status == 200
        assert not any(name.startswith("access-control-") for name in resp.headers)
        resp = await request(cors.port, "GET", "/v1/streams/c/poll?from=start&timeout=0")
        assert not any(name.startswith("access-control-") for name in resp.headers)


async def test_rate_limited_answer_carries_cors_headers(nursery: trio.Nursery, tmp_path: Path) -> None:
    s = await start_sluice(
        nursery,
        tmp_path,
        "memory",
        cors={"allow_origins": ["*"]},
        limits={"rules": [{"route": "publish", "rate": 0.01, "burst": 1}]},
    )
    with trio.fail_after(30):
        await publish(s.port, "r", "1")
        resp = await request(s.port, "POST", "/v1/streams/r", b"2", {"origin": APP})
        assert resp.status == 429
        assert resp.headers["access-control-allow-origin"] == "*"
        assert resp.headers["retry-after"] == "100"


async def test_websocket_origin_check(cors: Running) -> None:
    url = f"ws://127.0.0.1:{cors.port}/v1/ws"
    proto = ["sluice.json.v1"]
    with trio.fail_after(30):
        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(url, subprotocols=proto, extra_headers=[(b"origin", EVIL.encode())]):
                pass
        assert info.value.status_code == 403
        assert json.loads(info.value.body or b"{}")["error"] == "forbidden"
        for headers in ([(b"origin", APP.encode())], []):  # an allowed origin, and no Origin at all
            async with open_websocket_url(url, subprotocols=proto, extra_headers=headers) as ws:
                await ws.send_message(json.dumps({"op": "ping"}))
                assert json.loads(await ws.get_message()) == {"op": "pong"}


async def test_websocket_origins_can_differ_from_http(nursery: trio.Nursery, tmp_path: Path) -> None:
    s = await start_sluice(nursery, tmp_path, "memory", cors={"ws_allowed_origins": [EVIL]})
    url = f"ws://127.0.0.1:{s.port}/v1/ws"
    with trio.fail_after(30):
        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(url, extra_headers=[(b"origin", APP.encode())]):
                pass
        assert info.value.status_code == 403
        async with open_websocket_url(url, extra_headers=[(b"origin", EVIL.encode())]) as ws:
            await ws.send_message(json.dumps({"op": "ping"}))
            assert json.loads(await ws.get_message()) == {"op": "pong"}
        # no HTTP origin is allowed: no CORS headers
        resp = await request(s.port, "GET", "/v1/streams/x/poll?timeout=0", headers={"origin": EVIL})
        assert "access-control-allow-origin" not in resp.headers
