"""`sluice serve` as a real supervisor process with N workers, observed the way systemd does.

Each test starts ``python -m server.cli serve`` on port 0 with ``NOTIFY_SOCKET`` naming an
abstract datagram socket the test reads: ``READY=1`` says when it serves, and its ``STATUS=``
carries the port. Every process started here (the supervisor and each worker pid it logged) is
killed by pid when the test ends.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from tests.client import open_sse, publish, request
from tests.supervised import STOP_WITHIN, _is_worker, supervisor

pytestmark = pytest.mark.slow


async def healthz_pids(port: int, connections: int = 60, until: set[int] | None = None) -> Counter[int]:
    """Which worker pid answered ``/healthz`` on each of ``connections`` fresh connections; with
    ``until``, stop early once every pid in it has answered."""
    pids: Counter[int] = Counter()
    for _ in range(connections):
        response = await request(port, "GET", "/healthz")
        assert response.status == 200
        pids[response.json()["pid"]] += 1
        if until is not None and until <= set(pids):
            break
    return pids


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and _is_worker(pid)


async def test_workers_share_the_port_crashed_ones_are_replaced_and_stop_drains(tmp_path: Path) -> None:
    with trio.fail_after(40):
        async with supervisor(tmp_path, "--workers", "3", env={"WATCHDOG_USEC": "400000"}) as sup:
            await sup.ready()
            first = sup.started()
            assert len(first) == 3
            pids = await healthz_pids(sup.port)
            assert set(pids) == set(first), pids  # the kernel spreads connections over every worker

            async with AsyncExitStack() as stack:  # subscribers spread over the workers all get a publish
                readers = [await stack.enter_async_context(open_sse(sup.port, "/v1/streams/bus")) for _ in range(9)]
                event_id = await publish(sup.port, "bus", "to every worker")
                for reader in readers:
                    event = await reader.next()
                    assert (event.id, event.data) == (event_id, "to every worker")

            victim = first[1]
            marker = len(sup.notes.messages)
            os.kill(victim, signal.SIGKILL)
            assert (await request(sup.port, "GET", "/healthz")).status == 200  # the service keeps answering
            await sup.notes.wait("STATUS=serving on", marker)  # the replacement reported READY
            [replacement] = [pid for pid in sup.started() if pid not in first]
            assert sup.started(1) == [victim, replacement]
            assert f"slot 1: worker pid {victim} was killed by SIGKILL" in sup.log()
            assert set(await healthz_pids(sup.port)) == {first[0], replacement, first[2]}
            assert sup.notes.count("WATCHDOG=1") >= 2  # every 0.2 s since the start

            async with trio.open_nursery() as nursery:  # hold an SSE stream open across the stop
                stream = await trio.open_tcp_stream("127.0.0.1", sup.port)
                await stream.send_all(b"GET /v1/streams/s HTTP/1.1\r\nhost: t\r\naccept: text/event-stream\r\n\r\n")
                assert b"200" in await stream.receive_some(4096)
                start = trio.current_time()
                os.kill(sup.proc.pid, signal.SIGTERM)
                await sup.notes.wait("STOPPING=1")
                assert await sup.exit_code(STOP_WITHIN) == 0
                assert trio.current_time() - start < STOP_WITHIN
                nursery.cancel_scope.cancel()
                await stream.aclose()
            assert not any(alive(pid) for pid in sup.started())


async def _probe(port: int, outcomes: Counter[str], stop: trio.Event) -> None:
    """Connect, ask /healthz, repeat until ``stop``; count ``ok`` and each kind of failure."""
    while not stop.is_set():
        try:
            response = await request(port, "GET", "/healthz")
            outcomes["ok" if response.status == 200 else f"status {response.status}"] += 1
        except Exception as exc:
            outcomes[type(exc).__name__] += 1
        await trio.sleep(0.005)


async def _sse_retry(port: int) -> int:
    """The ``retry:`` value a fresh SSE response starts with."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /v1/streams/cfg HTTP/1.1\r\nhost: t\r\naccept: text/event-stream\r\n\r\n")
        data = b""
        while not (match := re.search(rb"\nretry: (\d+)\n", data)):
            chunk = await stream.receive_some(4096)
            assert chunk, data
            data += chunk
        return int(match.group(1))


