"""Encode-once wire forms (server.core.encoding), checked with real decoders."""

from __future__ import annotations

import base64
import json
from typing import Any

import msgpack
import pytest
from wsproto.frame_protocol import FrameProtocol, Opcode

from server.core.encoding import (
    EncodedEvent,
    WireFormat,
    sse_end,
    sse_reset,
    ws_end,
    ws_frame,
    ws_message,
    ws_reset,
)
from server.core.events import Event
from server.core.frame import Frame
from server.core.replay import Reset
from server.core.sse import SSEEvent, SSEParser

EPOCH = "0123456789"


def ws_decode(wire: bytes) -> tuple[Opcode, bytes | str]:
    """Decode exactly one complete message with wsproto's client-side frame decoder."""
    fp = FrameProtocol(client=True, extensions=[])
    fp.receive_bytes(wire)
    frames = list(fp.received_frames())
    assert frames, "no frame decoded"
    assert frames[-1].message_finished
    opcode = frames[0].opcode
    if opcode is Opcode.TEXT:
        return opcode, "".join(str(f.payload) for f in frames)
    return opcode, b"".join(bytes(f.payload) for f in frames)  # type: ignore[arg-type]


def ws_json(frame: Frame) -> Any:
    opcode, payload = ws_decode(frame.raw)
    assert opcode is Opcode.TEXT
    assert isinstance(payload, str)
    return json.loads(payload)


def ws_msgpack(frame: Frame) -> Any:
    opcode, payload = ws_decode(frame.raw)
    assert opcode is Opcode.BINARY
    assert isinstance(payload, bytes)
    return msgpack.unpackb(payload, raw=False)


def sse(frame: Frame) -> list[SSEEvent]:
    p = SSEParser()
    events = p.feed(frame.raw)
    assert not p.pending
    return events


def ev(data: bytes, *, type_: str = "message", binary: bool = False, seq: int = 7) -> Event:
    return Event("chat:1", EPOCH, seq, type_, data, binary)


# --- ws_frame ------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "header_len"), [(0, 2), (1, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)])
@pytest.mark.parametrize("text", [True, False])
def test_ws_frame_lengths_decode_with_wsproto(size: int, header_len: int, text: bool) -> None:
    payload = bytes(ord("a") + i % 26 for i in range(size))
    wire = ws_frame(payload, text=text)
    assert len(wire) == header_len + size
    assert wire[0] == (0x81 if text else 0x82)
    assert not wire[1] & 0x80  # unmasked
    opcode, got = ws_decode(wire)
    assert opcode is (Opcode.TEXT if text else Opcode.BINARY)
    assert got == (payload.decode() if text else payload)


def test_ws_frame_multibyte_text() -> None:
    text = "é漢🎉" * 30_000
    assert ws_decode(ws_frame(text.encode(), text=True)) == (Opcode.TEXT, text)


# --- EncodedEvent --------------------------------------------------------------------------


def test_text_event_all_formats() -> None:
    data = "line one\nzwei é\r\n漢字 🎉"
    enc = EncodedEvent(ev(data.encode(), type_="token"))
    eid = format(7, "016x")
    wire_id = f"{EPOCH}-{eid}"
    assert sse(enc.sse) == [SSEEvent(wire_id, "token", "line one\nzwei é\n漢字 🎉")]
    assert enc.sse.raw.startswith(f"id: {wire_id}\nevent: token\ndata: line one\n".encode())
    assert ws_json(enc.ws_json) == {"op": "event", "stream": "chat:1", "id": wire_id, "type": "token", "data": data}
    assert "漢".encode() in enc.ws_json.raw  # not \u-escaped
    assert b" " not in enc.ws_json.raw.split(b"{", 1)[1].split(b'"data"')[0]  # compact separators
    assert ws_msgpack(enc.ws_msgpack) == {
        "op": "event",
        "stream": "chat:1",
        "id": wire_id,
        "type": "token",
        "data": data.encode(),
    }
    assert enc.poll == {"id": wire_id, "type": "token", "data": data}
    assert json.loads(enc.poll_json) == enc.poll


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("data", [b"", b"plain", 'q"uote\\back\n\t\x00\x1f\u2028 é 🎉'.encode(), b"\xff\xfe"])
def test_json_forms_match_the_stdlib_encoding(data: bytes, binary: bool) -> None:
    enc = EncodedEvent(ev(data, type_="a.b:c-d_e", binary=binary))
    compact = {"separators": (",", ":"), "ensure_ascii": False}
    expected = {"op": "event", "stream": "chat:1", "id": enc.event.id, "type": "a.b:c-d_e", "data": enc.data_text}
    if binary:
        expected["encoding"] = "base64"
    _, payload = ws_decode(enc.ws_json.raw)
    assert payload == json.dumps(expected, **compact)  # type: ignore[arg-type]
    assert enc.poll_json == json.dumps(enc.poll, **compact).encode()  # type: ignore[arg-type]


def test_message_type_has_no_event_line() -> None:
    enc = EncodedEvent(ev(b"hi"))
    assert b"event:" not in enc.sse.raw
    assert sse(enc.sse)[0].event == "message"
    assert ws_json(enc.ws_json)["type"] == "message"


