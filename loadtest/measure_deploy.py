"""Measure a rolling restart (SIGHUP) of a multi-worker ``sluice serve`` under thousands of SSE subscribers.

    python loadtest/measure_deploy.py                            # 5,000 subscribers, drain.window=10
    python loadtest/measure_deploy.py --window 10 --window 2     # one run (and server) per window

The restart is timed by the supervisor's own ``NOTIFY_SOCKET`` messages (``RELOADING=1``, ``STATUS=
reloading: slot i/N``, ``READY=1``), read here from an abstract datagram socket. Subscribers (HTTP/1.1,
in client processes) behave like EventSource: when a response ends they wait the last ``retry:`` and
reconnect with ``Last-Event-ID``. Event data is the per-stream publish sequence number, so each one
checks it got every event once and in order. Server CPU (supervisor, reaped and live workers) comes
from /proc every 0.5 s. Every process started is ended by PID; nothing is imported from ``server``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import trio

try:
    from loadtest import measure_core as core
except ImportError:  # run as a script: loadtest/ is on sys.path
    import measure_core as core  # type: ignore[no-redef]

HOST, RECV = core.HOST, core.RECV
SLOT_STATUS = re.compile(r"STATUS=reloading: slot (\d+)/(\d+)")
WORKER_READY = re.compile(r"slot (\d+): worker pid (\d+) ready \(([\d.]+)s\)")
TCP_DROPS = ("ListenOverflows", "ListenDrops", "TCPReqQFullDrop", "TCPSynRetrans")
CONCURRENCY, CONNECT_TIMEOUT, FINAL_TIMEOUT = 200, 90.0, 90.0  # per client process: connects in flight, s, s


@dataclass
class SubSpec:
    """What one client process does."""

    port: int
    streams: list[str]
    hold_timeout: float  # fail-safe: the longest wait for the controller
    count: int = 0
    first_index: int = 0  # global index of its first subscriber (picks its stream)


class Subscriber:
    """One EventSource-like subscriber: its position, its checks and its reconnect record."""

    def __init__(self, index: int, stream: str) -> None:
        self.index, self.stream = index, stream
        self.last_id = b""  # the Last-Event-ID buffer (set by any id: field, event or not)
        self.event_id = b""  # id of the last event dispatched
        self.next_seq, self.retry_ms = 0, 3000
        self.gaps = self.dups = self.disorder = self.resets = self.ends = 0
        self.raw = self.text = b""
        self.live = self.done = False
        # per reconnect: [disconnected, last attempt, TCP connected, 200 head, first event, failed attempts]
        self.moves: list[list[float]] = []
        self.kinds: list[str] = []  # how each response ended

    def feed(self, data: bytes, group: Group) -> bool:
        """Take bytes of a chunked body; dispatch complete events; True at the last chunk."""
        raw, pos, out, last = self.raw + data, 0, [], False
        while (nl := raw.find(b"\r\n", pos)) >= 0:
            size = int(raw[pos:nl].split(b";", 1)[0], 16)
            end = nl + 2 + size
            if len(raw) < end + 2:
                break
            if size == 0:
                last = True
                break
            out.append(raw[nl + 2 : end])
            pos = end + 2
        self.raw = raw[pos:]
        if out:
            *blocks, self.text = (self.text + b"".join(out)).split(b"\n\n")
            now = time.monotonic()
            for block in blocks:
                self.dispatch(block, group, now)
        return last

    def dispatch(self, block: bytes, group: Group, now: float) -> None:
        """One SSE block (WHATWG rules for id/retry/data/event; LF line ends, as the server sends)."""
        ev_id = data = etype = None
        for line in block.split(b"\n"):
            name, _, value = line.partition(b":")
            value = value[1:] if value[:1] == b" " else value
            if name == b"id":
                ev_id = value
            elif name == b"data":
                data = value if data is None else data + b"\n" + value
            elif name == b"event":
                etype = value
            elif name == b"retry" and value.isdigit():
                self.retry_ms = int(value)
        if ev_id is not None:
            self.last_id = ev_id
        if data is None or etype in (b"sluice.reset", b"sluice.end"):
            self.resets += etype == b"sluice.reset"
            self.ends += etype == b"sluice.end"
            return
        if ev_id is not None:
            self.disorder += ev_id <= self.event_id
            self.event_id = ev_id
        if (seq := int(data)) < self.next_seq:
            self.dups += 1
        else:
            self.gaps += seq - self.next_seq
            self.next_seq = seq + 1
        if self.moves and not self.moves[-1][4]:
            self.moves[-1][4] = now
        group.progress(self)


class Group:
    """A client process's subscribers, counted, and the moments they all reach a mark."""

    def __init__(self, subs: list[Subscriber]) -> None:
        self.subs, self.n = subs, len(subs)
        self.connected = self.live = self.done = self.connect_errors = 0
        self.errors: list[str] = []
        self.target: dict[str, int] = {}
        self.all_connected, self.all_live, self.all_done = trio.Event(), trio.Event(), trio.Event()
        self.lag: list[tuple[float, float]] = []  # (when, how late a 50 ms sleep woke up)

    def note(self, error: str) -> None:
        """Count a failed connection attempt; keep the first few messages."""
        self.connect_errors += 1
        if len(self.errors) < 5:
            self.errors.append(error)

    def progress(self, sub: Subscriber) -> None:
        """A subscriber advanced: mark it live (first event) and done (reached its target)."""
        if not sub.live:
            sub.live, self.live = True, self.live + 1
            if self.live == self.n:
                self.all_live.set()
        if self.target and not sub.done and sub.next_seq >= self.target[sub.stream]:
            sub.done, self.done = True, self.done + 1
            if self.done == self.n:
                self.all_done.set()

    def report(self, last_ids: dict[str, str], t0: float) -> dict[str, Any]:
        """What the controller needs; times relative to the SIGHUP moment ``t0``."""
        subs = self.subs
        moves = [(*(x - t0 if x else None for x in m[:5]), int(m[5]), k)
                 for s in subs for m, k in zip(s.moves, s.kinds, strict=True)]
        return {"moves": moves, "per_sub": Counter(len(s.moves) for s in subs),
                "lost": sum(s.gaps + max(0, self.target[s.stream] - s.next_seq) for s in subs),
                "extra": sum(max(0, s.next_seq - self.target[s.stream]) for s in subs),
                "bad_last_id": sum(s.event_id.decode() != last_ids[s.stream] for s in subs),
                **{k: sum(getattr(s, k) for s in subs) for k in ("dups", "disorder", "resets", "ends")},
                "not_done": self.n - self.done, "connect_errors": self.connect_errors, "errors": self.errors,
                "lag": [(t - t0, d) for t, d in self.lag]}


