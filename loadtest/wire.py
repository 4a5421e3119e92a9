"""Client-side HTTP/1.1 and SSE decoding for the load clients (pure, no I/O).

Small and fast on purpose: the load generator shares the machine with the server, so every
microsecond it spends per event is one the server cannot use. :class:`SSEDecoder` handles what
servers send (LF or CRLF line ends, comments, ``retry:``), not every corner of the WHATWG
algorithm (no ``\r``-only lines).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HEAD = 65_536


class ProtocolError(ValueError):
    """The server sent something the client cannot follow."""


@dataclass(frozen=True)
class Head:
    """A parsed HTTP/1.1 response head."""

    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "

    @property
    def chunked(self) -> bool:
        """True when the body uses chunked transfer coding."""
        return "chunked" in self.headers.get("transfer-encoding", "").lower()

    @property
    def length(self) -> int | None:
        """Content-Length, if given."""
        value = self.headers.get("content-length")
        return int(value) if value is not None else None


def parse_head(buf: bytes | bytearray) -> tuple[Head, int] | None:
    """``(head, bytes used)`` once ``buf`` holds a whole response head, else None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise ProtocolError("response head too large")
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"bad status line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"bad header line {line!r}")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return Head(int(parts[1]), headers), end + 4


class ChunkedDecoder:
    """Undoes HTTP/1.1 chunked transfer coding, incrementally."""

    __slots__ = ("_buf", "_left", "done", "tail")

    def __init__(self) -> None:
        self._buf = b""
        self._left = 0  # bytes of chunk data still to come
        self.done = False
        self.tail = b""  # what followed the last chunk (the next response on a kept-alive connection)

    def feed(self, data: bytes) -> bytes:
        """The body bytes contained in ``data`` (possibly empty)."""
        if not self._buf and not self._left and not self.done:
            # The common case: ``data`` is exactly one whole chunk (what one server write makes).
            eol = data.find(b"\r\n", 0, 18)
            if eol > 0 and data[:1] != b"0" and data.endswith(b"\r\n"):
                try:
                    size = int(data[:eol], 16)
                except ValueError:
                    size = -1
                start = eol + 2
                if size > 0 and start + size + 2 == len(data):
                    return data[start:-2]
        out: list[bytes] = []
        buf = self._buf + data if self._buf else data
        pos = 0
        n = len(buf)
        while pos < n and not self.done:
            if self._left:
                take = min(self._left, n - pos)
                out.append(buf[pos : pos + take])
                self._left -= take
                pos += take
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if n - pos > 1024:
                    raise ProtocolError("chunk size line too long")
                break
            line = buf[pos:eol]
            if not line:  # the CRLF that ends a chunk's data
                pos = eol + 2
                continue
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {line[:20]!r}") from None
            pos = eol + 2
            if size == 0:  # the last chunk; no trailers expected, then the closing CRLF
                self.done = True
                if buf.startswith(b"\r\n", pos):
                    pos += 2
                self.tail = buf[pos:]
                break
            self._left = size
        self._buf = buf[pos:] if not self.done else b""
        # a chunk's data is followed by CRLF, which the loop above skips as an empty line
        return out[0] if len(out) == 1 else b"".join(out)


class SSEDecoder:
    """Splits an event stream into events: ``(id or None, type, data)`` tuples."""

    __slots__ = ("_buf", "comments", "last_id", "retry")

    def __init__(self) -> None:
        self._buf = b""
        self.last_id: str | None = None
        self.retry: int | None = None  # milliseconds, from the last ``retry:`` field
        self.comments = 0  # heartbeats and other comment lines

    @property
    def pending(self) -> bool:
        """True while part of a block is buffered (the next bytes continue it)."""
        return bool(self._buf)

    def feed(self, data: bytes) -> list[tuple[str | None, str, bytes]]:
        """The events completed by ``data``."""
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        blocks = buf.split(b"\n\n")
        self._buf = blocks.pop()
        events: list[tuple[str | None, str, bytes]] = []
        for block in blocks:
            if not block:
                continue
            if block.startswith(b"id: "):  # the common shape, one id line then one data line
                nl = block.find(b"\n")
                if nl > 4 and block.startswith(b"data: ", nl + 1) and block.find(b"\n", nl + 1) < 0:
                    self.last_id = block[4:nl].lstrip(b" ").decode()
                    events.append((self.last_id, "message", block[nl + 7 :]))
                    continue
            event_id: str | None = None
            etype = "message"
            data_lines: list[bytes] = []
            for line in block.split(b"\n"):
                if line.startswith(b"data:"):
                    data_lines.append(line[6:] if line[5:6] == b" " else line[5:])
                elif line.startswith(b"id:"):
                    event_id = line[3:].lstrip(b" ").decode()
                elif line.startswith(b"event:"):
                    etype = line[6:].lstrip(b" ").decode()
                elif line.startswith(b":"):
                    self.comments += 1
                elif line.startswith(b"retry:"):
                    value = line[6:].strip()
                    if value.isdigit():
                        self.retry = int(value)
            if event_id is not None:
                self.last_id = event_id
            if data_lines:
                events.append((event_id, etype, b"\n".join(data_lines)))
        return events
