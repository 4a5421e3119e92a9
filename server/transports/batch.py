"""Decoding publish bodies into events (pure: no I/O).

Single events: the body is the data; ``Content-Type`` ``text/*``, ``application/json`` or
``application/*+json`` marks it text (it must be UTF-8), anything else marks it binary. Without
a ``Content-Type`` the body is text if it is valid UTF-8, binary otherwise.

Batches: ``application/x-ndjson`` lines of ``{"type": ..., "data": ...}`` (``data`` a string is
text; any other JSON value is stored as its compact JSON text; with ``"encoding": "base64"`` a
string is decoded to binary), or ``application/msgpack`` an array of maps with ``type`` and
``data`` (``bytes`` is binary, ``str`` is text). A batch is all-or-nothing: one bad item rejects it.
"""

from __future__ import annotations

import base64
import binascii
import json
from json.encoder import encode_basestring
from typing import Any

import msgpack

from server.core.events import InvalidInput, NewEvent, check_type

NDJSON = "application/x-ndjson"
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")

_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)  # one encoder, not one per call


class TooLarge(InvalidInput):
    """An event or batch beyond the configured size (HTTP 413)."""


def media_type(content_type: str | None) -> str:
    """The lower-cased media type without parameters (``""`` when absent)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_text_type(mtype: str) -> bool:
    """True for media types whose bodies are stored as text."""
    return (
        mtype.startswith("text/")
        or mtype == "application/json"
        or (mtype.startswith("application/") and mtype.endswith("+json"))
    )


def _check_size(data: bytes, max_event_bytes: int) -> None:
    if len(data) > max_event_bytes:
        raise TooLarge("too_large", f"event data exceeds {max_event_bytes} bytes")


JSON_MESSAGE_FACTOR = 4  # an event's sluice.json.v1 message is at most this many times max_event_bytes
ENVELOPE_ALLOWANCE = 1024  # bytes of that message kept for its other fields (op, stream, id, type)
WORST_ESCAPE = 6  # a control character is sent as \u00XX


def json_data_limit(max_event_bytes: int) -> int:
    """The longest JSON-escaped text data accepted: ``4 x max_event_bytes`` less the envelope
    allowance (1 KiB, or ``max_event_bytes`` itself when smaller), so with ``max_event_bytes`` of
    at least 1 KiB every event's ``sluice.json.v1`` message is at most ``4 x max_event_bytes``
    bytes (binary data, base64 there, is 4/3 of its size and always fits)."""
    return JSON_MESSAGE_FACTOR * max_event_bytes - min(ENVELOPE_ALLOWANCE, max_event_bytes)


def check_encoded_size(event: NewEvent, max_event_bytes: int) -> None:
    """Refuse (``too_large``) text whose JSON string form (quotes, backslashes and control
    characters escaped) is longer than :func:`json_data_limit`: within ``max_event_bytes`` as
    bytes, but too large once a text transport carries it."""
    limit = json_data_limit(max_event_bytes)
    data = event.data
    if event.binary or len(data) * WORST_ESCAPE <= limit:
        return
    text = data.decode("utf-8", "replace")
    escaped = len(data) + len(encode_basestring(text)) - 2 - len(text)  # each escape adds ASCII bytes
    if escaped > limit:
        raise TooLarge("too_large", f"event data exceeds {limit} bytes once escaped for JSON")


def _utf8(data: bytes) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("bad_encoding", "text data must be UTF-8 (send binary with another Content-Type)") from None


def single_event(body: bytes, content_type: str | None, event_type: str | None, max_event_bytes: int) -> NewEvent:
    """The event a plain ``POST /v1/streams/{stream}`` publishes."""
    etype = check_type(event_type)
    _check_size(body, max_event_bytes)
    mtype = media_type(content_type)
    if mtype == "":
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            return NewEvent(etype, body, True)
    elif is_text_type(mtype):
        _utf8(body)
    else:
        return NewEvent(etype, body, True)
    event = NewEvent(etype, body, False)
    check_encoded_size(event, max_event_bytes)
    return event


def item_event(item: Any, max_event_bytes: int, *, where: str) -> NewEvent:
    """One event from a decoded batch item or WebSocket publish (a map with ``type``/``data``)."""
    if not isinstance(item, dict):
        raise InvalidInput("bad_batch", f"{where}: expected an object with 'type' and 'data'")
    raw_type = item.get("type")
    if raw_type is not None and not isinstance(raw_type, str):
        raise InvalidInput("bad_type", f"{where}: 'type' must be a string")
    etype = check_type(raw_type)
    if "data" not in item:
        raise InvalidInput("bad_batch", f"{where}: 'data' is required")
    data = item["data"]
    encoding = item.get("encoding")
    if isinstance(data, bytes):
        event = NewEvent(etype, data, True)
    elif encoding is not None:
        if encoding != "base64" or not isinstance(data, str):
            raise InvalidInput("bad_batch", f"{where}: 'encoding' must be 'base64' with string data")
        try:
            event = NewEvent(etype, base64.b64decode(data, validate=True), True)
        except (binascii.Error, ValueError):
            raise InvalidInput("bad_batch", f"{where}: 'data' is not valid base64") from None
    elif isinstance(data, str):
        try:
            event = NewEvent(etype, data.encode("utf-8"), False)
        except UnicodeEncodeError:
            raise InvalidInput("bad_encoding", f"{where}: 'data' is not valid Unicode") from None
    else:
        event = NewEvent(etype, _COMPACT.encode(data).encode(), False)
    _check_size(event.data, max_event_bytes)
    check_encoded_size(event, max_event_bytes)
    return event


def _check_count(n: int, max_events: int) -> None:
    if n == 0:
        raise InvalidInput("bad_batch", "the batch is empty")
    if n > max_events:
        raise TooLarge("too_large", f"a batch holds at most {max_events} events")


def ndjson_events(body: bytes, max_event_bytes: int, max_events: int) -> list[NewEvent]:
    """Decode an ``application/x-ndjson`` batch (blank lines are skipped)."""
    events: list[NewEvent] = []
    for lineno, line in enumerate(body.split(b"\n"), 1):
        if not line.strip():
            continue
        if len(events) >= max_events:
            _check_count(len(events) + 1, max_events)
        try:
            item = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            raise InvalidInput("bad_batch", f"line {lineno}: not valid JSON") from None
        events.append(item_event(item, max_event_bytes, where=f"line {lineno}"))
    _check_count(len(events), max_events)
    return events


def msgpack_events(body: bytes, max_event_bytes: int, max_events: int) -> list[NewEvent]:
    """Decode an ``application/msgpack`` batch: an array of maps."""
    try:
        items = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_array_len=max_events + 1,
            max_map_len=16,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError):
        raise InvalidInput("bad_batch", "body is not a valid msgpack array of maps") from None
    if not isinstance(items, list):
        raise InvalidInput("bad_batch", "body must be a msgpack array of maps")
    _check_count(len(items), max_events)
    return [item_event(item, max_event_bytes, where=f"item {i}") for i, item in enumerate(items)]
