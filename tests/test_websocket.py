"""WebSocket end to end with trio-websocket: both subprotocols, many streams, publish acks, resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from tests.client import Running, publish, request, start_sluice, wait_live, ws_ops_together


class Client:
    """A WebSocket client speaking one Sluice subprotocol."""

    def __init__(self, ws: WebSocketConnection, fmt: str) -> None:
        self.ws = ws
        self.fmt = fmt

    async def send(self, obj: dict[str, Any]) -> None:
        await self.ws.send_message(json.dumps(obj) if self.fmt == "json" else msgpack.packb(obj))

    async def recv(self) -> dict[str, Any]:
        """The next message other than the ``subscribed`` and ``live`` markers."""
        while True:
            msg = await self.recv_any()
            if msg.get("op") not in MARKERS:
                return msg

    async def recv_any(self) -> dict[str, Any]:
        raw = await self.ws.get_message()
        if self.fmt == "json":
            assert isinstance(raw, str)
            return json.loads(raw)  # type: ignore[no-any-return]
        assert isinstance(raw, bytes)
        return msgpack.unpackb(raw, raw=False)  # type: ignore[no-any-return]


MARKERS = ("subscribed", "live")


def url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/v1/ws"


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_many_streams_publish_and_resume(nursery: trio.Nursery, tmp_path: Path, backend: str, fmt: str) -> None:
    s = await start_sluice(nursery, tmp_path, backend)
    proto = f"sluice.{fmt}.v1"
    with trio.fail_after(15):
        async with open_websocket_url(url(s.port), subprotocols=[proto]) as raw:
            assert raw.subprotocol == proto
            c = Client(raw, fmt)
            for name in ("a", "b"):
                await c.send({"op": "subscribe", "stream": name, "from": "start"})
            await wait_live(s.ctx, "a")
            await wait_live(s.ctx, "b")
            await c.send({"op": "publish", "stream": "a", "data": "hello", "ref": 7})
            got = [await c.recv(), await c.recv()]
            ack = next(m for m in got if m["op"] == "published")
            ev = next(m for m in got if m["op"] == "event")
            assert ack["ref"] == 7 and ack["id"] == ev["id"]
            want_data: Any = "hello" if fmt == "json" else b"hello"
            assert ev == {"op": "event", "stream": "a", "id": ack["id"], "type": "message", "data": want_data}
            bid = await publish(s.port, "b", "on b", type_="t")
            evb = await c.recv()
            assert (evb["stream"], evb["id"], evb["type"]) == ("b", bid, "t")
            await c.send({"op": "ping"})
            assert await c.recv() == {"op": "pong"}
            await c.send({"op": "unsubscribe", "stream": "b"})
        ids = [await publish(s.port, "a", f"m{i}") for i in range(3)]
        async with open_websocket_url(url(s.port), subprotocols=[proto]) as raw:
            c = Client(raw, fmt)
            await c.send({"op": "subscribe", "stream": "a", "last_event_id": ack["id"]})
            got = [await c.recv() for _ in range(3)]
            assert [m["id"] for m in got] == ids


async def test_errors_keep_socket_open_and_resets(sluice: Running) -> None:
    with trio.fail_after(15):
        async with open_websocket_url(url(sluice.port), subprotocols=["sluice.json.v1"]) as raw:
            c = Client(raw, "json")
            await c.send({"op": "subscribe", "stream": "bad name"})
            assert (await c.recv())["code"] == "bad_stream"
            await c.send({"op": "fly", "ref": "r1"})
            err = await c.recv()
            assert (err["op"], err["code"], err["ref"]) == ("error", "bad_op", "r1")
            await raw.send_message("{not json")
            assert (await c.recv())["code"] == "bad_message"
            await c.send({"op": "publish", "stream": "w", "type": "sluice.x", "data": "x", "ref": 2})
            assert (await c.recv())["code"] == "bad_type"
            await c.send({"op": "subscribe", "stream": "w", "last_event_id": "junk"})
            reset = await c.recv()
            assert reset == {"op": "reset", "stream": "w", "reason": "invalid", "earliest": None, "requested": "junk"}
            await c.send({"op": "subscribe", "stream": "w"})
            assert (await c.recv())["code"] == "already_subscribed"
            await c.send({"op": "ping"})
            assert await c.recv() == {"op": "pong"}


async def test_close_delivers_end_and_wrong_frame_kind_closes_1003(sluice: Running) -> None:
    with trio.fail_after(15):
        eid = await publish(sluice.port, "e", "last")
        async with open_websocket_url(url(sluice.port), subprotocols=["sluice.json.v1"]) as raw:
            c = Client(raw, "json")
            await c.send({"op": "subscribe", "stream": "e", "from": "start"})
            assert (await c.recv())["id"] == eid
            await wait_live(sluice.ctx, "e")
            await request(sluice.port, "POST", "/v1/streams/e/close")
            assert await c.recv() == {"op": "end", "stream": "e"}
            await c.send({"op": "publish", "stream": "e", "data": "late", "ref": 1})
            assert (await c.recv())["code"] == "closed"
            await raw.send_message(b"\x00binary")
            with pytest.raises(ConnectionClosed) as info:
                await raw.get_message()
            assert info.value.reason.code == 1003


async def test_resets_for_evicted_and_foreign_ids(nursery: trio.Nursery, tmp_path: Path, backend: str) -> None:
    s = await start_sluice(nursery, tmp_path, backend, store={"max_events": 2})
    with trio.fail_after(15):
        ids = [await publish(s.port, "ev", f"e{i}") for i in range(4)]  # e2, e3 retained
        async with open_websocket_url(url(s.port), subprotocols=["sluice.msgpack.v1"]) as raw:
            c = Client(raw, "msgpack")
            for requested, reason in ((ids[0], "gone"), ("abcdef0123-0000000000000001", "epoch")):
                await c.send({"op": "subscribe", "stream": "ev", "last_event_id": requested})
                reset = await c.recv()
                assert reset == {
                    "op": "reset",
                    "stream": "ev",
                    "reason": reason,
                    "earliest": ids[2],
                    "requested": requested,
                }
                assert [(await c.recv())["id"] for _ in range(2)] == ids[2:]
                await c.send({"op": "unsubscribe", "stream": "ev"})


async def test_publishes_that_arrive_together_are_committed_together_and_answered_in_order(
    nursery: trio.Nursery, tmp_path: Path, backend: str
) -> None:
    s = await start_sluice(nursery, tmp_path, backend)
    with trio.fail_after(15):
        await request(s.port, "POST", "/v1/streams/shut/close")
        ops: list[dict[str, Any]] = [
            *({"op": "publish", "stream": "g:a" if i % 2 else "g:b", "data": f"e{i}", "ref": i} for i in range(8)),
            {"op": "publish", "stream": "no good", "data": "x", "ref": "bad"},
            {"op": "publish", "stream": "shut", "data": "x", "ref": "shut"},
            {"op": "publish", "stream": "g:a", "data": "last", "ref": "last"},
            {"op": "subscribe", "stream": "g:a", "from": "start"},  # handled after the publishes
        ]
        commits = s.ctx.store.stats.commits if backend == "sqlite" else 0  # type: ignore[attr-defined]
        got = await ws_ops_together(s.port, ops, len(ops) - 1 + 5)  # an answer per publish, g:a's five events
    answers, events = got[: len(ops) - 1], got[len(ops) - 1 :]
    assert [a.get("ref") for a in answers] == [*range(8), "bad", "shut", "last"]
    assert [a["op"] for a in answers] == ["published"] * 8 + ["error", "error", "published"]
    assert (answers[8]["code"], answers[9]["code"]) == ("bad_stream", "closed")
    ids_a = [a["id"] for a in answers if a["op"] == "published" and a["ref"] in (1, 3, 5, 7, "last")]
    assert [(e["op"], e["id"], e["data"]) for e in events] == [
        ("event", i, d) for i, d in zip(ids_a, ["e1", "e3", "e5", "e7", "last"], strict=True)
    ]
    if backend == "sqlite":  # nine appends, one transaction
        assert s.ctx.store.stats.commits == commits + 1  # type: ignore[attr-defined]