async def watch_lag(group: Group) -> None:
    """Record this process's event-loop lag: a client that runs late measures the server as slow."""
    while True:
        t = time.monotonic()
        await trio.sleep(0.05)
        group.lag.append((t, time.monotonic() - t - 0.05))


async def request(sock: trio.socket.SocketType, spec: SubSpec, sub: Subscriber) -> tuple[float, bytes]:
    """Connect, send the GET (with Last-Event-ID once there is one), read a 200 chunked head;
    returns when TCP connected and the body bytes that came with the head."""
    await sock.connect((HOST, spec.port))  # no bind(addr, 0) first: with thousands of ports in use it takes ms
    connected = time.monotonic()
    req = f"GET /v1/streams/{sub.stream}?from=start HTTP/1.1\r\nHost: {HOST}\r\nAccept: text/event-stream\r\n"
    if sub.last_id:
        req += f"Last-Event-ID: {sub.last_id.decode()}\r\n"
    await core.send_all(sock, (req + "\r\n").encode())
    buf = b""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        if not (data := await sock.recv(RECV)) or len(buf) > 65_536:
            raise ConnectionError(f"no response head ({buf[:80]!r})")
        buf += data
    if not buf.startswith(b"HTTP/1.1 200") or b"chunked" not in buf[:end].lower():
        raise ConnectionError(buf.split(b"\r\n", 1)[0].decode(errors="replace"))
    return connected, buf[end + 4 :]


