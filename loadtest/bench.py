"""``sluice-loadtest bench``: every figure of docs/PERFORMANCE.md, baselines included, in one run.

Each entry starts a fresh server (Sluice, nginx + nchan, or the uvicorn + ASGI baseline; or, see
:mod:`loadtest.stacks`, Sluice on a redis-server of its own, on one host or two) for each
target it compares, runs one scenario with the same harness and settings, saves the result
(JSON) and plots under ``--out``, and finally rewrites the generated part of the page (between
``<!-- bench:begin -->`` and ``<!-- bench:end -->``). The rest of the page is prose and stays.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest import report
from loadtest.clients.common import Endpoint
from loadtest.run import Run
from loadtest.spec import Action, RunSpec
from loadtest.stacks import CROSS, REDIS, SUBSCRIBER_HOST, open_stack
from loadtest.sysinfo import machine

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"

Result = dict[str, Any]
NOT_RUN: tuple[str, bool | None] = ("not run", None)
EDGE = "sluice-edge"  # Sluice with auth, rate limits and CORS on: what the edge costs


@dataclass(frozen=True)
class Entry:
    """One comparison: a scenario run against each of ``targets``."""

    name: str
    title: str
    targets: tuple[str, ...]
    scenario: str
    subs: int
    rate: float = 10.0
    duration: float = 20.0
    transport: str = "sse-h1"
    per_conn: int = 1
    base: str = "fanout"
    tokens: int = 100
    workers: dict[str, int] = field(default_factory=dict)  # per target kind; default 2 (nchan, sluice), 1 (uvicorn)
    actions: tuple[Action, ...] = ()
    procs: int = 0
    ramp: float = 0.0  # connects per second per load process (0: as fast as they go)
    pub_connections: int = 0  # publisher connections, each one request at a time (0: the run's default)
    pub_transport: str = "http"  # "ws": the publisher sends publish ops over WebSockets (Sluice only)
    batch: int = 1  # most due events one publish carries (HTTP: ndjson; WebSocket: ops back to back)

    def spec(self, endpoint: Endpoint, pid: int, scale: float, time_scale: float = 1.0) -> RunSpec:
        """The run for one target; ``scale`` multiplies the subscriptions, ``time_scale`` the
        durations and action times (both below 1 to try the bench quickly)."""
        subs = max(10, math.ceil(self.subs * scale))
        actions = [Action(a.at * time_scale, a.kind, a.command) for a in self.actions]
        return RunSpec(scenario=self.scenario, endpoint=endpoint, base=self.base, transport=self.transport,
                       subs=subs, per_conn=self.per_conn, rate=self.rate, duration=self.duration * time_scale,
                       tokens=max(5, round(self.tokens * time_scale)), stagger=min(5.0, self.duration) * time_scale,
                       server_pid=pid, actions=actions, procs=self.procs, ramp=self.ramp, label=self.name,
                       pub_connections=self.pub_connections, pub_transport=self.pub_transport, batch=self.batch,
                       connect_timeout=240, settle_timeout=60)


ENTRIES: tuple[Entry, ...] = (
    Entry("idle-15k", "idle: 15,000 SSE connections", ("sluice", "nchan", "uvicorn"), "idle", 15_000, duration=15),
    Entry("fanout-20", "fanout: 2,000 subscribers x 20 events/s", ("sluice", REDIS, "nchan", "uvicorn"), "fanout",
          2000, rate=20, duration=30),
    Entry("fanout-20-edge", "fanout: 2,000 subscribers x 20 events/s, without and with auth + rate limits + CORS",
          ("sluice", EDGE), "fanout", 2000, rate=20, duration=30),
    Entry("fanout-20-h2", "fanout: 2,000 subscribers x 20 events/s over HTTP/2 (100 streams per connection)",
          ("sluice",), "fanout", 2000, rate=20, duration=30, transport="sse-h2", per_conn=100),
    Entry("fanout-200", "fanout: 2,000 subscribers x 200 events/s", ("sluice", "uvicorn", "nchan"), "fanout", 2000,
          rate=200, duration=15),
    Entry("topics", "topics: 5,000 subscribers on their own streams, 2,000 events/s",
          ("sluice", REDIS, "nchan", "uvicorn"), "topics", 5000, rate=2000, duration=15),
    # Two Sluice hosts on one redis-server: published on host A, every subscriber on host B,
    # beside one host on the same Redis, in the same run.
    Entry("cross-host", "cross-host: 2,000 subscribers on host B x 20 events/s published on host A, one Redis",
          (REDIS, CROSS), "fanout", 2000, rate=20, duration=30),
    Entry("fanout-10k", "fanout: 10,000 subscribers x 5 events/s", ("sluice",), "fanout", 10_000, rate=5,
          duration=30),
    Entry("deploy", "deploy: 10,000 subscribers, 5 events/s, two rolling restarts", ("sluice",), "deploy", 10_000,
          rate=5, duration=90,
          actions=(Action(20, "restart", "kill -HUP {pid}"), Action(55, "restart", "kill -HUP {pid}"))),
    Entry("storm", "storm: 5,000 subscribers drop and reconnect at once", ("sluice",), "storm", 5000, rate=5,
          duration=20, actions=(Action(8, "storm"),)),
    # Each generation has a producer of its own in an LLM app: 32 publisher connections (about 31
    # generations each, one request at a time) rather than the default one per 250 streams, with
    # which the run is bound by 4 requests in flight.
    Entry("llm", "llm: 1,000 generations of 100 tokens at 30 tokens/s", ("sluice", "uvicorn"), "llm", 1000, rate=30,
          tokens=100, duration=5, pub_connections=32),
    # The same generations relayed by 32 producers that each hold a WebSocket and send what is due
    # (up to 16 tokens, of any of their generations) without waiting for each ack.
    Entry("llm-ws", "llm: the same, published over 32 WebSockets, due tokens sent together", ("sluice",), "llm",
          1000, rate=30, tokens=100, duration=5, pub_connections=32, pub_transport="ws", batch=16),
    Entry("ws-json", "fanout over WebSocket JSON: 2,000 x 20/s", ("sluice",), "fanout", 2000, rate=20, duration=15,
          transport="ws-json"),
    Entry("ws-msgpack", "fanout over WebSocket msgpack: 2,000 x 20/s", ("sluice",), "fanout", 2000, rate=20,
          duration=15, transport="ws-msgpack"),
    Entry("longpoll", "fanout over long-poll: 2,000 x 20/s", ("sluice",), "fanout", 2000, rate=20, duration=15,
          transport="longpoll"),
    # Paced: unpaced, the load processes queue ~100,000 connects at once; what the workers accept
    # then waits its turn longer than the harness's 30 s per attempt, and the retries add to it.
    Entry("idle-100k", "idle: 100,000 SSE connections", ("sluice", "nchan"), "idle", 100_000, duration=20,
          workers={"sluice": 8, "nchan": 8}, ramp=300),
)


def _get(results: dict[str, Result], key: str, *path: str) -> Any:
    value: Any = results.get(key)
    for p in path:
        if not isinstance(value, dict):
            return None
        value = value.get(p)
    return value


def _cpu(results: dict[str, Result], key: str) -> float | None:
    value = _get(results, key, "server_cpu_us_per_event")
    return float(value) if value is not None else None


def _p99(results: dict[str, Result], key: str) -> float | None:
    value = _get(results, key, "latency_ms", "p99")
    return float(value) if value is not None else None


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


Goal = tuple[str, Callable[[dict[str, Result]], tuple[str, bool | None]]]


def _goal_idle(r: dict[str, Result]) -> tuple[str, bool | None]:
    v = _get(r, "idle-100k/sluice", "server_rss_kib_per_conn")
    n = _get(r, "idle-100k/nchan", "server_rss_kib_per_conn")
    held = _get(r, "idle-100k/sluice", "connections", "held")
    if not v:
        small = _get(r, "idle-15k/sluice", "server_rss_kib_per_conn")
        if small:
            nchan = _get(r, "idle-15k/nchan", "server_rss_kib_per_conn")
            return f"not run at 100,000; at 15,000: {small} KiB/conn (nchan {nchan})", None
        return NOT_RUN
    return f"{v} KiB/conn at {held:,} held (nchan {n})", v <= 10 and held >= 100_000


def _goal_f20(r: dict[str, Result]) -> tuple[str, bool | None]:
    s, n = _cpu(r, "fanout-20/sluice"), _cpu(r, "fanout-20/nchan")
    if s is None or n is None:
        return NOT_RUN
    return f"{s} µs vs nchan {n} µs ({_ratio(s, n)})", s <= 1.1 * n


def _goal_f200(r: dict[str, Result]) -> tuple[str, bool | None]:
    s, u = _cpu(r, "fanout-200/sluice"), _cpu(r, "fanout-200/uvicorn")
    ps, pu, pn = _p99(r, "fanout-200/sluice"), _p99(r, "fanout-200/uvicorn"), _p99(r, "fanout-200/nchan")
    lost = _get(r, "fanout-200/sluice", "verdict", "lost")
    if s is None or u is None or ps is None or pu is None or pn is None:
        return NOT_RUN
    text = f"lost {lost}; {s} µs vs uvicorn {u} µs; p99 {ps:,.0f} ms vs uvicorn {pu:,.0f}, nchan {pn:,.0f}"
    return text, lost == 0 and s <= u and ps < pu and ps < pn


def _goal_topics(r: dict[str, Result]) -> tuple[str, bool | None]:
    s, n = _cpu(r, "topics/sluice"), _cpu(r, "topics/nchan")
    if s is None or n is None:
        return NOT_RUN
    return f"{s} µs vs nchan {n} µs ({_ratio(s, n)})", s <= n


def _goal_f10k(r: dict[str, Result]) -> tuple[str, bool | None]:
    p = _p99(r, "fanout-10k/sluice")
    if p is None:
        return NOT_RUN
    return f"p99 {p:,.1f} ms", p <= 50


def _goal_deploy(r: dict[str, Result]) -> tuple[str, bool | None]:
    v = _get(r, "deploy/sluice", "verdict")
    m = _get(r, "deploy/sluice", "resume_s", "max")
    if not v:
        return NOT_RUN
    rec = _get(r, "deploy/sluice", "reconnects")
    return (f"lost {v['lost']}, duplicated {v['duplicated']}, {rec:,} reconnects, slowest resume {_cell(m)} s",
            v["lost"] == 0 and v["duplicated"] == 0 and m is not None and m <= 10)


def _goal_h2(r: dict[str, Result]) -> tuple[str, bool | None]:
    h2, h1 = _cpu(r, "fanout-20-h2/sluice"), _cpu(r, "fanout-20/sluice")
    if h2 is None or h1 is None:
        return NOT_RUN
    return f"{h2} µs vs {h1} µs ({_ratio(h2, h1)})", h2 <= 1.5 * h1


def _goal_redis(entry: str) -> Callable[[dict[str, Result]], tuple[str, bool | None]]:
    """Sluice on Redis against Sluice on SQLite in ``entry``: the Redis target's CPU per
    delivered event counts Sluice's processes and redis-server's (SQLite's work is inside
    Sluice's), at most 1.5x SQLite's."""

    def check(r: dict[str, Result]) -> tuple[str, bool | None]:
        sqlite, key = _cpu(r, f"{entry}/sluice"), f"{entry}/{REDIS}"
        total = _get(r, key, "server_with_helpers_cpu_us_per_event")
        if sqlite is None or total is None:
            return NOT_RUN
        own, redis = _cpu(r, key), _get(r, key, "helpers", "redis", "cpu_us_per_event")
        text = (f"{total} µs (Sluice {own} + Redis {redis}) vs SQLite {sqlite} µs ({_ratio(total, sqlite)}); "
                f"p99 {_cell(_p99(r, key), 1)} vs {_cell(_p99(r, f'{entry}/sluice'), 1)} ms")
        return text, total <= 1.5 * sqlite

    return check


def _goal_cross(r: dict[str, Result]) -> tuple[str, bool | None]:
    one, two = f"cross-host/{REDIS}", f"cross-host/{CROSS}"
    p1, p2 = _p99(r, one), _p99(r, two)
    if p1 is None or p2 is None:
        return NOT_RUN
    bus = report.bus_text(_get(r, two, "bus", SUBSCRIBER_HOST), most=3)
    return (f"p50 / p99 {_cell(_get(r, two, 'latency_ms', 'p50'), 1)} / {p2:,.1f} ms vs one host "
            f"{_cell(_get(r, one, 'latency_ms', 'p50'), 1)} / {p1:,.1f} ms; host B's bus: {bus}", p2 <= p1 + 5)


GOALS: tuple[Goal, ...] = (
    ("idle: 100,000 SSE connections, <= 10 KiB server RSS each", _goal_idle),
    ("fanout 2,000 x 20/s: server CPU/event <= 1.1x nginx+nchan", _goal_f20),
    ("fanout 2,000 x 200/s: nothing lost, CPU/event <= uvicorn, p99 below both baselines", _goal_f200),
    ("topics 5,000 x 2,000 ev/s: CPU/event <= nginx+nchan", _goal_topics),
    ("fanout 10,000 x 5/s: p99 <= 50 ms", _goal_f10k),
    ("deploy 10,000 subscribers, 2 rolling restarts: 0 lost, 0 duplicated, resumed within 10 s", _goal_deploy),
    ("SSE over HTTP/2 <= 1.5x SSE over HTTP/1.1 per event", _goal_h2),
    ("Redis store, fanout 2,000 x 20/s: CPU/event (Sluice + Redis) <= 1.5x SQLite's", _goal_redis("fanout-20")),
    ("Redis store, topics 5,000 x 2,000/s: CPU/event (Sluice + Redis) <= 1.5x SQLite's", _goal_redis("topics")),
    ("cross-host (publish on A, subscribe on B, one Redis): p99 <= one host's p99 + 5 ms", _goal_cross),
)


def edge_setup(workdir: Path) -> tuple[dict[str, dict[str, object]], str]:
    """The config of the ``sluice-edge`` target and a token for its clients: JWT auth (HS256),
    a subscribe rule per address and a publish rule per token subject (both far above the run's
    rates: evaluated on every request, never refusing), and CORS for one origin."""
    import jwt

    secret = workdir / "hs256.key"
    secret.write_bytes(os.urandom(32).hex().encode())
    rights = {"subscribe": ["**"], "publish": ["**"]}
    claims = {"sub": "loadtest", "exp": int(time.time()) + 24 * 3600, "sluice": rights}
    token = jwt.encode(claims, secret.read_bytes(), algorithm="HS256")
    config: dict[str, dict[str, object]] = {
        "auth": {"enabled": True, "keys": [{"alg": "HS256", "file": str(secret)}]},
        "limits": {
            "rules": [
                {"route": "subscribe", "rate": 1_000_000, "key": "address"},
                {"route": "publish", "rate": 1_000_000, "key": "claim:sub"},
            ]
        },
        "cors": {"allow_origins": ["https://app.example"]},
    }
    return config, token


def run_entry(entry: Entry, kind: str, out: Path, scale: float, time_scale: float = 1.0, *,
              appendfsync: str = "always") -> Result:
    """Run one entry against one target kind; the result, also saved as JSON (and plotted).
    ``appendfsync`` is that of the redis-server behind the Redis targets."""
    workers = entry.workers.get(kind, 1 if kind == "uvicorn" else 2)
    print(f"== {entry.name} / {kind} ({workers} server processes)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        config, token = edge_setup(Path(tmp)) if kind == EDGE else ({}, None)
        with open_stack("sluice" if kind == EDGE else kind, workdir=Path(tmp), workers=workers, config=config,
                        token=token, appendfsync=appendfsync) as stack:
            spec = stack.apply(entry.spec(stack.endpoint, stack.pid, scale, time_scale))
            result = Run(spec, progress=True).execute()
    result["server_workers"] = workers
    result["server_hosts"] = stack.hosts
    if stack.notes:
        result["stack"] = {"kind": kind, **stack.notes}
    name = f"{entry.name}-{kind}"
    report.write_json(result, out / f"{name}.json")
    if kind in ("sluice", REDIS, CROSS) or entry.scenario in ("deploy", "storm"):
        report.plot(result, out, name)
    print(report.table(result), file=sys.stderr, flush=True)
    return result


def load_results(out: Path) -> dict[str, Result]:
    """Every saved result, keyed ``entry/target``."""
    results: dict[str, Result] = {}
    for entry in ENTRIES:
        for kind in entry.targets:
            path = out / f"{entry.name}-{kind}.json"
            if path.exists():
                results[f"{entry.name}/{kind}"] = json.loads(path.read_text())
    return results


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _clean(r: Result) -> str:
    if r["ok"]:
        return "yes"
    why = []
    if not (r.get("publisher") or {}).get("complete", True):
        why.append("publisher stopped behind its plan")
    if r["connections"]["held"] < r["connections"]["planned"]:
        why.append("connections not all held")
    if not r["verdict"].get("lost") == r["verdict"].get("duplicated") == r["verdict"].get("disorder") == 0:
        why.append("transcripts differ")
    return "no: " + (", ".join(why) or "see JSON")


def _procs(r: Result) -> str:
    workers, hosts = r.get("server_workers", "-"), r.get("server_hosts", 1)
    return f"{hosts} hosts x {workers}" if hosts > 1 else str(workers)


def _redis_cpu(r: Result) -> str:
    return _cell(((r.get("helpers") or {}).get("redis") or {}).get("cpu_us_per_event"))


def _subscribers_bus(r: Result) -> str:
    bus = r.get("bus") or {}
    if not bus:
        return "-"
    host = SUBSCRIBER_HOST if SUBSCRIBER_HOST in bus else next(iter(bus))
    return report.bus_text(bus[host], most=3)


# Columns a table has only when one of its rows has a value: the first two after the server's
# CPU, the others at the end.
EXTRA_COLUMNS: tuple[tuple[str, Callable[[Result], str]], ...] = (
    ("Redis CPU µs/event", _redis_cpu),
    ("server + Redis µs/event", lambda r: _cell(r.get("server_with_helpers_cpu_us_per_event"))),
    ("bus counters grown on the subscribers' host", _subscribers_bus),
)


def render(results: dict[str, Result], out: Path, doc: Path) -> str:
    """The generated part of the page."""
    any_result = next(iter(results.values()), None)
    facts = any_result["machine"] if any_result else machine()
    lines = [BEGIN, "", "_Generated by `sluice-loadtest bench`; do not edit by hand._", "",
             f"Machine: {facts['cpu']}, {facts['cores']} cores, {facts['memory']}, Linux {facts['kernel']}, "
             f"CPython {facts['python']}, open files per process {facts['nofile_hard']}.", "",
             "### Goals", "", "| goal | measured | met |", "|---|---|---|"]
    for text, check in GOALS:
        measured, met = check(results)
        lines.append(f"| {text} | {measured} | {'yes' if met else 'no' if met is False else 'not run'} |")
    rel = out.relative_to(doc.parent) if out.is_relative_to(doc.parent) else out
    for entry in ENTRIES:
        keys = [(kind, f"{entry.name}/{kind}") for kind in entry.targets]
        rows = [(kind, results[key]) for kind, key in keys if key in results]
        if not rows:
            continue
        extra = [(head, cell) for head, cell in EXTRA_COLUMNS if any(cell(r) != "-" for _, r in rows)]
        heads = ["server", "procs", "conns held", "published", "delivered", "lost / dup / disorder",
                 "latency p50 / p99 / max ms", "server CPU µs/event", *(h for h, _ in extra[:2]), "RSS KiB/conn",
                 "reconnects (slowest resume s)", "load cores", "run clean", *(h for h, _ in extra[2:])]
        lines += ["", f"### {entry.title}", "", "| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
        for kind, r in rows:
            cells = [cell(r) for _, cell in extra]
            v, lat = r["verdict"], r["latency_ms"]
            latency = "-"
            if lat.get("count"):
                latency = f"{_cell(lat.get('p50'))} / {_cell(lat.get('p99'))} / {_cell(lat.get('max'))}"
            resume = f"{r['reconnects']:,} ({_cell(r['resume_s'].get('max'))})" if r["reconnects"] else "0"
            lines.append(
                f"| {kind} | {_procs(r)} | {r['connections']['held']:,} | {r['published']:,} | "
                f"{r['delivered']:,} | {v['lost']} / {v['duplicated']} / {v['disorder']} | {latency} | "
                f"{_cell(r.get('server_cpu_us_per_event'))} | " + "".join(f"{c} | " for c in cells[:2])
                + f"{_cell(r.get('server_rss_kib_per_conn'))} | {resume} | "
                f"{_cell((r.get('load_cpu') or {}).get('cores_used'))} | {_clean(r)} |"
                + "".join(f" {c} |" for c in cells[2:]))
        spec = rows[0][1]["spec"]
        command = (f"sluice-loadtest run {spec['scenario']} --start <server> --subs {spec['subs']} "
                   f"--transport {spec['transport']} --rate {spec['rate']:g} --duration {spec['duration']:g}")
        if spec["per_conn"] > 1:
            command += f" --per-conn {spec['per_conn']}"
        if spec.get("pub_connections"):
            command += f" --pub-connections {spec['pub_connections']}"
        if spec.get("pub_transport", "http") != "http":
            command += f" --pub-transport {spec['pub_transport']}"
        if spec.get("batch", 1) > 1:
            command += f" --batch {spec['batch']}"
        lines += ["", f"Same as `{command}`; results in `{rel}/{entry.name}-*.json`."]
        for kind, _ in rows:
            for suffix in ("latency", "connections"):
                png = out / f"{entry.name}-{kind}-{suffix}.png"
                if png.exists():
                    lines.append(f"![{entry.name} {kind} {suffix}]({rel}/{png.name})")
    lines += ["", END]
    return "\n".join(lines)


def bench(args: argparse.Namespace) -> int:
    """``sluice-loadtest bench``: run the entries, then rewrite the page."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only)
    unknown = wanted - {e.name for e in ENTRIES} - {f"{e.name}/{k}" for e in ENTRIES for k in e.targets}
    if unknown:
        raise ValueError(f"no bench entries named {', '.join(sorted(unknown))}")
    started = time.monotonic()
    for entry in ENTRIES if not args.render_only else ():
        for kind in entry.targets:
            if wanted and entry.name not in wanted and f"{entry.name}/{kind}" not in wanted:
                continue
            run_entry(entry, kind, out, args.scale, args.time_scale, appendfsync=args.redis_appendfsync)
    doc: Path = args.doc
    text = doc.read_text() if doc.exists() else f"# Performance\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    doc.write_text(head + render(load_results(out), out, doc) + tail)
    print(f"bench: {time.monotonic() - started:.0f} s; wrote {doc}", file=sys.stderr)
    return 0
