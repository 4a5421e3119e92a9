"""SSE encoder and reference parser (server.core.sse)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.core.sse import (
    SSEEvent,
    SSEParser,
    encode_comment,
    encode_control,
    encode_event,
    encode_retry,
)


def parse(data: bytes) -> list[SSEEvent]:
    return SSEParser().feed(data)


def parse_bytewise(data: bytes) -> tuple[list[SSEEvent], SSEParser]:
    p = SSEParser()
    out: list[SSEEvent] = []
    for i in range(len(data)):
        out.extend(p.feed(data[i : i + 1]))
    return out, p


# --- encoder -------------------------------------------------------------------------------


def test_event_with_id_and_type() -> None:
    assert encode_event("e-1", "chat", "hi") == b"id: e-1\nevent: chat\ndata: hi\n\n"


def test_message_type_is_omitted() -> None:
    assert encode_event("e-1", "message", "hi") == b"id: e-1\ndata: hi\n\n"
    assert encode_event("e-1", "", "hi") == b"id: e-1\ndata: hi\n\n"


def test_no_id() -> None:
    assert encode_event(None, "message", "hi") == b"data: hi\n\n"
    assert encode_event(None, "t", "hi") == b"event: t\ndata: hi\n\n"


def test_empty_id_is_sent_and_clears_last_event_id() -> None:
    wire = encode_event("a", "message", "1") + encode_event("", "message", "2")
    assert wire.endswith(b"id: \ndata: 2\n\n")
    assert [e.id for e in parse(wire)] == ["a", ""]


def test_empty_data_is_one_data_line_and_dispatches_empty_event() -> None:
    wire = encode_event("x", "message", "")
    assert wire == b"id: x\ndata: \n\n"
    assert parse(wire) == [SSEEvent("x", "message", "")]


@pytest.mark.parametrize(
    ("data", "lines"),
    [
        ("a\nb", [b"a", b"b"]),
        ("a\r\nb", [b"a", b"b"]),
        ("a\rb", [b"a", b"b"]),
        ("a\n\rb", [b"a", b"", b"b"]),
        ("a\r\r\nb", [b"a", b"", b"b"]),
        ("a\n", [b"a", b""]),
        ("\n", [b"", b""]),
        ("\r", [b"", b""]),
    ],
)
def test_every_line_ending_starts_a_data_line(data: str, lines: list[bytes]) -> None:
    wire = encode_event(None, "message", data)
    assert wire == b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"
    assert b"\r" not in wire


def test_lone_cr_cannot_forge_fields() -> None:
    wire = encode_event("1", "message", "x\rid: forged\revent: evil\r\rdata: second")
    events = parse(wire)
    assert events == [SSEEvent("1", "message", "x\nid: forged\nevent: evil\n\ndata: second")]


def test_nul_and_unicode_in_data() -> None:
    data = "a\x00b é 漢字 🎉 \u2028 \x85"
    wire = encode_event("1", "t", data)
    assert wire == ("id: 1\nevent: t\ndata: " + data + "\n\n").encode()
    assert parse(wire) == [SSEEvent("1", "t", data)]


def test_data_starting_with_space_or_colon_survives() -> None:
    for data in (" lead", "  two", ":colon", "data: nested"):
        assert parse(encode_event(None, "message", data))[0].data == data


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\x00b"])
def test_id_with_cr_lf_nul_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="id"):
        encode_event(bad, "message", "x")


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\x00b"])
def test_type_with_cr_lf_nul_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="type"):
        encode_event(None, bad, "x")


def test_retry() -> None:
    assert encode_retry(3000) == b"retry: 3000\n\n"
    assert encode_retry(0) == b"retry: 0\n\n"
    with pytest.raises(ValueError):
        encode_retry(-1)
    p = SSEParser()
    assert p.feed(encode_retry(1234)) == []
    assert p.retry == 1234


def test_comment() -> None:
    assert encode_comment() == b":\n\n"
    assert encode_comment("ping") == b": ping\n\n"
    assert encode_comment("a\r\nb\rc\nd") == b": a  b c d\n\n"
    p = SSEParser()
    assert p.feed(encode_comment("a\nb") + encode_comment()) == []
    assert p.comments == ["a b", ""]


def test_control_event_is_compact_json_without_id() -> None:
    wire = encode_control("sluice.reset", {"reason": "gone", "earliest": "e-2", "requested": None})
    assert wire == b'event: sluice.reset\ndata: {"reason":"gone","earliest":"e-2","requested":null}\n\n'
    p = SSEParser()
    p.feed(encode_event("keep", "message", "x"))
    assert p.feed(wire)[0].id == "keep"
    assert encode_control("sluice.end", {}) == b"event: sluice.end\ndata: {}\n\n"


def test_control_json_escapes_newlines() -> None:
    wire = encode_control("sluice.x", {"k": "a\nb\rc"})
    assert wire.count(b"\n") == 3
    assert b"\r" not in wire


# --- parser --------------------------------------------------------------------------------


def test_spec_example_multiline() -> None:
    assert parse(b"data: YHOO\ndata: +2\ndata: 10\n\n") == [SSEEvent("", "message", "YHOO\n+2\n10")]


def test_spec_example_fields_without_value() -> None:
    # From the WHATWG spec: the third block is incomplete and never dispatched.
    events = parse(b"data\n\ndata\ndata\n\ndata:")
    assert events == [SSEEvent("", "message", ""), SSEEvent("", "message", "\n")]


def test_spec_example_space_after_colon_is_optional() -> None:
    assert parse(b"data:test\n\ndata: test\n\n") == [SSEEvent("", "message", "test")] * 2
    assert parse(b"data:  two\n\n")[0].data == " two"


def test_line_endings_crlf_cr_lf_mixed() -> None:
    wire = b"id: 1\r\ndata: a\r\rid: 2\ndata: b\r\n\r\nevent: t\rdata: c\n\n"
    assert parse(wire) == [SSEEvent("1", "message", "a"), SSEEvent("2", "message", "b"), SSEEvent("2", "t", "c")]


def test_cr_at_chunk_end_then_lf_is_one_line_end() -> None:
    p = SSEParser()
    assert p.feed(b"data: a\r") == []
    assert p.feed(b"\n") == []
    assert p.feed(b"\r") == [SSEEvent("", "message", "a")]
    assert p.feed(b"\ndata: b\r\n\r\n") == [SSEEvent("", "message", "b")]


def test_bom_is_skipped_once() -> None:
    bom = "\ufeff".encode()
    assert parse(bom + b"data: x\n\n") == [SSEEvent("", "message", "x")]
    # A second BOM is part of the first line: field name "\ufeffdata" is unknown.
    assert parse(bom + bom + b"data: x\n\n") == []
    p = SSEParser()
    assert p.feed(bom[:1]) == []
    assert p.feed(bom[1:] + b"data: y\n\n") == [SSEEvent("", "message", "y")]


def test_comments_unknown_fields_and_empty_blocks() -> None:
    p = SSEParser()
    wire = b": hello\n:raw\nfoo: bar\nretry\n\nevent: x\n\ndata: after\n\n"
    assert p.feed(wire) == [SSEEvent("", "message", "after")]
    assert p.comments == ["hello", "raw"]


def test_event_type_resets_after_dispatch() -> None:
    assert parse(b"event: a\ndata: 1\n\ndata: 2\n\n") == [SSEEvent("", "a", "1"), SSEEvent("", "message", "2")]


def test_id_persists_and_id_with_nul_is_ignored() -> None:
    events = parse(b"id: 7\ndata: a\n\ndata: b\n\nid: x\x00y\ndata: c\n\nid\ndata: d\n\n")
    assert [e.id for e in events] == ["7", "7", "7", ""]


def test_retry_validation() -> None:
    p = SSEParser()
    assert p.feed(b"retry: 10\ndata: a\n\n") == [SSEEvent("", "message", "a", 10)]
    p.feed(b"retry: -5\n\nretry: 1e3\n\nretry: \xc2\xb2\n\nretry:\n\nretry: 20\n\n")
    assert p.retry == 20
    assert p.retries == [10, 20]
    assert p.feed(b"data: b\n\n") == [SSEEvent("", "message", "b", None)]


def test_partial_event_is_pending_not_dispatched() -> None:
    p = SSEParser()
    assert not p.pending
    assert p.feed(b"data: a\n") == []
    assert p.pending
    assert p.feed(b"\n") == [SSEEvent("", "message", "a")]
    assert not p.pending
    p.feed(b"dat")
    assert p.pending
    p2 = SSEParser()
    p2.feed("é".encode()[:1])
    assert p2.pending


def test_invalid_utf8_is_replaced() -> None:
    assert parse(b"data: a\xffb\n\n") == [SSEEvent("", "message", "a\ufffdb")]


def test_bytewise_feeding_matches_whole() -> None:
    wire = (
        "\ufeff".encode()
        + encode_retry(5)
        + encode_event("1", "t", "a\r\nb\rc é")
        + encode_comment("hb")
        + b"data: x\r\n\r\n"
    )
    events, p = parse_bytewise(wire)
    assert events == parse(wire)
    assert events == [SSEEvent("1", "t", "a\nb\nc é", None), SSEEvent("1", "message", "x")]
    assert p.retry == 5
    assert p.comments == ["hb"]


# --- property ------------------------------------------------------------------------------

_data_text = st.text(alphabet=st.one_of(st.sampled_from("\r\n\x00 :a"), st.characters(codec="utf-8")))
_field_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n\x00"))


def _normalise(data: str) -> str:
    return data.replace("\r\n", "\n").replace("\r", "\n")


@given(
    events=st.lists(
        st.tuples(st.one_of(st.none(), _field_text), _field_text, _data_text),
        min_size=1,
        max_size=5,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
)
def test_encode_parse_roundtrip(events: list[tuple[str | None, str, str]], cuts: list[int]) -> None:
    wire = b"".join(encode_event(i, t, d) for i, t, d in events)
    points = sorted({c % (len(wire) + 1) for c in cuts})
    p = SSEParser()
    got: list[SSEEvent] = []
    prev = 0
    for c in [*points, len(wire)]:
        got.extend(p.feed(wire[prev:c]))
        prev = c
    assert not p.pending
    expected = []
    last_id = ""
    for i, t, d in events:
        if i is not None:
            last_id = i
        expected.append(SSEEvent(last_id, t or "message", _normalise(d)))
    assert got == expected
