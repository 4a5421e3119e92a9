"""Encode once per wire format: an event's SSE, WebSocket and long-poll forms, shared by subscribers.

Every ``Frame`` returned here is complete and ready to write: SSE bytes for an HTTP body, or a
whole server-to-client WebSocket frame (FIN set, unmasked, no extension) for a socket. The same
``Frame`` object may be written to any number of connections and must not be modified.
"""

from __future__ import annotations

import base64
import json
from json.encoder import encode_basestring
from typing import Any, Literal

import msgpack

from server.core.events import Event
from server.core.frame import Frame
from server.core.replay import Reset
from server.core.sse import encode_control, encode_event

__all__ = [
    "EncodedEvent",
    "EventBatch",
    "WireFormat",
    "sse_end",
    "sse_reset",
    "ws_end",
    "ws_frame",
    "ws_message",
    "ws_reset",
]

WireFormat = Literal["json", "msgpack"]
"""A WebSocket subprotocol's encoding: ``json`` (``sluice.json.v1``) or ``msgpack`` (``sluice.msgpack.v1``)."""

_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_B64_TAIL = ',"encoding":"base64"}'
_OP_TEXT = 0x81
_OP_BINARY = 0x82


def ws_frame(payload: bytes, *, text: bool) -> bytes:
    """Return one complete, final (FIN), unmasked WebSocket frame carrying ``payload``.

    The opcode is text (0x1) when ``text`` is true, else binary (0x2); the payload length uses the
    shortest RFC 6455 encoding (7-bit, 16-bit or 64-bit). For text, ``payload`` must be UTF-8.
    """
    n = len(payload)
    op = _OP_TEXT if text else _OP_BINARY
    if n < 126:
        return bytes((op, n)) + payload
    if n < 0x10000:
        return b"".join((bytes((op, 126)), n.to_bytes(2, "big"), payload))
    return b"".join((bytes((op, 127)), n.to_bytes(8, "big"), payload))


def _json_bytes(obj: object) -> bytes:
    return _JSON.encode(obj).encode("utf-8")


def ws_message(obj: dict[str, Any], fmt: WireFormat) -> Frame:
    """Return ``obj`` as one complete WebSocket message in ``fmt``.

    ``json``: a text frame of compact JSON (UTF-8, non-ASCII kept as is); ``msgpack``: a binary
    frame, bytes values as msgpack bin. Raises ``TypeError`` for values the format cannot carry
    (for example bytes in JSON).
    """
    if fmt == "json":
        return Frame(ws_frame(_json_bytes(obj), text=True))
    if fmt == "msgpack":
        return Frame(ws_frame(msgpack.packb(obj, use_bin_type=True), text=False))
    raise ValueError(f"unknown wire format {fmt!r}")


def ws_reset(stream: str, reset: Reset, fmt: WireFormat) -> Frame:
    """Return ``{"op": "reset", "stream", "reason", "earliest", "requested"}`` as a WebSocket message."""
    return ws_message(
        {
            "op": "reset",
            "stream": stream,
            "reason": reset.reason,
            "earliest": reset.earliest,
            "requested": reset.requested,
        },
        fmt,
    )


def ws_end(stream: str, fmt: WireFormat) -> Frame:
    """Return ``{"op": "end", "stream"}``: the stream was closed and everything in it delivered."""
    return ws_message({"op": "end", "stream": stream}, fmt)


def sse_reset(reset: Reset) -> Frame:
    """Return the SSE ``sluice.reset`` event, data ``{"reason", "earliest", "requested"}``, with no id."""
    return Frame(encode_control("sluice.reset", reset.as_dict()))


_SSE_END = Frame(encode_control("sluice.end", {}))


def sse_end() -> Frame:
    """Return the SSE ``sluice.end`` event (data ``{}``, no id): the stream was closed; the response ends next.

    The same shared ``Frame`` is returned on every call.
    """
    return _SSE_END


