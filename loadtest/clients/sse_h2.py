"""SSE over HTTP/2 cleartext with prior knowledge (h2c): every track of a connection is one GET on
one HTTP/2 connection, framed by the ``h2`` library and decoded by :class:`loadtest.wire.SSEDecoder`.

Flow control is opened as wide as HTTP/2 allows (2**31-1 for the connection and for every stream)
and received data is acknowledged as it is read, so the server is never stalled by this client.
When any stream ends or is reset before its track ended, or a GOAWAY arrives, the session returns:
the whole connection is then reconnected, each track resuming after its last id.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio

from loadtest.clients.common import Conn, Endpoint, Load, open_socket, send_all
from loadtest.clients.sse_h1 import dispatch
from loadtest.track import Track
from loadtest.wire import ProtocolError, SSEDecoder

RECV = 65_536
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535

_DataReceived = h2.events.DataReceived
_ResponseReceived = h2.events.ResponseReceived
_StreamEnded = h2.events.StreamEnded
_StreamReset = h2.events.StreamReset
_ConnectionTerminated = h2.events.ConnectionTerminated


def new_connection() -> h2.connection.H2Connection:
    """A client-side HTTP/2 connection with the widest windows, its preface and SETTINGS queued."""
    config = h2.config.H2Configuration(client_side=True, header_encoding=None)
    h2c = h2.connection.H2Connection(config=config)
    # Set before the preface so the first SETTINGS frame carries them and new streams use them.
    h2c.local_settings = h2.settings.Settings(client=True, initial_values={
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: MAX_WINDOW,
        h2.settings.SettingCodes.ENABLE_PUSH: 0,
    })
    h2c.initiate_connection()
    h2c.increment_flow_control_window(MAX_WINDOW - DEFAULT_WINDOW)
    return h2c


def request_headers(endpoint: Endpoint, track: Track) -> list[tuple[str, str]]:
    """The GET that subscribes ``track``: from the start, or after its last id."""
    path = endpoint.stream_path(track.stream)
    headers = [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", f"{endpoint.host}:{endpoint.port}"),
        (":path", path if track.last_id is not None else path + "?from=start"),
        ("accept", "text/event-stream"),
    ]
    if track.last_id is not None:
        headers.append(("last-event-id", track.last_id))
    return headers + endpoint.auth_headers()


def _status(headers: Iterable[tuple[bytes | str, bytes | str]]) -> int:
    for name, value in headers:
        if name == b":status":
            return int(value)
    raise ProtocolError("response without :status")


async def session(load: Load, conn: Conn) -> None:
    """Subscribe every track not yet ended, one stream each, and read until the connection or one
    of its streams ends (or every track has ended)."""
    tracks = [t for t in conn.tracks if not t.ended]
    if not tracks:
        return
    sock = await open_socket(load, conn.source)
    with sock:
        h2c = new_connection()
        subs: dict[int, tuple[Track, SSEDecoder]] = {}
        for track in tracks:
            stream_id = h2c.get_next_available_stream_id()
            h2c.send_headers(stream_id, request_headers(load.endpoint, track), end_stream=True)
            subs[stream_id] = (track, SSEDecoder())
        await send_all(sock, h2c.data_to_send())
        heads_due = len(subs)
        with trio.CancelScope(deadline=trio.current_time() + load.timeout) as heads:
            while True:
                data = await sock.recv(RECV)
                if not data:
                    return
                now = time.monotonic_ns()
                stop = False
                # Per batch, not per frame (the server sends about one DATA frame per event): data
                # joined per stream before decoding, flow control acknowledged per stream.
                received: dict[int, list[bytes]] = {}
                sizes: dict[int, int] = {}
                finished: list[int] = []
                try:
                    for ev in h2c.receive_data(data):
                        if isinstance(ev, _DataReceived):
                            stream_id = ev.stream_id
                            sizes[stream_id] = sizes.get(stream_id, 0) + ev.flow_controlled_length
                            chunks = received.get(stream_id)
                            if chunks is None:
                                received[stream_id] = [ev.data]
                            else:
                                chunks.append(ev.data)
                        elif isinstance(ev, _ResponseReceived):
                            status = _status(ev.headers)
                            if status != 200:
                                sub = subs.get(ev.stream_id)
                                raise ProtocolError(f"HTTP {status} for {sub[0].stream if sub else '?'}")
                            load.up(conn)
                            heads_due -= 1
                            if heads_due <= 0:
                                heads.deadline = math.inf
                        elif isinstance(ev, (_StreamEnded, _StreamReset)):
                            finished.append(ev.stream_id)
                        elif isinstance(ev, _ConnectionTerminated):  # GOAWAY
                            stop = True
                    for stream_id, size in sizes.items():
                        h2c.acknowledge_received_data(size, stream_id)
                except h2.exceptions.H2Error as exc:
                    raise ProtocolError(f"HTTP/2: {exc!r}") from exc
                for stream_id, chunks in received.items():
                    sub = subs.get(stream_id)
                    if sub is None:
                        continue
                    track, decoder = sub
                    out = decoder.feed(chunks[0] if len(chunks) == 1 else b"".join(chunks))
                    if out:
                        dispatch(load, track, out, now)
                    if decoder.last_id is not None:  # also an id sent without data (wind-down)
                        track.last_id = decoder.last_id
                    if decoder.comments:
                        load.heartbeats += decoder.comments
                        decoder.comments = 0
                    if decoder.retry is not None:
                        conn.retry_ms = decoder.retry
                for stream_id in finished:
                    sub = subs.pop(stream_id, None)
                    if sub is not None and not sub[0].ended:
                        stop = True  # ended early (drain, rotation) or reset: reconnect and resume
                out_bytes = h2c.data_to_send()
                if out_bytes:
                    await send_all(sock, out_bytes)
                if stop or not subs:  # a track's response finishes right after its sluice.end
                    return
        if heads.cancelled_caught:
            raise trio.TooSlowError(f"no response head within {load.timeout} s")
