"""Helpers for abuse tests: a bystander served while an attack runs, memory readings, raw
WebSocket and HTTP/2 frames, connections from chosen source addresses."""

from __future__ import annotations

import base64
import contextlib
import os
import statistics
import struct
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import trio

from tests.client import Running, open_sse, publish, request, wait_live

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MIB = 1024 * 1024
MEMORY_BOUND = 50 * MIB  # RSS growth allowed while an attack runs
ROUND_DEADLINE = 5.0  # liveness bound for one bystander round (not a latency target)


# -- memory -----------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def rss_bytes() -> int:
    """This process's resident set size now (``VmRSS``)."""
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS; False if not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """The peak RSS since :func:`reset_peak_rss` (``VmHWM``)."""
    return _status_kib("VmHWM") * 1024


class MemoryWatch:
    """Growth of this process's RSS across a block: the peak (``VmHWM``, reset at the start) when
    the kernel allows resetting it, else the RSS at the end. The worker runs in this process."""

    def __init__(self) -> None:
        self.before = rss_bytes()
        self._peak = reset_peak_rss()

    @property
    def growth(self) -> int:
        """Bytes above the RSS at the start."""
        after = peak_rss_bytes() if self._peak else rss_bytes()
        return max(0, after - self.before)


def check_memory(name: str, watch: MemoryWatch, by: Bystander, bound: int = MEMORY_BOUND) -> None:
    """Print the attack's RSS growth with the bystander's latencies, and assert the growth bound."""
    line = f"{name}: RSS +{watch.growth / MIB:.1f} MiB (bound {bound / MIB:.0f} MiB); {by.summary()}"
    print(line)
    assert watch.growth <= bound, line


# -- bystander --------------------------------------------------------------------------------


class Bystander:
    """What :func:`bystander` saw: the latency of each round completed while the block ran
    (publish to receipt on the SSE subscription, seconds on the trio clock, so virtual seconds
    under a mock clock), and of the last round after the block."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.final: float | None = None
        self.started = 0
        self._changed = trio.Event()

    def _done(self, latency: float) -> None:
        self.latencies.append(latency)
        self._changed.set()
        self._changed = trio.Event()

    async def fresh_round(self) -> None:
        """Wait until a round that starts after this call has completed (the caller bounds it)."""
        target = self.started + 1
        while len(self.latencies) < target:
            await self._changed.wait()

    def summary(self) -> str:
        """Rounds and their latencies, for messages and ``pytest -s``."""
        if not self.latencies:
            return "bystander: no round completed"
        ms = [x * 1000 for x in self.latencies]
        final = "" if self.final is None else f", last after the attack {self.final * 1000:.1f} ms"
        return (
            f"bystander: {len(ms)} rounds, publish->receive median {statistics.median(ms):.1f} ms,"
            f" max {max(ms):.1f} ms{final}"
        )


@contextlib.asynccontextmanager
async def bystander(s: Running, *, pause: float = 0.0, min_rounds: int = 1) -> AsyncIterator[Bystander]:
    """An SSE subscriber (from 127.0.0.1) served round after round for as long as the block runs:
    publish an event, receive it, and get ``/healthz``. Each round, and a last one after the
    block, must complete within :data:`ROUND_DEADLINE` (liveness, not speed); at least
    ``min_rounds`` must have completed inside the block, so a test makes sure of that with
    :meth:`Bystander.fresh_round` while its attack is under way. ``pause`` (seconds between
    rounds) lets a mock clock advance between rounds."""
    by = Bystander()
    async with open_sse(s.port, "/v1/streams/bystander") as sse:
        with trio.fail_after(ROUND_DEADLINE):
            await wait_live(s.ctx, "bystander")

        async def one(n: int) -> float:
            with trio.fail_after(ROUND_DEADLINE):
                start = trio.current_time()
                eid = await publish(s.port, "bystander", f"round {n}")
                ev = await sse.next()
                while ev.id != eid:  # a round cut short by the end of the block left its event behind
                    ev = await sse.next()
                latency = trio.current_time() - start
                assert ev.data == f"round {n}"
                assert (await request(s.port, "GET", "/healthz")).status == 200
            return latency

        async def loop() -> None:
            while True:
                by.started += 1
                by._done(await one(by.started - 1))
                if pause:
                    await trio.sleep(pause)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop)
            yield by
            nursery.cancel_scope.cancel()
        assert len(by.latencies) >= min_rounds, f"fewer than {min_rounds} rounds during the attack; {by.summary()}"
        by.final = await one(by.started + 1000)


# -- sockets ----------------------------------------------------------------------------------


async def connect_from(source: str, port: int) -> trio.SocketStream:
    """A TCP connection to ``127.0.0.1:port`` from the local address ``source`` (e.g. 127.0.0.2)."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def read_to_eof(stream: trio.SocketStream, limit: int = 64 * MIB) -> bytes:
    """Everything the server sends until it closes (a reset counts as the end)."""
    out = bytearray()
    with contextlib.suppress(trio.BrokenResourceError):
        while len(out) < limit:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            out += chunk
    return bytes(out)


