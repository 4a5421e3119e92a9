"""SSE over HTTP/1.1: one connection per subscription, a raw socket, the fast decoders of
:mod:`loadtest.wire`.

Each connection's task connects, sends the request and reads the response head. The event stream
that follows is read by a :class:`Reader` shared by every connection of the load process: one task
and one level-triggered epoll set in which each subscribed socket is registered once. A received
event then costs one ``recv`` and the decoding, not a task switch and an epoll re-arm of its own.
"""

from __future__ import annotations

import os
import re
import select
import time
from typing import NoReturn

import trio

from loadtest import payload
from loadtest.clients.common import Conn, Load, open_socket, send_all
from loadtest.track import Track
from loadtest.wire import ChunkedDecoder, ProtocolError, SSEDecoder, parse_head

RECV = 65_536
MAX_READY = 256  # sockets read per batch, between two yields to the other tasks


def request(load: Load, track: Track) -> bytes:
    """The GET that subscribes ``track``: from the start, or after its last id."""
    ep = load.endpoint
    lines = [f"GET {ep.stream_path(track.stream)}{'' if track.last_id else '?from=start'} HTTP/1.1",
             f"Host: {ep.host}:{ep.port}", "Accept: text/event-stream"]
    if track.last_id:
        lines.append(f"Last-Event-ID: {track.last_id}")
    lines += [f"{name}: {value}" for name, value in ep.auth_headers()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def dispatch(load: Load, track: Track, events: list[tuple[str | None, str, bytes]], now: int) -> None:
    """Hand decoded SSE events, received at ``now`` (monotonic ns), to the load's counters.

    The same as :meth:`Load.deliver` per event, with the common case (a ``message`` carrying the
    harness's payload) inlined: this runs once per delivered event in every load process."""
    decode = payload.decode
    on_event = track.on_event
    latencies = load.latencies
    counted = 0
    for event_id, etype, data in events:
        if etype == "message":
            try:
                seq, t_ns = decode(data)
            except ValueError:
                load.deliver(track, event_id, data, now)  # counts it as foreign
                continue
            on_event(seq)
            latencies.append(now - t_ns)
            counted += 1
            if event_id is not None:
                track.last_id = event_id
        elif etype == "sluice.end":
            load.end(track)
        elif etype == "sluice.reset":
            load.reset(track)
        else:
            load.deliver(track, event_id, data, now)
    load.events += counted


HARNESS_EVENT = re.compile(rb"id: ([^\n ][^\n]*)\ndata: (\d+) (\d+)\.*\n\n")


def harness_events(body: bytes) -> list[tuple[bytes, bytes, bytes]] | None:
    """``(id, seq, t_ns)`` of every event in ``body`` when it is nothing but whole events of the
    shape ``id: <id>`` + ``data: <harness payload>`` (what a server writes for this harness's
    events, one or several per write), found by one regular-expression scan; ``None`` for
    anything else, which the general decoders then take.

    Every block must start with ``id: ``, have exactly three newlines and match: so the matches
    are exactly the blocks, in order."""
    if not body.startswith(b"id: ") or not body.endswith(b"\n\n"):
        return None
    n = body.count(b"\n\n")
    if not n or body.count(b"\n") != 3 * n or body.count(b"\n\nid: ") != n - 1:
        return None
    found = HARNESS_EVENT.findall(body)
    return found if len(found) == n else None


def count_harness_events(load: Load, track: Track, found: list[tuple[bytes, bytes, bytes]], now: int) -> None:
    """What :func:`dispatch` does for ``message`` events with the harness's payload, for the
    output of :func:`harness_events`."""
    on_event = track.on_event
    latencies = load.latencies
    for _, seq, t_ns in found:
        on_event(int(seq))
        latencies.append(now - int(t_ns))
    load.events += len(found)
    track.last_id = found[-1][0].decode()


class Subscription:
    """The event stream of one subscribed connection, after its response head: the socket's fd,
    the decoders, and how it ended (``done`` is set once, ``error`` is what to raise, if any)."""

    __slots__ = ("chunked", "conn", "done", "error", "fd", "load", "sse", "track")

    def __init__(self, load: Load, conn: Conn, fd: int, chunked: bool) -> None:
        self.load = load
        self.conn = conn
        self.track = conn.tracks[0]
        self.fd = fd
        self.chunked = ChunkedDecoder() if chunked else None
        self.sse = SSEDecoder()
        self.done = trio.Event()
        self.error: Exception | None = None

    def feed(self, data: bytes) -> bool:
        """Decode received bytes and count what they carry; True when the subscription is over
        (its stream ended, or the chunked body did). Raises :class:`ProtocolError` on bad input."""
        chunked, sse, track = self.chunked, self.sse, self.track
        body = chunked.feed(data) if chunked else data
        found = harness_events(body) if not sse.pending else None
        if found:  # the common case, without the general decoder
            count_harness_events(self.load, track, found, time.monotonic_ns())
            sse.last_id = track.last_id
        else:
            events = sse.feed(body)
            if events:
                dispatch(self.load, track, events, time.monotonic_ns())
            if sse.last_id is not None:  # also from an id-only block (a position sent on drain)
                track.last_id = sse.last_id
            if sse.comments:
                self.load.heartbeats += sse.comments
                sse.comments = 0
            self.conn.retry_ms = sse.retry
        return track.ended or (chunked is not None and chunked.done)

    def read(self) -> bool:
        """One non-blocking ``recv`` of at most ``RECV`` bytes, fed to the decoders; True when
        the subscription is over (also at end of file), False when there is nothing to read yet.
        Raises what the ``recv`` or the decoding raised."""
        try:
            data = os.read(self.fd, RECV)
        except (BlockingIOError, InterruptedError):
            return False
        return not data or self.feed(data)


class Reader:
    """Reads every registered :class:`Subscription` from one task (:meth:`run`).

    Level-triggered: a socket stays registered until its subscription is over, and gets one
    ``recv`` per batch in which it is ready, so a busy socket cannot hold up the others. At most
    ``max_ready`` sockets are read per batch; after a full batch the task yields before the next.
    """

    def __init__(self, ep: select.epoll, max_ready: int = MAX_READY) -> None:
        self._ep = ep
        self._subs: dict[int, Subscription] = {}
        self.max_ready = max_ready

    def __len__(self) -> int:
        """How many subscriptions are registered."""
        return len(self._subs)

    def add(self, sub: Subscription) -> None:
        """Start reading ``sub``; raises ``trio.ClosedResourceError`` once the reader stopped."""
        if self._ep.closed:
            raise trio.ClosedResourceError("the shared SSE reader has stopped")
        self._ep.register(sub.fd, select.EPOLLIN)
        self._subs[sub.fd] = sub

    def discard(self, sub: Subscription) -> None:
        """Stop reading ``sub``, if it is registered (before its socket is closed)."""
        if self._subs.get(sub.fd) is sub:
            del self._subs[sub.fd]
            if not self._ep.closed:
                self._ep.unregister(sub.fd)

    def _finish(self, sub: Subscription, error: Exception | None = None) -> None:
        self.discard(sub)
        sub.error = error
        sub.done.set()

    def _read(self, sub: Subscription) -> None:
        try:
            over = sub.read()
        except Exception as exc:  # the session raises it, as it would have reading by itself
            self._finish(sub, exc)
        else:
            if over:
                self._finish(sub)

    async def run(self) -> NoReturn:
        """Read ready sockets, batch after batch, until cancelled."""
        ep, subs, max_ready = self._ep, self._subs, self.max_ready
        while True:
            await trio.lowlevel.wait_readable(ep.fileno())  # always a yield to the other tasks
            while True:
                ready = ep.poll(0, max_ready)
                for fd, _ in ready:
                    sub = subs.get(fd)
                    if sub is not None:
                        self._read(sub)
                if len(ready) < max_ready:
                    break
                await trio.lowlevel.checkpoint()

    def stop(self) -> None:
        """Wake every registered subscription's session with ``trio.ClosedResourceError``."""
        for sub in list(self._subs.values()):
            self._finish(sub, trio.ClosedResourceError("the shared SSE reader has stopped"))

    async def session(self, load: Load, conn: Conn) -> None:
        """:func:`session` reading through this reader (a ``Session`` for ``keep_connected``)."""
        await session(load, conn, self)


async def serve_reader(
    max_ready: int = MAX_READY, *, task_status: trio.TaskStatus[Reader] = trio.TASK_STATUS_IGNORED
) -> NoReturn:
    """Run a shared :class:`Reader` until cancelled; ``nursery.start`` returns it. When it
    stops, sessions still waiting on it raise ``trio.ClosedResourceError``."""
    with select.epoll() as ep:
        reader = Reader(ep, max_ready)
        try:
            task_status.started(reader)
            await reader.run()
        finally:
            reader.stop()


async def session(load: Load, conn: Conn, reader: Reader | None = None) -> None:
    """Subscribe the connection's one track and read until the response or connection ends:
    returns at end of file, the stream's end or the chunked body's end, raises
    :class:`ProtocolError` on what it cannot decode and ``OSError`` on a failed ``recv``.

    With a ``reader`` the event stream is read by that shared reader while this task waits;
    without one, this task reads its socket itself.
    """
    track = conn.tracks[0]
    sock = await open_socket(load, conn.source)
    with sock:
        await send_all(sock, request(load, track))
        buf = b""
        with trio.fail_after(load.timeout):
            while (parsed := parse_head(buf)) is None:
                data = await sock.recv(RECV)
                if not data:
                    raise EOFError("connection closed before the response head")
                buf += data
        head, used = parsed
        if head.status != 200:
            raise ProtocolError(f"HTTP {head.status}")
        load.up(conn)
        sub = Subscription(load, conn, sock.fileno(), head.chunked)
        if len(buf) > used and sub.feed(buf[used:]):
            return
        if reader is None:
            while True:
                await trio.lowlevel.wait_readable(sock)
                if sub.read():
                    return
        reader.add(sub)
        try:
            await sub.done.wait()
        finally:
            reader.discard(sub)
        if sub.error is not None:
            raise sub.error