async def test_sighup_rolls_every_worker_without_losing_a_connection(tmp_path: Path) -> None:
    config = tmp_path / "sluice.toml"
    config.write_text("[sse]\nretry_ms = 1000\nretry_jitter_ms = 0\n")
    with trio.fail_after(50):
        async with supervisor(tmp_path, "--workers", "3", "--config", str(config)) as sup:
            await sup.ready()
            first = sup.started()
            assert await _sse_retry(sup.port) == 1000

            outcomes: Counter[str] = Counter()
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(_probe, sup.port, outcomes, stop)
                await trio.sleep(0.2)
                config.write_text("[sse]\nretry_ms = 4321\nretry_jitter_ms = 0\n")
                os.kill(sup.proc.pid, signal.SIGHUP)
                reloading = await sup.notes.wait("RELOADING=1")
                assert re.search(r"^MONOTONIC_USEC=\d+$", sup.notes.messages[reloading], re.M)
                await sup.notes.wait("STATUS=reloading: slot 1/3", reloading)  # the file has been read
                config.write_text("[sse\nretry_ms = 5\n")  # broken: the next reload keeps the config
                os.kill(sup.proc.pid, signal.SIGHUP)  # during a reload: queued
                done = await sup.ready(reloading)
                again = await sup.notes.wait("RELOADING=1", done)
                await sup.ready(again)
                await trio.sleep(0.2)
                stop.set()

            assert outcomes["ok"] > 50 and set(outcomes) == {"ok"}, outcomes  # nothing refused or reset
            log = sup.log()
            assert "keeping the previous configuration" in log and "invalid TOML" in log
            assert len(sup.started()) == 9  # 3 at start, 3 per reload
            for slot in range(3):
                assert len(sup.started(slot)) == 3
            assert not any(alive(pid) for pid in first)
            assert set(await healthz_pids(sup.port)).isdisjoint(first)
            assert await _sse_retry(sup.port) == 4321  # the first reload's configuration, kept
            os.kill(sup.proc.pid, signal.SIGTERM)
            assert await sup.exit_code(STOP_WITHIN) == 0


async def test_a_reload_whose_new_worker_fails_keeps_the_old_ones(tmp_path: Path) -> None:
    config = tmp_path / "sluice.toml"
    config.write_text(f'[store]\npath = "{tmp_path / "ok.db"}"\n')
    with trio.fail_after(30):
        async with supervisor(tmp_path, "--workers", "2", "--config", str(config), db=False) as sup:
            await sup.ready()
            first = sup.started()
            config.write_text('[store]\npath = "/dev/null/not-a-directory/sluice.db"\n')  # valid, unusable
            os.kill(sup.proc.pid, signal.SIGHUP)
            index = await sup.ready(await sup.notes.wait("RELOADING=1"))
            assert "reload failed at slot 0" in sup.notes.messages[index]
            [new] = [pid for pid in sup.started() if pid not in first]
            assert f"slot 0: new worker pid {new} exited with status 1 before it was ready" in sup.log()
            assert set(await healthz_pids(sup.port, 30)) == set(first)  # the old workers kept serving
            os.kill(sup.proc.pid, signal.SIGTERM)
            assert await sup.exit_code(STOP_WITHIN) == 0


async def _crash_looping_slot_is_given_up(tmp_path: Path) -> None:
    crash = {"SLUICE_WORKER_CRASH_SLOTS": "1"}
    async with supervisor(tmp_path, "--workers", "2", env=crash, name="one-bad-slot") as sup:
        await sup.ready()
        status = "\n".join(sup.notes.messages)
        assert "STATUS=slot 1 failed" in status and "more than 5 crashes within 60s" in status
        assert "failed slot(s): 1" in sup.notes.messages[-1]
        assert len(sup.started(1)) == 6  # the first start and 5 restarts, then no more
        assert set(await healthz_pids(sup.port, 10)) == set(sup.started(0))  # the other slot serves
        await trio.sleep(1.0)
        assert len(sup.started(1)) == 6
        os.kill(sup.proc.pid, signal.SIGHUP)  # a reload gives the failed slot one more chance
        index = await sup.ready(await sup.notes.wait("RELOADING=1"))
        assert "reload failed at slot 1" in sup.notes.messages[index]
        assert (len(sup.started(0)), len(sup.started(1))) == (2, 7)  # slot 0 was still replaced
        assert set(await healthz_pids(sup.port, 10)) == {sup.started(0)[-1]}
        os.kill(sup.proc.pid, signal.SIGTERM)
        assert await sup.exit_code(STOP_WITHIN) == 0


