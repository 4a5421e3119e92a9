"""Server-Sent Events: ``GET /v1/streams/{stream}`` (API.md "SSE"), one code path for h1 and h2."""

from __future__ import annotations

import math

import trio

from server.core.encoding import EncodedEvent, EventBatch, sse_end, sse_reset
from server.core.events import InvalidInput
from server.core.frame import Frame
from server.core.gzipsse import GzipFraming
from server.core.hub import heartbeat_or_none
from server.core.ports.store import StoreUnavailable
from server.core.replay import Reset, Start, parse_start
from server.core.sse import encode_comment, encode_retry
from server.edge.compress import accepts_gzip
from server.http.base import Exchange, HTTPError, ResponseStream
from server.transports.context import Context, store_unavailable
from server.transports.guard import Access

SSE_HEADERS = [
    ("content-type", "text/event-stream"),
    ("cache-control", "no-store"),
    ("x-accel-buffering", "no"),
    ("sluice-binary", "base64"),
]
GZIP_HEADERS = [*SSE_HEADERS, ("content-encoding", "gzip"), ("vary", "accept-encoding")]
_HEARTBEAT = encode_comment()
_HEARTBEAT_FRAME = Frame(_HEARTBEAT)


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

    def fell_behind(self) -> bool:
        """The response was cut for falling behind (not the client leaving)."""
        return self._resp.fell_behind()

    async def drain(self) -> None:
        """Wait for the connection's buffer to go down."""
        await self._resp.drain()


class GzipSSESink(SSESink):
    """:class:`SSESink` for a gzip response: every payload goes out in its shared compressed form
    (see :mod:`server.core.gzipsse`); the connection keeps only a CRC-32 and a length."""

    __slots__ = ("gz",)

    def __init__(self, resp: ResponseStream, gz: GzipFraming) -> None:
        super().__init__(resp)
        self.gz = gz

    def deliver(self, enc: EncodedEvent) -> bool:
        """Write the event's shared gzip form."""
        return self._resp.send_frame(self.gz.frame(enc.sse))

    def deliver_batch(self, batch: EventBatch) -> bool:
        """Write the batch's shared gzip form, in one write."""
        return self._resp.send_frame(self.gz.frame(batch.sse))

    def reset(self, reset: Reset) -> bool:
        """Write ``event: sluice.reset``, compressed."""
        return self._resp.send_frame(self.gz.frame(sse_reset(reset)))

    def end(self) -> None:
        """Write ``event: sluice.end``, compressed."""
        self._resp.send_frame(self.gz.frame(sse_end()))

    def idle(self) -> bool:
        """Write a heartbeat comment, compressed (shared)."""
        return self._resp.send_frame(self.gz.frame(_HEARTBEAT_FRAME))


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


async def handle_sse(ex: Exchange, ctx: Context, stream: str, access: Access) -> None:
    """Stream events as SSE until the stream ends, the client leaves, the worker drains or the
    token expires (``access.deadline``: ended like a drain, so the client reconnects, with a
    fresh token, from its exact position)."""
    if not wants_sse(ex.request.headers.get("accept")):
        raise HTTPError(406, "not_acceptable", "this endpoint serves text/event-stream")
    start = start_of(ex)
    heartbeat = heartbeat_or_none(ctx.settings.heartbeat)
    settings = ctx.settings
    gz = GzipFraming(settings.gzip_level) if settings.sse_gzip and wants_gzip(ex) else None
    # Subscribe (and fix what "now" means) before the client hears 200: nothing published after
    # it has the response head can be missed.
    try:
        async with ctx.hub.open_subscription(stream, start, heartbeat=heartbeat) as sub:
            retry = encode_retry(settings.retry_value())
            if gz is None:
                resp = await ex.open_stream(200, SSE_HEADERS)
                resp.send(retry)
                sink = SSESink(resp)
            else:
                resp = await ex.open_stream(200, GZIP_HEADERS)
                resp.send(gz.start(retry))
                sink = GzipSSESink(resp, gz)
            ex.on_close_request(sub.stop)  # drain or rotation: stop, then end cleanly below
            expired = False
            if access.deadline == math.inf:  # no token to expire: no cancel scope per connection
                await sub.run(sink)
            else:
                with trio.CancelScope(deadline=access.deadline) as expiry:
                    await sub.run(sink)
                expired = expiry.cancelled_caught
    except StoreUnavailable:  # the subscription could not be planned: nothing was sent yet
        raise store_unavailable() from None
    if sub.ended:
        if gz is not None:
            resp.send(gz.trailer())
        await resp.finish()
    elif sub.stopped or expired:  # cancelled at an await: the position is exact
        block = wind_down_block(sub.position, settings.retry_value())
        resp.send(block if gz is None else gz.data(block) + gz.trailer())
        await resp.finish()


async def handle_sse_head(ex: Exchange, ctx: Context, stream: str, access: Access) -> None:
    """``HEAD`` on an SSE stream: GET's checks (406, a bad start position's 400) and GET's response
    head (gzip included when GET would compress), then the response ends; nothing is subscribed
    and the connection is not held."""
    if not wants_sse(ex.request.headers.get("accept")):
        raise HTTPError(406, "not_acceptable", "this endpoint serves text/event-stream")
    start_of(ex)
    gzip = ctx.settings.sse_gzip and wants_gzip(ex)
    resp = await ex.open_stream(200, GZIP_HEADERS if gzip else SSE_HEADERS)
    await resp.finish()


def wants_gzip(ex: Exchange) -> bool:
    """The client takes gzip (``Accept-Encoding``)."""
    accept = ex.request.headers.get("accept-encoding")
    return accept is not None and accepts_gzip(accept.encode("latin-1"))


def wind_down_block(position: str | None, retry_ms: int) -> bytes:
    """What a stopped SSE response ends with: a fresh (jittered) ``retry:``, preceded by
    ``id: <position>`` when there is one, so that the client's Last-Event-ID is exact even when
    it saw no event yet (an ``id`` with no ``data`` sets it without dispatching an event)."""
    retry = encode_retry(retry_ms)
    return b"id: " + position.encode("ascii") + b"\n" + retry if position is not None else retry
