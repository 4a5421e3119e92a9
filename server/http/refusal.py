"""The answers of a connection over a connection cap, written before any request is parsed.

Plain HTTP (HTTP/1.1 and h2c alike) gets one fixed ``503`` with ``Retry-After``. A WebSocket
handshake that arrived whole in the first read gets the handshake answered and, at once, a close
frame ``1013`` (Try Again Later), so a browser's ``onclose`` sees a reason instead of a failed
handshake; wsproto does both the parsing and the framing.
"""

from __future__ import annotations

import h11
import wsproto.utilities
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request

REFUSED_BODY = b'{"error":"overloaded","message":"too many connections"}'
TRY_AGAIN_LATER = 1013


def refusal_response(retry_after: int) -> bytes:
    """The fixed HTTP/1.1 ``503`` written to a plaintext connection over a connection cap."""
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        f"Retry-After: {retry_after}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(REFUSED_BODY)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + REFUSED_BODY


def websocket_refusal(data: bytes, retry_after: int) -> bytes | None:
    """If ``data`` holds a complete WebSocket handshake request: the ``101`` answer followed by a
    close frame ``1013`` whose reason says when to come back; else ``None`` (send the ``503``).

    The first subprotocol the client offered is echoed (browsers fail a handshake that offered
    subprotocols and got none back, which would hide the close code); no extension is accepted."""
    if not data.startswith(b"GET "):
        return None
    ws = WSConnection(ConnectionType.SERVER)
    try:
        ws.receive_data(data)
        request = next(iter(ws.events()), None)
        if not isinstance(request, Request):
            return None  # an incomplete head
        subprotocol = request.subprotocols[0] if request.subprotocols else None
        out = ws.send(AcceptConnection(subprotocol=subprotocol))
        reason = f"too many connections; retry after {retry_after} s"
        return out + ws.send(CloseConnection(code=TRY_AGAIN_LATER, reason=reason))
    except (wsproto.utilities.LocalProtocolError, wsproto.utilities.RemoteProtocolError, h11.ProtocolError):
        return None  # not a WebSocket upgrade (or a malformed one): the plain 503
