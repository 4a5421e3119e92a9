"""A Redis outage as clients see it, on a real `sluice serve --store redis` and `redis-server`:
publishes are refused with 503 and Retry-After within `store.redis_timeout` (never hang), a
WebSocket publish is answered `store_unavailable`, a new subscription or poll gets 503, an open
subscriber stays connected, and once
Redis is back it continues exactly, with nothing acknowledged lost."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

from tests.client import open_sse, publish, request, ws_ops_together
from tests.redis_server import RedisServer
from tests.supervised import supervisor

pytestmark = pytest.mark.slow

DEADLINE = 90.0


async def test_publishes_get_503_while_redis_is_down_and_subscribers_continue(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    flags = ["--store", "redis", "--redis-url", redis.url, "--workers", "1", "--set", "store.redis_timeout=1"]
    try:
        with trio.fail_after(DEADLINE):
            async with supervisor(tmp_path, *flags, db=False, env={"RUNTIME_DIRECTORY": str(tmp_path)}) as s:
                await s.ready()
                assert (await request(s.port, "GET", "/readyz")).status == 200
                first = await publish(s.port, "room", "before")
                async with open_sse(s.port, "/v1/streams/room", {"last-event-id": first}) as sse:
                    assert sse.status == 200
                    redis.stop()
                    with trio.fail_after(5):  # refused within redis_timeout (1 s), never a hang
                        refused = await request(
                            s.port, "POST", "/v1/streams/room", b"lost?", {"content-type": "text/plain"}
                        )
                    assert refused.status == 503, refused.body
                    assert refused.headers["retry-after"] == "1"
                    assert refused.json()["error"] == "store_unavailable"
                    [answer] = await ws_ops_together(
                        s.port, [{"op": "publish", "stream": "room", "data": "ws", "ref": "r1"}], 1
                    )
                    assert (answer["op"], answer["code"], answer.get("ref")) == ("error", "store_unavailable", "r1")
                    for path, headers in (
                        ("/v1/streams/room/info", {}),
                        ("/v1/streams/room", {"accept": "text/event-stream", "last-event-id": first}),
                        ("/v1/streams/room/poll?from=start&timeout=0", {}),
                    ):
                        resp = await request(s.port, "GET", path, b"", headers)
                        assert resp.status == 503, (path, resp.status, resp.body)
                        assert resp.json()["error"] == "store_unavailable"
                    ready = await request(s.port, "GET", "/readyz")  # the balancer takes the host out
                    assert (ready.status, ready.json()["status"]) == (503, "store_unavailable")
                    redis.start()  # reloads its AOF: everything acknowledged is there
                    after = ""
                    with trio.fail_after(30):
                        while not after:  # the client reconnects by itself; until then, 503s
                            resp = await request(
                                s.port, "POST", "/v1/streams/room", b"after", {"content-type": "text/plain"}
                            )
                            if resp.status == 201:
                                after = str(resp.json()["id"])
                            else:
                                assert resp.status == 503
                                await trio.sleep(0.2)
                    assert (await request(s.port, "GET", "/readyz")).status == 200
                    [event] = await sse.take(1)  # the same connection, the next event exactly
                    assert (event.id, event.data) == (after, "after")
                history = await request(s.port, "GET", "/v1/streams/room/poll?from=start&timeout=0")
                assert [e["data"] for e in history.json()["events"]] == ["before", "after"]
    finally:
        redis.stop()


PUBLISHES = 120  # events in the run; Redis is killed once a third of them are acknowledged
KILL_AT = 40


async def _publish_until_acknowledged(port: int, i: int, statuses: list[int]) -> str:
    """Publish event ``i`` with its own Idempotency-Key until it is acknowledged: each attempt under
    a deadline (a hang fails the test), a 503 or a refused connection retried with the same key."""
    while True:
        with trio.fail_after(5):  # store.redis_timeout is 1 s: refused quickly, never a hang
            try:
                resp = await request(
                    port,
                    "POST",
                    "/v1/streams/run",
                    str(i).encode(),
                    {"content-type": "text/plain", "idempotency-key": f"k{i}"},
                )
            except OSError:
                statuses.append(0)
                await trio.sleep(0.05)
                continue
        statuses.append(resp.status)
        if resp.status == 201:
            return str(resp.json()["id"])
        assert resp.status == 503, resp.body
        assert resp.headers["retry-after"] == "1"
        await trio.sleep(0.05)


async def test_redis_killed_and_restarted_during_publishing_loses_nothing_acknowledged(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    flags = ["--store", "redis", "--redis-url", redis.url, "--workers", "2", "--set", "store.redis_timeout=1"]
    try:
        with trio.fail_after(DEADLINE):
            async with supervisor(tmp_path, *flags, db=False, env={"RUNTIME_DIRECTORY": str(tmp_path)}) as s:
                await s.ready()
                statuses: list[int] = []
                acked: list[str] = [await _publish_until_acknowledged(s.port, 0, statuses)]
                async with (
                    open_sse(s.port, "/v1/streams/run?from=start") as one,
                    open_sse(s.port, "/v1/streams/run?from=start") as two,
                    open_sse(s.port, "/v1/streams/run?from=start") as three,
                ):

                    async def publisher() -> None:
                        for i in range(1, PUBLISHES):
                            acked.append(await _publish_until_acknowledged(s.port, i, statuses))

                    async def outage() -> None:
                        while len(acked) < KILL_AT:
                            await trio.sleep(0.01)
                        # SIGKILL: no shutdown, no last AOF write; with appendfsync always every
                        # acknowledged append was fsynced before its answer
                        redis.signal(signal.SIGKILL)
                        assert redis.proc is not None
                        redis.proc.wait(10)
                        redis.proc = None
                        refused = statuses.count(503)
                        while statuses.count(503) < refused + 5:  # publishes meanwhile are refused
                            await trio.sleep(0.01)
                        redis.start()  # reloads its AOF

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(publisher)
                        nursery.start_soon(outage)
                    assert statuses.count(503) >= 1  # the outage was seen, and answered
                    assert len(set(acked)) == PUBLISHES
                    for sse in (one, two, three):  # the same connections, every event once, in order
                        events = await sse.take(PUBLISHES)
                        assert [e.id for e in events] == acked
                        assert [e.data for e in events] == [str(i) for i in range(PUBLISHES)]
                history = await request(s.port, "GET", f"/v1/streams/run/poll?from=start&timeout=0&limit={PUBLISHES}")
                assert [e["data"] for e in history.json()["events"]] == [str(i) for i in range(PUBLISHES)]
    finally:
        redis.stop()
