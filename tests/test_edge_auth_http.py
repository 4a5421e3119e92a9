"""JWT auth over real HTTP: the token matrix, carriers, anonymous patterns, and the end of open
SSE, long-poll and WebSocket connections when their token expires."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from tests.client import Running, open_sse, publish, request, start_sluice, wait_live, ws_json
from tests.test_edge_auth import craft

SECRET = b"k" * 40
T0 = 1_800_000_000.0  # the fake wall clock at trio time 0


@dataclass
class Auth:
    """A worker with auth enabled (HS256 and RS256 keys) and a wall clock tied to trio's clock."""

    s: Running
    rsa_key: rsa.RSAPrivateKey
    rsa_pem: bytes

    def now(self) -> float:
        return T0 + trio.current_time()

    def token(self, alg: str = "HS256", **claims: Any) -> str:
        payload: dict[str, Any] = {
            "sub": "u1",
            "exp": self.now() + 60,
            "sluice": {"subscribe": ["chat:*"], "publish": ["chat:1"]},
        }
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        key: Any = SECRET if alg == "HS256" else self.rsa_key
        return jwt.encode(payload, key, algorithm=alg)

    def bearer(self, token: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


async def start_auth(
    nursery: trio.Nursery, tmp_path: Path, rsa_key: rsa.RSAPrivateKey, backend: str = "memory", **auth: object
) -> Auth:
    (tmp_path / "hs.key").write_bytes(SECRET)
    public = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "rs.pem").write_bytes(public)
    keys = [{"alg": "HS256", "file": str(tmp_path / "hs.key")}, {"alg": "RS256", "file": str(tmp_path / "rs.pem")}]
    s = await start_sluice(
        nursery, tmp_path, backend, auth={"enabled": True, "keys": keys, "anonymous_subscribe": ["public:**"], **auth}
    )
    a = Auth(s, rsa_key, public)
    assert s.ctx.guard is not None
    s.ctx.guard.clock = a.now
    return a


def ws_url(port: int, query: str = "") -> str:
    return f"ws://127.0.0.1:{port}/v1/ws{query}"


async def test_token_matrix_over_http(nursery: trio.Nursery, tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    a = await start_auth(nursery, tmp_path, rsa_key)
    port = a.s.port
    now = a.now()
    claims = {"sub": "u1", "exp": now + 60, "sluice": {"subscribe": ["chat:*"], "publish": ["chat:1"]}}
    refused = {
        "expired": a.token(exp=now - 1),
        "not yet valid": a.token(nbf=now + 30),
        "wrong audience": a.token(aud="someone-else"),
        "alg none": craft({"alg": "none", "typ": "JWT"}, claims),
        "HS256 with the RS public key": craft({"alg": "HS256", "typ": "JWT"}, claims, secret=a.rsa_pem),
        "garbage": "not.a.jwt",
    }
    with trio.fail_after(30):
        for alg in ("HS256", "RS256"):
            resp = await request(port, "POST", "/v1/streams/chat:1", b"hi", a.bearer(a.token(alg)))
            assert resp.status == 201, (alg, resp.body)
            resp = await request(port, "GET", "/v1/streams/chat:1/info", headers=a.bearer(a.token(alg)))
            assert resp.status == 200, (alg, resp.body)
        for what, token in refused.items():
            resp = await request(port, "POST", "/v1/streams/chat:1", b"hi", a.bearer(token))
            assert resp.status == 401, what
            assert resp.json()["error"] == "unauthorized", what
            assert resp.headers["www-authenticate"].startswith("Bearer"), what
        # no token at all
        resp = await request(port, "POST", "/v1/streams/chat:1", b"hi")
        assert (resp.status, resp.json()["error"]) == (401, "unauthorized")
        resp = await request(port, "GET", "/v1/streams/chat:1/poll?timeout=0")
        assert resp.status == 401
        # a valid token that does not cover the stream, for each action
        token = a.token()
        for method, path in (
            ("POST", "/v1/streams/chat:2"),
            ("POST", "/v1/streams/chat:3/close"),
            ("DELETE", "/v1/streams/chat:3"),
            ("GET", "/v1/streams/other/poll?timeout=0"),
            ("GET", "/v1/streams/other/info"),
            ("GET", "/v1/streams/chat:1:x"),
        ):
            resp = await request(port, method, path, b"x" if method == "POST" else b"", a.bearer(token))
            assert resp.status == 403, (method, path)
            assert set(resp.json()) == {"error", "message"}
            assert resp.json()["error"] == "forbidden"
        # anonymous pattern: subscribe without a token; but an invalid token is still refused
        await publish(port, "chat:1", "x", authorization=f"Bearer {token}")
        resp = await request(port, "GET", "/v1/streams/public:news/poll?timeout=0")
        assert resp.status == 200
        resp = await request(
            port, "GET", "/v1/streams/public:news/poll?timeout=0", headers=a.bearer(refused["expired"])
        )
        assert resp.status == 401
        resp = await request(port, "POST", "/v1/streams/public:news", b"x")
        assert resp.status == 401  # anonymous rights are per action
        # operations endpoints stay open
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await request(port, "GET", path)).status == 200, path


