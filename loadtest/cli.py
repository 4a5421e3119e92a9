"""``sluice-loadtest``: run one scenario against a server and report it.

    sluice-loadtest run fanout --start sluice --subs 2000 --rate 20 --duration 30
    sluice-loadtest run idle --url http://127.0.0.1:8080 --server-pid 1234 --subs 20000
    sluice-loadtest run deploy --base topics --start sluice --workers 4 --restarts 2 --kills 1
    sluice-loadtest run fanout --start sluice-redis-2hosts --subs 2000 --rate 20 --duration 30
    sluice-loadtest bench            # every figure of docs/PERFORMANCE.md, baselines included

Targets must be on 127.0.0.0/8. Exit status 0 when the run was clean (nothing lost, duplicated
or out of order, every connection held, within its time bound), 1 otherwise, 2 on bad arguments,
an impossible run (refused before anything connects) or missing dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from loadtest import deps, report
from loadtest.clients.common import Endpoint
from loadtest.redisd import APPENDFSYNC
from loadtest.serverpid import supervisor_pid
from loadtest.spec import SCENARIOS, Action, RunSpec, publish_seconds
from loadtest.stacks import ALL_KINDS, Stack, server_kind
from loadtest.targets import TRANSPORTS

# Only modules of the standard library, trio and the harness's own pure ones are imported above:
# the rest (trio-websocket, hdrhistogram...) is imported once ``deps`` found it installed.
TRANSPORT_NAMES = sorted(set().union(*TRANSPORTS.values()))


def endpoint_of(url: str, kind: str) -> Endpoint:
    """The endpoint of ``url``; refuses anything outside 127.0.0.0/8."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise ValueError(f"--url must look like http://127.0.0.1:8080, not {url!r}")
    if ipaddress.ip_address(parts.hostname) not in ipaddress.ip_network("127.0.0.0/8"):
        raise ValueError("the harness only targets 127.0.0.0/8")
    return Endpoint(parts.hostname, parts.port, kind)


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="sluice-loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run one scenario")
    r.add_argument("scenario", choices=SCENARIOS)
    where = r.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="the server, e.g. http://127.0.0.1:8080")
    where.add_argument("--start", choices=ALL_KINDS, help="start this server for the run (sluice-redis: Sluice on "
                       "a redis-server of the harness's own; sluice-redis-2hosts: two Sluice hosts on one, publishing "
                       "to host A, subscribing on host B)")
    r.add_argument("--token", help="a JWT sent as Authorization: Bearer by every client and the publisher")
    r.add_argument("--kind", default="sluice", choices=("sluice", "uvicorn", "nchan"), help="what --url runs")
    r.add_argument("--workers", type=int, default=2, help="with --start: server worker processes (per host)")
    r.add_argument("--redis-appendfsync", choices=APPENDFSYNC, default="always",
                   help="with --start sluice-redis*: the redis-server's appendfsync")
    r.add_argument("--server-pid", type=int, help="with --url: the server's PID, to sample RSS and CPU "
                   "(default for Sluice: the supervisor pid its /metrics gives)")
    r.add_argument("--base", default="fanout", choices=("fanout", "topics", "llm"), help="traffic under storm/deploy")
    r.add_argument("--transport", default="sse-h1", choices=TRANSPORT_NAMES)
    r.add_argument("--subs", type=int, default=100, help="subscriptions")
    r.add_argument("--per-conn", type=int, default=1, help="subscriptions per connection (sse-h2, ws)")
    r.add_argument("--streams", type=int, default=0, help="streams (default: 1, or one per subscription)")
    r.add_argument("--rate", type=float, default=10.0, help="events/s in total (llm: tokens/s per generation)")
    r.add_argument("--duration", type=float, default=10.0, help="seconds of publishing (idle: of holding)")
    r.add_argument("--size", type=int, default=0, help="bytes of data per event")
    r.add_argument("--tokens", type=int, default=100, help="llm: tokens per generation")
    r.add_argument("--stagger", type=float, default=5.0, help="llm: spread generation starts over this many s")
    r.add_argument("--batch", type=int, default=1, help="events one publish may carry when behind the plan")
    r.add_argument("--pub-connections", type=int, default=0)
    r.add_argument("--pub-transport", choices=["http", "ws"], default="http",
                   help="publish by HTTP POST, or over WebSocket (sluice.json.v1; Sluice only, not deploy)")
    r.add_argument("--procs", type=int, default=0, help="subscriber processes (default: by fd limit and cores)")
    r.add_argument("--ramp", type=float, default=0.0, help="connects/s per process at the start (0: no pacing)")
    r.add_argument("--connect-timeout", type=float, default=120.0)
    r.add_argument("--settle-timeout", type=float, default=60.0)
    r.add_argument("--restarts", type=int, default=0, help="rolling restarts during the run")
    r.add_argument("--restart-cmd", default="kill -HUP {pid}", help="shell command; {pid} is the server's PID")
    r.add_argument("--kills", type=int, default=0, help="worker kills during the run")
    r.add_argument("--kill-cmd", default="kill -KILL {child}", help="shell command; {child} is one of its children")
    r.add_argument("--storm-at", type=float, action="append", default=[], help="storm at this second (repeatable)")
    r.add_argument("--fault", help="inject at the publisher: drop:SEQ or dup:SEQ on the first stream")
    r.add_argument("--json", type=Path, help="write the result here")
    r.add_argument("--plots", type=Path, help="write PNG plots into this directory")
    r.add_argument("--quiet", action="store_true", help="no progress lines")
    b = sub.add_parser("bench", help="measure every figure of docs/PERFORMANCE.md")
    b.add_argument("--out", type=Path, default=Path("docs/perf"), help="results and plots go here")
    b.add_argument("--doc", type=Path, default=Path("docs/PERFORMANCE.md"), help="the page to rewrite")
    b.add_argument("--only", action="append", default=[], help="run only these bench entries (repeatable)")
    b.add_argument("--scale", type=float, default=1.0, help="multiply every connection count (e.g. 0.1 to try)")
    b.add_argument("--time-scale", type=float, default=1.0, help="multiply every duration (e.g. 0.2 to try)")
    b.add_argument("--render-only", action="store_true", help="rewrite the page from the saved results, run nothing")
    b.add_argument("--redis-appendfsync", choices=APPENDFSYNC, default="always",
                   help="the appendfsync of the redis-server behind the sluice-redis targets")
    return p


