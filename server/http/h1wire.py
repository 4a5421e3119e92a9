"""The bytes of HTTP/1.1 responses as the native engine writes them.

Heads are written by hand: a status line, the handler's fields (lower-case names, checked), the
framing the engine chose (``content-length``, ``transfer-encoding: chunked`` or neither for a
close-delimited HTTP/1.0 stream) and ``connection: close`` when the connection ends after it.
A field that could break the framing (a name that is not a token, a value with CR, LF, NUL, FF or
VT, or with leading or trailing blanks) is refused before anything is written.
"""

from __future__ import annotations

import re

from server.http.common import reason_phrase

# a lower-case token; a value without NUL, CR, LF, FF or VT and without leading or trailing blanks
_FIELD_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9a-z-]+")
_FIELD_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
FRAMING = frozenset({b"transfer-encoding", b"content-length"})  # the engine's to write, never a handler's
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


class BadField(ValueError):
    """A response header field that must not be written (the handler's answer becomes a 500)."""


def status_line(status: int) -> bytes:
    """``HTTP/1.1 <status> <reason>`` and its CRLF."""
    return b"HTTP/1.1 %d %b\r\n" % (status, reason_phrase(status))


def head_bytes(status: int, fields: list[tuple[bytes, bytes]], framing: bytes, close: bool) -> bytes:
    """A response head: status line, ``fields`` (checked; framing fields dropped), ``framing``
    (ready-made lines such as ``content-length: 5\\r\\n``), ``connection: close`` if ``close``.

    Raises :class:`BadField` for a field that would not be a valid header line."""
    lines = [status_line(status)]
    for name, value in fields:
        if not _FIELD_NAME.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise BadField(f"invalid response header field {name!r}")
        if name in FRAMING:
            continue
        if name == b"connection" and close:
            continue  # said once, below
        lines.append(b"%b: %b\r\n" % (name, value))
    lines.append(framing)
    if close:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def wants_close(fields: list[tuple[bytes, bytes]]) -> bool:
    """True if the handler's own ``connection`` field says ``close``."""
    for name, value in fields:
        if name == b"connection" and b"close" in (t.strip() for t in value.lower().split(b",")):
            return True
    return False
