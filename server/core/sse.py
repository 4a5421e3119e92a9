"""Server-Sent Events: the encoder the server writes with, and a reference parser.

The encoder follows the WHATWG HTML "Server-sent events" section and API.md:

* an event is ``id: <id>``, ``event: <type>`` (omitted for ``message``), one ``data: <line>`` per
  line of data, then a blank line; every line ends in LF and the output is UTF-8;
* data is split into lines on CRLF, CR and LF alike, exactly as a client splits them, so no byte
  of data can end a field or an event early. A client joins the lines with LF: text sent over SSE
  arrives with its line endings normalised to LF (a transport limit of SSE itself; publish as
  binary, or use WebSocket, when CR must survive);
* empty data is sent as one ``data: `` line: the client dispatches an event whose data is ``""``;
* U+0000 NUL is allowed in data (the spec gives it no special meaning there); it is refused in an
  id, because a client silently ignores an ``id`` field that contains NUL.

``SSEParser`` is the client side of the same spec (BOM, CR/LF/CRLF, comments, fields without a
colon, ``retry``), used as the reference client by tests.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SSEEvent",
    "SSEParser",
    "encode_comment",
    "encode_control",
    "encode_event",
    "encode_retry",
]

_DEFAULT_TYPE = "message"
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _check_field(name: str, value: str) -> None:
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValueError(f"SSE {name} must not contain CR, LF or NUL: {value!r}")


def encode_event(event_id: str | None, event_type: str, data: str) -> bytes:
    """Return one complete SSE event as UTF-8 bytes, ending with the blank line that dispatches it.

    ``event_id`` ``None`` omits the ``id`` field (the client keeps its last event id); an empty
    string sends ``id: `` which clears it. ``event_type`` ``message`` (or empty) omits the
    ``event`` field. Each CRLF, CR or LF in ``data`` starts a new ``data:`` line, so a parsed
    event's data equals ``data`` with its line endings normalised to LF. Raises ``ValueError`` if
    ``event_id`` or ``event_type`` contains CR, LF or NUL.
    """
    if "\r" in data:
        data = data.replace("\r\n", "\n").replace("\r", "\n")
    if "\n" in data:
        data = data.replace("\n", "\ndata: ")
    if event_type == _DEFAULT_TYPE or not event_type:
        if event_id is None:
            text = f"data: {data}\n\n"
        else:
            _check_field("id", event_id)
            text = f"id: {event_id}\ndata: {data}\n\n"
    else:
        _check_field("event type", event_type)
        if event_id is None:
            text = f"event: {event_type}\ndata: {data}\n\n"
        else:
            _check_field("id", event_id)
            text = f"id: {event_id}\nevent: {event_type}\ndata: {data}\n\n"
    return text.encode("utf-8")


def encode_retry(ms: int) -> bytes:
    """Return a ``retry: <ms>`` block that sets the client's reconnection delay; dispatches no event.

    Raises ``ValueError`` for a negative delay (a client ignores anything but ASCII digits).
    """
    if ms < 0:
        raise ValueError(f"retry must be >= 0 ms, got {ms}")
    return b"retry: %d\n\n" % int(ms)


def encode_comment(text: str = "") -> bytes:
    """Return an SSE comment (``: text``, or ``:`` alone when empty) followed by a blank line.

    Clients ignore comments; they keep idle connections alive through proxies. CR and LF in
    ``text`` become spaces so the comment stays one line. The blank line dispatches nothing,
    because it is only ever written between events.
    """
    if not text:
        return b":\n\n"
    if "\n" in text or "\r" in text:
        text = text.replace("\r", " ").replace("\n", " ")
    return f": {text}\n\n".encode()


def encode_control(event_type: str, payload: dict[str, Any]) -> bytes:
    """Return a control event (``sluice.reset``, ``sluice.end``): no id, data = compact JSON of ``payload``.

    Having no ``id`` field, a control event leaves the client's last event id unchanged.
    """
    return encode_event(None, event_type, _JSON.encode(payload))


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """An event as a WHATWG-conforming client dispatches it.

    ``id`` is the client's last event id at dispatch (it persists across events until changed);
    ``event`` is the type (``message`` by default); ``data`` has its trailing LF removed; ``retry``
    is the value of a valid ``retry`` field seen since the previous blank line, else ``None``.
    """

    id: str
    event: str
    data: str
    retry: int | None = None


_LINE_END = re.compile(r"\r\n|\r|\n")


class SSEParser:
    """Incremental SSE parser: ``feed`` bytes in any split, get the events they complete.

    Implements the WHATWG "interpreting an event stream" algorithm: UTF-8 decoding with
    replacement, one leading BOM skipped, CRLF / CR / LF line endings (a CR ending one chunk and
    an LF starting the next count as one line end), ``:`` comments, fields without a colon (empty
    value), one space after the colon stripped, unknown fields ignored, ``id`` containing NUL
    ignored, ``retry`` accepted only as ASCII digits, and a blank line with no data dispatching
    nothing. A partial event at end of input is never dispatched.

    Besides the events returned by ``feed``, the parser records ``last_event_id``, ``retry`` (the
    reconnection delay in effect, ``None`` until set), ``retries`` (every valid ``retry`` value in
    order) and ``comments`` (each comment's text, one leading space removed).
    """

    def __init__(self) -> None:
        """Start a parser at the beginning of a stream."""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""
        self._started = False
        self._skip_lf = False
        self._data: list[str] = []
        self._event = ""
        self._block_retry: int | None = None
        self._fields_in_block = False
        self.last_event_id = ""
        self.retry: int | None = None
        self.retries: list[int] = []
        self.comments: list[str] = []

    @property
    def pending(self) -> bool:
        """True when a partial line or fields of an undispatched event are buffered."""
        return bool(self._buf) or self._fields_in_block or self._decoder.getstate()[0] != b""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume ``chunk`` and return the events it completes, in order."""
        text = self._decoder.decode(chunk)
        if not text:
            return []
        if not self._started:
            self._started = True
            if text[0] == "\ufeff":
                text = text[1:]
        if self._skip_lf:
            self._skip_lf = False
            if text.startswith("\n"):
                text = text[1:]
        buf = self._buf + text
        out: list[SSEEvent] = []
        pos = 0
        for m in _LINE_END.finditer(buf):
            self._line(buf[pos : m.start()], out)
            pos = m.end()
        # A CR ending the input has ended its line already; an LF arriving next belongs to it.
        self._skip_lf = buf.endswith("\r")
        self._buf = buf[pos:]
        return out

    def _line(self, line: str, out: list[SSEEvent]) -> None:
        if not line:
            self._dispatch(out)
            return
        if line[0] == ":":
            self.comments.append(line[2:] if line.startswith(": ") else line[1:])
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        self._fields_in_block = True
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            ms = int(value)
            self.retry = ms
            self.retries.append(ms)
            self._block_retry = ms
        # Any other field name is ignored.

    def _dispatch(self, out: list[SSEEvent]) -> None:
        data, event, retry = self._data, self._event, self._block_retry
        self._data = []
        self._event = ""
        self._block_retry = None
        self._fields_in_block = False
        if not data:
            return
        out.append(SSEEvent(self.last_event_id, event or _DEFAULT_TYPE, "\n".join(data), retry))
