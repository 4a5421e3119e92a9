"""CORS policy, per-event gzip and bounded permessage-deflate: pure units, no sockets."""

from __future__ import annotations

import gc
import tracemalloc

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from server.edge.compress import accepts_gzip
from server.edge.cors import CorsConfig, CorsPolicy
from server.edge.deflate import BoundedPerMessageDeflate

MiB = 1024 * 1024

# --------------------------------------------------------------------------- CORS


def _h(headers: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    return dict(headers)


def test_exact_origins_case_insensitive_host_exact_port() -> None:
    p = CorsPolicy(CorsConfig(allow_origins=("https://App.Example.com", "http://localhost:8080")))
    assert p.origin_allowed(b"https://app.example.com")
    assert p.origin_allowed(b"HTTPS://APP.EXAMPLE.COM")
    assert p.origin_allowed(b"https://app.example.com:443")  # default port is no port
    assert not p.origin_allowed(b"https://app.example.com:8443")
    assert not p.origin_allowed(b"http://app.example.com")
    assert p.origin_allowed(b"http://localhost:8080")
    assert not p.origin_allowed(b"http://localhost:8081")
    assert not p.origin_allowed(b"http://localhost")
    assert not p.origin_allowed(b"https://app.example.com.evil.com")
    assert not p.origin_allowed(b"https://app.example.com/")
    assert not p.origin_allowed(b"\xff\xfe")
    assert not p.origin_allowed(None)


def test_subdomain_wildcard_is_one_label() -> None:
    p = CorsPolicy(CorsConfig(allow_origins=("https://*.example.com",)))
    assert p.origin_allowed(b"https://a.example.com")
    assert p.origin_allowed(b"https://B-2.Example.com")
    assert not p.origin_allowed(b"https://example.com")
    assert not p.origin_allowed(b"https://a.b.example.com")
    assert not p.origin_allowed(b"https://aexample.com")
    assert not p.origin_allowed(b"http://a.example.com")
    assert not p.origin_allowed(b"https://a.example.com:8443")


def test_null_only_when_listed() -> None:
    assert not CorsPolicy(CorsConfig(allow_origins=("*",))).origin_allowed(b"null")
    p = CorsPolicy(CorsConfig(allow_origins=("null",)))
    assert p.origin_allowed(b"null")
    assert _h(p.response_headers(b"null"))[b"access-control-allow-origin"] == b"null"


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="credentials"):
        CorsConfig(allow_origins=("*",), allow_credentials=True)
    for bad in ("app.example.com", "https://*.*.example.com", "https://a.com/path", "https://a.com:99999"):
        with pytest.raises(ValueError):
            CorsConfig(allow_origins=(bad,))
    with pytest.raises(ValueError):
        CorsConfig(ws_allowed_origins=("ftp//x",))
    with pytest.raises(ValueError):
        CorsConfig(allow_headers=("bad header",))


def test_response_headers_echo_with_credentials() -> None:
    p = CorsPolicy(CorsConfig(allow_origins=("https://app.example.com",), allow_credentials=True))
    h = p.response_headers(b"https://app.example.com")
    assert h == [
        (b"access-control-allow-origin", b"https://app.example.com"),
        (b"vary", b"Origin"),
        (b"access-control-allow-credentials", b"true"),
        (b"access-control-expose-headers", b"sluice-binary, retry-after"),
    ]
    assert p.response_headers(b"https://other.example.com") == []
    assert p.response_headers(None) == []


def test_response_headers_star_without_credentials() -> None:
    p = CorsPolicy(CorsConfig(allow_origins=("*",), expose_headers=()))
    assert p.response_headers(b"https://anything.test") == [(b"access-control-allow-origin", b"*")]


def test_preflight() -> None:
    p = CorsPolicy(CorsConfig(allow_origins=("https://app.example.com",), max_age=120))
    status, headers = p.preflight(b"https://app.example.com", b"POST", b"Content-Type, Idempotency-Key")
    assert status == 204
    h = _h(headers)
    assert h[b"access-control-allow-origin"] == b"https://app.example.com"
    assert h[b"vary"] == b"Origin"
    assert h[b"access-control-allow-methods"] == b"GET, HEAD, POST, DELETE"
    assert b"last-event-id" in h[b"access-control-allow-headers"]
    assert h[b"access-control-max-age"] == b"120"
    assert b"access-control-allow-credentials" not in h
    assert p.preflight(b"https://app.example.com", b"GET", None)[0] == 204
    assert p.preflight(b"https://app.example.com", b"PUT", None) == (403, [])
    assert p.preflight(b"https://app.example.com", b"POST", b"x-custom") == (403, [])
    assert p.preflight(b"https://evil.example.com", b"GET", None) == (403, [])
    assert p.preflight(None, b"GET", None) == (403, [])
    assert p.preflight(b"https://app.example.com", None, None) == (403, [])


