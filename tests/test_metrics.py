"""``/metrics``: the samples of one worker (pure), the host's totals from snapshot files, the
guard's refusal counters over HTTP, and a real supervisor with two workers.

The host tests run several :class:`HostMetrics` in this process, each given its own pid, with a
fake liveness check and wall clock, so "a worker died" is one set operation.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from server.core.hub_stats import HubStats
from server.http.stats import HttpStats
from server.observability.host import FOLDED_KEEP, RETIRED, STALE_AFTER, HostMetrics, metrics_dir
from server.observability.metrics import Samples, collect, family, key, render
from server.observability.stats import EdgeStats
from tests.client import publish, request, start_sluice
from tests.supervised import supervisor

# ---- samples and rendering ------------------------------------------------------------------


def parse(text: bytes) -> tuple[dict[str, int], dict[str, str]]:
    """``({sample key: value}, {family: type})`` of an exposition; checks every sample has a TYPE."""
    values: dict[str, int] = {}
    types: dict[str, str] = {}
    for line in text.decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types, f"two TYPE lines for {name}"
            types[name] = kind
        elif line and not line.startswith("#"):
            sample, value = line.rsplit(" ", 1)
            assert family(sample) in types, line
            values[sample] = int(value)
    return values, types


def test_hub_names_are_unchanged_and_http_fields_are_exported_generically() -> None:
    hub = HubStats(published=3, delivered=7, subscriptions=2, subscriptions_total=5)
    hub.resets["gone"] = 1
    http = HttpStats(connections_open=4, connections_total=9, slow_consumers=1)
    values, types = parse(render(collect(hub, http)))
    assert values["sluice_published_total"] == 3
    assert values["sluice_delivered_total"] == 7
    assert values['sluice_resets_total{reason="gone"}'] == 1
    assert (values["sluice_subscriptions"], types["sluice_subscriptions"]) == (2, "gauge")
    assert (values["sluice_subscriptions_total"], types["sluice_subscriptions_total"]) == (5, "counter")
    assert (values["sluice_http_connections_open"], types["sluice_http_connections_open"]) == (4, "gauge")
    assert values["sluice_http_connections_total"] == 9  # already ends in _total: not doubled
    assert values["sluice_http_slow_consumers_total"] == 1
    for name in HttpStats.__dataclass_fields__:  # every field, including ones added later
        assert any(sample.startswith(f"sluice_http_{name}") for sample in values), name


def test_a_field_added_to_a_record_is_exported_without_code_changes() -> None:
    @dataclass
    class Later(HttpStats):
        header_timeouts_v2: int = 0
        by_kind: dict[str, int] = field(default_factory=dict)

    record = Later(header_timeouts_v2=2)
    record.by_kind["x"] = 1
    values, types = parse(render(collect(HubStats(), record)))
    assert values["sluice_http_header_timeouts_v2_total"] == 2
    assert types["sluice_http_header_timeouts_v2_total"] == "counter"
    assert values['sluice_http_by_kind_total{key="x"}'] == 1


def test_edge_refusals_are_labelled_and_escaped() -> None:
    edge = EdgeStats()
    edge.refused(401, "expired")
    edge.refused(401, "expired")
    edge.limited(429, "publish")
    edge.limited(413, "publish_bytes")
    values, _ = parse(render(collect(HubStats(), edge=edge)))
    assert values['sluice_edge_auth_refused_total{status="401",reason="expired"}'] == 2
    assert values['sluice_edge_rate_limited_total{status="429",route="publish"}'] == 1
    assert values['sluice_edge_rate_limited_total{status="413",route="publish_bytes"}'] == 1
    assert key("m", {"l": 'a"b\\c\nd'}) == 'm{l="a\\"b\\\\c\\nd"}'


# ---- host totals from snapshots -------------------------------------------------------------


class Host:
    """Workers sharing one snapshot directory; ``dead`` pids fail the liveness check."""

    def __init__(self, directory: Path) -> None:
        self.directory = str(directory)
        self.dead: set[int] = set()
        self.now = 1000.0

    def worker(self, pid: int, samples: Samples) -> HostMetrics:
        metrics = HostMetrics(
            self.directory, lambda: samples, alive=lambda p: p not in self.dead, clock=lambda: self.now
        )
        metrics.pid, metrics.name = pid, f"{pid}-t{pid}.json"
        return metrics


def worker_samples(published: int, open_: int) -> Samples:
    return Samples({"sluice_published_total": published}, {"sluice_http_connections_open": open_})


def test_totals_add_live_counters_and_the_other_workers_snapshots(tmp_path: Path) -> None:
    host = Host(tmp_path)
    a_samples, b_samples = worker_samples(3, 1), worker_samples(5, 2)
    a, b = host.worker(101, a_samples), host.worker(102, b_samples)
    b.write()
    a_samples.counters["sluice_published_total"] = 4  # live: newer than any snapshot
    values, types = parse(a.render())
    assert values["sluice_published_total"] == 9
    assert values["sluice_http_connections_open"] == 3
    assert (values["sluice_workers"], types["sluice_workers"]) == (2, "gauge")
    # answering wrote A's snapshot first: B sees exactly what A reported for itself
    assert b.totals().counters["sluice_published_total"] == 9


def test_a_dead_workers_counters_stay_and_its_gauges_go(tmp_path: Path) -> None:
    host = Host(tmp_path)
    a, b = host.worker(101, worker_samples(3, 1)), host.worker(102, worker_samples(5, 2))
    b.write()
    before = a.totals()
    b_file = tmp_path / b.name
    assert b.totals().counters == before.counters == {"sluice_published_total": 8}
    host.dead.add(101)
    after = b.totals()
    assert after.counters["sluice_published_total"] == 8  # never backwards
    assert (after.gauges["sluice_http_connections_open"], after.gauges["sluice_workers"]) == (2, 1)
    assert b.fold() == 1  # a's file goes into retired.json, the totals stay
    assert not (tmp_path / a.name).exists() and b_file.exists()
    retired = json.loads((tmp_path / RETIRED).read_text())
    assert retired["counters"] == {"sluice_published_total": 3} and retired["folded"] == [a.name]
    assert b.totals().counters["sluice_published_total"] == 8
    assert b.fold() == 0  # nothing left to fold


def test_stale_snapshots_keep_counters_but_not_gauges(tmp_path: Path) -> None:
    host = Host(tmp_path)
    a, b = host.worker(101, worker_samples(3, 1)), host.worker(102, worker_samples(5, 2))
    b.write()
    host.now += STALE_AFTER + 1  # b is alive but stopped writing (or its pid was reused)
    totals = a.totals()
    assert totals.counters["sluice_published_total"] == 8
    assert (totals.gauges["sluice_http_connections_open"], totals.gauges["sluice_workers"]) == (1, 1)
    assert a.fold() == 0  # alive: never folded


def test_a_fold_interrupted_before_removing_files_counts_them_once(tmp_path: Path) -> None:
    host = Host(tmp_path)
    a, b = host.worker(101, worker_samples(3, 0)), host.worker(102, worker_samples(5, 0))
    b.write()
    host.dead.add(102)
    # the state a fold leaves when it stops between writing retired.json and removing the files
    (tmp_path / RETIRED).write_text(json.dumps({"counters": {"sluice_published_total": 5}, "folded": [b.name]}))
    assert a.totals().counters["sluice_published_total"] == 8  # a reader counts b once
    assert a.fold() == 0 and not (tmp_path / b.name).exists()  # removed, not added again
    assert a.totals().counters["sluice_published_total"] == 8


def test_folds_stay_bounded_over_many_replacements(tmp_path: Path) -> None:
    host = Host(tmp_path)
    survivor = host.worker(1, worker_samples(0, 0))
    for pid in range(1000, 1000 + FOLDED_KEEP + 10):
        host.worker(pid, worker_samples(1, 1)).write()
        host.dead.add(pid)
        if pid % 100 == 0:
            survivor.fold()
    survivor.fold()
    assert {p.name for p in tmp_path.iterdir()} <= {"fold.lock", RETIRED, survivor.name}
    retired = json.loads((tmp_path / RETIRED).read_text())
    assert len(retired["folded"]) == FOLDED_KEEP
    totals = survivor.totals()
    assert totals.counters["sluice_published_total"] == FOLDED_KEEP + 10
    assert totals.gauges["sluice_workers"] == 1


def test_unreadable_and_foreign_files_are_ignored(tmp_path: Path) -> None:
    host = Host(tmp_path)
    a = host.worker(101, worker_samples(3, 1))
    (tmp_path / "102-x.json").write_text("{not json")
    (tmp_path / "103-x.json").write_text(json.dumps({"written": host.now, "counters": {"x": -1, "y": "2", "z": 4}}))
    (tmp_path / "notes.json").write_text("{}")
    totals = a.totals()
    assert totals.counters == {"sluice_published_total": 3, "z": 4}
    assert totals.gauges["sluice_workers"] == 2  # 103's file is fresh and its pid is "alive"


def test_without_a_directory_only_this_worker_is_rendered() -> None:
    metrics = HostMetrics(None, lambda: worker_samples(3, 1))
    values, _ = parse(metrics.render())
    assert values == {"sluice_published_total": 3, "sluice_http_connections_open": 1, "sluice_workers": 1}
    assert metrics_dir(None) is None and metrics_dir("/run/x") == "/run/x/metrics"


# ---- one real worker --------------------------------------------------------------------------


async def test_a_worker_exports_engine_and_guard_counters(nursery: trio.Nursery, tmp_path: Path) -> None:
    rules = [
        {"route": "publish", "rate": 0.01, "burst": 1, "streams": "hot"},
        {"route": "publish_bytes", "rate": 0.01, "burst": 10},
    ]
    s = await start_sluice(nursery, tmp_path, "memory", limits={"rules": rules})
    with trio.fail_after(20):
        post = {"content-type": "text/plain"}
        assert (await request(s.port, "POST", "/v1/streams/hot", b"a", post)).status == 201
        assert (await request(s.port, "POST", "/v1/streams/hot", b"b", post)).status == 429
        assert (await request(s.port, "POST", "/v1/streams/cold", b"x" * 11, post)).status == 413
        values, _ = parse((await request(s.port, "GET", "/metrics")).body)
    assert values["sluice_published_total"] == 1
    assert values['sluice_edge_rate_limited_total{status="429",route="publish"}'] == 1
    assert values['sluice_edge_rate_limited_total{status="413",route="publish_bytes"}'] == 1
    assert values["sluice_http_connections_total"] == 4  # three posts and this request
    assert values["sluice_http_connections_open"] == 1
    assert values["sluice_workers"] == 1


async def test_auth_refusals_are_counted_by_reason(nursery: trio.Nursery, tmp_path: Path) -> None:
    (tmp_path / "hs.key").write_bytes(b"k" * 40)
    auth = {"enabled": True, "keys": [{"alg": "HS256", "file": str(tmp_path / "hs.key")}]}
    s = await start_sluice(nursery, tmp_path, "memory", auth=auth)
    with trio.fail_after(20):
        assert (await request(s.port, "POST", "/v1/streams/a", b"x")).status == 401
        bad = {"authorization": "Bearer not.a.token"}
        assert (await request(s.port, "GET", "/v1/streams/a/poll?timeout=0", headers=bad)).status == 401
        values, _ = parse((await request(s.port, "GET", "/metrics")).body)
    assert values['sluice_edge_auth_refused_total{status="401",reason="missing"}'] == 1
    assert values['sluice_edge_auth_refused_total{status="401",reason="invalid"}'] == 1


# ---- a real supervisor with two workers ---------------------------------------------------------


async def scrape(port: int) -> dict[str, int]:
    response = await request(port, "GET", "/metrics")
    assert response.status == 200
    return parse(response.body)[0]


def snapshots(directory: Path) -> dict[int, dict[str, int]]:
    """Each worker's published count, from the snapshot files (pid -> counters)."""
    out: dict[int, dict[str, int]] = {}
    for path in directory.glob("*.json"):
        if re.fullmatch(r"\d+-\w+\.json", path.name):
            out[int(path.name.split("-")[0])] = json.loads(path.read_text())["counters"]
    return out


