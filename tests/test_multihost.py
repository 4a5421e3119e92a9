"""Three Sluice hosts on one ``redis-server`` behind a real haproxy (TCP mode, PROXY v2, round
robin, ``/readyz`` health checks): subscribers on every transport and a steady publisher, all
through the balancer, while one host is SIGKILLed whole (supervisor and workers at once), one
is rolled with SIGHUP and one is stopped (SIGTERM, with ``drain.unready_delay``) and started
again on its port.

Every subscriber's transcript must equal its stream's published sequence exactly (nothing lost,
nothing repeated, in order, no reset); a probe opening a new connection through the balancer
for every ``/healthz`` all along sees only ``200``, except while it is held still around the
kill (a request in flight on a host that is SIGKILLed dies with it: no balancer can replay a
TCP stream). Each "host" is a supervisor with its own port, runtime directory and workers.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from tests.haproxy import Balancer, free_port, open_from, read_head, running_balancer
from tests.redis_server import RedisServer
from tests.resilient import Goal, Probe, assert_exact, finish, publish_acknowledged, start_clients
from tests.supervised import STOP_WITHIN, Supervised, supervisor

pytestmark = pytest.mark.slow

STREAMS = ["hosts:a", "hosts:b", "hosts:c"]
RATE = 40.0  # publishes per second through the balancer, over all streams
TAIL = 60  # publishes after the last operation, so every client is seen live again
UNREADY = 1.0  # drain.unready_delay: well above haproxy's 2 checks x 100 ms to mark a host down
DEADLINE = 150.0


def host_flags(redis: RedisServer, port: int) -> list[str]:
    """``sluice serve`` flags for one host of the three: its own port, the shared Redis store."""
    flags = ["--port", str(port), "--store", "redis", "--redis-url", redis.url, "--workers", "2"]
    settings = {
        "store.redis_prefix": "hosts:",
        "proxy.trusted": "127.0.0.1",  # haproxy connects from 127.0.0.1; the test's direct probes from 127.0.0.2
        "drain.window": "1.0",
        "drain.deadline": "6",
        "drain.unready_delay": str(UNREADY),
        "sse.retry_ms": "100",
        "sse.retry_jitter_ms": "300",
    }
    for key, value in settings.items():
        flags += ["--set", f"{key}={value}"]
    return flags


async def publisher(port: int, published: dict[str, list[str]], ops_done: trio.Event) -> None:
    """Publish round-robin at :data:`RATE` through the balancer until the operations are over
    and :data:`TAIL` more are in; a failed publish is retried with its Idempotency-Key (on
    whatever host the balancer picks: the keys live in Redis)."""
    i = 0
    tail = TAIL
    while tail:
        if ops_done.is_set():
            tail -= 1
        stream = STREAMS[i % len(STREAMS)]
        published[stream].append(await publish_acknowledged(port, stream, i))
        i += 1
        await trio.sleep(1.0 / RATE)


async def direct_status(port: int, path: str) -> int:
    """``GET path`` straight to a host (from 127.0.0.2, an address not trusted to send PROXY)."""
    stream = await open_from("127.0.0.2", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        status, _ = await read_head(stream, bytearray())
    return status


async def accepts(port: int) -> bool:
    """Whether a connection to ``port`` is established (closed again at once)."""
    try:
        stream = await open_from("127.0.0.2", port)
    except OSError:
        return False
    await stream.aclose()
    return True


def kill_whole(host: Supervised) -> None:
    """SIGKILL a host's workers and its supervisor, with no time between for anything to drain."""
    pids = [pid for pid in host.started() if Path(f"/proc/{pid}").exists()]
    for pid in [*pids, host.proc.pid]:
        os.kill(pid, signal.SIGKILL)