async def _every_slot_failing_exits_1(tmp_path: Path) -> None:
    crash = {"SLUICE_WORKER_CRASH_SLOTS": "0"}
    async with supervisor(tmp_path, "--workers", "1", env=crash, name="all-bad") as sup:
        assert await sup.exit_code(20) == 1
        assert "every worker slot has failed" in sup.log()
        assert len(sup.started(0)) == 6


async def test_a_crash_looping_slot_is_reported_and_not_respawned_forever(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:  # both run concurrently: the backoff takes ~3 s
            nursery.start_soon(_crash_looping_slot_is_given_up, tmp_path)
            nursery.start_soon(_every_slot_failing_exits_1, tmp_path)


# Becomes the supervisor with systemd's view: the socket on fd 3, LISTEN_PID = its own pid.
ACTIVATE = (
    "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd); "
    "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES='web'); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def _activated(sock: socket.socket) -> Callable[..., object]:
    return lambda tmp_path, *args, **kw: supervisor(
        tmp_path, *args, prefix=[sys.executable, "-c", ACTIVATE, str(sock.fileno())], pass_fds=[sock.fileno()], **kw
    )


async def test_socket_activation_serves_on_systemds_socket(tmp_path: Path) -> None:
    with socket.socket() as listener, trio.fail_after(30):
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        async with _activated(listener)(tmp_path, "--workers", "2") as sup:  # type: ignore[attr-defined]
            await sup.ready()
            assert sup.port == port  # systemd's socket, not one of its own on port 0
            assert "using 1 socket(s) from systemd" in sup.log() and "(web)" in sup.log()
            # Two workers share one socket: which one accepts a connection is the kernel's choice
            # (both are woken), so ask until both answered, within a bound.
            workers = set(sup.started())
            assert set(await healthz_pids(port, 400, until=workers)) == workers
            os.kill(sup.proc.pid, signal.SIGTERM)
            assert await sup.exit_code(STOP_WITHIN) == 0
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # still listening: the supervisor never shuts systemd's socket down

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, trio.fail_after(20):
        async with _activated(udp)(tmp_path, name="bad-fd") as sup:  # type: ignore[attr-defined]
            assert await sup.exit_code(15) == 1
            assert "file descriptor 3 is not a TCP socket" in sup.log()


async def test_a_stop_with_unready_delay_keeps_serving_while_readyz_says_503(tmp_path: Path) -> None:
    """``drain.unready_delay``: on SIGTERM every worker answers ``/readyz`` with 503 at once, and
    goes on accepting and serving (new connections, publishes, live events) for that long; only
    then do the workers drain, and the supervisor exits 0."""
    delay = 5.0  # long enough for the checks below on a loaded machine; the test waits it out
    with trio.fail_after(delay + STOP_WITHIN + 20):
        async with supervisor(tmp_path, "--workers", "2", "--set", f"drain.unready_delay={delay}") as sup:
            await sup.ready()
            assert (await request(sup.port, "GET", "/readyz")).status == 200
            async with open_sse(sup.port, "/v1/streams/unready?from=start") as sse:
                assert sse.status == 200
                os.kill(sup.proc.pid, signal.SIGTERM)
                unready = await sup.notes.wait("STATUS=stopping: /readyz answers 503")
                # both workers (fresh connections land on either) say 503, and still serve
                answers = Counter([(await request(sup.port, "GET", "/readyz")).status for _ in range(20)])
                assert answers == Counter({503: 20}), answers
                assert (await request(sup.port, "GET", "/healthz")).status == 200
                eid = await publish(sup.port, "unready", "still here")
                [event] = await sse.take(1)
                assert (event.id, event.data) == (eid, "still here")
                draining = await sup.notes.wait("STATUS=stopping: draining workers", unready)
                assert draining > unready
                rest = await sse.until_end()  # then the drain ends the response (the client resumes elsewhere)
                assert sse.finished and [e for e in rest if not e.event.startswith("sluice.")] == [], rest
            assert await sup.exit_code(delay + STOP_WITHIN) == 0
    assert sup.log().count("host stopping: /readyz answers 503 until the drain") == 2
