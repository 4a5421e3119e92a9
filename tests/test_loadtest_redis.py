"""The harness on the Redis store: its own redis-server, Sluice on it on one host or two, Redis's
CPU measured apart, the notice bus's counters read, and the bench's rows for all of it.

Each run is small and bounded by the harness's own deadlines; every process is stopped by its
PID. Nothing here asserts a speed: only that the figures exist and the counts are exact.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest import bench, cli, redisd, report
from loadtest.serverpid import growth, parse_bus, scrape
from loadtest.stacks import CROSS, PUBLISHER_HOST, REDIS, SUBSCRIBER_HOST, open_stack
from loadtest.targets import sluice_env, store_args

SUBS, RATE = 10, 20  # each tiny run: 10 subscribers, 20 events in 1 s


def redis_command(port: int, command: str) -> bytes:
    """One inline command to the redis-server on ``port``; its raw answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(command.encode() + b"\r\n")
        return sock.recv(4096)


# --- pieces, without starting anything ----------------------------------------------------------


def test_the_store_goes_on_the_command_line_and_the_runtime_directory_is_never_inherited(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    redis = {"store": {"backend": "redis", "redis_url": "redis://127.0.0.1:7000/0", "max_events": 50}}
    assert store_args(redis, tmp_path) == ["--store", "redis", "--redis-url", "redis://127.0.0.1:7000/0"]
    assert store_args({}, tmp_path) == ["--db", str(tmp_path / "sluice.db")]
    assert store_args({"store": {"path": "x.db"}}, tmp_path) == []
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/someone-else")
    env = sluice_env(redis)
    assert "RUNTIME_DIRECTORY" not in env
    assert "SLUICE_STORE_BACKEND" not in env and "SLUICE_STORE_REDIS_URL" not in env  # flags instead
    assert env["SLUICE_STORE_MAX_EVENTS"] == "50"


def test_bus_counters_are_parsed_and_their_growth_is_said_most_telling_first() -> None:
    body = (b"# TYPE sluice_bus_peers gauge\nsluice_bus_peers 1\nsluice_bus_sent_total 7\n"
            b"sluice_bus_repairs_total 2\nsluice_bus_redis_received_total{kind=\"notice\"} 40\n"
            b"sluice_published_total 9\n")
    before = {"sent": 3, "repairs": 2}
    after = parse_bus(body)
    assert after == {"sent": 7, "repairs": 2, 'redis_received{kind="notice"}': 40}
    grew = growth(before, after)
    assert grew == {'redis_received{kind="notice"}': 40, "repairs": 0, "sent": 4}
    assert report.bus_text(grew) == 'redis_received{kind="notice"} 40, sent 4'
    assert report.bus_text({"sent": 9, "received": 1, "repairs": 1}, most=2) == "repairs 1, received 1 (+1 more)"
    assert report.bus_text(None) == "/metrics not readable"
    assert growth(None, after) is None


def test_the_redis_kinds_are_sluice_on_the_wire_for_the_run_checks() -> None:
    args = cli.parser().parse_args(["run", "fanout", "--start", CROSS, "--subs", "40"])
    assert cli.planned(args).endpoint.kind == "sluice"
    bad = cli.parser().parse_args(["run", "fanout", "--start", REDIS, "--transport", "ws-json", "--per-conn", "4"])
    with pytest.raises(ValueError, match="needs at least 4 streams"):
        cli.planned(bad)


def test_a_missing_redis_server_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(redisd.shutil, "which", lambda _name: None)
    monkeypatch.setattr(redisd, "PATHS", (tmp_path / "nowhere",))
    with pytest.raises(redisd.RedisUnavailable, match="redis-server"), redisd.open_redis(tmp_path):
        pass
    with pytest.raises(ValueError, match="appendfsync"), redisd.open_redis(tmp_path, appendfsync="sometimes"):
        pass


# --- real processes -----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_harness_redis_server_is_durable_by_default_and_stopped_by_its_pid(tmp_path: Path) -> None:
    with redisd.open_redis(tmp_path / "a") as redis:
        assert redis.url == f"redis://127.0.0.1:{redis.port}/0"
        assert b"always" in redis_command(redis.port, "CONFIG GET appendfsync")
        assert b"yes" in redis_command(redis.port, "CONFIG GET appendonly")
        assert redis_command(redis.port, "CONFIG GET save").endswith(b"$0\r\n\r\n")  # no RDB snapshots
        assert str(tmp_path / "a").encode() in redis_command(redis.port, "CONFIG GET dir")
        pid = redis.pid
    assert not os.path.exists(f"/proc/{pid}")
    with redisd.open_redis(tmp_path / "b", appendfsync="everysec") as redis:
        assert b"everysec" in redis_command(redis.port, "CONFIG GET appendfsync")
    assert (tmp_path / "a" / redisd.LOG_NAME).exists()


@pytest.mark.slow
def test_two_hosts_on_one_redis_keep_their_own_runtime_directories(tmp_path: Path) -> None:
    with open_stack(CROSS, workdir=tmp_path, workers=1) as stack:
        assert stack.hosts == 2 and set(stack.bus_hosts) == {PUBLISHER_HOST, SUBSCRIBER_HOST}
        assert stack.pub_endpoint is not None and stack.pub_endpoint.port != stack.endpoint.port
        for name, ep in stack.bus_hosts.items():
            body, note = scrape(ep)
            assert body is not None, note
            # one worker each: a shared runtime directory would make each host count two
            assert b"\nsluice_workers 1\n" in body, (name, body)
            assert b"\nsluice_bus_peers 0\n" in body, (name, body)
        assert (tmp_path / "host-a" / "run").is_dir() and (tmp_path / "host-b" / "run").is_dir()
        pids = [stack.pid, *stack.other_pids, stack.helpers["redis"]]
    assert [p for p in pids if os.path.exists(f"/proc/{p}")] == []


TINY = bench.Entry("cross-host", "cross-host, tiny", (REDIS, CROSS), "fanout", SUBS, rate=RATE, duration=1,
                   workers={REDIS: 1, CROSS: 1})


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, dict[str, Any]]]]:
    """The tiny cross-host entry run by the bench against both Redis targets, one after the other."""
    out = tmp_path_factory.mktemp("perf")
    results = {kind: bench.run_entry(TINY, kind, out, 1.0) for kind in TINY.targets}
    yield out, results