def test_websocket_origin() -> None:
    inherit = CorsPolicy(CorsConfig(allow_origins=("https://app.example.com",)))
    assert inherit.websocket_origin_ok(None)
    assert inherit.websocket_origin_ok(b"https://app.example.com")
    assert not inherit.websocket_origin_ok(b"https://evil.example.com")
    separate = CorsPolicy(CorsConfig(allow_origins=("*",), ws_allowed_origins=("https://*.example.com",)))
    assert separate.websocket_origin_ok(b"https://chat.example.com")
    assert not separate.websocket_origin_ok(b"https://evil.test")
    none = CorsPolicy(CorsConfig(allow_origins=("https://app.example.com",), ws_allowed_origins=()))
    assert not none.websocket_origin_ok(b"https://app.example.com")
    assert none.websocket_origin_ok(None)


# --------------------------------------------------------------------------- gzip


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"gzip, deflate, br", True),
        (b"GZIP", True),
        (b"br;q=1.0, gzip;q=0.8", True),
        (b"gzip;q=0", False),
        (b"gzip;q=0.000, *", False),
        (b"*", True),
        (b"*;q=0", False),
        (b"x-gzip", True),
        (b"deflate, br", False),
        (b"identity", False),
        (b"", False),
        (None, False),
        (b"gzip;q=abc", False),
        (b"gzip ; Q=0.5", True),
    ],
)
def test_accepts_gzip(value: bytes | None, expected: bool) -> None:
    assert accepts_gzip(value) is expected


# --------------------------------------------------------------------------- permessage-deflate


def _pair(server_ext: PerMessageDeflate, client_ext: PerMessageDeflate) -> tuple[WSConnection, WSConnection, str]:
    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="sluice.test", target="/v1/ws", extensions=[client_ext])))
    request = next(server.events())
    assert isinstance(request, Request)
    client.receive_data(server.send(AcceptConnection(extensions=[server_ext])))
    accepted = next(client.events())
    assert isinstance(accepted, AcceptConnection)
    assert client_ext.enabled() and server_ext.enabled()
    return client, server, repr(server_ext)


def _messages(events: list[Event]) -> list[bytes | str]:
    out: list[bytes | str] = []
    buf: list[Message] = []  # type: ignore[type-arg]
    for event in events:
        assert isinstance(event, Message)
        buf.append(event)
        if event.message_finished:
            parts = [e.data for e in buf]
            out.append("".join(parts) if isinstance(event, TextMessage) else b"".join(parts))
            buf = []
    return out


def test_round_trip_both_directions() -> None:
    client, server, _ = _pair(BoundedPerMessageDeflate(max_message_bytes=MiB), PerMessageDeflate())
    sent: list[bytes | str] = ['{"op": "ping"}', b"\x00" * 500_000, "é" * 1000, b""]
    for m in sent:
        wire = client.send(TextMessage(data=m) if isinstance(m, str) else BytesMessage(data=m))
        assert isinstance(m, str) or len(m) < 1000 or len(wire) < len(m) // 10  # really compressed
        server.receive_data(wire)
    assert _messages(list(server.events())) == sent
    for m in sent:
        client.receive_data(server.send(TextMessage(data=m) if isinstance(m, str) else BytesMessage(data=m)))
    assert _messages(list(client.events())) == sent


def test_fragmented_message_with_ping_between_fragments() -> None:
    client, server, _ = _pair(BoundedPerMessageDeflate(max_message_bytes=MiB), PerMessageDeflate())
    wire = client.send(Ping(payload=b"before"))  # a control frame must not disturb the next message
    wire += client.send(BytesMessage(data=b"a" * 1000, message_finished=False))
    wire += client.send(Ping(payload=b"p"))
    wire += client.send(BytesMessage(data=b"b" * 1000, message_finished=True))
    server.receive_data(wire)
    events = list(server.events())
    assert sum(isinstance(e, Ping) for e in events) == 2
    assert _messages([e for e in events if not isinstance(e, (Ping, Pong))]) == [b"a" * 1000 + b"b" * 1000]


def test_window_bits_negotiation() -> None:
    ext = BoundedPerMessageDeflate(server_max_window_bits=10, client_max_window_bits=11)
    assert ext.accept("permessage-deflate; client_max_window_bits") == (
        "client_max_window_bits=11; server_max_window_bits=10"
    )
    ext = BoundedPerMessageDeflate(server_max_window_bits=12)
    assert ext.accept("permessage-deflate; server_max_window_bits=9") == "server_max_window_bits=9"
    assert ext.client_max_window_bits == 15  # not offered: the client may use 15, so inflate with 15
    ext = BoundedPerMessageDeflate(server_max_window_bits=15)
    assert ext.accept("permessage-deflate") == ""
    assert BoundedPerMessageDeflate().accept("permessage-deflate; client_max_window_bits=7") is None
    # A real client honours the negotiated limits and messages still round trip.
    client_ext = PerMessageDeflate(client_max_window_bits=15)
    client, server, _ = _pair(BoundedPerMessageDeflate(server_max_window_bits=9, client_max_window_bits=10), client_ext)
    assert client_ext.server_max_window_bits == 9 and client_ext.client_max_window_bits == 10
    data = bytes(range(256)) * 400
    server.receive_data(client.send(BytesMessage(data=data)))
    client.receive_data(server.send(BytesMessage(data=data)))
    assert _messages(list(server.events())) == [data]
    assert _messages(list(client.events())) == [data]


