"""Server-Sent Events: ``GET /v1/streams/{stream}`` (API.md "SSE"), one code path for h1 and h2."""

from __future__ import annotations

from server.core.encoding import EncodedEvent, EventBatch, sse_end, sse_reset
from server.core.events import InvalidInput
from server.core.hub import heartbeat_or_none
from server.core.replay import Reset, Start, parse_start
from server.core.sse import encode_comment, encode_retry
from server.http.base import Exchange, HTTPError, ResponseStream
from server.transports.context import Context

SSE_HEADERS = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-store"),
    ("x-accel-buffering", "no"),
    ("sluice-binary", "base64"),
]
_HEARTBEAT = encode_comment()


class SSESink:
    """A subscription's output as SSE on one response."""

    __slots__ = ("_resp",)

    def __init__(self, resp: ResponseStream) -> None:
        self._resp = resp

    def deliver(self, enc: EncodedEvent) -> bool:
        """Write the shared SSE encoding of the event."""
        return self._resp.send_frame(enc.sse)

    def deliver_batch(self, batch: EventBatch) -> bool:
        """Write the shared SSE encoding of every event of the batch, in one write."""
        return self._resp.send_frame(batch.sse)

    def reset(self, reset: Reset) -> bool:
        """Write ``event: sluice.reset``."""
        return self._resp.send_frame(sse_reset(reset))

    def end(self) -> None:
        """Write ``event: sluice.end``; the handler then finishes the response."""
        self._resp.send_frame(sse_end())

    def idle(self) -> bool:
        """Write a heartbeat comment."""
        return self._resp.send(_HEARTBEAT)

    async def drain(self) -> None:
        """Wait for the connection's buffer to go down."""
        await self._resp.drain()


def wants_sse(accept: str | None) -> bool:
    """True unless the client's ``Accept`` clearly excludes ``text/event-stream``."""
    if not accept:
        return True
    accept = accept.lower()
    return "text/event-stream" in accept or "*/*" in accept or "text/*" in accept


def start_of(ex: Exchange) -> Start:
    """Where the subscription starts (header, then query, then ``from``); 400 for a bad ``from``."""
    req = ex.request
    try:
        return parse_start(req.headers.get("last-event-id"), req.query.get("last_event_id"), req.query.get("from"))
    except InvalidInput as exc:
        raise HTTPError(400, exc.code, exc.message) from None


async def handle_sse(ex: Exchange, ctx: Context, stream: str) -> None:
    """Stream events as SSE until the stream ends, the client leaves or the worker drains."""
    if not wants_sse(ex.request.headers.get("accept")):
        raise HTTPError(406, "not_acceptable", "this endpoint serves text/event-stream")
    start = start_of(ex)
    heartbeat = heartbeat_or_none(ctx.settings.heartbeat)
    # Subscribe (and fix what "now" means) before the client hears 200: nothing published after
    # it has the response head can be missed.
    async with ctx.hub.open_subscription(stream, start, heartbeat=heartbeat) as sub:
        resp = await ex.open_stream(200, SSE_HEADERS)
        resp.send(encode_retry(ctx.settings.retry_value()))
        ex.on_close_request(sub.stop)  # drain or rotation: stop, then end cleanly below
        await sub.run(SSESink(resp))
    if sub.ended:
        await resp.finish()
    elif sub.stopped:
        resp.send(wind_down_block(sub.position, ctx.settings.retry_value()))
        await resp.finish()


def wind_down_block(position: str | None, retry_ms: int) -> bytes:
    """What a stopped SSE response ends with: a fresh (jittered) ``retry:``, preceded by
    ``id: <position>`` when there is one, so that the client's Last-Event-ID is exact even when
    it saw no event yet (an ``id`` with no ``data`` sets it without dispatching an event)."""
    retry = encode_retry(retry_ms)
    return b"id: " + position.encode("ascii") + b"\n" + retry if position is not None else retry