def actions(args: argparse.Namespace, span: float | None = None) -> list[Action]:
    """Restarts and kills spread evenly over the publishing time (``span`` seconds, default
    ``--duration``), plus storms."""
    out = [Action(t, "storm") for t in args.storm_at]
    n = args.restarts + args.kills
    kinds = ["restart"] * args.restarts + ["kill"] * args.kills
    order = sorted(range(n), key=lambda i: (i % 2, i))  # interleave restarts and kills
    for slot, i in enumerate(order):
        at = (args.duration if span is None else span) * (slot + 1) / (n + 1)
        out.append(Action(at, kinds[i], args.restart_cmd if kinds[i] == "restart" else args.kill_cmd))
    return sorted(out, key=lambda a: a.at)


@contextlib.contextmanager
def _target(args: argparse.Namespace) -> Iterator[Stack | None]:
    """The servers started for the run (with ``--start``), or None for ``--url``."""
    if args.url:
        yield None
        return
    from loadtest.stacks import open_stack

    with tempfile.TemporaryDirectory(prefix="sluice-loadtest-") as tmp, \
            open_stack(args.start, workdir=Path(tmp), workers=args.workers, token=args.token,
                       appendfsync=args.redis_appendfsync) as stack:
        yield stack


def planned(args: argparse.Namespace) -> RunSpec:
    """The run the arguments ask for, checked before anything starts or connects (``ValueError``
    says what is impossible); its endpoint is a placeholder (port 0) with ``--start``."""
    fault = None
    if args.fault:
        kind, _, seq = args.fault.partition(":")
        if kind not in ("drop", "dup") or not seq.isdigit():
            raise ValueError("--fault is drop:SEQ or dup:SEQ")
        fault = (kind, int(seq))
    if args.start and args.server_pid is not None:
        raise ValueError("--server-pid goes with --url (with --start the harness knows the server it started)")
    if args.workers < 1:
        raise ValueError("--workers must be at least 1")
    endpoint = endpoint_of(args.url, args.kind) if args.url else Endpoint("127.0.0.1", 0, server_kind(args.start))
    kind = args.base if args.scenario in ("storm", "deploy") else args.scenario
    spec = RunSpec(
        scenario=args.scenario, endpoint=dataclasses.replace(endpoint, token=args.token), base=args.base,
        transport=args.transport, subs=args.subs,
        per_conn=args.per_conn, streams=args.streams, rate=args.rate, duration=args.duration, size=args.size,
        tokens=args.tokens, stagger=args.stagger, batch=args.batch, pub_connections=args.pub_connections,
        pub_transport=args.pub_transport,
        procs=args.procs, ramp=args.ramp, connect_timeout=args.connect_timeout,
        settle_timeout=args.settle_timeout, server_pid=args.server_pid, fault=fault,
        actions=actions(args, publish_seconds(kind, args.duration, args.tokens, args.rate, args.stagger)))
    commands = any(a.kind in ("restart", "kill") for a in spec.actions)
    if commands and args.url and args.kind != "sluice" and args.server_pid is None:
        raise ValueError("--restarts and --kills against --url need --server-pid (their commands use {pid}/{child})")
    return spec


