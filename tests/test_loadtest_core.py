"""The harness's pure parts: payloads, transcript checks, HTTP/SSE decoding, schedules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest import hist, payload
from loadtest.cli import actions, endpoint_of, parser
from loadtest.clients.common import Endpoint
from loadtest.clients.sse_h1 import harness_events
from loadtest.publisher import llm_entries, rate_entries
from loadtest.spec import RunSpec
from loadtest.sysinfo import source_address
from loadtest.track import Track, Verdict
from loadtest.wire import ChunkedDecoder, ProtocolError, SSEDecoder, parse_head


def test_payload_round_trip_and_padding() -> None:
    data = payload.encode(42, 123456789, size=64)
    assert len(data) == 64
    assert payload.decode(data) == (42, 123456789)
    assert payload.decode(data.decode()) == (42, 123456789)
    with pytest.raises(ValueError):
        payload.decode(b"hello world")


def test_track_counts_loss_duplicates_and_disorder() -> None:
    t = Track("s")
    for seq in (0, 1, 3, 2, 3, 5):
        t.on_event(seq)
    assert t.received == 5
    assert t.dups == 1
    assert t.disorder == 1  # 2 after 3
    assert t.lost(6) == 1  # 4
    assert not t.complete(6)
    assert t.complete(4)
    v = Verdict()
    v.add(t, 6)
    assert (v.lost, v.duplicated, v.disorder, v.incomplete) == (1, 1, 1, 1)
    assert not v.clean
    assert "first [4]" in v.samples[0]
    clean = Track("c")
    for seq in range(3):
        clean.on_event(seq)
    w = Verdict()
    w.add(clean, 3)
    assert w.clean
    w.merge(v)
    assert (w.tracks, w.lost, w.expected) == (2, 1, 9)


def test_track_with_nothing_received_lost_everything() -> None:
    assert Track("s").lost(7) == 7


def test_parse_head() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nX: a\r\nX: b\r\n\r\nrest"
    )
    head, used = parse_head(raw)  # type: ignore[misc]
    assert head.status == 200 and head.chunked and head.headers["x"] == "a, b"
    assert raw[used:] == b"rest"
    assert parse_head(b"HTTP/1.1 200 OK\r\n") is None
    with pytest.raises(ProtocolError):
        parse_head(b"garbage\r\n\r\n")


def chunked(body: bytes, sizes: list[int]) -> bytes:
    out = b""
    pos = 0
    for n in sizes:
        piece = body[pos : pos + n]
        pos += n
        if piece:
            out += b"%x\r\n%s\r\n" % (len(piece), piece)
    if pos < len(body):
        out += b"%x;ext=1\r\n%s\r\n" % (len(body) - pos, body[pos:])
    return out + b"0\r\n\r\n"


SSE = (
    b"retry: 1500\n\n: heartbeat\n\nid: 1-a\ndata: one\n\nid: 1-b\nevent: token\ndata: two\ndata: lines\n\n"
    b"event: sluice.end\ndata: {}\n\n"
)


@given(st.lists(st.integers(1, 40), max_size=10), st.lists(st.integers(1, 60), max_size=20))
def test_chunked_and_sse_decode_whatever_the_splits(sizes: list[int], cuts: list[int]) -> None:
    wire = chunked(SSE, sizes)
    dec = ChunkedDecoder()
    sse = SSEDecoder()
    events = []
    pos = 0
    for n in [*cuts, len(wire)]:
        events += sse.feed(dec.feed(wire[pos : pos + n]))
        pos += n
    assert dec.done
    assert events == [("1-a", "message", b"one"), ("1-b", "token", b"two\nlines"), (None, "sluice.end", b"{}")]
    assert sse.retry == 1500 and sse.comments == 1 and sse.last_id == "1-b"


def test_sse_crlf_and_bad_chunk_size() -> None:
    assert SSEDecoder().feed(b"id: 7\r\ndata: x\r\n\r\n") == [("7", "message", b"x")]
    with pytest.raises(ProtocolError):
        ChunkedDecoder().feed(b"zz\r\n")


def test_schedules() -> None:
    entries = rate_entries(3, rate=10, duration=1)
    assert len(entries) == 10 and [s for _, s in entries[:4]] == [0, 1, 2, 0]
    assert entries[-1][0] == pytest.approx(0.9)
    llm = llm_entries(2, tokens=3, rate=10, stagger=1)
    closes = [(t, s) for t, s in llm if s < 0]
    assert sorted(s for _, s in closes) == [-2, -1]
    assert len(llm) == 8 and llm == sorted(llm)
    # a stream's close comes after its last token
    assert max(t for t, s in llm if s == 1) < next(t for t, s in llm if s == -2)


def test_source_addresses_stay_in_loopback() -> None:
    assert source_address(0) == "127.0.0.2"
    assert source_address(8_000) == "127.0.0.3"
    assert source_address(8_000 * 300) == "127.0.1.46"


def test_cli_refuses_non_loopback_and_spreads_actions() -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.0/8"):
        endpoint_of("http://10.0.0.1:80", "sluice")
    assert endpoint_of("http://127.0.0.9:8080", "nchan").port == 8080
    args = parser().parse_args(
        [
            "run",
            "deploy",
            "--url",
            "http://127.0.0.1:1",
            "--duration",
            "30",
            "--restarts",
            "2",
            "--kills",
            "1",
            "--storm-at",
            "5",
        ]
    )
    acts = actions(args)
    assert [a.kind for a in acts] == ["storm", "restart", "kill", "restart"]
    assert [a.at for a in acts] == [5, 7.5, 15, 22.5]


@given(st.lists(st.integers(-5_000, 4_000_000_000_000), max_size=300))
def test_histogram_from_ns_equals_recording_every_sample(samples: list[int]) -> None:
    one_by_one = hist.new()
    for v in samples:
        one_by_one.record_value(max(hist.LOWEST_US, min(hist.HIGHEST_US, v // 1000)))
    folded = hist.from_ns(samples)
    assert folded.get_total_count() == one_by_one.get_total_count()
    if samples:
        assert folded.get_max_value() == one_by_one.get_max_value()
        assert folded.get_min_value() == one_by_one.get_min_value()
    for pct in (1.0, 50.0, 90.0, 99.0, 99.9, 100.0):
        assert folded.get_value_at_percentile(pct) == one_by_one.get_value_at_percentile(pct)
    assert hist.summary(folded) == hist.summary(one_by_one)


def test_histogram_encoding_round_trip() -> None:
    h = hist.from_ns([1_000_000] * 99 + [50_000_000])
    total = hist.new()
    hist.add(total, hist.encode(h))
    hist.add(total, "")
    s = hist.summary(total)
    assert s["count"] == 100
    assert s["p50"] == pytest.approx(1.0, rel=0.01)
    assert s["max"] == pytest.approx(50.0, rel=0.01)


def test_a_token_goes_on_every_subscribe_request() -> None:
    from loadtest.clients import longpoll, sse_h1, sse_h2
    from loadtest.clients.common import Endpoint, Load

    track = Track("s")
    plain, signed = Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 1, token="t.k.n")
    for module in (sse_h1, longpoll):
        assert b"authorization" not in module.request(Load(plain), track).lower()
        head = module.request(Load(signed), track)
        assert b"\r\nauthorization: Bearer t.k.n\r\n" in head
        assert head.endswith(b"\r\n\r\n") and head.count(b"\r\n\r\n") == 1
    assert ("authorization", "Bearer t.k.n") in sse_h2.request_headers(signed, track)
    assert not any(name == "authorization" for name, _ in sse_h2.request_headers(plain, track))


def test_whole_chunks_take_the_fast_paths_and_agree_with_the_general_ones() -> None:
    # One server write = one whole chunk: decoded without the general loop, same result.
    pieces = [
        b"id: 1-a\ndata: one\n\n",
        b"id: 1-b\nevent: token\ndata: two\n\n",
        b"id:  1-c\ndata: x\ndata: y\n\n",
        b"id: 1-d\ndata: three\n\nid: 1-e\ndata: four\n\n",
    ]
    dec, sse = ChunkedDecoder(), SSEDecoder()
    events = []
    for piece in pieces:
        body = dec.feed(b"%x\r\n%s\r\n" % (len(piece), piece))
        assert body == piece
        events += sse.feed(body)
    assert events == [
        ("1-a", "message", b"one"),
        ("1-b", "token", b"two"),
        ("1-c", "message", b"x\ny"),
        ("1-d", "message", b"three"),
        ("1-e", "message", b"four"),
    ]
    assert sse.last_id == "1-e"
    # A size that does not match what follows is left to the general path: buffered until whole.
    dec = ChunkedDecoder()
    assert dec.feed(b"5\r\nab") == b"ab"
    assert dec.feed(b"cde\r\n") == b"cde"
    assert dec.feed(b"0\r\n\r\n") == b"" and dec.done
    with pytest.raises(ProtocolError):
        ChunkedDecoder().feed(b"zz\r\nab\r\n")


_BLOCKS = st.one_of(
    st.builds(
        lambda i, seq, t, pad: b"id: e-%d\ndata: %d %d%s\n\n" % (i, seq, t, b"." * pad),
        st.integers(0, 10**6),
        st.integers(0, 10**6),
        st.integers(0, 10**18),
        st.integers(0, 4),
    ),
    st.sampled_from(
        [
            b"id: e-1\nevent: token\ndata: 1 2\n\n",
            b": heartbeat\n\n",
            b"retry: 1500\n\n",
            b"id: e-2\ndata: not harness\n\n",
            b"id: e-3\ndata: 1 2\ndata: 3\n\n",
            b"data: 4 5\n\n",
            b"event: sluice.end\ndata: {}\n\n",
            b"id:  e-4\ndata: 6 7\n\n",
            b"id: e-5\r\ndata: 8 9\r\n\r\n",
            b"id: e-6\n\n",
            b"xid: e-7\ndata: 1 2\n\n",
        ]
    ),
)


@given(st.lists(_BLOCKS, max_size=8))
@settings(max_examples=500)
def test_the_harness_event_scan_agrees_with_the_general_decoder(blocks: list[bytes]) -> None:
    body = b"".join(blocks)
    found = harness_events(body)
    general = SSEDecoder().feed(body)
    if found is None:
        return  # left to the general decoder
    assert found  # an empty body is never claimed
    assert [(i.decode(), int(s), int(t)) for i, s, t in found] == [
        (event_id, *payload.decode(data)) for event_id, etype, data in general if etype == "message"
    ]
    assert len(general) == len(found)  # nothing else was in the body
    everything_plain = all(b.startswith(b"id: e-") and b.count(b"\n") == 3 and b"data: " in b for b in blocks)
    assert everything_plain


def test_the_harness_event_scan_takes_a_typical_write() -> None:
    body = b"id: ab-1\ndata: 0 123...\n\nid: ab-2\ndata: 1 456\n\n"
    assert harness_events(body) == [(b"ab-1", b"0", b"123"), (b"ab-2", b"1", b"456")]
    assert harness_events(body + b": hb\n\n") is None
    for other in (
        b"xid: e-7\ndata: 1 2\n\n",
        b"id:  e-4\ndata: 6 7\n\n",
        b"id: e-3\ndata: 1 2\ndata: 3\n\n",
        b"id: e-2\ndata: not harness\n\n",
        b"id: e-5\r\ndata: 8 9\r\n\r\n",
    ):
        assert harness_events(body + other) is None  # a block of another shape: the general path
        assert harness_events(other + body) is None
    assert harness_events(body[:-1]) is None
    assert harness_events(b"") is None


def test_a_websocket_publisher_needs_sluice_and_a_run_without_restarts() -> None:
    sluice, nchan = Endpoint("127.0.0.1", 1, "sluice"), Endpoint("127.0.0.1", 1, "nchan")
    assert RunSpec(scenario="topics", endpoint=sluice, pub_transport="ws").pub_transport == "ws"
    for scenario, endpoint, transport in [("topics", nchan, "ws"), ("deploy", sluice, "ws"), ("topics", sluice, "h3")]:
        with pytest.raises(ValueError, match="transport"):
            RunSpec(scenario=scenario, endpoint=endpoint, pub_transport=transport)