async def send_ignoring_close(stream: trio.SocketStream, data: bytes) -> None:
    """Send ``data``; stop quietly once the server has closed or reset the connection."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(data)


# -- WebSocket --------------------------------------------------------------------------------


def mask(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte masking ``key`` (fast for large payloads)."""
    n = len(payload)
    if not n:
        return b""
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(n, "little")


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    """One masked client frame of any length."""
    key = os.urandom(4)
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + key + mask(payload, key)


def deflate_zeros(size: int, chunk: int = MIB) -> bytes:
    """``size`` zero bytes as one permessage-deflate message payload (RFC 7692: raw deflate,
    sync-flushed, the trailing ``00 00 ff ff`` removed), built without holding ``size`` bytes."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(chunk)
    parts = [comp.compress(zeros) for _ in range(size // chunk)]
    parts.append(comp.compress(bytes(size % chunk)))
    parts.append(comp.flush(zlib.Z_SYNC_FLUSH))
    data = b"".join(parts)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


async def ws_upgrade(
    stream: trio.SocketStream, path: str, *, protocol: str | None = None, deflate: bool = False
) -> tuple[bytes, bytearray]:
    """Send an upgrade request and read the 101; return its head and the bytes after it."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: t",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if protocol:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    if deflate:
        lines.append("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")
    await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(65536)
        assert chunk, "EOF before the 101"
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    return head, bytearray(rest)


async def ws_read_frame(stream: trio.SocketStream, buf: bytearray) -> tuple[int, bytes] | None:
    """One unmasked server frame ``(opcode, payload)``; ``None`` at EOF."""
    while True:
        if len(buf) >= 2:
            length = buf[1] & 0x7F
            offset = 2
            if length == 126 and len(buf) >= 4:
                length, offset = struct.unpack("!H", buf[2:4])[0], 4
            elif length == 127 and len(buf) >= 10:
                length, offset = struct.unpack("!Q", buf[2:10])[0], 10
            if (length < 126 or offset > 2) and len(buf) >= offset + length:
                opcode = buf[0] & 0x0F
                payload = bytes(buf[offset : offset + length])
                del buf[: offset + length]
                return opcode, payload
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            chunk = b""
        if not chunk:
            return None
        buf += chunk


async def ws_close_code(stream: trio.SocketStream, buf: bytearray) -> tuple[int, str, list[int]]:
    """Read frames until the server's close frame: ``(code, reason, opcodes seen before it)``."""
    seen: list[int] = []
    while True:
        frame = await ws_read_frame(stream, buf)
        assert frame is not None, f"EOF without a close frame (after {seen})"
        opcode, payload = frame
        if opcode == 0x8:
            return struct.unpack("!H", payload[:2])[0], payload[2:].decode(), seen
        seen.append(opcode)


# -- HTTP/2 -----------------------------------------------------------------------------------


def h2_frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    """One raw HTTP/2 frame."""
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + sid.to_bytes(4, "big") + payload


def h2_frames(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """The complete frames in ``data`` (after no preface): ``(type, flags, stream id, payload)``."""
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        if pos + 9 + length > len(data):
            return
        kind, flags = data[pos + 3], data[pos + 4]
        sid = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        yield kind, flags, sid, data[pos + 9 : pos + 9 + length]
        pos += 9 + length


def goaway_code(data: bytes) -> int | None:
    """The error code of the first GOAWAY frame in ``data``, if any."""
    for kind, _flags, _sid, payload in h2_frames(data):
        if kind == 0x7:
            return int.from_bytes(payload[4:8], "big")
    return None
