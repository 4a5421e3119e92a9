"""Measure Sluice's core costs: RSS per idle SSE connection and server CPU per delivered event.

    python loadtest/measure_core.py idle --conns 5000
    python loadtest/measure_core.py fanout --subs 2000 --proto h1 --events 200 --rate 20
    python loadtest/measure_core.py all

Each scenario starts its own server (a subprocess on a free 127.0.0.1 port, temporary SQLite
database, heartbeats pushed out of the run), generates load from separate client processes and
reads the server's RSS and CPU time from /proc. Nothing is imported from the server package.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import math
import multiprocessing as mp
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio

HOST = "127.0.0.1"
PATTERN = b"\nid: "  # every SSE event starts with an id: line; counting it survives chunk framing
TAIL = len(PATTERN) - 1
PORTS_PER_SOURCE = 20_000
H2_WINDOW = 2**31 - 1
RECV = 262_144


def raise_nofile() -> None:
    """Raise this process's open-file soft limit to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def source_address(index: int) -> str:
    """127.0.0.2, 127.0.0.3, ...: at most PORTS_PER_SOURCE connections per source address."""
    n = 2 + index // PORTS_PER_SOURCE
    return f"127.0.{n // 256}.{n % 256}"


def process_tree(pid: int) -> list[int]:
    """The process and all its descendants (via /proc/PID/task/TID/children)."""
    pids: list[int] = []
    todo = [pid]
    while todo and len(pids) < 1024:
        p = todo.pop()
        pids.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    todo.extend(int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split())
    return pids


def rss_kib(pid: int) -> int:
    """VmRSS in KiB summed over the process tree."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def cpu_seconds(pid: int) -> float:
    """utime + stime in seconds summed over the process tree (threads included)."""
    ticks = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


class Server:
    """``sluice serve`` as a subprocess; always killed by PID (descendants too) on exit."""

    def __init__(self, sluice: str, extra: list[str]) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="sluice-measure-"))
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port: int = s.getsockname()[1]
        self.cmd = [sluice, "serve", "--host", HOST, "--port", str(self.port), "--db", str(self.tmp / "sluice.db"),
                    "--set", "sse.heartbeat=3600", *extra]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = ""

    def __enter__(self) -> Server:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        with (self.tmp / "server.log").open("wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while self.proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError), contextlib.closing(http.client.HTTPConnection(HOST, self.port, 2)) as c:
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    return
            time.sleep(0.05)
        log = (self.tmp / "server.log").read_text(errors="replace")
        raise RuntimeError(f"server not ready (exit status {self.proc.returncode}):\n{log}")

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.proc is not None
        return self.proc.pid

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            pids = process_tree(self.proc.pid)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for p in pids:
                    with contextlib.suppress(OSError):
                        os.kill(p, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
                if self.proc.poll() is not None and not any(Path(f"/proc/{p}").exists() for p in pids[1:]):
                    break
        with contextlib.suppress(OSError):
            self.log = (self.tmp / "server.log").read_text(errors="replace")
        shutil.rmtree(self.tmp, ignore_errors=True)

    def report_log(self) -> None:
        """Print the server's log lines other than INFO (warnings, errors, tracebacks)."""
        lines = [ln for ln in self.log.splitlines() if ln.strip() and " INFO " not in ln]
        for line in lines[:20]:
            print(f"  server log: {line}", file=sys.stderr)
        if len(lines) > 20:
            print(f"  server log: ... {len(lines) - 20} more lines", file=sys.stderr)


@dataclass
class ClientSpec:
    """What one client process does."""

    mode: str  # "idle" or "fanout"
    proto: str  # "h1" or "h2"
    port: int
    stream: str
    count: int = 0  # subscribers in this process
    first_index: int = 0  # global index of its first subscriber (spreads source addresses)
    concurrency: int = 200
    streams_per_conn: int = 100
    connect_timeout: float = 60.0
    warm_timeout: float = 60.0
    events: int = 0
    events_timeout: float = 60.0
    hold_timeout: float = 180.0