def server_pid(spec: RunSpec, started: int | None, *, quiet: bool) -> int | None:
    """The process tree to sample: the server started, ``--server-pid``, or the supervisor pid a
    Sluice server gives on ``/metrics`` (``ValueError`` when restarts or kills need it and it is
    not found)."""
    if started is not None or spec.server_pid is not None:
        return started if started is not None else spec.server_pid
    if spec.endpoint.kind != "sluice":
        return None
    pid, note = supervisor_pid(spec.endpoint)
    if pid is None and any(a.kind in ("restart", "kill") for a in spec.actions):
        raise ValueError(f"--restarts and --kills need the server's pid: {note}; give --server-pid")
    if not quiet:
        print(f"sluice-loadtest: server {note}" + ("" if pid else "; not sampling its RSS and CPU"),
              file=sys.stderr, flush=True)
    return pid


def run_command(args: argparse.Namespace) -> int:
    """``sluice-loadtest run``."""
    from loadtest.run import Run

    plan = planned(args)
    with _target(args) as stack:
        spec = stack.apply(plan) if stack else plan
        spec = dataclasses.replace(spec, server_pid=server_pid(spec, stack.pid if stack else None, quiet=args.quiet))
        result = Run(spec, progress=not args.quiet).execute()
        if stack and stack.notes:
            result["stack"] = {"kind": stack.kind, **stack.notes}
    print(report.table(result))
    if args.json:
        report.write_json(result, args.json)
    if args.plots:
        for path in report.plot(result, args.plots, f"{args.scenario}-{args.transport}"):
            print(f"plot: {path}")
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``sluice-loadtest``."""
    args = parser().parse_args(argv)
    missing = deps.problem()
    if missing:
        print(f"sluice-loadtest: {missing}", file=sys.stderr)
        sys.exit(2)
    try:
        if args.command == "run":
            sys.exit(run_command(args))
        from loadtest.bench import bench

        sys.exit(bench(args))
    except ValueError as exc:
        print(f"sluice-loadtest: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
