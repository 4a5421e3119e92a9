"""Long-poll load client: one keep-alive HTTP/1.1 connection per :class:`Conn`, polling each of its
tracks in turn (normally one) with ``GET /v1/streams/<s>/poll``, from the start and then after the
``next`` id of the previous answer.

Several tracks on one connection are polled one after the other, so an idle stream holds the
others back for up to :data:`POLL_TIMEOUT` seconds; give each long-poll connection one track for
meaningful latencies.
"""

from __future__ import annotations

import base64
import json
import time
from urllib.parse import quote

import trio

from loadtest.clients.common import Conn, Endpoint, Load, open_socket, read_response, send_all
from loadtest.track import Track
from loadtest.wire import ProtocolError

POLL_TIMEOUT = 20  # seconds the server may hold a poll open (its ?timeout=)


def request(load: Load, track: Track, wait: int = POLL_TIMEOUT) -> bytes:
    """The poll for ``track``: from the start, or after its last id; the server may hold it
    ``wait`` seconds."""
    ep = load.endpoint
    start = "from=start" if track.last_id is None else "last_event_id=" + quote(track.last_id, safe="")
    return (
        f"GET {ep.stream_path(track.stream)}/poll?timeout={wait}&{start} HTTP/1.1\r\n"
        f"Host: {ep.host}:{ep.port}\r\n{_extra(ep)}\r\n"
    ).encode()


def _extra(ep: Endpoint) -> str:
    return "".join(f"{name}: {value}\r\n" for name, value in ep.auth_headers())


def handle(load: Load, track: Track, body: bytes, now: int) -> bool:
    """Apply one poll answer to ``track``; True when its stream ended."""
    answer = json.loads(body)
    if answer.get("reset"):
        load.reset(track)
    deliver = load.deliver
    for event in answer["events"]:
        data = event["data"]
        if event.get("encoding") == "base64":
            data = base64.b64decode(data)
        deliver(track, event["id"], data, now)
    next_id = answer.get("next")
    if next_id is not None:
        track.last_id = next_id
    if answer.get("end"):
        load.end(track)
        return True
    return False


async def session(load: Load, conn: Conn) -> None:
    """Poll the connection's tracks until they all ended or the server closes the connection."""
    active = [t for t in conn.tracks if not t.ended]
    if not active:
        return
    sock = await open_socket(load, conn.source)
    with sock:
        buf = b""
        while active:
            for track in list(active):
                with trio.fail_after(load.timeout + POLL_TIMEOUT):
                    # the first poll answers at once, so the client knows it is subscribed
                    await send_all(sock, request(load, track, POLL_TIMEOUT if conn.is_up else 0))
                    response = await read_response(sock, buf)
                if response is None:
                    if conn.is_up:
                        return  # the server closed the kept-alive connection between polls
                    raise EOFError("connection closed before the response head")
                now = time.monotonic_ns()
                head, body, buf = response
                if head.status != 200:
                    raise ProtocolError(f"HTTP {head.status}: {body[:100]!r}")
                load.up(conn)
                try:
                    if handle(load, track, body, now):
                        active.remove(track)
                except (KeyError, TypeError, AttributeError) as exc:
                    raise ProtocolError(f"unexpected poll answer {body[:100]!r}") from exc
                if head.headers.get("connection", "").lower() == "close":
                    return