class Tracker:
    """Per-subscriber event counts and the moments when every subscriber reached a mark."""

    def __init__(self, n: int) -> None:
        self.n, self.counts, self.target = n, [0] * n, list[int]()
        self.connected = self.failed = self.lost = self.warm = self.done = 0
        self.errors: list[str] = []
        self.all_settled, self.all_warm, self.all_done = trio.Event(), trio.Event(), trio.Event()

    def settle(self, ok: bool, error: str = "") -> None:
        """One subscriber is live (response head and retry: seen) or failed to get there."""
        self.connected += ok
        self.failed += not ok
        if error:
            self.note(error)
        if self.connected + self.failed == self.n:
            self.all_settled.set()

    def note(self, error: str) -> None:
        """Keep the first few error messages."""
        if len(self.errors) < 5:
            self.errors.append(error)

    def add(self, i: int, k: int) -> None:
        """Subscriber i received k more events."""
        old = self.counts[i]
        new = self.counts[i] = old + k
        if old < 1 <= new:
            self.warm += 1
            if self.warm == self.n:
                self.all_warm.set()
        if self.target and old < self.target[i] <= new:
            self.done += 1
            if self.done == self.n:
                self.all_done.set()

    def arm(self, events: int) -> list[int]:
        """Wait for `events` more per subscriber from now on; returns the baseline counts."""
        baseline = list(self.counts)
        self.target = [c + events for c in baseline]
        if events == 0:
            self.all_done.set()
        return baseline


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    """Write all of data."""
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


async def open_socket(spec: ClientSpec, index: int) -> trio.socket.SocketType:
    """A TCP connection to the server from the source address for this index."""
    sock = trio.socket.socket()
    try:
        await sock.bind((source_address(index), 0))
        await sock.connect((HOST, spec.port))
    except BaseException:
        sock.close()
        raise
    return sock


async def read_head(sock: trio.socket.SocketType) -> tuple[bytes, int]:
    """Read until the response head and retry: have arrived; (bytes so far, end of head)."""
    buf, end = b"", -1
    while end < 0 or b"retry:" not in buf[end:]:
        data = await sock.recv(RECV)
        if not data or len(buf) > 65_536:
            raise ConnectionError(f"no response head and retry: ({buf[:80]!r})")
        buf += data
        end = buf.find(b"\r\n\r\n")
    if not buf.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(buf.split(b"\r\n", 1)[0].decode(errors="replace"))
    return buf, end


async def h1_subscriber(spec: ClientSpec, i: int, tr: Tracker, limiter: trio.CapacityLimiter) -> None:
    """One HTTP/1.1 SSE subscriber: read the head and retry:, then count events until cancelled."""
    request = (f"GET /v1/streams/{spec.stream} HTTP/1.1\r\nHost: {HOST}:{spec.port}\r\n"
               "Accept: text/event-stream\r\n\r\n").encode()
    sock: trio.socket.SocketType | None = None
    try:
        async with limiter:
            with trio.fail_after(15):
                sock = await open_socket(spec, spec.first_index + i)
                await send_all(sock, request)
                buf, end = await read_head(sock)
    except (OSError, ConnectionError, trio.TooSlowError) as exc:
        tr.settle(False, f"subscriber {i}: {exc!r}")
        if sock is not None:
            sock.close()
        return
    tr.settle(True)
    tail = buf[end:]
    tr.add(i, tail.count(PATTERN))
    try:
        while data := await sock.recv(RECV):
            chunk = tail[-TAIL:] + data
            if n := chunk.count(PATTERN):
                tr.add(i, n)
            tail = chunk
        tr.lost += 1
        tr.note(f"subscriber {i}: server closed the response")
    except OSError as exc:
        tr.lost += 1
        tr.note(f"subscriber {i}: {exc!r}")
    finally:
        sock.close()