def _assert_closed_1009(client: WSConnection, server: WSConnection, wire: bytes, cap: int) -> None:
    gc.collect()
    tracemalloc.start()
    try:
        server.receive_data(wire)
        events = list(server.events())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    closes = [e for e in events if isinstance(e, CloseConnection)]
    assert [c.code for c in closes] == [1009]
    assert sum(len(e.data) for e in events if isinstance(e, Message)) <= cap
    assert peak < cap + 4 * MiB, peak
    client.receive_data(server.send(CloseConnection(code=closes[0].code)))
    assert [e.code for e in client.events() if isinstance(e, CloseConnection)] == [1009]


def test_deflate_bomb_single_frame_closes_1009() -> None:
    cap = MiB
    client, server, _ = _pair(BoundedPerMessageDeflate(max_message_bytes=cap), PerMessageDeflate())
    wire = client.send(BytesMessage(data=bytes(64 * MiB)))
    assert len(wire) < 128 * 1024
    _assert_closed_1009(client, server, wire, cap)


def test_deflate_bomb_fragmented_closes_1009() -> None:
    cap = MiB
    client, server, _ = _pair(BoundedPerMessageDeflate(max_message_bytes=cap), PerMessageDeflate())
    zeros = bytes(MiB)
    wire = b"".join(client.send(BytesMessage(data=zeros, message_finished=i == 63)) for i in range(64))
    del zeros
    assert len(wire) < 128 * 1024
    _assert_closed_1009(client, server, wire, cap)


def test_text_bomb_fed_in_small_pieces_closes_1009() -> None:
    cap = 256 * 1024
    client, server, _ = _pair(BoundedPerMessageDeflate(max_message_bytes=cap), PerMessageDeflate())
    wire = client.send(TextMessage(data=" " * (16 * MiB)))
    gc.collect()
    tracemalloc.start()
    try:
        events: list[Event] = []
        for i in range(0, len(wire), 1000):
            server.receive_data(wire[i : i + 1000])
            events.extend(server.events())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [e.code for e in events if isinstance(e, CloseConnection)] == [1009]
    assert peak < cap + 4 * MiB, peak


def test_message_at_cap_passes_one_more_byte_fails() -> None:
    cap = 300_000
    client, server, _ = _pair(BoundedPerMessageDeflate(max_message_bytes=cap), PerMessageDeflate())
    server.receive_data(client.send(BytesMessage(data=b"x" * (cap - 1))))
    server.receive_data(client.send(BytesMessage(data=b"y" * cap)))
    assert _messages(list(server.events())) == [b"x" * (cap - 1), b"y" * cap]
    server.receive_data(client.send(BytesMessage(data=b"z" * (cap + 1))))
    assert [e.code for e in server.events() if isinstance(e, CloseConnection)] == [1009]


def test_uncompressed_message_counts_and_corrupt_data_closes_1007() -> None:
    cap = 1000
    client, server, _ = _pair(BoundedPerMessageDeflate(max_message_bytes=cap), PerMessageDeflate())
    server.receive_data(client.send(Ping(payload=b"x" * 100)))
    assert [type(e) for e in server.events()] == [Ping]
    # An uncompressed (RSV1 clear) data frame on the negotiated connection counts too.
    plain = bytes([0x82, 0x80 | 126]) + (cap + 1).to_bytes(2, "big") + bytes(4) + b"u" * (cap + 1)
    server.receive_data(plain)
    assert [e.code for e in server.events() if isinstance(e, CloseConnection)] == [1009]
    client, server, _ = _pair(BoundedPerMessageDeflate(max_message_bytes=cap), PerMessageDeflate())
    server.receive_data(bytes([0x82, 0x80 | 10]) + bytes(4) + b"u" * 10)
    assert _messages(list(server.events())) == [b"u" * 10]
    # A compressed frame whose payload is not deflate data.
    bad = bytes([0xC2, 0x80 | 4]) + b"\x00\x00\x00\x00" + b"\xff\xff\xff\xff"
    server.receive_data(bad)
    assert [e.code for e in server.events() if isinstance(e, CloseConnection)] == [1007]
