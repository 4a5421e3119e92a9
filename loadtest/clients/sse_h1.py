"""SSE over HTTP/1.1: one connection per subscription, a raw socket, the fast decoders of
:mod:`loadtest.wire`."""

from __future__ import annotations

import time

import trio

from loadtest.clients.common import Conn, Load, open_socket, send_all
from loadtest.track import Track
from loadtest.wire import ChunkedDecoder, ProtocolError, SSEDecoder, parse_head

RECV = 65_536


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
    """Hand decoded SSE events, received at ``now`` (monotonic ns), to the load's counters."""
    for event_id, etype, data in events:
        if etype == "sluice.end":
            load.end(track)
        elif etype == "sluice.reset":
            load.reset(track)
        else:
            load.deliver(track, event_id, data, now)


async def session(load: Load, conn: Conn) -> None:
    """Subscribe the connection's one track and read until the response or connection ends."""
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
        chunked = ChunkedDecoder() if head.chunked else None
        sse = SSEDecoder()
        body = buf[used:]
        while True:
            if body:
                events = sse.feed(chunked.feed(body) if chunked else body)
                if events:
                    dispatch(load, track, events, time.monotonic_ns())
                if sse.last_id is not None:  # also from an id-only block (a position sent on drain)
                    track.last_id = sse.last_id
                if sse.comments:
                    load.heartbeats += sse.comments
                    sse.comments = 0
                conn.retry_ms = sse.retry
                if track.ended or (chunked and chunked.done):
                    return
            body = await sock.recv(RECV)
            if not body:
                return