async def subscribe(spec: SubSpec, sub: Subscriber, group: Group, limiter: trio.CapacityLimiter) -> None:
    """Stay subscribed: after any end, wait the last ``retry:`` and resume from Last-Event-ID."""
    first, failures = True, 0
    while True:
        attempt, sock = time.monotonic(), trio.socket.socket()
        try:
            async with limiter if first else contextlib.nullcontext():
                with trio.fail_after(15):
                    connected, body = await request(sock, spec, sub)
        except (OSError, ConnectionError, trio.TooSlowError) as exc:
            sock.close()
            group.note(f"subscriber {sub.index}: {exc!r}")
            failures += 1
            await trio.sleep(sub.retry_ms / 1000)
            continue
        if first:
            first, group.connected = False, group.connected + 1
            if group.connected == group.n:
                group.all_connected.set()
        elif sub.moves:
            sub.moves[-1][1:4], sub.moves[-1][5] = [attempt, connected, time.monotonic()], failures
        failures, sub.raw, sub.text, kind = 0, b"", b"", "end"
        try:
            while not (body and sub.feed(body, group)):
                if not (body := await sock.recv(RECV)):
                    kind = "eof"
                    break
        except OSError as exc:
            kind = type(exc).__name__
        finally:
            sock.close()
        sub.moves.append([time.monotonic(), 0.0, 0.0, 0.0, 0.0, 0])
        sub.kinds.append(kind)
        await trio.sleep(sub.retry_ms / 1000)


async def client_async(conn: Connection, spec: SubSpec) -> None:
    """Open every subscriber; report connected and live; on ("final", ...) wait for all, report."""
    group = Group([Subscriber(i, spec.streams[(spec.first_index + i) % len(spec.streams)]) for i in range(spec.count)])
    limiter = trio.CapacityLimiter(CONCURRENCY)
    async with trio.open_nursery() as nursery:
        for sub in group.subs:
            nursery.start_soon(subscribe, spec, sub, group, limiter)
        nursery.start_soon(watch_lag, group)
        with trio.move_on_after(CONNECT_TIMEOUT):
            await group.all_connected.wait()
        conn.send(("connected", group.connected, group.errors))
        with trio.move_on_after(CONNECT_TIMEOUT):
            await group.all_live.wait()
        conn.send(("live", group.live))
        msg = await trio.to_thread.run_sync(core.recv_control, conn, spec.hold_timeout)
        if isinstance(msg, tuple) and msg[0] == "final":
            _, group.target, last_ids, t0 = msg
            for sub in group.subs:
                group.progress(sub)
            with trio.move_on_after(FINAL_TIMEOUT):
                await group.all_done.wait()
            conn.send(("done", group.report(last_ids, t0)))
            await trio.to_thread.run_sync(core.recv_control, conn, spec.hold_timeout)  # "stop"
        nursery.cancel_scope.cancel()


def client_main(conn: Connection, spec: SubSpec) -> None:
    """Entry point of a client process."""
    core.raise_nofile()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller stops us
    trio.run(client_async, conn, spec)


@dataclass
class PubStats:
    """One stream's publishing record."""

    count: int = 0  # events published: their data are 0..count-1
    last_id: str = ""
    retries: list[str] = field(default_factory=list)
    latency: list[tuple[float, float]] = field(default_factory=list)  # (sent, seconds until 201)
    failed: str = ""


