"""Load clients, one module per transport; each exposes ``session(load, conn)``.

``TRANSPORTS`` maps the names used on the command line to those sessions.
"""

from __future__ import annotations

from loadtest.clients import longpoll, sse_h1, sse_h2, ws
from loadtest.clients.common import Session

TRANSPORTS: dict[str, Session] = {
    "sse-h1": sse_h1.session,
    "sse-h2": sse_h2.session,
    "ws-json": ws.session_json,
    "ws-msgpack": ws.session_msgpack,
    "longpoll": longpoll.session,
}
