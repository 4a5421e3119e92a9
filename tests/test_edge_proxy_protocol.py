"""PROXY protocol v1/v2 parsing and trusted-proxy matching (no sockets)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.edge.proxy_protocol import (
    TLV_ALPN,
    TLV_AUTHORITY,
    TLV_CRC32C,
    TLV_NOOP,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeaderParser,
    ProxyProtocolError,
    ProxyResult,
    TrustedProxies,
    crc32c,
)

CLIENT_HELLO = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(32))
HTTP = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def v2(
    ver_cmd: int = 0x21, fam: int = 0x11, addresses: bytes | None = None, tlvs: bytes = b"", length: int | None = None
) -> bytes:
    if addresses is None:
        addresses = {
            0x00: b"",
            0x11: bytes([192, 0, 2, 1, 198, 51, 100, 7]) + struct.pack("!HH", 51234, 443),
            0x21: ipaddress.IPv6Address("2001:db8::1").packed
            + ipaddress.IPv6Address("2001:db8::2").packed
            + struct.pack("!HH", 1, 65535),
        }[fam]
    body = addresses + tlvs
    return V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", len(body) if length is None else length) + body


def with_crc(header_without_crc: bytes) -> bytes:
    """Append a CRC32C TLV to a v2 header, fixing the length and the checksum."""
    raw = header_without_crc + tlv(TLV_CRC32C, bytes(4))
    raw = raw[:14] + struct.pack("!H", len(raw) - 16) + raw[16:]
    return raw[:-4] + struct.pack("!I", crc32c(raw))


def parse(data: bytes, **kwargs: int) -> tuple[ProxyResult, bytes]:
    parser = ProxyHeaderParser(**kwargs)
    result = parser.feed(data)
    assert result is not None
    return result, parser.remainder


def parse_bytewise(data: bytes) -> tuple[ProxyResult | None, bytes]:
    parser = ProxyHeaderParser()
    for i in range(len(data)):
        result = parser.feed(data[i : i + 1])
        if result is not None:
            return result, parser.remainder + data[i + 1 :]
    return None, b""


def refuse(data: bytes, match: str | None = None, **kwargs: int) -> None:
    with pytest.raises(ProxyProtocolError, match=match):
        ProxyHeaderParser(**kwargs).feed(data)


# ---- v1 ---------------------------------------------------------------------------------------


def test_v1_tcp4() -> None:
    result, rest = parse(b"PROXY TCP4 192.0.2.1 198.51.100.7 51234 443\r\n" + HTTP)
    assert result == ProxyResult(1, "proxy", ("192.0.2.1", 51234), ("198.51.100.7", 443), ())
    assert rest == HTTP


def test_v1_tcp6_is_normalized() -> None:
    result, rest = parse(b"PROXY TCP6 2001:DB8:0:0::1 ::ffff:192.0.2.9 0 65535\r\n")
    assert result.source == ("2001:db8::1", 0)
    assert result.destination == ("::ffff:192.0.2.9", 65535)
    assert rest == b""


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff:f...:ffff ffff:f...:ffff 65535 65535\r\n",
        b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n",
    ],
)
def test_v1_unknown_has_no_addresses(line: bytes) -> None:
    result, rest = parse(line + CLIENT_HELLO)
    assert (result.version, result.command, result.source, result.destination) == (1, "proxy", None, None)
    assert rest == CLIENT_HELLO


def test_v1_longest_allowed_and_one_more() -> None:
    longest = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n"
    assert len(longest) == V1_MAX_LENGTH
    parse(longest)
    refuse(b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 15) + b"\r\n", "too long")
    refuse(b"PROXY UNKNOWN " + b"1" * 200, "too long")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2\n", "CRLF"),
        (b"PROXY TCP4 192.0.2.256 198.51.100.7 1 2\r\n", "address"),
        (b"PROXY TCP4 192.0.2 198.51.100.7 1 2\r\n", "address"),
        (b"PROXY TCP4 192.0.02.1 198.51.100.7 1 2\r\n", "address"),
        (b"PROXY TCP4 2001:db8::1 198.51.100.7 1 2\r\n", None),
        (b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n", "address"),
        (b"PROXY TCP6 fe80::1%eth0 2001:db8::2 1 2\r\n", None),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 65536\r\n", None),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 99999\r\n", None),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 080 2\r\n", None),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 +80 2\r\n", None),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 -1 2\r\n", None),
        (b"PROXY TCP4 192.0.2.1  198.51.100.7 1 2\r\n", None),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2 \r\n", "fields"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1\r\n", "fields"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2 3\r\n", "fields"),
        (b"PROXY  TCP4 192.0.2.1 198.51.100.7 1 2\r\n", None),
        (b"PROXY tcp4 192.0.2.1 198.51.100.7 1 2\r\n", None),
        (b"PROXY TCP5 192.0.2.1 198.51.100.7 1 2\r\n", None),
        (b"PROXY UNKNOWNX\r\n", None),
        (b"PROXY \r\n", None),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2\r\r\n", None),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 \xd9\xa3\r\n", "ASCII"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 \t2\r\n", None),
        (b"proxy TCP4 192.0.2.1 198.51.100.7 1 2\r\n", "no PROXY header"),
    ],
)
def test_v1_malformed(line: bytes, reason: str | None) -> None:
    refuse(line, reason)
    with pytest.raises(ProxyProtocolError):
        parse_bytewise(line)


@pytest.mark.parametrize(
    "prefix",
    [
        b"G",
        b"PROXX",
        b"PROXY G",
        b"PROXY TCP4 10.0.0.1x",
        b"PROXY TCP4 10.0.0.256 ",
        b"PROXY TCP6 1.2.3.4 ",
        b"PROXY TCP4 10.0.0.1 10.0.0.2 65536",
        b"PROXY TCP4 10.0.0.1 10.0.0.2 01",
        b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2 ",
        b"PROXY TCP4 10.0.0.1 10.0.0.2 1\r",
        b"\r\n\r\nX",
        V2_SIGNATURE + b"\x11",
        V2_SIGNATURE + b"\x22",
        V2_SIGNATURE + b"\x21\x41",
        V2_SIGNATURE + b"\x21\x13",
        V2_SIGNATURE + b"\x21\x11\x00\x0b",
        V2_SIGNATURE + b"\x21\x11\xff\xff",
    ],
)
def test_refused_as_soon_as_decidable(prefix: bytes) -> None:
    """Every byte but the last still begins a possible header; the last one rules it out."""
    parser = ProxyHeaderParser()
    for i in range(len(prefix) - 1):
        assert parser.feed(prefix[i : i + 1]) is None
    with pytest.raises(ProxyProtocolError):
        parser.feed(prefix[-1:])


def test_plain_http_refused_on_first_byte() -> None:
    with pytest.raises(ProxyProtocolError, match="no PROXY header"):
        ProxyHeaderParser().feed(b"G")
    refuse(HTTP, "no PROXY header")
    refuse(CLIENT_HELLO, "no PROXY header")


# ---- v2 ---------------------------------------------------------------------------------------


def test_v2_proxy_ipv4() -> None:
    result, rest = parse(v2() + CLIENT_HELLO)
    assert result == ProxyResult(2, "proxy", ("192.0.2.1", 51234), ("198.51.100.7", 443), ())
    assert rest == CLIENT_HELLO


def test_v2_proxy_ipv6() -> None:
    result, rest = parse(v2(fam=0x21) + HTTP)
    assert result.source == ("2001:db8::1", 1)
    assert result.destination == ("2001:db8::2", 65535)
    assert rest == HTTP


def test_v2_local_and_unspec_have_no_addresses() -> None:
    assert parse(v2(0x20, 0x00))[0] == ProxyResult(2, "local")
    assert parse(v2(0x20, 0x11))[0] == ProxyResult(2, "local")  # addresses present but ignored
    assert parse(v2(0x20, 0x31, bytes(216)))[0] == ProxyResult(2, "local")
    assert parse(v2(0x21, 0x00))[0] == ProxyResult(2, "proxy")


def test_v2_tlvs_in_order_with_duplicates() -> None:
    tlvs = tlv(TLV_ALPN, b"h2") + tlv(TLV_NOOP, b"") + tlv(TLV_AUTHORITY, b"example.com") + tlv(TLV_NOOP, b"\0\0")
    result, rest = parse(v2(tlvs=tlvs) + HTTP)
    assert result.tlvs == ((TLV_ALPN, b"h2"), (TLV_NOOP, b""), (TLV_AUTHORITY, b"example.com"), (TLV_NOOP, b"\0\0"))
    assert result.tlv(TLV_AUTHORITY) == b"example.com"
    assert result.tlv(TLV_NOOP) == b""
    assert result.tlv(0x30) is None
    assert rest == HTTP
    local, _ = parse(v2(0x20, 0x00, tlvs=tlv(0xE0, b"custom")))
    assert local.tlvs == ((0xE0, b"custom"),)


def test_v2_crc32c() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    good = with_crc(v2(tlvs=tlv(TLV_ALPN, b"h2")))
    result, _ = parse(good + HTTP)
    assert result.tlv(TLV_CRC32C) == good[-4:]
    refuse(good[:-1] + bytes([good[-1] ^ 1]), "CRC32C")
    refuse(v2(tlvs=tlv(TLV_CRC32C, b"\0\0")), "CRC32C")


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"\r\n\r\n\x00\r\nQUIX\n", "no PROXY header"),
        (v2(ver_cmd=0x11), "version"),
        (v2(ver_cmd=0x31), "version"),
        (v2(ver_cmd=0x22), "command"),
        (v2(ver_cmd=0x2F), "command"),
        (v2(fam=0x41, addresses=b""), "family"),
        (v2(fam=0x10, addresses=bytes(12)), "family"),
        (v2(fam=0x03, addresses=b""), "family"),
        (v2(fam=0x12, addresses=bytes(12)), "DGRAM"),
        (v2(fam=0x22, addresses=bytes(36)), "DGRAM"),
        (v2(fam=0x31, addresses=bytes(216)), "AF_UNIX"),
        (v2(fam=0x11, addresses=bytes(11)), "truncated"),
        (v2(fam=0x21, addresses=bytes(12)), "truncated"),
        (v2(0x20, 0x31, bytes(100)), "truncated"),
        (v2(tlvs=b"\x01\x00"), "TLV truncated"),
        (v2(tlvs=b"\x01"), "TLV truncated"),
        (v2(tlvs=b"\x01\x00\x05abcd"), "overruns"),
        (v2(tlvs=tlv(1, b"ok") + b"\x02\xff\xffxx"), "overruns"),
        (v2(tlvs=tlv(1, b"x" * 5000)), "longer than allowed"),
    ],
)
def test_v2_malformed(header: bytes, reason: str) -> None:
    refuse(header + HTTP, reason)
    with pytest.raises(ProxyProtocolError, match=reason):
        parse_bytewise(header + HTTP)


def test_v2_length_limit_is_configurable_and_decided_from_fixed_part() -> None:
    header = v2(tlvs=tlv(TLV_NOOP, bytes(100)))
    assert len(header) == 16 + 12 + 103
    parse(header, max_v2_length=len(header))
    refuse(header[:16], "longer than allowed", max_v2_length=len(header) - 1)
    parse(v2(tlvs=tlv(TLV_NOOP, bytes(4096 - 31))))
    refuse(v2(tlvs=tlv(TLV_NOOP, bytes(4096 - 30)))[:16], "longer than allowed")
    with pytest.raises(ValueError, match="max_v2_length"):
        ProxyHeaderParser(max_v2_length=15)


# ---- streaming behaviour ----------------------------------------------------------------------

HEADERS = [
    b"PROXY TCP4 192.0.2.1 198.51.100.7 51234 443\r\n",
    b"PROXY TCP6 2001:db8::1 2001:db8::2 0 65535\r\n",
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN whatever\r\n",
    v2(),
    v2(fam=0x21),
    v2(0x20, 0x00),
    with_crc(v2(fam=0x21, tlvs=tlv(TLV_ALPN, b"http/1.1"))),
]


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("payload", [b"", HTTP, CLIENT_HELLO])
def test_any_split_gives_same_result_and_remainder(header: bytes, payload: bytes) -> None:
    whole, rest = parse(header + payload)
    assert rest == payload
    assert parse_bytewise(header + payload) == (whole, payload)
    for cut in range(len(header) + len(payload) + 1):
        parser = ProxyHeaderParser()
        first = parser.feed((header + payload)[:cut])
        if first is None:
            assert cut < len(header)
            assert parser.feed((header + payload)[cut:]) == whole
            assert parser.remainder == payload
        else:
            assert cut >= len(header)
            assert first == whole
            assert parser.remainder + (header + payload)[cut:] == payload


def test_parser_state_errors() -> None:
    parser = ProxyHeaderParser()
    with pytest.raises(RuntimeError):
        _ = parser.remainder
    assert parser.feed(b"") is None
    assert parser.result is None
    result = parser.feed(HEADERS[0] + b"x")
    assert parser.result == result
    with pytest.raises(RuntimeError):
        parser.feed(b"more")
    failed = ProxyHeaderParser()
    with pytest.raises(ProxyProtocolError):
        failed.feed(b"nope")
    with pytest.raises(ProxyProtocolError, match="no PROXY header"):
        failed.feed(b"PROXY UNKNOWN\r\n")


def test_result_is_frozen_and_hashable() -> None:
    result, _ = parse(v2(tlvs=tlv(TLV_ALPN, b"h2")))
    with pytest.raises(AttributeError):
        result.version = 1  # type: ignore[misc]
    assert hash(result) == hash(parse(v2(tlvs=tlv(TLV_ALPN, b"h2")))[0])


LIMIT = 64
starts = st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", V2_SIGNATURE])
chunks = st.lists(st.binary(max_size=40), max_size=8)


@settings(max_examples=400, deadline=None)
@given(start=starts, tail=chunks)
def test_random_input_only_protocol_errors_and_bounded(start: bytes, tail: list[bytes]) -> None:
    parser = ProxyHeaderParser(max_v2_length=LIMIT)
    seen = b""
    for chunk in [start, *tail]:
        seen += chunk
        try:
            result = parser.feed(chunk)
        except ProxyProtocolError:
            return
        if result is not None:
            assert seen.endswith(parser.remainder)
            return
        # Still waiting: must be a possible header prefix, and below the bound.
        assert V2_SIGNATURE.startswith(seen[:12]) or b"PROXY ".startswith(seen[:6])
        assert len(seen) < (LIMIT if seen.startswith(V2_SIGNATURE[:1]) else V1_MAX_LENGTH)


v4 = st.ip_addresses(v=4)
v6 = st.ip_addresses(v=6)
ports = st.integers(0, 65535)


@settings(max_examples=200, deadline=None)
@given(family=st.sampled_from([4, 6]), data=st.data(), sport=ports, dport=ports, payload=st.binary(max_size=20))
def test_roundtrip_v1_and_v2(family: int, data: st.DataObject, sport: int, dport: int, payload: bytes) -> None:
    src, dst = data.draw(v4 if family == 4 else v6), data.draw(v4 if family == 4 else v6)
    line = f"PROXY TCP{family} {src} {dst} {sport} {dport}\r\n".encode()
    binary = v2(fam=0x11 if family == 4 else 0x21, addresses=src.packed + dst.packed + struct.pack("!HH", sport, dport))
    for header in (line, binary):
        cut = data.draw(st.integers(0, len(header) + len(payload)))
        parser = ProxyHeaderParser()
        result = parser.feed((header + payload)[:cut])
        late = b""
        if result is None:
            result = parser.feed((header + payload)[cut:])
        else:
            late = (header + payload)[cut:]
        assert result is not None
        assert result.source is not None
        assert result.destination is not None
        assert ipaddress.ip_address(result.source[0]) == src
        assert ipaddress.ip_address(result.destination[0]) == dst
        assert (result.source[1], result.destination[1]) == (sport, dport)
        assert parser.remainder + late == payload


# ---- trusted proxies --------------------------------------------------------------------------


def test_trusted_proxies_v4_v6_and_single_hosts() -> None:
    trusted = TrustedProxies(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "fe80::/10"])
    assert trusted.contains("10.1.2.3")
    assert trusted.contains("192.0.2.7")
    assert not trusted.contains("192.0.2.8")
    assert not trusted.contains("11.0.0.1")
    assert trusted.contains("2001:db8:ffff::1")
    assert trusted.contains("fe80::1%eth0")
    assert not trusted.contains("2001:db9::1")
    assert len(trusted.networks) == 4


def test_trusted_proxies_ipv4_mapped() -> None:
    trusted = TrustedProxies(["10.0.0.0/8"])
    assert trusted.contains("::ffff:10.9.8.7")
    assert trusted.contains("::FFFF:0a09:0807")
    assert not trusted.contains("::ffff:11.9.8.7")
    assert not trusted.contains("::10.9.8.7")  # IPv4-compatible, not mapped
    mapped_net = TrustedProxies(["::ffff:10.0.0.0/104"])
    assert mapped_net.contains("10.1.1.1")
    assert mapped_net.contains("::ffff:10.1.1.1")
    assert not mapped_net.contains("11.1.1.1")


def test_trusted_proxies_empty_and_bad_peers() -> None:
    nobody = TrustedProxies([])
    assert not nobody.contains("127.0.0.1")
    assert not nobody.contains("::1")
    everybody = TrustedProxies(["0.0.0.0/0", "::/0"])
    assert everybody.contains("203.0.113.5")
    for peer in ["", "localhost", "10.0.0.1:80", "/run/sluice.sock", "10.0.0.256"]:
        assert not everybody.contains(peer)


@pytest.mark.parametrize(
    "entry", ["banana", "10.0.0.0/33", "10.0.0.1/8", "", " 10.0.0.0/8", "2001:db8::/129", "::1/64"]
)
def test_trusted_proxies_reject_junk_naming_entry(entry: str) -> None:
    with pytest.raises(ValueError, match="invalid trusted proxy network") as info:
        TrustedProxies(["127.0.0.1", entry])
    assert repr(entry) in str(info.value)


def test_trusted_proxies_reject_non_strings() -> None:
    with pytest.raises(ValueError, match="167772160"):
        TrustedProxies([167772160])  # type: ignore[list-item]