class EncodedEvent:
    """An event with its wire forms, each built on first access and then kept for every subscriber.

    Text data is decoded as UTF-8 (an invalid sequence becomes U+FFFD); binary data is carried as
    standard base64 without line breaks wherever the format is text (SSE, JSON, long-poll) and as
    raw bytes in msgpack. ``event`` is the wrapped event and ``id`` its wire id. The returned
    frames and dict are shared: callers must not modify them.
    """

    __slots__ = ("_data_text", "_poll", "_poll_json", "_sse", "_ws_json", "_ws_msgpack", "event", "id")

    def __init__(self, event: Event) -> None:
        """Wrap ``event``; only its wire ``id`` is computed now, each form on first access."""
        self.event = event
        self.id = event.id
        self._data_text: str | None = None
        self._sse: Frame | None = None
        self._ws_json: Frame | None = None
        self._ws_msgpack: Frame | None = None
        self._poll: dict[str, object] | None = None
        self._poll_json: bytes | None = None

    @property
    def data_text(self) -> str:
        """The data as text formats carry it: UTF-8 text, or base64 when the event is binary."""
        t = self._data_text
        if t is None:
            ev = self.event
            t = base64.b64encode(ev.data).decode("ascii") if ev.binary else ev.data.decode("utf-8", "replace")
            self._data_text = t
        return t

    @property
    def sse(self) -> Frame:
        """The SSE event: ``id``, ``event`` (unless ``message``), ``data`` lines, blank line."""
        f = self._sse
        if f is None:
            ev = self.event
            f = self._sse = Frame(encode_event(self.id, ev.type, self.data_text))
        return f

    @property
    def ws_json(self) -> Frame:
        """A text WebSocket frame: ``{"op":"event","stream","id","type","data"}``, plus
        ``"encoding":"base64"`` when the event is binary."""
        f = self._ws_json
        if f is None:
            ev = self.event
            # Built by hand (C string escaping only): several times faster than a JSONEncoder and
            # byte-identical to the compact, ensure_ascii=False encoding of the same dict.
            payload = (
                f'{{"op":"event","stream":{encode_basestring(ev.stream)},"id":{encode_basestring(self.id)},'
                f'"type":{encode_basestring(ev.type)},"data":{encode_basestring(self.data_text)}'
                f"{_B64_TAIL if ev.binary else '}'}"
            )
            f = self._ws_json = Frame(ws_frame(payload.encode("utf-8"), text=True))
        return f

    @property
    def ws_msgpack(self) -> Frame:
        """A binary WebSocket frame: msgpack map ``op, stream, id, type, data``, ``data`` always bin."""
        f = self._ws_msgpack
        if f is None:
            ev = self.event
            obj = {"op": "event", "stream": ev.stream, "id": self.id, "type": ev.type, "data": ev.data}
            f = self._ws_msgpack = Frame(ws_frame(msgpack.packb(obj, use_bin_type=True), text=False))
        return f

    def ws(self, fmt: WireFormat) -> Frame:
        """The WebSocket frame for ``fmt``: ``ws_json`` or ``ws_msgpack``."""
        return self.ws_json if fmt == "json" else self.ws_msgpack

    @property
    def poll(self) -> dict[str, object]:
        """The long-poll event object ``{"id","type","data"}``, plus ``"encoding":"base64"`` if binary."""
        p = self._poll
        if p is None:
            ev = self.event
            p = {"id": self.id, "type": ev.type, "data": self.data_text}
            if ev.binary:
                p["encoding"] = "base64"
            self._poll = p
        return p

    @property
    def poll_json(self) -> bytes:
        """``poll`` as compact UTF-8 JSON, for building a long-poll body by joining."""
        b = self._poll_json
        if b is None:
            ev = self.event
            b = self._poll_json = (
                f'{{"id":{encode_basestring(self.id)},"type":{encode_basestring(ev.type)},'
                f'"data":{encode_basestring(self.data_text)}'
                f"{_B64_TAIL if ev.binary else '}'}"
            ).encode()
        return b


class EventBatch:
    """Consecutive events of one stream and epoch, fanned out together, each encoded once.

    A subscriber that takes the whole batch gets its wire forms joined into one payload (one
    socket write, one HTTP/1.1 chunk, one HTTP/2 DATA frame), built on first use and shared like
    the single-event forms. ``encs`` are the events in order; ``first_seq``/``last_seq`` their
    first and last ``seq`` (consecutive).
    """

    __slots__ = ("_sse", "_ws_json", "_ws_msgpack", "encs", "epoch", "first_seq", "last_seq")

    def __init__(self, encs: list[EncodedEvent]) -> None:
        """Wrap ``encs`` (non-empty; one stream and epoch; consecutive ``seq``)."""
        self.encs = encs
        first = encs[0].event
        self.epoch = first.epoch
        self.first_seq = first.seq
        self.last_seq = encs[-1].event.seq
        self._sse: Frame | None = None
        self._ws_json: Frame | None = None
        self._ws_msgpack: Frame | None = None

    def __len__(self) -> int:
        return len(self.encs)

    @property
    def sse(self) -> Frame:
        """Every event's SSE form, joined."""
        f = self._sse
        if f is None:
            encs = self.encs
            f = self._sse = encs[0].sse if len(encs) == 1 else Frame(b"".join([e.sse.raw for e in encs]))
        return f

    @property
    def ws_json(self) -> Frame:
        """Every event's text WebSocket frame (``EncodedEvent.ws_json``), joined."""
        f = self._ws_json
        if f is None:
            encs = self.encs
            f = self._ws_json = encs[0].ws_json if len(encs) == 1 else Frame(b"".join([e.ws_json.raw for e in encs]))
        return f

    @property
    def ws_msgpack(self) -> Frame:
        """Every event's binary WebSocket frame (``EncodedEvent.ws_msgpack``), joined."""
        f = self._ws_msgpack
        if f is None:
            encs = self.encs
            f = self._ws_msgpack = (
                encs[0].ws_msgpack if len(encs) == 1 else Frame(b"".join([e.ws_msgpack.raw for e in encs]))
            )
        return f
