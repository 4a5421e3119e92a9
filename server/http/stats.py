"""The engine's counters (one instance per worker)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class HttpStats:
    """Counters for one engine instance (one worker), updated on the trio thread only."""

    connections_open: int = 0
    connections_total: int = 0
    slow_consumers: int = 0  # connections (or HTTP/2 streams) dropped for exceeding send_buffer
    send_timeouts: int = 0  # connections dropped because a write made no progress in send_timeout
    protocol_errors: int = 0  # malformed HTTP/1.1, HTTP/2 or WebSocket input
    accept_errors: int = 0  # accept() failures such as EMFILE/ENFILE (the loop backs off, never dies)
    connections_rotated: int = 0  # connections asked to close for reaching http.max_connection_age
    drain_aborted: int = 0  # connections still open at a drain's deadline, cut
    h2_calm: int = 0  # HTTP/2 connections ended with GOAWAY ENHANCE_YOUR_CALM (reset/stream floods, header floods)
    connections_refused: int = 0  # turned away at accept by a connection cap (503, or closed before TLS)
    plaintext_refused: int = 0  # plaintext connections on a TLS port that does not serve plaintext (400 or closed)
    ws_ping_floods: int = 0  # WebSockets closed 1008 for sending pings faster than the ping bucket allows
    peer_gone: int = 0  # connections whose tasks ended on an error from a client that had left (logged at debug)
    # HTTP/2 connections ended (GOAWAY ENHANCE_YOUR_CALM, so also in h2_calm) for a header block or
    # the client preface not complete within header_timeout (slowloris over HTTP/2)
    header_timeouts: int = 0
