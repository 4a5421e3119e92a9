"""`sluice serve --store redis` as real processes: two servers (two runtime directories, two
ports, as two hosts would be) on one ``redis-server`` share every stream's history, and a publish
on either reaches the subscribers of both through the Redis notice bus."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.client import data_of, open_sse, publish, request
from tests.redis_server import RedisServer, redis_server
from tests.supervised import supervisor

__all__ = ["redis_server"]
pytestmark = pytest.mark.slow

DEADLINE = 60.0


async def test_two_servers_on_one_redis_serve_one_history(tmp_path: Path, redis_server: RedisServer) -> None:
    flags = ["--store", "redis", "--redis-url", redis_server.url, "--workers", "2", "--set", "store.redis_prefix=e2e:"]
    flags += ["--set", "bus.reconcile_interval=0"]  # no repair passes: what arrives live came by PUB/SUB
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    with trio.fail_after(DEADLINE):
        async with (
            supervisor(tmp_path / "a", *flags, db=False, name="a", env={"RUNTIME_DIRECTORY": str(tmp_path / "a")}) as a,
            supervisor(tmp_path / "b", *flags, db=False, name="b", env={"RUNTIME_DIRECTORY": str(tmp_path / "b")}) as b,
        ):
            await a.ready()
            await b.ready()
            assert a.port != b.port
            first = await publish(a.port, "room:1", "one")
            async with open_sse(a.port, "/v1/streams/room:1?from=start") as sse:
                assert sse.status == 200
                [event] = await sse.take(1)
                assert (event.id, event.data) == (first, "one")
                second = await publish(a.port, "room:1", "two")
                [live] = await sse.take(1)
                assert (live.id, live.data) == (second, "two")
            # the other server holds the same history: an exact resume, no reset
            async with open_sse(b.port, "/v1/streams/room:1", {"last-event-id": first}) as resumed:
                assert resumed.status == 200
                [event] = await resumed.take(1)
                assert (event.id, event.data, event.event) == (second, "two", "message")
                # published on b, seen live on a's subscriber and b's
                async with open_sse(a.port, "/v1/streams/room:1", {"last-event-id": second}) as on_a:
                    third = await publish(b.port, "room:1", "three")
                    [here] = await resumed.take(1)
                    assert here.id == third
                    # a hears of b's commit through Redis PUB/SUB (no reconciliation runs)
                    [there] = await on_a.take(1)
                    assert (there.id, there.data) == (third, "three")
            info = await request(b.port, "GET", "/v1/streams/room:1/info")
            assert info.status == 200 and info.json()["last_id"] == third
            history = await request(a.port, "GET", "/v1/streams/room:1/poll?from=start&timeout=0")
            assert history.status == 200
            assert data_of_poll(history.json()) == ["one", "two", "three"]
            assert data_of([event]) == ["two"]


def data_of_poll(body: dict[str, object]) -> list[str]:
    """The data of each event of a long-poll answer."""
    events = body["events"]
    assert isinstance(events, list)
    return [str(e["data"]) for e in events]