async def operations(
    balancer: Balancer,
    hosts: dict[str, Supervised],
    ports: dict[str, int],
    restart: AsyncExitStack,
    tmp_path: Path,
    redis: RedisServer,
    probe: Probe,
) -> None:
    """SIGHUP host b; SIGKILL host a; stop host c and start it again."""
    await trio.sleep(1.5)
    print(f"roll b at {trio.current_time():.1f}")
    b = hosts["b"]
    os.kill(b.proc.pid, signal.SIGHUP)
    reloading = await b.notes.wait("RELOADING=1")
    await b.ready(reloading)
    await trio.sleep(1.0)

    print(f"kill a at {trio.current_time():.1f}")
    await probe.hold()
    kill_whole(hosts["a"])
    while await accepts(ports["a"]):  # SIGKILL is asynchronous: its listening sockets close soon after
        await trio.sleep(0.01)
    probe.release()  # from now on connections to a are refused, and haproxy retries them elsewhere
    await balancer.wait_state("h0", "DOWN")
    await trio.sleep(1.0)

    print(f"stop c at {trio.current_time():.1f}")
    c = hosts["c"]
    os.kill(c.proc.pid, signal.SIGTERM)
    await c.notes.wait("STATUS=stopping: /readyz answers 503")
    assert await direct_status(ports["c"], "/readyz") == 503  # still accepting, no longer ready
    assert await direct_status(ports["c"], "/healthz") == 200
    await balancer.wait_state("h2", "DOWN")  # taken out before anything of it closes
    assert await c.exit_code(UNREADY + STOP_WITHIN) == 0
    print(f"start c at {trio.current_time():.1f}")
    again = await restart.enter_async_context(
        supervisor(tmp_path, *host_flags(redis, ports["c"]), db=False, name="c-again", env=runtime(tmp_path, "c"))
    )
    await again.ready()
    await balancer.wait_state("h2", "UP")
    hosts["c"] = again
    await trio.sleep(1.0)


def runtime(tmp_path: Path, name: str) -> dict[str, str]:
    return {"RUNTIME_DIRECTORY": str(tmp_path / name)}


async def test_three_hosts_behind_haproxy_lose_nothing(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    published: dict[str, list[str]] = {s: [] for s in STREAMS}
    goal = Goal(STREAMS)
    probe = Probe()
    stop_probe = trio.Event()
    ops_done = trio.Event()
    ports = {name: free_port() for name in "abc"}
    for name in "abc":
        (tmp_path / name).mkdir()
    try:
        with trio.fail_after(DEADLINE):
            async with AsyncExitStack() as stack:
                hosts: dict[str, Supervised] = {}
                for name in "abc":
                    flags = host_flags(redis, ports[name])
                    hosts[name] = await stack.enter_async_context(
                        supervisor(tmp_path, *flags, db=False, name=name, env=runtime(tmp_path, name))
                    )
                for host in hosts.values():
                    await host.ready()
                assert [hosts[n].port for n in "abc"] == [ports[n] for n in "abc"]
                balancer = await stack.enter_async_context(
                    running_balancer(tmp_path, [ports[n] for n in "abc"], health="/readyz")
                )
                for server in ("h0", "h1", "h2"):
                    await balancer.wait_state(server, "UP")
                port = balancer.port

                async with trio.open_nursery() as nursery:
                    transcripts = start_clients(nursery, port, goal, sse_h1=30, sse_h2=6, ws=10, poll=6)
                    for _ in range(2):
                        nursery.start_soon(probe.run, port, stop_probe)

                    async with trio.open_nursery() as ops:
                        ops.start_soon(publisher, port, published, ops_done)
                        await operations(balancer, hosts, ports, stack, tmp_path, redis, probe)
                        ops_done.set()
                    print(f"published {sum(map(len, published.values()))} at {trio.current_time():.1f}")
                    stop_probe.set()
                    await finish(goal, transcripts, published)
                    nursery.cancel_scope.cancel()
                states = await balancer.states()
                for name in "bc":
                    os.kill(hosts[name].proc.pid, signal.SIGTERM)
                for name in "bc":
                    assert await hosts[name].exit_code(UNREADY + STOP_WITHIN) == 0
    finally:
        redis.stop()

    assert states == {"h0": "DOWN", "h1": "UP", "h2": "UP"}, states
    assert probe.outcomes["ok"] > 100 and set(probe.outcomes) == {"ok"}, (probe.outcomes, probe.failures)
    kinds = Counter(t.name.split("-")[0] for t in transcripts)
    reconnects = sum(t.reconnects for t in transcripts)
    print(f"subscribers {dict(kinds)}; reconnects {reconnects}; probe {dict(probe.outcomes)}")
    assert_exact(transcripts, published, goal)
    # every host was disrupted once and host a never came back: every streaming client was moved
    # at least once, and those that were on a resumed on b or c (a long-poll connects anew for
    # every poll, and counts only failed polls)
    moved = [(t.name, t.reconnects) for t in transcripts if not t.name.startswith("poll")]
    assert all(reconnects >= 1 for _, reconnects in moved), moved
