"""Routing: maps a request to its transport handler (the API.md surface), with 404/405/400.

With a :class:`~server.transports.guard.Guard` configured (auth, rate rules or CORS), every
request under ``/v1/`` goes through it; ``/healthz``, ``/readyz`` and ``/metrics`` stay open.

``HEAD`` is answered wherever ``GET`` is (RFC 9110 9.3.2), with GET's status and headers and no
body (the engine drops it, keeping GET's ``content-length``). Where GET's work is long-lived, HEAD
has its own handler that only validates and answers the head: an SSE HEAD never subscribes, a
long-poll HEAD never waits (and has no ``content-length``: the body is not known yet).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from functools import partial

from server.core.events import is_valid_stream
from server.edge.auth import Action
from server.edge.limits import Route
from server.http.base import Exchange, Handler, HTTPError
from server.transports.context import Context, send_json
from server.transports.guard import OPEN, Access, Target
from server.transports.longpoll import handle_poll, handle_poll_head
from server.transports.publish import handle_close, handle_delete, handle_info, handle_publish
from server.transports.sse import handle_sse, handle_sse_head
from server.transports.websocket import handle_ws

StreamHandler = Callable[[Exchange, Context, str, Access], Awaitable[None]]
Endpoint = tuple[StreamHandler, Action, "Route | None"]
"""A stream endpoint: its handler, the right it needs, and the rate-limit route it is charged."""
PREFIX = "/v1/streams/"
STREAM_RULE = "stream names are 1-200 chars of [A-Za-z0-9._~:@-], no empty segment"

# suffix after the stream name -> {method: endpoint}
_STREAM_ROUTES: dict[str, dict[str, Endpoint]] = {
    "": {
        "GET": (handle_sse, "subscribe", "subscribe"),
        "HEAD": (handle_sse_head, "subscribe", "subscribe"),
        "POST": (handle_publish, "publish", "publish"),
        "DELETE": (handle_delete, "publish", None),
    },
    "/close": {"POST": (handle_close, "publish", None)},
    "/info": {"GET": (handle_info, "subscribe", None), "HEAD": (handle_info, "subscribe", None)},
    "/poll": {"GET": (handle_poll, "subscribe", "subscribe"), "HEAD": (handle_poll_head, "subscribe", "subscribe")},
}
GET_OR_HEAD = ("GET", "HEAD")


def _not_allowed(allowed: list[str]) -> HTTPError:
    allow = ", ".join(sorted(allowed))
    return HTTPError(405, "method_not_allowed", f"allowed: {allow}", [("allow", allow)])


def _stream_endpoint(path: str, method: str) -> tuple[Endpoint, str]:
    """The endpoint and stream of a path under :data:`PREFIX`, or the routing error."""
    stream, slash, tail = path[len(PREFIX) :].partition("/")
    routes = _STREAM_ROUTES.get(slash + tail)
    if routes is None:
        raise HTTPError(404, "not_found", "no such endpoint")
    if not is_valid_stream(stream):
        raise HTTPError(400, "bad_stream", STREAM_RULE)
    endpoint = routes.get(method)
    if endpoint is None:
        raise _not_allowed(list(routes))
    return endpoint, stream


def make_handler(ctx: Context, metrics: Callable[[], bytes] | None = None) -> Handler:
    """The application handler for one worker.

    A plain function that picks the transport and returns its coroutine (or raises the routing
    error): the engine awaits the transport's coroutine directly, so a long-lived response holds
    no routing frame. With a guard, requests under ``/v1/`` run inside :meth:`Guard.serve`."""

    def ws_call(ex: Exchange, access: Access) -> Awaitable[None]:
        return handle_ws(ex, ctx, access)

    def resolve(ex: Exchange) -> Target:
        req = ex.request
        if req.path.startswith(PREFIX):
            (handler, action, rate), stream = _stream_endpoint(req.path, req.method)
            return Target(partial(_call_stream, handler, ctx, stream), action, stream, rate)
        if req.path == "/v1/ws":
            if req.method not in GET_OR_HEAD:  # HEAD: what GET without an upgrade gets (400)
                raise _not_allowed(list(GET_OR_HEAD))
            return Target(ws_call, None, None, None, websocket=True)
        raise HTTPError(404, "not_found", "no such endpoint")

    def handle(ex: Exchange) -> Awaitable[None]:
        req = ex.request
        path = req.path
        method = req.method
        if path.startswith("/v1/"):
            guard = ctx.guard
            return resolve(ex).call(ex, OPEN) if guard is None else guard.serve(ex, partial(resolve, ex))
        if path == "/healthz":
            if method not in GET_OR_HEAD:
                raise _not_allowed(list(GET_OR_HEAD))
            return send_json(ex, 200, {"status": "ok", "pid": os.getpid()})  # pid: which worker answered
        if path == "/readyz":
            if method not in GET_OR_HEAD:
                raise _not_allowed(list(GET_OR_HEAD))
            return _readyz(ex, ctx)
        if path == "/metrics" and metrics is not None:
            if method not in GET_OR_HEAD:
                raise _not_allowed(list(GET_OR_HEAD))
            return ex.respond(200, [("content-type", "text/plain; version=0.0.4; charset=utf-8")], metrics())
        raise HTTPError(404, "not_found", "no such endpoint")

    return handle


async def _readyz(ex: Exchange, ctx: Context) -> None:
    """``/readyz``: 503 while draining or while the store cannot take requests, else 200."""
    if ctx.draining:
        await send_json(ex, 503, {"status": "draining"})
    elif not await ctx.store.ready():
        await send_json(ex, 503, {"status": "store_unavailable"})
    else:
        await send_json(ex, 200, {"status": "ready"})


def _call_stream(handler: StreamHandler, ctx: Context, stream: str, ex: Exchange, access: Access) -> Awaitable[None]:
    return handler(ex, ctx, stream, access)
