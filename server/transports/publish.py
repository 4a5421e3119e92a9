"""Producer endpoints: publish (single and batches), close, delete, info (API.md "Publish")."""

from __future__ import annotations

from server.core.events import InvalidInput, NewEvent
from server.core.ports.store import IdempotencyKeyReused, StoreUnavailable, StreamClosed
from server.http.base import Exchange, HTTPError
from server.transports.batch import (
    MSGPACK_TYPES,
    NDJSON,
    TooLarge,
    media_type,
    msgpack_events,
    ndjson_events,
    single_event,
)
from server.transports.context import Context, send_json, store_unavailable
from server.transports.guard import Access

MAX_IDEMPOTENCY_KEY = 256


def input_error(exc: InvalidInput) -> HTTPError:
    """The HTTP answer for invalid input: 413 for sizes, else 400."""
    return HTTPError(413 if isinstance(exc, TooLarge) else 400, exc.code, exc.message)


def _idempotency_key(ex: Exchange) -> str | None:
    key = ex.request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise HTTPError(400, "bad_idempotency_key", f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII")
    return key


async def append(ctx: Context, stream: str, events: list[NewEvent], key: str | None) -> list[str]:
    """Append and return the ids; a closed stream is 409, an idempotency key already used for a
    different request (another stream, type, encoding or data) is 422 ``idempotency_key_reused``."""
    try:
        result = await ctx.store.append(stream, events, idempotency_key=key)
    except StreamClosed:
        raise HTTPError(409, "closed", f"stream {stream!r} is closed") from None
    except StoreUnavailable:
        raise store_unavailable() from None
    except IdempotencyKeyReused:
        raise HTTPError(
            422, "idempotency_key_reused", "this Idempotency-Key was already used for a different request"
        ) from None
    return result.ids


async def handle_publish(ex: Exchange, ctx: Context, stream: str, access: Access) -> None:
    """``POST /v1/streams/{stream}``: 201 ``{"id"}`` or, for a batch, ``{"ids"}``, once durable.

    The body's size is charged to the ``publish_bytes`` rate rules once it is read; refused
    there, the request's ``publish`` token is given back."""
    req = ex.request
    key = _idempotency_key(ex)
    s = ctx.settings
    mtype = media_type(req.headers.get("content-type"))
    body = await req.read_body(s.max_body_bytes)
    access.charge("publish_bytes", stream, len(body), paid="publish")
    try:
        if mtype == NDJSON:
            events = ndjson_events(body, s.max_event_bytes, s.max_batch_events)
        elif mtype in MSGPACK_TYPES:
            events = msgpack_events(body, s.max_event_bytes, s.max_batch_events)
        else:
            event = single_event(body, req.headers.get("content-type"), req.query.get("type"), s.max_event_bytes)
            ids = await append(ctx, stream, [event], key)
            await send_json(ex, 201, {"id": ids[0]})
            return
    except InvalidInput as exc:
        raise input_error(exc) from None
    ids = await append(ctx, stream, events, key)
    await send_json(ex, 201, {"ids": ids})


async def handle_close(ex: Exchange, ctx: Context, stream: str, access: Access) -> None:
    """``POST /v1/streams/{stream}/close``: 204, idempotent."""
    try:
        await ctx.store.close_stream(stream)
    except StoreUnavailable:
        raise store_unavailable() from None
    await ex.respond(204, [])


async def handle_delete(ex: Exchange, ctx: Context, stream: str, access: Access) -> None:
    """``DELETE /v1/streams/{stream}``: 204 whether or not it existed."""
    try:
        await ctx.store.delete(stream)
    except StoreUnavailable:
        raise store_unavailable() from None
    await ex.respond(204, [])


async def handle_info(ex: Exchange, ctx: Context, stream: str, access: Access) -> None:
    """``GET /v1/streams/{stream}/info``: the stream's state, 404 if it does not exist."""
    try:
        info = await ctx.store.info(stream)
    except StoreUnavailable:
        raise store_unavailable() from None
    if info is None:
        raise HTTPError(404, "not_found", f"stream {stream!r} does not exist")
    await send_json(
        ex,
        200,
        {
            "first_id": info.first_id,
            "last_id": info.last_id,
            "epoch": info.epoch,
            "closed": info.closed,
            "length": info.length,
        },
    )
