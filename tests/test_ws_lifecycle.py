"""WebSocket subscriptions' lifecycle: the ``subscribed`` reply and ``live`` marker, a client
leaving in the middle of a catch-up, and what ``sluice_dropped_total`` counts."""

from __future__ import annotations

import json
import logging
import socket
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from trio_websocket import open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, TextMessage
from wsproto.events import Request as WsRequest

from server.core.encoding import EncodedEvent
from server.core.events import NewEvent
from server.core.hub import Hub
from server.core.ports.store import Retention
from server.core.replay import Reset, Start
from server.http.hooks import EdgeHooks
from server.http.server import HttpServer
from server.store.memory import MemoryStore
from tests.client import Running, publish, request, start_sluice, wait_live


class Client:
    """A trio-websocket client speaking one Sluice subprotocol, every message kept."""

    def __init__(self, ws: Any, fmt: str) -> None:
        self.ws = ws
        self.fmt = fmt

    async def send(self, obj: dict[str, Any]) -> None:
        await self.ws.send_message(json.dumps(obj) if self.fmt == "json" else msgpack.packb(obj))

    async def recv(self) -> dict[str, Any]:
        raw = await self.ws.get_message()
        return json.loads(raw) if self.fmt == "json" else msgpack.unpackb(raw, raw=False)  # type: ignore[no-any-return]

    async def recv_n(self, n: int) -> list[dict[str, Any]]:
        return [await self.recv() for _ in range(n)]


def ws_url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/v1/ws"


def data(value: str, fmt: str) -> object:
    return value if fmt == "json" else value.encode()


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_subscribe_is_answered_then_replay_then_live_for_each_start(
    nursery: trio.Nursery, tmp_path: Path, fmt: str
) -> None:
    s = await start_sluice(nursery, tmp_path, "memory", store={"max_events": 2})
    with trio.fail_after(15):
        ids = [await publish(s.port, "h", f"e{i}") for i in range(3)]  # e1, e2 retained
        async with open_websocket_url(ws_url(s.port), subprotocols=[f"sluice.{fmt}.v1"]) as raw:
            c = Client(raw, fmt)
            await c.send({"op": "subscribe", "stream": "h", "from": "start", "ref": "s1"})
            assert await c.recv_n(4) == [
                {"op": "subscribed", "stream": "h", "from": None, "ref": "s1"},
                {"op": "event", "stream": "h", "id": ids[1], "type": "message", "data": data("e1", fmt)},
                {"op": "event", "stream": "h", "id": ids[2], "type": "message", "data": data("e2", fmt)},
                {"op": "live", "stream": "h"},
            ]
            await c.send({"op": "unsubscribe", "stream": "h"})
            # resuming after an id of another history: subscribed (with that id), reset, replay, live
            foreign = "abcdef0123-0000000000000001"
            await c.send({"op": "subscribe", "stream": "h", "last_event_id": foreign})
            got = await c.recv_n(4)
            assert got[0] == {"op": "subscribed", "stream": "h", "from": foreign}
            assert {k: got[1].get(k) for k in ("op", "reason", "earliest")} == {
                "op": "reset",
                "reason": "epoch",
                "earliest": ids[1],
            }
            assert [m["op"] for m in got[2:]] == ["event", "event"]
            assert await c.recv() == {"op": "live", "stream": "h"}
            await c.send({"op": "unsubscribe", "stream": "h"})
            # an exact resume with nothing after it: subscribed, then live at once
            await c.send({"op": "subscribe", "stream": "h", "last_event_id": ids[2], "ref": 3})
            assert await c.recv_n(2) == [
                {"op": "subscribed", "stream": "h", "from": ids[2], "ref": 3},
                {"op": "live", "stream": "h"},
            ]
            new = await publish(s.port, "h", "e3")
            assert (await c.recv())["id"] == new


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_from_now_is_told_the_current_last_id_then_live_then_gets_what_is_published(
    nursery: trio.Nursery, tmp_path: Path, backend: str, fmt: str
) -> None:
    s = await start_sluice(nursery, tmp_path, backend)
    with trio.fail_after(15):
        last = await publish(s.port, "n", "old")
        async with open_websocket_url(ws_url(s.port), subprotocols=[f"sluice.{fmt}.v1"]) as raw:
            c = Client(raw, fmt)
            await c.send({"op": "subscribe", "stream": "n", "from": "now"})
            await c.send({"op": "subscribe", "stream": "empty"})  # "now" is the default; no events yet
            got = await c.recv_n(4)
            assert {"op": "subscribed", "stream": "n", "from": last} in got
            assert {"op": "subscribed", "stream": "empty", "from": None} in got
            for stream in ("n", "empty"):
                ops = [m["op"] for m in got if m["stream"] == stream]
                assert ops == ["subscribed", "live"]
            new = await publish(s.port, "n", "fresh")
            assert await c.recv() == {
                "op": "event",
                "stream": "n",
                "id": new,
                "type": "message",
                "data": data("fresh", fmt),
            }
            first = await publish(s.port, "empty", "first")
            assert (await c.recv())["id"] == first


