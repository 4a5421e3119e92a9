"""The coordinator: starts the load processes, drives a run through its phases, samples the
server, and gathers one result.

Phases: connect every subscription (up to ``connect_timeout``); then either hold (``idle``) or
start the publisher and the planned actions; when the publisher is done, ask every subscriber
process to finish once it holds every published event (up to ``settle_timeout``); check every
transcript. Every phase is bounded in time, and the run stops its processes itself.

The whole run has a hard deadline, :attr:`RunSpec.time_bound` seconds after it starts (connect
timeout + publishing time + settle timeout + :data:`loadtest.spec.OVERHEAD`): past it, the
phases end early, every process is asked for what it has, and the result says ``over_time``.

One clock: every time in the result (the timeline's ``t``, each mark's ``t`` and ``at``) is in
seconds since the publisher started (``idle``: since holding started), the clock ``--storm-at``
and the other actions are given in; the connect phase has negative times.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import random
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from multiprocessing.connection import wait
from typing import Any

from loadtest import hist, loadproc
from loadtest.publisher import Schedule, llm_entries, rate_entries
from loadtest.serverpid import bus_counters, growth
from loadtest.spec import Action, RunSpec
from loadtest.sysinfo import CpuMeter, machine, process_tree, raise_nofile, rss_kib, source_address
from loadtest.track import Verdict

PROGRESS_EVERY = 1.0
STOP_RESERVE = 10.0  # seconds of the run's time bound kept for gathering results and stopping processes
SATURATED = 0.9  # a load process busier than this share of a core may be what limits the run


class Proc:
    """A load process and its latest report."""

    def __init__(self, name: str, plan: loadproc.SubPlan | loadproc.PubPlan) -> None:
        ctx = mp.get_context("spawn")
        self.name = name
        self.pipe, child = ctx.Pipe()
        self.process = ctx.Process(target=loadproc.main, args=(child, plan), name=name, daemon=True)
        self.process.start()
        child.close()
        self.last: dict[str, Any] = {}
        self.result: dict[str, Any] | None = None
        self.crash: str | None = None

    def send(self, *msg: Any) -> None:
        """Send a command (ignored once the process is gone)."""
        with contextlib.suppress(OSError, ValueError):
            self.pipe.send(msg)

    def stop(self, timeout: float = 10.0) -> None:
        """Wait for the process to exit, then make sure it has."""
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


class Run:
    """One harness run (see module docstring)."""

    def __init__(self, spec: RunSpec, *, progress: bool = True) -> None:
        self.spec = spec
        self.progress = progress
        self.subs: list[Proc] = []
        self.pub: Proc | None = None
        self.timeline: list[dict[str, Any]] = []
        self.marks: list[dict[str, Any]] = []
        self.latency = hist.new()
        self.resume = hist.new()
        self.pub_latency = hist.new()
        self.server_cpu = CpuMeter()
        self.load_cpu = CpuMeter()
        self.helper_cpu = {name: CpuMeter() for name in spec.helpers}
        self.t0 = time.monotonic()
        self.hard_end = self.t0 + spec.time_bound - STOP_RESERVE
        self.over_time = False
        self.t_pub: float | None = None  # when the publisher started (idle: when holding started)
        self.commands: list[dict[str, Any]] = []

    # --- plans ------------------------------------------------------------------------------
    def _sub_plans(self) -> list[loadproc.SubPlan]:
        spec = self.spec
        nstreams = spec.stream_count
        conns: list[tuple[int, list[str], str]] = []
        for c in range(spec.conn_count):
            subs = range(c * spec.per_conn, min(spec.subs, (c + 1) * spec.per_conn))
            conns.append((c, [spec.stream_name(j % nstreams) for j in subs], source_address(c)))
        n = spec.process_count()
        return [loadproc.SubPlan(spec.endpoint, spec.transport, conns[i::n], dict(spec.limits), spec.ramp)
                for i in range(n)]

    def _schedule(self) -> Schedule:
        spec = self.spec
        names = [spec.stream_name(i) for i in range(spec.stream_count)]
        if spec.kind == "llm":
            entries = llm_entries(len(names), spec.tokens, spec.rate, spec.stagger)
        else:
            entries = rate_entries(len(names), spec.rate, spec.duration)
        conns = spec.pub_connections or max(1, min(32, math.ceil(len(names) / 250)))
        return Schedule(names, entries, size=spec.size, batch=spec.batch, connections=conns, fault=spec.fault,
                        transport=spec.pub_transport)

    # --- sampling ---------------------------------------------------------------------------
    def _server_pids(self) -> list[int]:
        """The server's processes: ``server_pid``'s tree first (its children are what
        ``{child}`` picks from), then those of ``server_pids``."""
        roots = [self.spec.server_pid] if self.spec.server_pid else []
        return [pid for root in [*roots, *self.spec.server_pids] for pid in process_tree(root)]

    def _sample(self) -> dict[str, Any]:
        pids = self._server_pids()
        load_pids = [p.process.pid for p in [*self.subs, *([self.pub] if self.pub else [])] if p.process.pid]
        row: dict[str, Any] = {
            "t": round(time.monotonic() - self.t0, 3), "server_rss_kib": rss_kib(pids) if pids else None,
            "server_cpu_s": self.server_cpu.read(pids) if pids else None,
            "load_cpu_s": self.load_cpu.read(load_pids), "server_procs": len(pids)}
        if self.helper_cpu:
            row["helper_cpu_s"] = {name: meter.read(process_tree(self.spec.helpers[name]))
                                   for name, meter in self.helper_cpu.items()}
        return row

    def _bus(self) -> dict[str, dict[str, int] | None]:
        """The ``sluice_bus_*`` counters of every host in ``bus_hosts`` (None: unreadable)."""
        return {name: bus_counters(ep, timeout=2.0) for name, ep in self.spec.bus_hosts.items()}

    # --- message pump -----------------------------------------------------------------------
    def _pump(self, timeout: float) -> None:
        """Take every message that arrives within ``timeout`` seconds."""
        procs = {p.pipe: p for p in [*self.subs, *([self.pub] if self.pub else [])] if p.result is None}
        end = time.monotonic() + timeout
        while procs:
            left = end - time.monotonic()
            if left <= 0:
                break
            for pipe in wait(list(procs), left):
                proc = procs[pipe]  # type: ignore[index]
                try:
                    kind, body = proc.pipe.recv()
                except (EOFError, OSError):
                    proc.crash = proc.crash or "exited without a result"
                    proc.result = {}
                    del procs[pipe]  # type: ignore[arg-type]
                    continue
                if kind == "tick":
                    proc.last = body
                    self._absorb(proc, body)
                elif kind == "result":
                    proc.last = body
                    self._absorb(proc, body)
                    proc.result = body
                    del procs[pipe]  # type: ignore[arg-type]
                elif kind == "crash":
                    proc.crash = body

    def _absorb(self, proc: Proc, body: dict[str, Any]) -> None:
        if proc is self.pub:
            hist.add(self.pub_latency, body.get("request_latency", ""))
            return
        hist.add(self.latency, body.get("latency", ""))
        for took in body.get("resumes", []):
            self.resume.record_value(max(1, min(hist.HIGHEST_US, int(took * 1e6))))
        self._second.append(body.get("latency", ""))

    _second: list[str]

    def _tick(self, phase: str) -> None:
        sample = self._sample()
        subs = [p.last for p in self.subs]
        second = hist.new()
        for enc in self._second:
            hist.add(second, enc)
        self._second = []
        row = {
            **sample, "phase": phase,
            "connected": sum(s.get("connected", 0) for s in subs),
            "failures": sum(s.get("failures", 0) for s in subs),
            "reconnects": sum(s.get("reconnects", 0) for s in subs),
            "disconnects": sum(s.get("disconnects", 0) for s in subs),
            "events": sum(s.get("events", 0) for s in subs),
            "heartbeats": sum(s.get("heartbeats", 0) for s in subs),
            "published": self.pub.last.get("sent", 0) if self.pub else 0,
            "latency": hist.summary(second),
        }
        self.timeline.append(row)
        if self.progress:
            self._print(row)

    def _print(self, row: dict[str, Any]) -> None:
        prev = self.timeline[-2] if len(self.timeline) > 1 else None
        dt = row["t"] - prev["t"] if prev else 1.0
        rate = (row["events"] - prev["events"]) / dt if prev and dt > 0 else 0.0
        cpu = ""
        if prev and row["server_cpu_s"] is not None and prev["server_cpu_s"] is not None and dt > 0:
            cpu = f" | server cpu {100 * (row['server_cpu_s'] - prev['server_cpu_s']) / dt:4.0f}%"
            cpu += f" rss {row['server_rss_kib'] / 1024:6.0f} MiB"
        for name, used in (row.get("helper_cpu_s") or {}).items():
            if prev and dt > 0 and name in (prev.get("helper_cpu_s") or {}):
                cpu += f" | {name} cpu {100 * (used - prev['helper_cpu_s'][name]) / dt:4.0f}%"
        if prev and dt > 0:
            cpu += f" | load cpu {100 * (row['load_cpu_s'] - prev['load_cpu_s']) / dt:4.0f}%"
        lat = row["latency"]
        p99 = f" p99 {lat['p99']:.1f} ms" if lat.get("count") else ""
        per_proc = ""
        if row["phase"] == "connect" and len(self.subs) > 1:
            per_proc = " (" + " ".join(str(p.last.get("connected", 0)) for p in self.subs) + ")"
        t = row["t"] - (self.t_pub - self.t0 if self.t_pub is not None else 0.0)  # the report's clock, once known
        print(f"[{t:6.1f}s {row['phase']:>7}] conns {row['connected']}/{self.spec.conn_count}{per_proc} "
              f"fail {row['failures']} | events {row['events']} ({rate:.0f}/s){p99} | reconn {row['reconnects']}"
              f" | pub {row['published']}{cpu}", file=sys.stderr, flush=True)

    def _wait(self, seconds: float, phase: str, until: Any = None) -> None:
        """Pump messages and tick once a second for ``seconds`` or until ``until()``, running
        each action when it is due; never past the run's deadline (then the run is over time)."""
        wanted = time.monotonic() + seconds
        end = min(wanted, self.hard_end)
        while (now := time.monotonic()) < end:
            step = min(PROGRESS_EVERY, end - now)
            due = self._due()
            for_action = due is not None and due - now < step
            if due is not None and for_action:
                step = max(0.0, due - now)
            if any(p.result is None for p in [*self.subs, *([self.pub] if self.pub else [])]):
                self._pump(step)
            else:
                time.sleep(step)  # nothing left to hear from: only the clock
            self._run_actions()
            if not for_action:
                self._tick(phase)
            if until is not None and until():
                return
        if wanted > self.hard_end and not (until is not None and until()):
            self.over_time = True

    def _due(self) -> float | None:
        """When the next action is due (``time.monotonic()``), if any."""
        if self.t_pub is None or not self._pending:
            return None
        return self.t_pub + self._pending[0].at

    # --- actions ----------------------------------------------------------------------------
    def _run_actions(self) -> None:
        if self.t_pub is None:
            return
        now = time.monotonic() - self.t_pub
        while self._pending and self._pending[0].at <= now:
            action = self._pending.pop(0)
            mark = {"t": round(time.monotonic() - self.t_pub, 3), "at": action.at, "kind": action.kind}
            if action.kind == "storm":
                for p in self.subs:
                    p.send("storm")
            else:
                cmd = self._expand(action.command)
                mark["command"] = cmd
                limit = min(60.0, max(1.0, self.hard_end - time.monotonic()))
                try:
                    done = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=limit, check=False)
                except subprocess.TimeoutExpired:
                    mark["exit"], mark["stderr"] = None, f"still running after {limit:.0f} s: abandoned"
                else:
                    mark["exit"] = done.returncode
                    if done.returncode:
                        mark["stderr"] = done.stderr[-300:]
            self.marks.append(mark)

    _pending: list[Action]

    def _expand(self, command: str) -> str:
        pid = self.spec.server_pid
        children = self._server_pids()[1:]
        return command.replace("{pid}", str(pid or "")).replace(
            "{child}", str(random.choice(children)) if children else "")

    # --- the run ----------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        """Do the run; the result (also what is written to the JSON file)."""
        raise_nofile()
        spec = self.spec
        self.t0 = time.monotonic()
        self.hard_end = self.t0 + spec.time_bound - STOP_RESERVE
        self._second = []
        self._pending = sorted(spec.actions, key=lambda a: a.at)
        before = self._sample()
        self.subs = [Proc(f"subs-{i}", plan) for i, plan in enumerate(self._sub_plans())]
        if spec.kind != "idle":
            self.schedule = self._schedule()
            self.pub = Proc("publisher", loadproc.PubPlan(spec.publish_to, self.schedule, timeout=30.0))
        try:
            return self._execute(before)
        finally:
            procs = [*self.subs, *([self.pub] if self.pub else [])]
            for p in procs:
                p.send("stop")
            stop_by = self.hard_end + STOP_RESERVE
            self._pump(min(5.0, max(0.0, stop_by - 5.0 - time.monotonic())))
            for p in procs:
                p.stop(min(10.0, max(0.0, stop_by - 5.0 - time.monotonic())))

    def _connected(self) -> int:
        return sum(p.last.get("connected", 0) for p in self.subs)

    def _execute(self, before: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec
        t_connect = time.monotonic()
        self._wait(spec.connect_timeout, "connect", lambda: self._connected() >= spec.conn_count)
        connect_s = time.monotonic() - t_connect
        held = self._connected()
        self._wait(1.0, "settle")
        at_hold = self._sample()
        load_start = dict(self.load_cpu.last)
        window: dict[str, Any] = {}
        if spec.kind == "idle":
            self.t_pub = time.monotonic()
            self._wait(spec.duration, "hold")
            end = self._sample()
            held = self._connected()
            window = {"seconds": end["t"] - at_hold["t"]}
        else:
            assert self.pub is not None
            pub = self.pub
            bus_start = self._bus()  # read before the CPU mark: the scrapes cost the server a little
            start = self._sample()
            load_start = dict(self.load_cpu.last)
            self.t_pub = time.monotonic()
            pub.send("go")
            last_at = self.schedule.entries[-1][0] if self.schedule.entries else 0.0
            self._wait(last_at + spec.settle_timeout + 30, "publish", lambda: pub.result is not None)
            if pub.result is None:  # behind its plan past the deadline: stop it, check what it did publish
                pub.send("stop")
                self._wait(10, "publish", lambda: pub.result is not None)
            if pub.result is None and self.over_time:  # the run's deadline: hear what it published
                self._pump(min(2.0, max(0.0, self.hard_end + STOP_RESERVE / 2 - time.monotonic())))
            published = (pub.result or {}).get("published", {})
            for p in self.subs:
                p.send("finish", published, spec.settle_timeout)
            self._wait(spec.settle_timeout + 10, "settle", lambda: all(p.result is not None for p in self.subs))
            end = self._sample()
            window = {"seconds": end["t"] - start["t"]}
            if start["server_cpu_s"] is not None:
                window["server_cpu_s"] = end["server_cpu_s"] - start["server_cpu_s"]
            window["load_cpu_s"] = end["load_cpu_s"] - start["load_cpu_s"]
            if "helper_cpu_s" in start:
                window["helper_cpu_s"] = {name: end["helper_cpu_s"][name] - used
                                          for name, used in start["helper_cpu_s"].items()}
            bus_end = self._bus()
            window["bus"] = {name: growth(bus_start[name], bus_end[name]) for name in bus_start}
        if window["seconds"] > 0:  # the busiest load process, as a share of one core
            window["load_busiest"] = max((cpu - load_start.get(pid, 0.0) for pid, cpu in self.load_cpu.last.items()),
                                         default=0.0) / window["seconds"]
        for p in self.subs:
            if p.result is None:
                p.send("stop")
        self._pump(min(15.0, max(0.0, self.hard_end + STOP_RESERVE / 2 - time.monotonic())))
        return self._result(before, at_hold, end, held=held, connect_s=connect_s, window=window)

    def _result(self, before: dict[str, Any], at_hold: dict[str, Any], end: dict[str, Any], *, held: int,
                connect_s: float, window: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec
        verdict = Verdict()
        errors: dict[str, int] = {}
        events = 0
        for p in self.subs:
            res = p.result or {}
            if res.get("verdict"):
                verdict.merge(Verdict(**res["verdict"]))
            for k, v in res.get("errors", {}).items():
                errors[k] = errors.get(k, 0) + v
            events += res.get("events", 0)
        pub = self.pub.result if self.pub and self.pub.result else {}
        published = sum(pub.get("published", {}).values()) if pub else 0
        zero = (self.t_pub - self.t0) if self.t_pub is not None else 0.0
        timeline = [{**row, "t": round(row["t"] - zero, 3)} for row in self.timeline]
        took = time.monotonic() - self.t0
        out: dict[str, Any] = {
            "spec": {**asdict(spec), "endpoint": asdict(spec.endpoint)},
            "machine": machine(),
            "connections": {"planned": spec.conn_count, "held": held, "subscriptions": spec.subs,
                            "connect_seconds": round(connect_s, 2),
                            "failures": sum((p.result or p.last).get("failures", 0) for p in self.subs)},
            "published": published,
            "delivered": events,
            "verdict": asdict(verdict),
            "latency_ms": hist.summary(self.latency),
            "resume_s": {k: (v / 1000 if k not in ("count",) else v) for k, v in hist.summary(self.resume).items()},
            "reconnects": sum((p.result or p.last).get("reconnects", 0) for p in self.subs),
            "publisher": {k: v for k, v in pub.items() if k not in ("published", "request_latency")},
            "publish_request_ms": hist.summary(self.pub_latency),
            "errors": errors,
            "crashes": {p.name: p.crash for p in [*self.subs, *([self.pub] if self.pub else [])] if p.crash},
            "marks": self.marks,
            "timeline": timeline,
            "window": window,
            "time": {"seconds": round(took, 2), "bound": round(spec.time_bound, 2), "over_time": self.over_time},
        }
        if at_hold.get("server_rss_kib") and before.get("server_rss_kib") and held:
            out["server_rss_kib_per_conn"] = round((at_hold["server_rss_kib"] - before["server_rss_kib"]) / held, 2)
            if spec.kind == "idle" and end.get("server_rss_kib"):
                out["server_rss_kib_per_conn"] = round((end["server_rss_kib"] - before["server_rss_kib"]) / held, 2)
            out["server_rss_kib"] = {"before": before["server_rss_kib"], "held": end.get("server_rss_kib")}
        if window.get("server_cpu_s") is not None and events:
            out["server_cpu_us_per_event"] = round(window["server_cpu_s"] / events * 1e6, 2)
        if window.get("helper_cpu_s") is not None and events:
            out["helpers"] = {name: {"cpu_s": round(used, 3), "cpu_us_per_event": round(used / events * 1e6, 2),
                                     "cpu_us_per_published": round(used / published * 1e6, 2) if published else None}
                              for name, used in window["helper_cpu_s"].items()}
            if window.get("server_cpu_s") is not None:
                with_helpers = window["server_cpu_s"] + sum(window["helper_cpu_s"].values())
                out["server_with_helpers_cpu_us_per_event"] = round(with_helpers / events * 1e6, 2)
        if "bus" in window:  # by host: how much each sluice_bus_* counter grew over the window
            out["bus"] = window.pop("bus")
        if window.get("load_cpu_s") is not None and window.get("seconds"):
            nprocs = len(self.subs) + (1 if self.pub else 0)
            busy = window["load_cpu_s"] / window["seconds"]
            busiest = window.get("load_busiest", 0.0)
            out["load_cpu"] = {"cores_used": round(busy, 2), "processes": nprocs, "busiest": round(busiest, 2),
                               "saturated": busiest > SATURATED,
                               "us_per_event": round(window["load_cpu_s"] / events * 1e6, 2) if events else None}
        out["ok"] = verdict.clean and not out["crashes"] and not self.over_time and held == spec.conn_count and (
            spec.kind == "idle" or (published > 0 and pub.get("complete", False)))
        return out


def shell_command(command: str) -> list[str]:
    """Split a command line (used when a command is given as one string)."""
    return shlex.split(command)
