"""Events at the size limit fit common clients' default limits on every transport; a WebSocket
publish of a too-large event is an ``error`` op (``too_large``), the socket staying open."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from trio_websocket import open_websocket_url
from websockets.sync.client import connect

from server.config import ServerConfig
from server.http.base import HttpLimits
from server.transports.batch import json_data_limit
from tests.client import open_sse, request, start_sluice

MAX = ServerConfig().max_event_bytes
WEBSOCKETS_MAX_SIZE = 2**20  # the `websockets` library's default max_size
AIOHTTP_LINE = 512 * 1024  # the longest SSE line aiohttp's reader takes by default
CONTROL = json_data_limit(MAX) // 6  # the most control characters (sent as \u00XX) one text event may hold


def test_the_defaults_fit_the_common_clients() -> None:
    assert MAX == 256 * 1024
    assert CONTROL * 6 <= 4 * MAX - 1024
    assert 4 * MAX <= WEBSOCKETS_MAX_SIZE
    assert 4 * MAX // 3 + len("data: ") < AIOHTTP_LINE  # binary on SSE: base64 on one line
    assert HttpLimits().ws_max_message >= 4 * MAX // 3 + 4096  # a too-large binary publish op is read whole


async def _post(port: int, stream: str, body: bytes, content_type: str) -> Any:
    return await request(port, "POST", f"/v1/streams/{stream}", body, {"content-type": content_type})


def _read_with_websockets(port: int, stream: str, count: int) -> list[dict[str, Any]]:
    """Subscribe from the start with the `websockets` library's client at its defaults and
    return the first ``count`` events (runs in a thread)."""
    with connect(f"ws://127.0.0.1:{port}/v1/ws", subprotocols=["sluice.json.v1"], open_timeout=10) as ws:  # type: ignore[list-item]
        assert ws.protocol.max_message_size == WEBSOCKETS_MAX_SIZE
        ws.send(json.dumps({"op": "subscribe", "stream": stream, "from": "start"}))
        events: list[dict[str, Any]] = []
        while len(events) < count:
            msg = json.loads(ws.recv(timeout=10))
            if msg["op"] == "event":
                events.append(msg)
        return events


async def test_events_at_the_limit_reach_a_websockets_client_with_its_defaults(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    s = await start_sluice(nursery, tmp_path, "memory")
    text = ('"\\' * (MAX // 2)).encode()  # every byte escaped (x2)
    control = b"\x01" * CONTROL  # the worst escaping (x6) at its limit
    binary = os.urandom(MAX)  # base64 (x4/3)
    with trio.fail_after(30):
        for body, ctype in ((text, "text/plain"), (control, "text/plain"), (binary, "application/octet-stream")):
            resp = await _post(s.port, "max", body, ctype)
            assert resp.status == 201, resp.body
        # one more control character and the event would not fit a 1 MiB message: refused
        resp = await _post(s.port, "max", control + b"\x01", "text/plain")
        assert (resp.status, resp.json()["error"]) == (413, "too_large")
        events = await trio.to_thread.run_sync(_read_with_websockets, s.port, "max", 3)
    assert events[0]["data"].encode() == text
    assert events[1]["data"].encode() == control
    assert events[2]["encoding"] == "base64" and base64.b64decode(events[2]["data"]) == binary


async def test_binary_at_the_limit_is_one_sse_line_below_aiohttps_limit(nursery: trio.Nursery, tmp_path: Path) -> None:
    s = await start_sluice(nursery, tmp_path, "memory")
    binary = os.urandom(MAX)
    with trio.fail_after(30):
        assert (await _post(s.port, "sse", binary, "application/octet-stream")).status == 201
        async with open_sse(s.port, "/v1/streams/sse?from=start") as sse:
            event = await sse.next()
    assert "\n" not in event.data and len("data: ") + len(event.data) < AIOHTTP_LINE
    assert base64.b64decode(event.data) == binary


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_a_too_large_websocket_publish_is_an_error_op_and_the_socket_goes_on(
    nursery: trio.Nursery, tmp_path: Path, fmt: str
) -> None:
    s = await start_sluice(nursery, tmp_path, "memory")
    over = os.urandom(MAX + 1)

    def encode(op: dict[str, Any]) -> str | bytes:
        return json.dumps(op) if fmt == "json" else msgpack.packb(op)

    def decode(raw: str | bytes) -> Any:
        return json.loads(raw) if isinstance(raw, str) else msgpack.unpackb(raw, raw=False)

    binary_op: dict[str, Any] = (
        {"data": base64.b64encode(over).decode(), "encoding": "base64"} if fmt == "json" else {"data": over}
    )
    with trio.fail_after(30):
        async with open_websocket_url(f"ws://127.0.0.1:{s.port}/v1/ws", subprotocols=[f"sluice.{fmt}.v1"]) as ws:
            for ref, fields in (
                ("bin", binary_op),
                ("text", {"data": "x" * (MAX + 1)}),
                ("escaped", {"data": "\x01" * (CONTROL + 1)}),
            ):
                await ws.send_message(encode({"op": "publish", "stream": "p", "ref": ref, **fields}))
                err = decode(await ws.get_message())
                assert (err["op"], err["code"], err["ref"]) == ("error", "too_large", ref)
            await ws.send_message(encode({"op": "publish", "stream": "p", "data": "fits", "ref": "ok"}))
            ack = decode(await ws.get_message())
            assert (ack["op"], ack["ref"]) == ("published", "ok")