class H2Subscribers:
    """One h2c connection (prior knowledge) carrying several SSE subscribers, one stream each."""

    def __init__(self, spec: ClientSpec, first: int, nstreams: int, tr: Tracker) -> None:
        self.spec, self.first, self.tr = spec, first, tr
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: H2_WINDOW, h2.settings.SettingCodes.ENABLE_PUSH: 0})
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(H2_WINDOW - 65_535)
        headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", f"{HOST}:{spec.port}".encode()),
                   (b":path", f"/v1/streams/{spec.stream}".encode()), (b"accept", b"text/event-stream")]
        self.sub: dict[int, int] = {}  # stream id -> subscriber index
        for k in range(nstreams):
            sid = self.conn.get_next_available_stream_id()
            self.conn.send_headers(sid, headers, end_stream=True)
            self.sub[sid] = first + k
        self.pending = set(self.sub)  # streams that have not shown 200 and retry: yet
        self.tails: dict[int, bytes] = dict.fromkeys(self.sub, b"")  # streams still open

    def drop(self, sid: int, why: str) -> None:
        """Stream sid failed before going live, or was cut off after."""
        if sid in self.pending:
            self.pending.discard(sid)
            self.tr.settle(False, f"h2 stream {self.sub[sid]}: {why}")
        elif sid in self.tails:
            self.tr.lost += 1
            self.tr.note(f"h2 stream {self.sub[sid]}: {why}")
        self.tails.pop(sid, None)

    async def run(self, limiter: trio.CapacityLimiter) -> None:
        """Connect, then read and count until cancelled or every stream is gone."""
        sock: trio.socket.SocketType | None = None
        try:
            async with limiter:
                with trio.fail_after(15):
                    sock = await open_socket(self.spec, self.spec.first_index + self.first)
                    await send_all(sock, self.conn.data_to_send())
            await self._pump(sock)
        except (OSError, ConnectionError, trio.TooSlowError, h2.exceptions.H2Error) as exc:
            for sid in list(self.tails):
                self.drop(sid, repr(exc))
        finally:
            if sock is not None:
                sock.close()

    async def _pump(self, sock: trio.socket.SocketType) -> None:
        conn, tails, tr = self.conn, self.tails, self.tr
        while tails:
            data = await sock.recv(RECV)
            if not data:
                raise ConnectionError("connection closed by server")
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.DataReceived) and ev.stream_id in tails:
                    sid = ev.stream_id
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                    chunk = tails[sid] + ev.data
                    if sid in self.pending and b"retry:" in chunk:
                        self.pending.discard(sid)
                        tr.settle(True)
                    if n := chunk.count(PATTERN):
                        tr.add(self.sub[sid], n)
                    tails[sid] = chunk[-TAIL:]
                elif isinstance(ev, h2.events.ResponseReceived) and dict(ev.headers).get(b":status") != b"200":
                    self.drop(ev.stream_id, f"status {dict(ev.headers).get(b':status')!r}")
                elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                    self.drop(ev.stream_id, type(ev).__name__)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    raise ConnectionError(f"GOAWAY {ev.error_code!r}")
            if out := conn.data_to_send():
                await send_all(sock, out)


def recv_control(conn: Connection, timeout: float) -> Any:
    """The controller's next message, or None on timeout or a closed pipe (runs in a thread)."""
    try:
        return conn.recv() if conn.poll(timeout) else None
    except (EOFError, OSError):
        return None


async def client_async(conn: Connection, spec: ClientSpec) -> None:
    """Open the subscribers, report each phase to the controller, hold until told to stop."""
    tr = Tracker(spec.count)
    limiter = trio.CapacityLimiter(spec.concurrency)
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        if spec.proto == "h1":
            for i in range(spec.count):
                nursery.start_soon(h1_subscriber, spec, i, tr, limiter)
        else:
            for first in range(0, spec.count, spec.streams_per_conn):
                n = min(spec.streams_per_conn, spec.count - first)
                nursery.start_soon(H2Subscribers(spec, first, n, tr).run, limiter)
        with trio.move_on_after(spec.connect_timeout):
            await tr.all_settled.wait()
        conn.send(("connected", tr.connected, time.monotonic() - started, tr.errors))
        if spec.mode == "fanout":
            with trio.move_on_after(spec.warm_timeout):
                await tr.all_warm.wait()
            conn.send(("live", tr.warm, sum(tr.counts)))
            if await trio.to_thread.run_sync(recv_control, conn, spec.hold_timeout) == "go":
                cpu0 = time.process_time()
                baseline = tr.arm(spec.events)
                conn.send(("armed",))
                with trio.move_on_after(spec.events_timeout):
                    await tr.all_done.wait()
                cpu = time.process_time() - cpu0
                received = sum(c - b for c, b in zip(tr.counts, baseline, strict=True))
                conn.send(("done", received, cpu, tr.lost, tr.errors))
        await trio.to_thread.run_sync(recv_control, conn, spec.hold_timeout)  # "stop"
        nursery.cancel_scope.cancel()


def client_main(conn: Connection, spec: ClientSpec) -> None:
    """Entry point of a client process."""
    raise_nofile()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller stops us
    trio.run(client_async, conn, spec)


