"""Routing: maps a request to its transport handler (the API.md surface), with 404/405/400."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

from server.core.events import is_valid_stream
from server.http.base import Exchange, Handler, HTTPError
from server.transports.context import Context, send_json
from server.transports.longpoll import handle_poll
from server.transports.publish import handle_close, handle_delete, handle_info, handle_publish
from server.transports.sse import handle_sse
from server.transports.websocket import handle_ws

StreamHandler = Callable[[Exchange, Context, str], Awaitable[None]]
PREFIX = "/v1/streams/"
STREAM_RULE = "stream names are 1-200 chars of [A-Za-z0-9._~:@-], no empty segment"

# suffix after the stream name -> {method: handler}
_STREAM_ROUTES: dict[str, dict[str, StreamHandler]] = {
    "": {"GET": handle_sse, "POST": handle_publish, "DELETE": handle_delete},
    "/close": {"POST": handle_close},
    "/info": {"GET": handle_info},
    "/poll": {"GET": handle_poll},
}


def _not_allowed(allowed: list[str]) -> HTTPError:
    allow = ", ".join(sorted(allowed))
    return HTTPError(405, "method_not_allowed", f"allowed: {allow}", [("allow", allow)])


def make_handler(ctx: Context, metrics: Callable[[], bytes] | None = None) -> Handler:
    """The application handler for one worker.

    A plain function that picks the transport and returns its coroutine (or raises the routing
    error): the engine awaits the transport's coroutine directly, so a long-lived response holds
    no routing frame."""

    def handle(ex: Exchange) -> Awaitable[None]:
        req = ex.request
        path = req.path
        method = req.method
        if path.startswith(PREFIX):
            rest = path[len(PREFIX) :]
            stream, slash, tail = rest.partition("/")
            routes = _STREAM_ROUTES.get(slash + tail)
            if routes is None:
                raise HTTPError(404, "not_found", "no such endpoint")
            if not is_valid_stream(stream):
                raise HTTPError(400, "bad_stream", STREAM_RULE)
            handler = routes.get(method)
            if handler is None:
                raise _not_allowed(list(routes))
            return handler(ex, ctx, stream)
        if path == "/v1/ws":
            if method != "GET":
                raise _not_allowed(["GET"])
            return handle_ws(ex, ctx)
        if path == "/healthz":
            if method != "GET":
                raise _not_allowed(["GET"])
            return send_json(ex, 200, {"status": "ok", "pid": os.getpid()})  # pid: which worker answered
        if path == "/readyz":
            if method != "GET":
                raise _not_allowed(["GET"])
            if ctx.draining:
                return send_json(ex, 503, {"status": "draining"})
            return send_json(ex, 200, {"status": "ready"})
        if path == "/metrics" and metrics is not None:
            if method != "GET":
                raise _not_allowed(["GET"])
            return ex.respond(200, [("content-type", "text/plain; version=0.0.4; charset=utf-8")], metrics())
        raise HTTPError(404, "not_found", "no such endpoint")

    return handle