@pytest.mark.slow
@pytest.mark.parametrize("kind", [REDIS, CROSS])
def test_a_redis_run_counts_exactly_and_measures_redis_apart(
    bench_out: tuple[Path, dict[str, dict[str, Any]]], kind: str
) -> None:
    r = bench_out[1][kind]
    assert r["ok"], (r["verdict"], r["errors"])
    assert r["published"] == RATE
    assert r["delivered"] == SUBS * RATE == r["latency_ms"]["count"]
    assert r["verdict"]["lost"] == r["verdict"]["duplicated"] == r["verdict"]["disorder"] == 0
    redis = r["helpers"]["redis"]
    assert redis["cpu_s"] >= 0 and redis["cpu_us_per_published"] == pytest.approx(
        redis["cpu_us_per_event"] * SUBS, abs=0.1)
    total = r["server_cpu_us_per_event"] + redis["cpu_us_per_event"]
    assert r["server_with_helpers_cpu_us_per_event"] == pytest.approx(total, abs=0.02)
    assert r["stack"]["kind"] == kind and "appendfsync always" in r["stack"]["redis"]
    saved = r["spec"]  # the spec as saved names both hosts and the helper
    assert list(saved["helpers"]) == ["redis"]
    if kind == CROSS:
        assert r["server_hosts"] == 2 and len(saved["server_pids"]) == 1
        assert saved["pub_endpoint"]["port"] != saved["endpoint"]["port"]
        assert set(r["bus"]) == {PUBLISHER_HOST, SUBSCRIBER_HOST}
        # something carried the events to host B: today its reconcile passes (repairs)
        assert any(v > 0 for v in r["bus"][SUBSCRIBER_HOST].values())
    else:
        assert r["server_hosts"] == 1 and not saved["server_pids"] and saved["pub_endpoint"] is None
        assert set(r["bus"]) == {PUBLISHER_HOST}
    assert all(grew is not None for grew in r["bus"].values())  # every host's /metrics was read
    names = [k for k, _ in report.rows(r)]
    assert "redis CPU µs per delivered event" in names and "server + redis CPU µs per delivered event" in names
    assert (bench_out[0] / f"cross-host-{kind}.json").exists()
    assert (bench_out[0] / f"cross-host-{kind}-latency.png").exists()


@pytest.mark.slow
def test_the_bench_page_has_a_row_per_redis_target_and_the_cross_host_goal(
    bench_out: tuple[Path, dict[str, dict[str, Any]]], tmp_path: Path
) -> None:
    out = bench_out[0]
    page = bench.render(bench.load_results(out), out, tmp_path / "PERFORMANCE.md")
    table = page.split("### cross-host:", 1)[1].split("\n\n")[1].splitlines()
    assert "Redis CPU µs/event" in table[0] and "bus counters grown on the subscribers' host" in table[0]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table[2:]}
    assert set(rows) == {REDIS, CROSS}
    for kind, cells in rows.items():
        assert cells[1] == ("2 hosts x 1" if kind == CROSS else "1")
        assert cells[3:5] == [f"{RATE:,}", f"{SUBS * RATE:,}"]
        assert cells[5] == "0 / 0 / 0"
        assert cells[8] != "-" and cells[9] != "-"  # Redis's CPU, and the sum
    (goal,) = [line for line in page.splitlines() if line.startswith("| cross-host (publish on A")]
    assert "vs one host" in goal and not goal.endswith("| not run |")