class Clients:
    """Client processes and their control pipes; stopped (killed by PID if need be) on exit."""

    def __init__(self, base: ClientSpec, total: int, procs: int) -> None:
        unit = base.streams_per_conn if base.proto == "h2" else 1
        units, parts = math.ceil(total / unit), max(procs, math.ceil(total / 15_000))
        sizes = [min(total, (units // parts + (k < units % parts)) * unit) for k in range(parts)]
        sizes = [s for s in sizes if s]
        sizes[-1] -= sum(sizes) - total
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.pipes: list[Connection] = []
        for k, size in enumerate(sizes):
            mine, theirs = ctx.Pipe()
            spec = replace(base, count=size, first_index=sum(sizes[:k]))
            self.procs.append(ctx.Process(target=client_main, args=(theirs, spec), daemon=True))
            self.procs[-1].start()
            theirs.close()
            self.pipes.append(mine)

    def gather(self, kind: str, timeout: float) -> list[tuple[Any, ...]]:
        """One message of this kind from every client, under one deadline; prints their errors."""
        deadline = time.monotonic() + timeout
        out = []
        for i, pipe in enumerate(self.pipes):
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"client {i} sent no {kind!r} within {timeout:.0f} s")
            out.append(msg := pipe.recv())
            if msg[0] != kind:
                raise RuntimeError(f"client {i}: expected {kind!r}, got {msg!r}")
            for err in msg[-1] if isinstance(msg[-1], list) else []:
                print(f"  client {i} error: {err}", file=sys.stderr)
        return out

    def send(self, msg: str) -> None:
        """Send msg to every client."""
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(msg)

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.send("stop")
        deadline = time.monotonic() + 10
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(2)


def run_idle(args: argparse.Namespace) -> dict[str, Any]:
    """RSS per idle SSE connection."""
    with Server(args.sluice, args.server_arg) as srv:
        time.sleep(0.5)
        before = rss_kib(srv.pid)
        base = ClientSpec("idle", "h1", srv.port, "idle", concurrency=args.concurrency)
        with Clients(base, args.conns, args.procs) as clients:
            msgs = clients.gather("connected", base.connect_timeout + 30)
            ok = sum(m[1] for m in msgs)
            after, prev = rss_kib(srv.pid), -1
            for _ in range(20):  # settle: until two samples 0.5 s apart agree within 256 KiB
                if abs(after - prev) < 256:
                    break
                time.sleep(0.5)
                prev, after = after, rss_kib(srv.pid)
    print(f"  idle: {ok} of {args.conns} held; server RSS {before} KiB before, {after} KiB after", file=sys.stderr)
    srv.report_log()
    return {"scenario": "idle", "protocol": "h1", "subscribers": ok, "setup": max(m[2] for m in msgs),
            "rss_per_conn": (after - before) / max(ok, 1), "rss_after": after, "loss": args.conns - ok}


def run_fanout(args: argparse.Namespace) -> dict[str, Any]:
    """Server CPU per delivered event with S subscribers of one stream."""
    duration = args.events / args.rate
    with Server(args.sluice, args.server_arg) as srv:
        base = ClientSpec("fanout", args.proto, srv.port, "fanout", concurrency=args.concurrency,
                          events=args.events, events_timeout=duration + 60, hold_timeout=duration + 180)
        with Clients(base, args.subs, args.procs) as clients:
            msgs = clients.gather("connected", base.connect_timeout + 30)
            if (ok := sum(m[1] for m in msgs)) < args.subs:
                raise RuntimeError(f"{args.subs - ok} of {args.subs} subscribers failed to connect")
            pub = http.client.HTTPConnection(HOST, srv.port, timeout=10)
            rounds, missed, warm_s = warm_up(clients, pub, args.subs, base.warm_timeout)
            clients.send("go")
            clients.gather("armed", 30)
            cpu0, t0, latency = cpu_seconds(srv.pid), time.monotonic(), []
            for k in range(args.events):
                if (delay := t0 + k / args.rate - time.monotonic()) > 0:
                    time.sleep(delay)
                sent = time.monotonic()
                publish(pub, f"tok-{k:016d}".encode())  # 20 bytes
                latency.append(time.monotonic() - sent)
            published = time.monotonic() - t0
            done = clients.gather("done", base.events_timeout + 10)
            wall, cpu = time.monotonic() - t0, cpu_seconds(srv.pid) - cpu0
            pub.close()
            rss = rss_kib(srv.pid)
    received, lat = sum(m[1] for m in done), sorted(latency)
    print(f"  fanout {args.proto}: {rounds} warm-up events, all live after {warm_s:.1f} s, {missed} warm-up "
          f"deliveries missed; {args.events} published in {published:.1f} s (target {duration:.1f} s), POST ms "
          f"p50 {lat[len(lat) // 2] * 1e3:.1f} p99 {lat[len(lat) * 99 // 100] * 1e3:.1f} max {lat[-1] * 1e3:.1f}; "
          f"all delivered after {wall:.1f} s; server CPU {cpu:.2f} s; subscribers cut off {sum(m[3] for m in done)}",
          file=sys.stderr)
    srv.report_log()
    return {"scenario": "fanout", "protocol": args.proto, "subscribers": args.subs, "events": args.events,
            "rate": args.events / published, "deliveries": received, "server_us": cpu * 1e6 / max(received, 1),
            "client_us": sum(m[2] for m in done) * 1e6 / max(received, 1), "rss_after": rss,
            "loss": args.subs * args.events - received, "setup": max(m[2] for m in msgs)}


def warm_up(clients: Clients, pub: http.client.HTTPConnection, subs: int, timeout: float) -> tuple[int, int, float]:
    """Publish a warm-up event per second until every subscriber has one, then leave 1 s of quiet.

    Returns (warm-up events published, warm-up deliveries missed, seconds until all were live).
    """
    started = time.monotonic()
    rounds, pending, live = 0, set(range(len(clients.pipes))), []
    while pending and time.monotonic() < started + timeout:
        publish(pub, b"warm-up")
        rounds += 1
        end = min(started + timeout, time.monotonic() + 1.0)
        for i in sorted(pending):
            if clients.pipes[i].poll(max(0.0, end - time.monotonic())):
                live.append(clients.pipes[i].recv())
                pending.discard(i)
    if pending or sum(m[1] for m in live) < subs:
        raise RuntimeError(f"after {rounds} warm-up events not every one of {subs} subscribers had one")
    live_s = time.monotonic() - started
    time.sleep(1.0)  # warm-ups still in flight land before the clients take their baseline
    return rounds, subs * rounds - sum(m[2] for m in live), live_s


def publish(pub: http.client.HTTPConnection, data: bytes) -> None:
    """One POST on the keep-alive connection; 201 or an error."""
    pub.request("POST", "/v1/streams/fanout", body=data, headers={"Content-Type": "text/plain"})
    resp = pub.getresponse()
    body = resp.read()
    if resp.status != 201:
        raise RuntimeError(f"publish: {resp.status} {body[:200]!r}")


def machine_facts() -> str:
    """nproc, CPU model, Python and library versions."""
    model = "unknown"
    with contextlib.suppress(OSError):
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), model)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (f"- nproc: {len(os.sched_getaffinity(0))} (cpu_count {os.cpu_count()})\n- CPU: {model}\n"
            f"- Python: {platform.python_version()} ({platform.python_implementation()}), kernel {platform.release()}\n"
            f"- trio {trio.__version__}, h2 {h2.__version__}; RLIMIT_NOFILE {nofile}")


