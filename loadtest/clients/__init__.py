"""Load clients, one module per transport; each exposes ``session(load, conn)``.

``TRANSPORTS`` maps the names used on the command line to those sessions. It is built on first
use, so importing ``loadtest.clients.common`` (the command line does, before it checks that the
``loadtest`` extra is installed) does not import every transport's third-party library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loadtest.clients.common import Session

    TRANSPORTS: dict[str, Session]


def __getattr__(name: str) -> object:
    """``TRANSPORTS``, imported on first use (see the module docstring)."""
    if name != "TRANSPORTS":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from loadtest.clients import longpoll, sse_h1, sse_h2, ws

    transports: dict[str, Session] = {
        "sse-h1": sse_h1.session,
        "sse-h2": sse_h2.session,
        "ws-json": ws.session_json,
        "ws-msgpack": ws.session_msgpack,
        "longpoll": longpoll.session,
    }
    globals()["TRANSPORTS"] = transports
    return transports
