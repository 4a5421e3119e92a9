"""The load-test harness end to end, against a real Sluice started for the test (small N).

Each run is bounded by the harness's own deadlines (connect, settle) and stops its processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from loadtest.clients.common import Endpoint
from loadtest.publisher import HttpConn
from loadtest.run import Run
from loadtest.spec import Action, RunSpec
from loadtest.targets import Target, open_target
from loadtest.wspub import WsPubConn

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sluice(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with open_target("sluice", workdir=tmp_path_factory.mktemp("sluice"), workers=1) as target:
        yield target


def run(target: Target, scenario: str, **kw: Any) -> dict[str, Any]:
    kw.setdefault("connect_timeout", 30)
    kw.setdefault("settle_timeout", 20)
    spec = RunSpec(
        scenario=scenario, endpoint=Endpoint(target.host, target.port, target.kind), server_pid=target.pid, **kw
    )
    return Run(spec, progress=False).execute()


def test_fanout_run_checks_every_transcript_and_samples_the_server(sluice: Target) -> None:
    r = run(sluice, "fanout", subs=20, rate=40, duration=1)
    assert r["ok"], r["verdict"]
    assert r["published"] == 40
    assert r["delivered"] == 20 * 40
    assert r["verdict"]["tracks"] == 20 and r["verdict"]["lost"] == 0
    assert r["latency_ms"]["count"] == 800
    assert r["connections"]["held"] == 20
    assert r["server_cpu_us_per_event"] > 0
    assert r["load_cpu"]["us_per_event"] > 0
    assert r["timeline"][0]["phase"] == "connect"


@pytest.mark.parametrize(("fault", "field"), [("drop", "lost"), ("dup", "duplicated")])
def test_an_injected_fault_is_detected_at_every_subscriber(sluice: Target, fault: str, field: str) -> None:
    r = run(sluice, "fanout", subs=10, rate=50, duration=0.4, fault=(fault, 5), settle_timeout=3)
    assert not r["ok"]
    v = r["verdict"]
    assert v[field] == 10
    assert v["lost" if field == "duplicated" else "duplicated"] == 0
    assert v["disorder"] == 0
    if fault == "drop":
        assert v["incomplete"] == 10
        assert "first [5]" in v["samples"][0]


def test_topics_and_llm(sluice: Target) -> None:
    r = run(sluice, "topics", subs=30, rate=100, duration=1)
    assert r["ok"], r["verdict"]
    assert r["verdict"]["expected"] == 100
    llm = run(sluice, "llm", subs=8, rate=50, tokens=20, stagger=0.5)
    assert llm["ok"], llm["verdict"]
    assert llm["verdict"]["ended"] == 8  # every client read to sluice.end
    assert llm["publisher"]["closed"] == 8
    assert llm["delivered"] == 8 * 20


@pytest.mark.parametrize(
    ("transport", "per_conn", "scenario"),
    [("sse-h2", 5, "topics"), ("ws-json", 3, "topics"), ("ws-msgpack", 1, "fanout"), ("longpoll", 1, "fanout")],
)
def test_every_transport(sluice: Target, transport: str, per_conn: int, scenario: str) -> None:
    r = run(sluice, scenario, transport=transport, per_conn=per_conn, subs=12, rate=40, duration=0.5)
    assert r["ok"], (r["verdict"], r["errors"])
    assert r["connections"]["held"] == -(-12 // per_conn)
    assert r["delivered"] == r["verdict"]["expected"] > 0


def test_storm_reconnects_everyone_and_loses_nothing(sluice: Target) -> None:
    r = run(sluice, "storm", subs=20, rate=20, duration=2, actions=[Action(0.8, "storm")])
    assert r["ok"], r["verdict"]
    assert r["reconnects"] == 20
    assert r["resume_s"]["count"] == 20
    assert [m["kind"] for m in r["marks"]] == ["storm"]


def test_idle_reports_rss_per_connection(sluice: Target) -> None:
    r = run(sluice, "idle", subs=25, duration=0.5)
    assert r["ok"]
    assert r["connections"]["held"] == 25
    assert "server_rss_kib_per_conn" in r
    assert r["published"] == 0


def test_deploy_with_restart_and_worker_kill(tmp_path: Path) -> None:
    with open_target("sluice", workdir=tmp_path, workers=2, config={"drain": {"window": 0.5, "deadline": 5}}) as t:
        r = run(
            t,
            "deploy",
            base="topics",
            subs=40,
            rate=40,
            duration=6,
            settle_timeout=30,
            actions=[Action(1.5, "restart", "kill -HUP {pid}"), Action(4, "kill", "kill -KILL {child}")],
        )
    assert [m["exit"] for m in r["marks"]] == [0, 0]
    assert r["verdict"]["lost"] == 0 and r["verdict"]["duplicated"] == 0 and r["verdict"]["disorder"] == 0
    assert r["reconnects"] >= 1
    assert r["ok"], r["verdict"]


def test_cli_writes_json_and_plots_and_fails_on_loss(sluice: Target, tmp_path: Path) -> None:
    base = [
        sys.executable,
        "-m",
        "loadtest.cli",
        "run",
        "fanout",
        "--url",
        sluice.base_url,
        "--server-pid",
        str(sluice.pid),
        "--subs",
        "5",
        "--rate",
        "20",
        "--duration",
        "0.5",
        "--quiet",
        "--settle-timeout",
        "5",
    ]
    ok = subprocess.run(
        [*base, "--json", str(tmp_path / "r.json"), "--plots", str(tmp_path / "plots")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "verdict" in ok.stdout and "OK" in ok.stdout
    assert json.loads((tmp_path / "r.json").read_text())["delivered"] == 50
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "fanout-sse-h1-connections.png",
        "fanout-sse-h1-latency.png",
    ]
    bad = subprocess.run([*base, "--fault", "drop:3"], capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 1
    assert "FAILED" in bad.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "loadtest.cli", "run", "idle", "--url", "http://10.1.2.3:80"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 2 and "127.0.0.0/8" in refused.stderr


def test_publishing_over_websocket_runs_clean_and_a_dropped_event_is_still_caught(sluice: Target) -> None:
    r = run(sluice, "llm", subs=6, rate=50, tokens=15, stagger=0.3, batch=4, pub_transport="ws")
    assert r["ok"], (r["verdict"], r["publisher"])
    assert r["publisher"]["transport"] == "ws"
    assert r["publisher"]["closed"] == 6  # closes go by HTTP: the WebSocket has no close op
    assert r["delivered"] == 6 * 15 and r["verdict"]["ended"] == 6
    bad = run(sluice, "fanout", subs=5, rate=50, duration=0.4, fault=("drop", 3), settle_timeout=3, pub_transport="ws")
    assert not bad["ok"] and bad["verdict"]["lost"] == 5


async def test_the_websocket_publisher_appends_in_order_and_reports_refusals(sluice: Target) -> None:
    endpoint = Endpoint(sluice.host, sluice.port, sluice.kind)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ws = WsPubConn(endpoint, "127.0.0.1", 10, nursery)
            assert await ws.publish([("wspub", "a"), ("wspub", "b"), ("wspub", "c")]) == [None] * 3
            assert await ws.publish([("wspub", "d"), ("bad stream name", "x")]) == [None, "bad_stream"]
            assert await ws.publish([("wspub", "e")]) == [None]  # the same socket goes on
            await ws.aclose()
        conn = HttpConn(endpoint, "127.0.0.1", 10)
        status, body = await conn.request("GET", "/v1/streams/wspub/poll?from=start&timeout=0")
        conn.close()
    assert status == 200
    assert [e["data"] for e in json.loads(body)["events"]] == ["a", "b", "c", "d", "e"]