async def _raw_subscriber(port: int, ops: list[dict[str, Any]]) -> trio.socket.SocketType:
    """A WebSocket client on a socket with a small receive buffer that sends ``ops`` once the
    handshake is done and then reads nothing more (the server's queue to it fills)."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    ws = WSConnection(ConnectionType.CLIENT)
    await sock.send(ws.send(WsRequest(host="127.0.0.1", target="/v1/ws", subprotocols=["sluice.json.v1"])))
    while True:
        got = await sock.recv(65536)
        assert got, "the server closed the connection"
        ws.receive_data(got)
        if any(isinstance(e, AcceptConnection) for e in ws.events()):
            break
    await sock.send(b"".join(ws.send(TextMessage(data=json.dumps(op))) for op in ops))
    return sock


async def _fill_history(port: int, stream: str, batches: int, per_batch: int, size: int) -> None:
    line = json.dumps({"data": "x" * size}).encode() + b"\n"
    for _ in range(batches):
        resp = await request(
            port, "POST", f"/v1/streams/{stream}", line * per_batch, {"content-type": "application/x-ndjson"}
        )
        assert resp.status == 201, resp.body


def _outbox_of_websocket(s: Running) -> Any:
    conns = [c for c in s.worker.http.connections if c.protocol == "websocket"]
    return conns[0].outbox if conns else None


async def test_a_client_that_leaves_during_catch_up_is_counted_not_logged_as_an_error(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    s = await start_sluice(nursery, tmp_path, "memory", hub={"replay_page": 200})
    with trio.fail_after(30):
        await _fill_history(s.port, "big", batches=10, per_batch=200, size=2000)  # ~4 MB of history
        sock = await _raw_subscriber(s.port, [{"op": "subscribe", "stream": "big", "from": "start"}])
        # wait until the catch-up is blocked on the connection's queue (waiting for it to drain)
        low = s.worker.http.limits.send_low_water
        while (outbox := _outbox_of_websocket(s)) is None or outbox.buffered <= low:
            await trio.sleep(0.01)
        gone_before = s.ctx.hub.stats.subscriptions_gone
        # abort the TCP connection (RST), as a client killed mid-catch-up does
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        while s.worker.http.connections:
            await trio.sleep(0.01)
        assert s.ctx.hub.stats.subscriptions_gone == gone_before + 1
        assert s.ctx.hub.stats.dropped == 0  # not a slow consumer: the client left
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [], [r.getMessage() for r in errors]
        # the server goes on serving others
        async with open_websocket_url(ws_url(s.port), subprotocols=["sluice.json.v1"]) as raw:
            c = Client(raw, "json")
            await c.send({"op": "subscribe", "stream": "other"})
            assert (await c.recv())["op"] == "subscribed"
            assert (await c.recv())["op"] == "live"
            eid = await publish(s.port, "other", "still here")
            assert (await c.recv())["id"] == eid


class Refusing:
    """A sink whose connection can take nothing: closed by the client, or cut for falling behind."""

    def __init__(self, behind: bool) -> None:
        self.behind = behind

    def deliver(self, enc: EncodedEvent) -> bool:
        return False

    def reset(self, reset: Reset) -> bool:
        return False

    def end(self) -> None:
        pass

    def idle(self) -> bool:
        return False

    def fell_behind(self) -> bool:
        return self.behind

    async def drain(self) -> None:
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("behind", [False, True])
async def test_a_refused_delivery_is_dropped_only_when_the_connection_fell_behind(behind: bool) -> None:
    store = MemoryStore(Retention(max_events=0, max_bytes=0, max_age=0))
    hub = Hub(store)
    store.set_listener(hub.on_notice)
    await store.append("s", [NewEvent("message", b"history")])
    with trio.fail_after(5):
        sub = await hub.subscribe("s", Start("start"), Refusing(behind))
    assert sub.done and not sub.ended
    assert (hub.stats.dropped, hub.stats.subscriptions_gone) == ((1, 0) if behind else (0, 1))


async def test_dropped_counts_slow_consumers_and_metrics_name_both(nursery: trio.Nursery, tmp_path: Path) -> None:
    s = await start_sluice(nursery, tmp_path, "memory", http={"send_buffer": 256 * 1024, "send_low_water": 16 * 1024})
    stats = s.ctx.hub.stats
    with trio.fail_after(30):
        # a client that reads nothing while large events are published live: a slow consumer
        sock = await _raw_subscriber(s.port, [{"op": "subscribe", "stream": "slow"}])
        await wait_live(s.ctx, "slow")
        while s.worker.http.stats.slow_consumers == 0:
            await publish(s.port, "slow", "y" * 100_000)
        sock.close()
        assert (stats.dropped, stats.subscriptions_gone) == (1, 0)
    metrics = (await request(s.port, "GET", "/metrics")).body.decode()
    assert "sluice_dropped_total 1\n" in metrics
    assert "sluice_subscriptions_gone_total 0\n" in metrics


@pytest.mark.parametrize(
    "error", [trio.BrokenResourceError("connection closed"), ConnectionResetError(), RuntimeError("bug")]
)
async def test_a_connection_ended_by_the_peer_logs_at_debug_and_a_bug_with_a_traceback(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    caplog.set_level(logging.DEBUG, logger="server.http.server")

    def admit(client_ip: str) -> None:
        raise error

    async def handler(ex: Any) -> None:
        raise AssertionError("no request gets this far")

    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    server = HttpServer(handler, hooks=EdgeHooks(admit=admit))
    await nursery.start(server.serve, [listener])
    with trio.fail_after(10):
        sock = await trio.open_tcp_stream("127.0.0.1", listener.getsockname()[1])
        while server.stats.connections_total == 0 or server.connections:
            await trio.sleep(0.01)
        await sock.aclose()
    records = [r for r in caplog.records if r.name == "server.http.server"]
    if isinstance(error, RuntimeError):
        assert server.stats.peer_gone == 0
        assert [(r.levelno, r.exc_info is not None) for r in records] == [(logging.ERROR, True)]
    else:
        assert server.stats.peer_gone == 1
        assert [(r.levelno, r.exc_info) for r in records] == [(logging.DEBUG, None)]
    listener.close()