async def wait_for(predicate: Callable[[], bool | Awaitable[bool]]) -> None:
    """Poll ``predicate`` until true: waiting for a snapshot, bounded by the caller's deadline."""
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        await trio.sleep(0.05)


@pytest.mark.slow
async def test_two_workers_report_host_totals_that_survive_a_killed_worker(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    snaps = run / "metrics"
    with trio.fail_after(60):
        async with supervisor(tmp_path, "--workers", "2", env={"RUNTIME_DIRECTORY": str(run)}) as sup:
            await sup.ready()
            first = sup.started()
            assert len(first) == 2
            published = 40
            for i in range(published):  # one fresh connection each: SO_REUSEPORT spreads them
                await publish(sup.port, f"s{i % 3}", f"e{i}")

            def settled(n: int, pids: set[int] | None = None) -> bool:
                found = snapshots(snaps)
                live = {pid: c for pid, c in found.items() if pids is None or pid in pids}
                return sum(c.get("sluice_published_total", 0) for c in found.values()) + retired() == n and (
                    pids is None or set(live) >= pids
                )

            def retired() -> int:
                path = snaps / RETIRED
                return json.loads(path.read_text())["counters"].get("sluice_published_total", 0) if path.exists() else 0

            await wait_for(lambda: settled(published, set(first)))  # both snapshots current
            per_worker = {pid: c["sluice_published_total"] for pid, c in snapshots(snaps).items()}
            assert set(per_worker) == set(first) and all(per_worker.values()), per_worker  # both served
            answers = [await scrape(sup.port) for _ in range(20)]  # whichever worker answers
            assert {a["sluice_published_total"] for a in answers} == {published}
            assert {a["sluice_workers"] for a in answers} == {2}
            assert {a["sluice_store_events_total"] for a in answers} == {published}  # both writers
            assert all(0 < a["sluice_store_commits_total"] <= a["sluice_store_requests_total"] for a in answers)
            assert all("sluice_store_largest_batch_total" not in a for a in answers)
            before: dict[str, int] = {}  # the most any answer reported, per counter
            for answer in answers:
                for sample, value in answer.items():
                    if family(sample).endswith("_total"):
                        before[sample] = max(before.get(sample, 0), value)

            victim = first[1]
            marker = len(sup.notes.messages)
            os.kill(victim, signal.SIGKILL)
            await sup.notes.wait("STATUS=serving on", marker)  # the replacement is READY
            [replacement] = [pid for pid in sup.started() if pid not in first]

            async def replaced() -> bool:
                now = await scrape(sup.port)
                for sample, value in before.items():  # counters never go backwards
                    assert now.get(sample, 0) >= value, (sample, now.get(sample), value)
                return now["sluice_workers"] == 2

            await wait_for(replaced)  # the replacement counted, the victim's gauges gone
            await wait_for(lambda: not any(p.name.startswith(f"{victim}-") for p in snaps.iterdir()))  # folded
            assert (await scrape(sup.port))["sluice_published_total"] == published  # the victim's stay

            for i in range(10):
                await publish(sup.port, "after", f"a{i}")
            await wait_for(lambda: settled(published + 10, {first[0], replacement}))
            answers = [await scrape(sup.port) for _ in range(20)]
            assert {a["sluice_published_total"] for a in answers} == {published + 10}
            assert {a["sluice_workers"] for a in answers} == {2}
            os.kill(sup.proc.pid, signal.SIGTERM)
            assert await sup.exit_code(20) == 0
