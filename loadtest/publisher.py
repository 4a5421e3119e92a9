"""The publishing side of a run: events at a planned rate, numbered per stream, over keep-alive
HTTP/1.1 connections, or over WebSockets (``loadtest.wspub``; closes still go by HTTP).

A stream is always published on the same connection, one request at a time, so the numbering is
also the server's order. When requests fall behind the plan, events due for the same stream may
go out together as one ndjson batch if ``batch`` allows it (a producer relaying tokens does the
same). A request whose connection breaks is retried on a new connection with the same
``Idempotency-Key``, so a retry never appends twice (servers without idempotency keys are only
used in runs that do not break connections).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

import trio
from trio_websocket import ConnectionClosed

from loadtest import payload
from loadtest.clients.common import CLIENT_ERRORS, Endpoint, connect_tcp, read_response, send_all
from loadtest.wire import ProtocolError
from loadtest.wspub import WsPubConn

# failures after which a request is sent again
RETRIED: tuple[type[BaseException], ...] = (*CLIENT_ERRORS, ProtocolError)
# failures that cost a WebSocket publish its events (not sent again: no idempotency key)
WS_LOST: tuple[type[BaseException], ...] = (ConnectionClosed, *RETRIED)


@dataclass(frozen=True)
class Schedule:
    """When to publish what: ``(seconds after start, stream index)`` pairs, sorted by time;
    a stream index of ``-1 - i`` means close stream ``i``."""

    streams: list[str]
    entries: list[tuple[float, int]]
    size: int = 0  # bytes of data per event
    batch: int = 1  # most events per request
    connections: int = 1
    fault: tuple[str, int] | None = None  # ("drop" | "dup", seq): injected on stream 0
    transport: str = "http"  # "http": POST; "ws": publish ops on a sluice.json.v1 WebSocket


@dataclass
class PubStats:
    """What the publisher did."""

    published: dict[str, int] = field(default_factory=dict)  # events acknowledged (or dropped by a fault)
    requests: int = 0
    retries: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    closed: int = 0
    lag_max: float = 0.0  # seconds behind the plan, worst case
    latencies: list[int] = field(default_factory=list)  # request round trips (ns) since the last tick


class HttpConn:
    """One keep-alive HTTP/1.1 connection, reopened when it breaks."""

    def __init__(self, endpoint: Endpoint, source: str, timeout: float) -> None:
        self.endpoint = endpoint
        self.source = source
        self.timeout = timeout
        self.sock: trio.socket.SocketType | None = None
        self.buf = b""

    def close(self) -> None:
        """Close the connection (the next request opens a new one)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
                      ) -> tuple[int, bytes]:
        """Send one request and read its response: ``(status, body)``."""
        with trio.fail_after(self.timeout):
            if self.sock is None:
                self.sock = await connect_tcp(self.endpoint.host, self.endpoint.port, self.source, self.timeout)
                self.buf = b""
            sock = self.sock
            ep = self.endpoint
            head = f"{method} {path} HTTP/1.1\r\nHost: {ep.host}:{ep.port}\r\nContent-Length: {len(body)}\r\n"
            for name, value in [*ep.auth_headers(), *(headers or {}).items()]:
                head += f"{name}: {value}\r\n"
            try:
                await send_all(sock, head.encode() + b"\r\n" + body)
                response = await read_response(sock, self.buf)
            except BaseException:
                self.close()
                raise
        if response is None:
            self.close()
            raise EOFError("connection closed")
        resp, out, self.buf = response
        if resp.headers.get("connection", "").lower() == "close":
            self.close()
        return resp.status, out