async def test_token_carriers_and_logs(
    nursery: trio.Nursery, tmp_path: Path, rsa_key: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    a = await start_auth(nursery, tmp_path, rsa_key)
    port = a.s.port
    token = a.token()
    bad = a.token(exp=a.now() - 5)
    with trio.fail_after(30):
        assert (await request(port, "POST", "/v1/streams/chat:1", b"1", a.bearer(token))).status == 201
        assert (await request(port, "POST", f"/v1/streams/chat:1?access_token={token}", b"2")).status == 201
        cookie = {"cookie": f"theme=dark; sluice_token={token}"}
        assert (await request(port, "POST", "/v1/streams/chat:1", b"3", cookie)).status == 201
        resp = await request(port, "GET", f"/v1/streams/chat:1/poll?from=start&timeout=0&access_token={token}")
        assert [e["data"] for e in resp.json()["events"]] == ["1", "2", "3"]
        async with open_sse(port, "/v1/streams/chat:1?from=start", cookie) as sse:
            assert sse.status == 200
            assert [e.data for e in await sse.take(3)] == ["1", "2", "3"]
        for headers, path in (
            (a.bearer(bad), "/v1/streams/chat:1"),
            ({}, f"/v1/streams/chat:1?access_token={bad}"),
            ({"cookie": f"sluice_token={bad}"}, "/v1/streams/chat:1"),
        ):
            resp = await request(port, "POST", path, b"x", headers)
            assert resp.status == 401
            assert bad not in resp.body.decode()
    assert any("refused" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        text = record.getMessage() + str(record.args)
        assert token not in text and bad not in text


async def test_sse_ends_cleanly_at_expiry_and_resumes_with_a_fresh_token(
    nursery: trio.Nursery, tmp_path: Path, rsa_key: rsa.RSAPrivateKey, autojump_clock: trio.abc.Clock
) -> None:
    a = await start_auth(nursery, tmp_path, rsa_key)
    port = a.s.port
    producer = a.bearer(a.token(exp=a.now() + 3600))
    with trio.fail_after(300):
        ids = [await publish(port, "chat:1", f"e{i}", **producer) for i in range(2)]
        opened = trio.current_time()
        async with open_sse(port, f"/v1/streams/chat:1?from=start&access_token={a.token()}") as sse:
            assert sse.status == 200
            assert [e.id for e in await sse.take(2)] == ids
            await wait_live(a.s.ctx, "chat:1")
            with pytest.raises(EOFError):
                await sse.next()
            assert sse.finished
            assert 59 <= trio.current_time() - opened <= 61
            assert len(sse.parser.retries) == 2  # the opening retry, then the fresh one at the end
            assert sse.parser.last_event_id == ids[-1]
            last = sse.parser.last_event_id
        # the old token is expired now; a fresh one resumes exactly after Last-Event-ID
        old = f"/v1/streams/chat:1?from=start&access_token={a.token(exp=opened + 60)}"
        assert (await request(port, "GET", old)).status == 401
        more = await publish(port, "chat:1", "e2", **producer)
        async with open_sse(port, f"/v1/streams/chat:1?access_token={a.token()}", {"last-event-id": last}) as sse:
            assert sse.status == 200
            (ev,) = await sse.take(1)
            assert (ev.id, ev.data) == (more, "e2")


async def test_long_poll_answers_by_expiry(
    nursery: trio.Nursery, tmp_path: Path, rsa_key: rsa.RSAPrivateKey, autojump_clock: trio.abc.Clock
) -> None:
    a = await start_auth(nursery, tmp_path, rsa_key)
    with trio.fail_after(300):
        start = trio.current_time()
        token = a.token(exp=a.now() + 5)  # the request helper gives up after 10 s
        resp = await request(a.s.port, "GET", "/v1/streams/chat:9/poll?timeout=60", headers=a.bearer(token))
        assert resp.status == 200
        assert resp.json() == {"events": [], "next": None, "reset": None, "end": False}
        assert 4.9 <= trio.current_time() - start <= 5.5


async def test_websocket_auth_and_4401_at_expiry(
    nursery: trio.Nursery, tmp_path: Path, rsa_key: rsa.RSAPrivateKey, autojump_clock: trio.abc.Clock
) -> None:
    a = await start_auth(nursery, tmp_path, rsa_key, anonymous_subscribe=[])
    port = a.s.port
    with trio.fail_after(300):
        # no anonymous rights at all: the upgrade needs a valid token
        expired = f"Bearer {a.token(exp=a.now() - 1)}".encode()
        headers: list[tuple[bytes, bytes]]
        for headers in ([], [(b"authorization", expired)]):
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(ws_url(port), subprotocols=["sluice.json.v1"], extra_headers=headers):
                    pass
            assert info.value.status_code == 401
            assert json.loads(info.value.body or b"{}")["error"] == "unauthorized"
        opened = trio.current_time()
        token = a.token(exp=a.now() + 30)
        async with open_websocket_url(ws_url(port, f"?access_token={token}"), subprotocols=["sluice.json.v1"]) as ws:
            await ws.send_message(json.dumps({"op": "subscribe", "stream": "other"}))
            err = await ws_json(ws)
            assert (err["op"], err["code"]) == ("error", "forbidden")
            await ws.send_message(json.dumps({"op": "publish", "stream": "chat:2", "data": "x", "ref": 1}))
            err = await ws_json(ws)
            assert (err["op"], err["code"], err["ref"]) == ("error", "forbidden", 1)
            await ws.send_message(json.dumps({"op": "subscribe", "stream": "chat:1", "from": "start"}))
            await wait_live(a.s.ctx, "chat:1")
            await ws.send_message(json.dumps({"op": "publish", "stream": "chat:1", "data": "ok", "ref": 2}))
            got = [await ws_json(ws) for _ in range(2)]
            assert {m["op"] for m in got} == {"published", "event"}
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason is not None and closed.value.reason.code == 4401
            assert 29 <= trio.current_time() - opened <= 31


async def test_websocket_upgrade_with_anonymous_rights(
    nursery: trio.Nursery, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    a = await start_auth(nursery, tmp_path, rsa_key)
    with trio.fail_after(30):
        async with open_websocket_url(ws_url(a.s.port), subprotocols=["sluice.json.v1"]) as ws:
            await ws.send_message(json.dumps({"op": "subscribe", "stream": "chat:1"}))
            err = await ws_json(ws)
            assert (err["op"], err["code"]) == ("error", "unauthorized")
            await ws.send_message(json.dumps({"op": "subscribe", "stream": "public:a", "from": "start"}))
            await wait_live(a.s.ctx, "public:a")
            await ws.send_message(json.dumps({"op": "ping"}))
            assert await ws_json(ws) == {"op": "pong"}