COLUMNS = [("scenario", "scenario", "s"), ("protocol", "protocol", "s"), ("subscribers", "subscribers", "d"),
           ("events", "events", "d"), ("events/s", "rate", ".1f"), ("deliveries", "deliveries", "d"),
           ("server CPU µs/delivery", "server_us", ".1f"), ("client CPU µs/delivery", "client_us", ".1f"),
           ("RSS KiB/conn", "rss_per_conn", ".1f"), ("loss", "loss", "d"), ("setup s", "setup", ".1f"),
           ("server RSS KiB", "rss_after", "d")]


def table(results: list[dict[str, Any]]) -> str:
    """Markdown table of the results."""
    rows = ["| " + " | ".join(c[0] for c in COLUMNS) + " |",
            "|" + "|".join("---" if c[2] == "s" else "---:" for c in COLUMNS) + "|"]
    rows += ["| " + " | ".join(format(r[k], f) if k in r else "-" for _, k, f in COLUMNS) + " |" for r in results]
    return "\n".join(rows)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sluice", default=str(Path(sys.executable).parent / "sluice"), help="sluice executable")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for sluice serve (repeatable), e.g. --server-arg=--store=memory")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--concurrency", type=int, default=200, help="connects in flight per client process")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("idle", help="RSS per idle SSE connection").add_argument("--conns", type=int, default=5000)
    fan = sub.add_parser("fanout", help="server CPU per delivered event")
    fan.add_argument("--subs", type=int, default=2000)
    fan.add_argument("--proto", choices=("h1", "h2"), default="h1")
    fan.add_argument("--events", type=int, default=200)
    fan.add_argument("--rate", type=float, default=20.0, help="events per second")
    sub.add_parser("all", help="idle 5000; fanout 2000 subscribers over h1 and h2, 200 events at 10/s")
    args = parser.parse_args()
    raise_nofile()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-ups in finally/__exit__
    if args.cmd == "idle":
        results = [run_idle(args)]
    elif args.cmd == "fanout":
        results = [run_fanout(args)]
    else:
        results = [run_idle(argparse.Namespace(**vars(args), conns=5000))]
        for proto in ("h1", "h2"):
            ns = argparse.Namespace(**vars(args), subs=2000, proto=proto, events=200, rate=10.0)
            results.append(run_fanout(ns))
    print(table(results))
    print()
    print(machine_facts())


if __name__ == "__main__":
    main()