class Publisher:
    """Runs a :class:`Schedule` against an endpoint."""

    def __init__(self, endpoint: Endpoint, schedule: Schedule, *, source: str = "127.0.0.1",
                 timeout: float = 30.0, attempts: int = 20, query: str = "") -> None:
        self.endpoint = endpoint
        self.schedule = schedule
        self.source = source
        self.timeout = timeout
        self.attempts = attempts
        self.query = query  # appended to publish paths (e.g. "?type=token")
        self.stats = PubStats(published=dict.fromkeys(schedule.streams, 0))
        self.seq = [0] * len(schedule.streams)
        self.idempotent = endpoint.kind == "sluice"

    async def run(self, t0: float) -> None:
        """Publish everything, starting the plan at ``t0`` (trio.current_time())."""
        n = self.schedule.connections
        lanes: list[list[tuple[float, int]]] = [[] for _ in range(n)]
        for at, index in self.schedule.entries:
            stream = index if index >= 0 else -1 - index
            lanes[stream % n].append((at, index))
        async with trio.open_nursery() as nursery:
            for lane in lanes:
                if lane:
                    nursery.start_soon(self._lane, lane, t0)

    async def _lane(self, lane: list[tuple[float, int]], t0: float) -> None:
        conn = HttpConn(self.endpoint, self.source, self.timeout)
        async with trio.open_nursery() as nursery:
            ws = None
            if self.schedule.transport == "ws":
                ws = WsPubConn(self.endpoint, self.source, self.timeout, nursery)
            try:
                await self._run_lane(lane, t0, conn, ws)
            finally:
                conn.close()
                if ws is not None:
                    with trio.move_on_after(2, shield=True):
                        await ws.aclose()

    async def _run_lane(self, lane: list[tuple[float, int]], t0: float, conn: HttpConn, ws: WsPubConn | None) -> None:
        """Publish ``lane``'s entries on their schedule: events over ``ws`` when there is one, else
        over ``conn``, which also carries closes."""
        i = 0
        while i < len(lane):
            at, index = lane[i]
            await trio.sleep_until(t0 + at)
            now = trio.current_time()
            self.stats.lag_max = max(self.stats.lag_max, now - t0 - at)
            if index < 0:
                await self._close(conn, -1 - index)
                i += 1
                continue
            j = i + 1  # gather what is already due, up to the batch size: for HTTP, of the same
            # stream (one ndjson request); over a WebSocket, of any stream (ops sent back to back)
            while (j < len(lane) and j - i < self.schedule.batch and t0 + lane[j][0] <= now
                   and (lane[j][1] == index if ws is None else lane[j][1] >= 0)):
                j += 1
            if ws is not None:
                await self._publish_ws(ws, [entry[1] for entry in lane[i:j]])
            else:
                await self._publish(conn, index, j - i)
            i = j

    def _numbers(self, index: int, count: int) -> list[int]:
        """The sequence numbers to send for ``count`` events, with the fault applied."""
        seqs = []
        for _ in range(count):
            seq = self.seq[index]
            self.seq[index] += 1
            fault = self.schedule.fault
            if fault and index == 0 and seq == fault[1]:
                if fault[0] == "drop":
                    self.stats.published[self.schedule.streams[index]] += 1
                    continue
                seqs.append(seq)
            seqs.append(seq)
        return seqs

    async def _publish(self, conn: HttpConn, index: int, count: int) -> None:
        stream = self.schedule.streams[index]
        seqs = self._numbers(index, count)
        if not seqs:
            return
        now = time.monotonic_ns()
        size = self.schedule.size
        headers: dict[str, str] = {}
        if len(seqs) == 1:
            body = payload.encode(seqs[0], now, size)
            headers["Content-Type"] = "text/plain"
        else:
            body = b"".join(
                json.dumps({"data": payload.encode(s, now, size).decode()}).encode() + b"\n" for s in seqs
            )
            headers["Content-Type"] = "application/x-ndjson"
        if self.idempotent:
            headers["Idempotency-Key"] = uuid.uuid4().hex
        status = await self._send(conn, "POST", self.endpoint.stream_path(stream) + self.query, body, headers)
        if status in (200, 201, 202):
            self.stats.published[stream] += len(set(seqs))
        else:
            self.stats.failures[f"HTTP {status}"] = self.stats.failures.get(f"HTTP {status}", 0) + 1

    async def _publish_ws(self, ws: WsPubConn, indexes: list[int]) -> None:
        """One event for each stream of ``indexes``, in that order, as ops sent back to back."""
        now = time.monotonic_ns()
        items: list[tuple[str, str]] = []
        owners: list[int] = []  # the position in ``indexes`` each item is for
        counts: list[int] = []  # events each position adds when it is appended
        for k, index in enumerate(indexes):
            seqs = self._numbers(index, 1)
            counts.append(len(set(seqs)))
            for seq in seqs:
                items.append((self.schedule.streams[index], payload.encode(seq, now, self.schedule.size).decode()))
                owners.append(k)
        if not items:
            return
        start = time.monotonic_ns()
        try:
            codes = await ws.publish(items)
        except WS_LOST as exc:
            key = f"WebSocket {type(exc).__name__}"
            self.stats.failures[key] = self.stats.failures.get(key, 0) + 1
            return
        self.stats.requests += 1
        self.stats.latencies.append(time.monotonic_ns() - start)
        refused = set()
        for owner, code in zip(owners, codes, strict=True):
            if code is not None:
                refused.add(owner)
                self.stats.failures[f"WebSocket {code}"] = self.stats.failures.get(f"WebSocket {code}", 0) + 1
        for k, index in enumerate(indexes):
            if k not in refused:
                self.stats.published[self.schedule.streams[index]] += counts[k]

    async def _close(self, conn: HttpConn, index: int) -> None:
        status = await self._send(conn, "POST", self.endpoint.stream_path(self.schedule.streams[index]) + "/close")
        if status == 204:
            self.stats.closed += 1
        else:
            self.stats.failures[f"close HTTP {status}"] = self.stats.failures.get(f"close HTTP {status}", 0) + 1

    async def _send(self, conn: HttpConn, method: str, path: str, body: bytes = b"",
                    headers: dict[str, str] | None = None) -> int:
        """Send with retries on broken connections; the status, or 0 when every attempt failed."""
        for attempt in range(self.attempts):
            start = time.monotonic_ns()
            try:
                status, _ = await conn.request(method, path, body, headers)
            except RETRIED as exc:
                key = f"{type(exc).__name__}"
                self.stats.failures[key] = self.stats.failures.get(key, 0) + 1
                self.stats.retries += 1
                await trio.sleep(min(0.05 * 2**attempt, 1.0))
                continue
            self.stats.requests += 1
            self.stats.latencies.append(time.monotonic_ns() - start)
            if status == 503 and attempt + 1 < self.attempts:  # draining or overloaded: try again
                self.stats.retries += 1
                conn.close()
                await trio.sleep(min(0.05 * 2**attempt, 1.0))
                continue
            return status
        return 0


def rate_entries(streams: int, rate: float, duration: float, start: float = 0.0) -> list[tuple[float, int]]:
    """``rate`` events/s in total for ``duration`` s, round-robin over ``streams`` streams."""
    count = int(rate * duration)
    return [(start + i / rate, i % streams) for i in range(count)]


def llm_entries(streams: int, tokens: int, rate: float, stagger: float) -> list[tuple[float, int]]:
    """Each stream a generation: ``tokens`` events at ``rate``/s, then a close; starts spread
    evenly over ``stagger`` seconds."""
    entries: list[tuple[float, int]] = []
    for s in range(streams):
        begin = stagger * s / max(1, streams)
        entries.extend((begin + k / rate, s) for k in range(tokens))
        entries.append((begin + tokens / rate, -1 - s))
    entries.sort()
    return entries