def publish_stream(port: int, stream: str, out: PubStats, *, rate: float, t0: float, run: str,
                   stop: threading.Event) -> None:
    """POST ``rate`` events/s; retry a failed POST with the same Idempotency-Key for up to 30 s."""
    conn: http.client.HTTPConnection | None = None
    while not stop.wait(max(0.0, t0 + out.count / rate - time.monotonic())):
        started = time.monotonic()
        headers = {"Content-Type": "text/plain", "Idempotency-Key": f"{run}:{stream}:{out.count}"}
        while True:
            try:
                conn = conn or http.client.HTTPConnection(HOST, port, timeout=10)
                conn.request("POST", f"/v1/streams/{stream}", body=str(out.count).encode(), headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                if resp.status == 201:
                    out.last_id = json.loads(body)["id"]
                    break
                reason = f"HTTP {resp.status} {body[:100]!r}"
                if 400 <= resp.status < 500 and resp.status not in (408, 429):
                    out.failed = reason
            except (OSError, http.client.HTTPException) as exc:
                reason = type(exc).__name__
            if conn is not None:
                conn.close()
                conn = None
            out.retries.append(reason)
            if out.failed or time.monotonic() - started > 30:
                out.failed = out.failed or f"gave up after 30 s: {reason}"
                return
            time.sleep(0.05)
        out.latency.append((started, time.monotonic() - started))
        out.count += 1


def publisher_main(conn: Connection, port: int, streams: list[str], rate: float, timeout: float) -> None:
    """Entry point of the publisher process: "go" starts, "stop" ends and reports."""
    core.raise_nofile()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if core.recv_control(conn, timeout) != "go":
        return
    stop, stats, run, t0 = threading.Event(), {s: PubStats() for s in streams}, uuid.uuid4().hex[:8], time.monotonic()
    threads = [threading.Thread(target=publish_stream, daemon=True, args=(port, s, stats[s]),
                                kwargs={"rate": rate, "t0": t0 + j / (rate * len(streams)), "run": run, "stop": stop})
               for j, s in enumerate(streams)]
    for t in threads:
        t.start()
    core.recv_control(conn, timeout)
    stop.set()
    for t in threads:
        t.join(40)
    conn.send(("published", stats))


class Notes:
    """The receiving end of ``$NOTIFY_SOCKET``: every datagram with its arrival time (monotonic)."""

    def __init__(self) -> None:
        self.name = f"@sluice-deploy-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name[1:].encode())
        self.sock.settimeout(0.2)
        self.log: list[tuple[float, str]] = []
        self.closed = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while not self.closed.is_set():
            with contextlib.suppress(TimeoutError):
                data = self.sock.recv(65536)
                self.log.append((time.monotonic(), data.decode(errors="replace")))

    def find(self, line: str, after: int = 0) -> int | None:
        """Index of the first message at or past ``after`` with a line starting with ``line``."""
        return next((i for i in range(after, len(self.log))
                     if any(part.startswith(line) for part in self.log[i][1].split("\n"))), None)

    def close(self) -> None:
        """Stop reading; close the socket."""
        self.closed.set()
        time.sleep(0.3)
        self.sock.close()


def server_cpu(pid: int, pids: list[int]) -> float:
    """CPU seconds of the supervisor, its reaped children (cutime/cstime) and live descendants."""
    ticks = 0
    for p in pids:
        with contextlib.suppress(OSError):
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if p == pid else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def tcp_drops() -> Counter[str]:
    """Host-wide TcpExt counters that reveal refused or dropped connection attempts."""
    lines = [ln.split() for ln in Path("/proc/net/netstat").read_text().splitlines() if ln.startswith("TcpExt:")]
    return Counter({k: int(v) for k, v in zip(lines[0][1:], lines[1][1:], strict=True) if k in TCP_DROPS})


def sockets_open(pid: int) -> int:
    """How many sockets the process has open (its connections, listeners and peer sockets)."""
    count = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


class Run:
    """One server with its clients and publisher; every process ended by PID in :meth:`close`."""

    def __init__(self, args: argparse.Namespace, window: float) -> None:
        self.args, self.window, self.log = args, window, ""
        self.tmp, self.notes = Path(tempfile.mkdtemp(prefix="sluice-deploy-")), Notes()
        self.cmd = [args.sluice, "serve", "--host", HOST, "--port", "0", "--workers", str(args.workers),
                    "--db", str(self.tmp / "sluice.db"), "--set", "sse.heartbeat=600",
                    "--set", f"drain.window={window:g}", "--set", f"drain.deadline={args.deadline:g}", *args.server_arg]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICE_", "LISTEN_", "WATCHDOG_"))}
        with (self.tmp / "server.log").open("wb") as log:
            self.server = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp,
                                           env={**env, "NOTIFY_SOCKET": self.notes.name})
        self.workers: set[int] = set()
        self.procs: list[Any] = []
        self.pipes: list[Connection] = []  # to the client processes
        self.every: list[Connection] = []  # to every process
        self.series: list[tuple[float, ...]] = []  # (monotonic, server CPU s, client CPU s, host busy CPU s)

    def spawn(self, target: Callable[..., None], *args: Any) -> Connection:
        """Start a process (a spawned interpreter) running ``target(pipe, *args)``."""
        mine, theirs = mp.get_context("spawn").Pipe()
        self.procs.append(mp.get_context("spawn").Process(target=target, args=(theirs, *args), daemon=True))
        self.procs[-1].start()
        theirs.close()
        self.every.append(mine)
        return mine

    def sample(self) -> None:
        """One CPU sample of the server (its worker set re-read from /proc) and the client processes."""
        pids = core.process_tree(self.server.pid)
        self.workers.update(pids[1:])
        clients = sum(core.cpu_seconds(p.pid) for p in self.procs[1:])
        host = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
        busy = (sum(host) - host[3] - host[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        self.series.append((time.monotonic(), server_cpu(self.server.pid, pids), clients, busy))

    def wait(self, until: Callable[[], Any], timeout: float, what: str) -> Any:
        """Sample every 0.5 s until ``until()`` is truthy (returned); fail-safe timeout."""
        deadline, next_sample = time.monotonic() + timeout, 0.0
        while not (result := until()):
            if self.server.poll() is not None:
                raise RuntimeError(f"server exited with status {self.server.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} within {timeout:.0f} s")
            if time.monotonic() >= next_sample:
                next_sample = time.monotonic() + 0.5
                self.sample()
            time.sleep(0.02)
        return result

    def note(self, line: str, after: int, timeout: float) -> int:
        """Index of the next notification with ``line`` at or past ``after``."""
        self.wait(lambda: self.notes.find(line, after) is not None, timeout, line)
        return self.notes.find(line, after) or 0

    def gather(self, pipes: list[Connection], kind: str, timeout: float) -> list[Any]:
        """The payload of the ``kind`` message from each pipe, under one deadline."""
        deadline, out = time.monotonic() + timeout, []
        for i, pipe in enumerate(pipes):
            self.wait(pipe.poll, max(0.0, deadline - time.monotonic()), f"{kind!r} from process {i}")
            if (msg := pipe.recv())[0] != kind:
                raise RuntimeError(f"process {i}: expected {kind!r}, got {msg!r}")
            out.append(msg[1] if len(msg) == 2 else msg[1:])
        return out

    def close(self) -> None:
        """End everything started here, by PID: clients and publisher, supervisor, workers."""
        for pipe in self.every:
            with contextlib.suppress(OSError):
                pipe.send("stop")
        deadline = time.monotonic() + 10
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(2)
        if self.server.poll() is None:
            self.workers.update(core.process_tree(self.server.pid)[1:])
            self.server.kill()
            self.server.wait(10)
        for pid in self.workers:
            with contextlib.suppress(OSError):
                if b"server.process.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        self.notes.close()
        with contextlib.suppress(OSError):
            self.log = (self.tmp / "server.log").read_text(errors="replace")
        shutil.rmtree(self.tmp, ignore_errors=True)


def measure(args: argparse.Namespace, window: float) -> dict[str, Any]:
    """One run: connect, warm up, SIGHUP, follow the reload, publish a tail, check every event, stop."""
    run, streams, ok = Run(args, window), [f"deploy:{k}" for k in range(args.streams)], False
    try:
        i_ready = run.note("READY=1", 0, 30)
        port = int(re.findall(r"STATUS=serving on \S+:(\d+)", run.notes.log[i_ready][1])[0])
        hold = args.workers * (args.deadline + 40) + 300
        pub = run.spawn(publisher_main, port, streams, args.rate, hold)
        per, base = math.ceil(args.subs / args.procs), SubSpec(port, streams, hold)
        run.pipes = [run.spawn(client_main, replace(base, count=min(per, args.subs - k), first_index=k))
                     for k in range(0, args.subs, per)]
        started = time.monotonic()
        connected = run.gather(run.pipes, "connected", CONNECT_TIMEOUT + 30)
        if (n := sum(c[0] for c in connected)) < args.subs:
            raise RuntimeError(f"{args.subs - n} subscribers failed to connect: {[c[1] for c in connected]}")
        print(f"  {n} subscribers connected in {time.monotonic() - started:.1f} s", file=sys.stderr)
        pub.send("go")
        run.gather(run.pipes, "live", CONNECT_TIMEOUT + 30)  # the first (warm-up) event reached all
        run.sample()
        marks, end = [len(run.series)], time.monotonic() + args.settle
        run.wait(lambda: time.monotonic() >= end, args.settle + 10, "settle")
        run.sample()
        marks.append(len(run.series))
        drops0 = tcp_drops()
        t_hup = time.monotonic()
        run.server.send_signal(signal.SIGHUP)
        i_rel = run.note("RELOADING=1", i_ready + 1, 10)
        i_done = run.note("READY=1", i_rel + 1, args.workers * (args.deadline + 40))
        run.sample()
        marks.append(len(run.series))
        end = time.monotonic() + args.tail
        run.wait(lambda: time.monotonic() >= end, args.tail + 10, "tail")
        pub.send("stop")
        stats: dict[str, PubStats] = run.gather([pub], "published", 60)[0]
        for pipe in run.pipes:
            pipe.send(("final", {k: p.count for k, p in stats.items()}, {k: p.last_id for k, p in stats.items()},
                       t_hup))
        reports = run.gather(run.pipes, "done", FINAL_TIMEOUT + 30)
        drops = tcp_drops() - drops0
        for pipe in run.pipes:
            pipe.send("stop")
        for proc in run.procs:  # subscribers gone: the stop below drains an idle server
            proc.join(30)
        fds = [sockets_open(w) for w in core.process_tree(run.server.pid)[1:]]
        t_term = time.monotonic()
        run.server.send_signal(signal.SIGTERM)
        code, t_exit = run.server.wait(args.deadline + 15), time.monotonic() - t_term
        ok = True
    finally:
        run.close()
        if not ok:
            print(f"server log:\n{run.log[-4000:]}", file=sys.stderr)
    return summarize(run, t_hup=t_hup, reload=(i_rel, i_done), marks=marks, stats=stats, reports=reports,
                     extra={"drops": drops, "exit": f"{t_exit:.1f} s, status {code}; worker sockets before: {fds}"})


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of xs; nan when empty."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else math.nan


def ms3(xs: list[float]) -> str:
    """p50 / p99 / max in ms."""
    return " / ".join(f"{pct(xs, q) * 1e3:.0f}" for q in (0.5, 0.99, 1.0)) if xs else "-"


def summarize(run: Run, *, t_hup: float, reload: tuple[int, int], marks: list[int], stats: dict[str, PubStats],
              reports: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """Reduce notifications, samples, the server log and the client reports to the reported rows."""
    notes, (i_rel, i_done), log, series = run.notes.log, reload, run.log, run.series
    t_ready = notes[i_done][0]
    slots = [t for t, msg in notes[i_rel:i_done] if SLOT_STATUS.search(msg)] + [t_ready]
    moves = [m for r in reports for m in r["moves"]]  # (disconnect, attempt, connected, head, event, fails, kind)
    per_sub: Counter[int] = sum((r["per_sub"] for r in reports), Counter())
    heads = [m[3] for m in moves if m[3] is not None]
    hist = Counter(math.floor(h) for h in heads)
    base, (t0, s0, c0, h0), (t1, s1, c1, h1) = (series[k - 1] for k in marks)
    lag = [d for r in reports for t, d in r["lag"] if 0 <= t <= t_ready - t_hup]
    steps, anchor = [], series[marks[1] - 1]  # server cores per interval of >= 0.45 s (ticks are 10 ms)
    for sample in series[marks[1] : marks[2]]:
        if sample[0] - anchor[0] >= 0.45:
            steps.append((sample[1] - anchor[1]) / (sample[0] - anchor[0]))
            anchor = sample
    total = {k: sum(r[k] for r in reports) for k in reports[0] if isinstance(reports[0][k], int)}
    pub_lat = [d for p in stats.values() for s, d in p.latency if t_hup <= s <= t_ready]
    done = [m for m in moves if m[1] is not None]
    rows = [
        ("drain.window / drain.deadline (s)", f"{run.window:g} / {run.args.deadline:g}"),
        ("SIGHUP → RELOADING=1 (ms)", f"{(notes[i_rel][0] - t_hup) * 1e3:.0f}"),
        ("**restart: RELOADING=1 → READY=1 (s)**", f"**{t_ready - notes[i_rel][0]:.1f}**"),
        ("per slot, STATUS slot i/N → next (s)", " / ".join(f"{b - a:.1f}" for a, b in itertools.pairwise(slots))),
        ("of which new worker start → READY (s)",
         " / ".join(m.group(3) for m in list(WORKER_READY.finditer(log))[run.args.workers :])),
        ("**connections moved (reconnects)**", f"**{sum(m[0] >= 0 for m in moves)}** "
                                               f"(before SIGHUP: {sum(m[0] < 0 for m in moves)})"),
        ("subscribers by times moved", ", ".join(f"{k}x: {v}" for k, v in sorted(per_sub.items()))),
        ("moved more than once", str(sum(v for k, v in per_sub.items() if k > 1))),
        ("how responses ended", ", ".join(f"{k}: {v}" for k, v in Counter(m[6] for m in moves).items())),
        ("**peak reconnects/s** (mean, first to last)", f"**{max(hist.values(), default=0)}** "
                                                        f"({len(heads) / (max(heads) - min(heads)):.0f})"),
        ("last reconnect after SIGHUP (s)", f"{max(heads, default=math.nan):.1f}"),
        ("disconnect → first event after reconnect, ms p50/p99/max", ms3([m[4] - m[0] for m in moves if m[4]])),
        ("  of which retry wait (ms p50/p99/max)", ms3([m[1] - m[0] for m in done])),
        ("  of which TCP connect (ms p50/p99/max)", ms3([m[2] - m[1] for m in done])),
        ("  of which request → 200 head (ms p50/p99/max)", ms3([m[3] - m[2] for m in done])),
        ("failed connection attempts (clients)", str(total["connect_errors"])),
        ("host TCP drops/retransmits during run", ", ".join(f"{k} {v}" for k, v in extra["drops"].items()) or "0"),
        ("events published (all streams)", str(sum(p.count for p in stats.values()))),
        ("**lost / duplicated / out of order**", f"**{total['lost']} / {total['dups']} / {total['disorder']}**"),
        ("resets / ends / extra / wrong last id / unfinished",
         " / ".join(str(total[k]) for k in ("resets", "ends", "extra", "bad_last_id", "not_done"))),
        ("publish retries (same Idempotency-Key)",
         ", ".join(f"{k} {v}" for k, v in Counter(r for p in stats.values() for r in p.retries).items()) or "0"),
        ("publish latency during reload, ms p50/p99/max", ms3(pub_lat)),
        ("server CPU before SIGHUP (cores)", f"{(s0 - base[1]) / (t0 - base[0]):.2f}"),
        ("server CPU SIGHUP → READY: s (avg, peak 0.5 s cores)",
         f"{s1 - s0:.1f} ({(s1 - s0) / (t1 - t0):.2f}, {max(steps, default=math.nan):.2f})"),
        ("client CPU SIGHUP → READY: s (avg cores)", f"{c1 - c0:.1f} ({(c1 - c0) / (t1 - t0):.2f})"),
        (f"host CPU busy SIGHUP → READY: avg cores of {os.cpu_count()} (not server or clients)",
         f"{(h1 - h0) / (t1 - t0):.2f} ({(h1 - h0 - s1 + s0 - c1 + c0) / (t1 - t0):.2f})"),
        ("client event-loop lag during reload, ms p50/p99/max", ms3(lag)),
        ("SIGTERM → supervisor exit (subscribers gone)", extra["exit"]),
    ]
    odd = [ln for ln in log.splitlines() if (ln.strip() and " INFO " not in ln) or "did not welcome" in ln]
    odd += [p.failed for p in stats.values() if p.failed] + [e for r in reports for e in r["errors"]]
    return {"rows": rows, "hist": hist, "odd": odd, "window": run.window, "cmd": run.cmd, "tmp": str(run.tmp),
            "raw": {"moves": moves, "series": series, "notes": notes, "log": log, "t_hup": t_hup}}


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Print the Markdown tables, histograms, oddities, commands and machine facts."""
    print(f"\n## Rolling restart: {args.subs} SSE subscribers (HTTP/1.1, {args.procs} client processes), "
          f"{args.streams} streams x {args.rate:g} events/s, {args.workers} workers\n")
    print("| metric | " + " | ".join(f"drain.window={r['window']:g}" for r in results) + " |")
    print("|---|" + "---:|" * len(results))
    for k, (label, _) in enumerate(results[0]["rows"]):
        print(f"| {label} | " + " | ".join(r["rows"][k][1] for r in results) + " |")
    for r in results:
        print(f"\n### Reconnects per second after SIGHUP, drain.window={r['window']:g} "
              "(by when the new response head arrived)\n")
        print("| t (s) | " + " | ".join(f"+{k}" for k in range(10)) + " |\n|---:|" + "---:|" * 10)
        for row in range(min(r["hist"], default=0) // 10, max(r["hist"], default=0) // 10 + 1):
            print(f"| {row * 10} | " + " | ".join(str(r["hist"].get(row * 10 + k, 0)) for k in range(10)) + " |")
        for line in r["odd"][:15]:
            print(f"- server log / errors: `{line}`")
    print("\nCommands:\n")
    print(f"    {' '.join([sys.executable, *sys.argv])}")
    env = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
    for r in results:
        print(f"    {env}" + " ".join(r["cmd"]).replace(r["tmp"], "$TMP"))
    print()
    print(core.machine_facts())


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sluice", default=str(Path(sys.executable).parent / "sluice"), help="sluice executable")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG", help="extra serve argument")
    parser.add_argument("--subs", type=int, default=5000, help="SSE subscribers")
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    parser.add_argument("--streams", type=int, default=10, help="streams (subscribers spread evenly)")
    parser.add_argument("--rate", type=float, default=2.0, help="events/s published per stream")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--window", type=float, action="append", help="drain.window (repeatable: one run each)")
    parser.add_argument("--deadline", type=float, default=30.0, help="drain.deadline")
    parser.add_argument("--settle", type=float, default=5.0, help="steady seconds before SIGHUP")
    parser.add_argument("--tail", type=float, default=5.0, help="seconds of publishing after READY=1")
    parser.add_argument("--dump", type=Path, help="write each run's raw data (moves, samples, notes, log) here")
    args = parser.parse_args()
    core.raise_nofile()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-ups in finally
    results = []
    for window in args.window or [10.0]:
        print(f"run: drain.window={window:g}", file=sys.stderr)
        results.append(measure(args, window))
    if args.dump:
        args.dump.write_text(json.dumps(results, default=str))
    report(results, args)


if __name__ == "__main__":
    main()