def test_binary_event_all_formats() -> None:
    data = bytes(range(256)) + b"\r\n\x00" * 40
    b64 = base64.b64encode(data).decode()
    enc = EncodedEvent(ev(data, type_="blob", binary=True))
    (parsed,) = sse(enc.sse)
    assert base64.b64decode(parsed.data, validate=True) == data
    assert parsed.data == b64
    assert enc.sse.raw.count(b"data:") == 1
    obj = ws_json(enc.ws_json)
    assert obj["encoding"] == "base64"
    assert base64.b64decode(obj["data"], validate=True) == data
    packed = ws_msgpack(enc.ws_msgpack)
    assert packed["data"] == data
    assert "encoding" not in packed
    assert enc.poll == {"id": obj["id"], "type": "blob", "data": b64, "encoding": "base64"}


def test_msgpack_data_is_bin_type_even_for_text() -> None:
    enc = EncodedEvent(ev(b"plain"))
    _, payload = ws_decode(enc.ws_msgpack.raw)
    assert isinstance(payload, bytes)
    assert msgpack.unpackb(payload, raw=True)[b"data"] == b"plain"
    assert b"\xc4\x05plain" in payload  # bin 8, length 5


def test_empty_data() -> None:
    enc = EncodedEvent(ev(b""))
    assert sse(enc.sse)[0].data == ""
    assert ws_json(enc.ws_json)["data"] == ""
    assert ws_msgpack(enc.ws_msgpack)["data"] == b""


def test_invalid_utf8_text_is_replaced_in_text_formats() -> None:
    enc = EncodedEvent(ev(b"a\xffb"))
    assert sse(enc.sse)[0].data == "a\ufffdb"
    assert ws_json(enc.ws_json)["data"] == "a\ufffdb"
    assert ws_msgpack(enc.ws_msgpack)["data"] == b"a\xffb"


def test_large_event_uses_64bit_length() -> None:
    enc = EncodedEvent(ev(b"x" * 70_000))
    assert enc.ws_msgpack.raw[1] == 127
    assert ws_msgpack(enc.ws_msgpack)["data"] == b"x" * 70_000


def test_forms_are_built_lazily_once() -> None:
    enc = EncodedEvent(ev(b"hello"))
    assert enc._sse is None and enc._ws_json is None and enc._ws_msgpack is None and enc._poll is None
    first = enc.sse
    assert enc._ws_json is None and enc._ws_msgpack is None
    assert enc.sse is first
    assert enc.ws_json is enc.ws_json
    assert enc.ws_msgpack is enc.ws_msgpack
    assert enc.poll is enc.poll
    assert enc.poll_json is enc.poll_json
    assert enc.ws("json") is enc.ws_json
    assert enc.ws("msgpack") is enc.ws_msgpack
    assert enc.sse.chunked is enc.sse.chunked
    assert enc.sse.chunked == b"%x\r\n%b\r\n" % (len(first.raw), first.raw)


def test_encoded_event_has_no_dict() -> None:
    enc = EncodedEvent(ev(b"x"))
    assert not hasattr(enc, "__dict__")
    assert enc.event.data == b"x"


# --- control messages ----------------------------------------------------------------------

RESET = Reset("gone", f"{EPOCH}-{5:016x}", f"{EPOCH}-{1:016x}")


def test_sse_reset_and_end() -> None:
    p = SSEParser()
    p.feed(b"id: keep\ndata: x\n\n")
    assert p.feed(sse_reset(RESET).raw) == [
        SSEEvent("keep", "sluice.reset", json.dumps(RESET.as_dict(), separators=(",", ":")))
    ]
    assert json.loads(sse(sse_reset(RESET))[0].data) == RESET.as_dict()
    assert sse(sse_end()) == [SSEEvent("", "sluice.end", "{}")]
    assert sse_end() is sse_end()


@pytest.mark.parametrize("decode", [ws_json, ws_msgpack])
def test_ws_reset_and_end(decode: Any) -> None:
    fmt: WireFormat = "json" if decode is ws_json else "msgpack"
    assert decode(ws_reset("chat:1", RESET, fmt)) == {
        "op": "reset",
        "stream": "chat:1",
        "reason": "gone",
        "earliest": RESET.earliest,
        "requested": RESET.requested,
    }
    assert decode(ws_reset("s", Reset("epoch", None, None), fmt))["earliest"] is None
    assert decode(ws_end("chat:1", fmt)) == {"op": "end", "stream": "chat:1"}


@pytest.mark.parametrize("decode", [ws_json, ws_msgpack])
def test_ws_message_is_generic(decode: Any) -> None:
    fmt: WireFormat = "json" if decode is ws_json else "msgpack"
    for obj in (
        {"op": "published", "ref": "r1", "id": "x"},
        {"op": "error", "ref": None, "code": "bad_stream", "message": "nein é"},
        {"op": "pong"},
    ):
        assert decode(ws_message(obj, fmt)) == obj


def test_ws_message_errors() -> None:
    with pytest.raises(TypeError):
        ws_message({"data": b"raw"}, "json")
    with pytest.raises(ValueError, match="format"):
        ws_message({"op": "pong"}, "xml")  # type: ignore[arg-type]
