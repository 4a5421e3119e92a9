"""Sans-IO parser for the HAProxy PROXY protocol, versions 1 (text) and 2 (binary).

A load balancer prepends one PROXY header to each TCP connection, naming the real client. The
caller feeds received bytes to :meth:`ProxyHeaderParser.feed` and, once a :class:`ProxyResult`
comes back, hands :attr:`ProxyHeaderParser.remainder` (the start of TLS or HTTP) to the next
layer. Following the specification, nothing is guessed: bytes that cannot begin a PROXY header
are refused as soon as that is certain. Whether to expect a header from a given peer at all is
the caller's decision, made with :class:`TrustedProxies`.

Choices where the specification leaves room:
* v1 ports are plain decimal without leading zeros (``0`` itself is fine); addresses go through
  :mod:`ipaddress` (IPv4 octets with leading zeros and IPv6 zone ids are refused). Addresses are
  returned normalized (``2001:db8::1``; IPv4-mapped as ``::ffff:1.2.3.4``).
* v2 command PROXY with family AF_UNIX or transport DGRAM is refused (a TCP server cannot use
  such a client address); AF_UNSPEC yields no addresses. Undefined family/transport bytes are
  refused for both commands; for LOCAL the addresses are ignored, but the address block must
  still be as long as the family says.
* v2 TLVs are kept in order (duplicates included) and must exactly fill the rest of the header.
  A CRC32C TLV, if present, is verified; other TLVs (PP2_TYPE_SSL too) are returned raw.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

V1_MAX_LENGTH = 107  # longest v1 header the specification allows, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # the 12 bytes every v2 header starts with
TLV_ALPN, TLV_AUTHORITY, TLV_CRC32C, TLV_NOOP, TLV_UNIQUE_ID = 0x01, 0x02, 0x03, 0x04, 0x05
TLV_SSL, TLV_NETNS = 0x20, 0x30

_V1_PREFIX = b"PROXY "
_V2_FIXED = 16
_V2_FAMILIES = frozenset({0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32})  # (family << 4) | transport
_V2_ADDRESS_LENGTH = {0: 0, 1: 12, 2: 36, 3: 216}  # AF_UNSPEC, AF_INET, AF_INET6, AF_UNIX
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")
_PORT_PREFIX = re.compile(r"(0|[1-9][0-9]{0,4})?")
_ADDRESS_CHARS = {"TCP4": (frozenset("0123456789."), 15), "TCP6": (frozenset("0123456789abcdefABCDEF:."), 45)}

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """``[proxy]``: which peers are load balancers that must open with a PROXY header.

    ``trusted``: CIDRs (a bare address is one host); empty turns the PROXY protocol off.
    ``max_v2_bytes``: the largest v2 header accepted, TLVs included.
    """

    trusted: tuple[str, ...] = ()
    max_v2_bytes: int = 4096

    def __post_init__(self) -> None:
        object.__setattr__(self, "trusted", tuple(self.trusted))
        TrustedProxies(self.trusted)  # raises ValueError naming a bad entry


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY header; the message is a short reason fit for a log line."""


@dataclass(frozen=True)
class ProxyResult:
    """One parsed PROXY header.

    ``source``/``destination`` are ``(ip, port)`` as the proxy saw them, or both ``None`` (v1
    ``UNKNOWN``, v2 ``LOCAL`` or AF_UNSPEC), meaning: use the socket's own peer address.
    ``tlvs`` holds v2 ``(type, value)`` pairs in header order; it is empty for v1.
    """

    version: Literal[1, 2]
    command: Literal["proxy", "local"]
    source: Address | None = None
    destination: Address | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    def tlv(self, kind: int) -> bytes | None:
        """Return the value of the first TLV of type ``kind``, or ``None`` if there is none."""
        return next((value for key, value in self.tlvs if key == kind), None)


class ProxyHeaderParser:
    """Incremental parser for exactly one PROXY header (v1 or v2) at the start of a connection.

    Bounded: a v1 header is decided (result or :class:`ProxyProtocolError`) within 107 bytes, a v2
    header within ``max_v2_length`` bytes, and its oversize length is refused from the first 16.
    Once it has failed, every later :meth:`feed` raises the same error; close the connection.
    """

    def __init__(self, *, max_v2_length: int = 4096) -> None:
        """``max_v2_length`` caps a v2 header's total size (16 fixed bytes + addresses + TLVs)."""
        if max_v2_length < _V2_FIXED:
            raise ValueError(f"max_v2_length must be at least {_V2_FIXED}, got {max_v2_length}")
        self._max_v2 = max_v2_length
        self._buf = bytearray()
        self._result: ProxyResult | None = None
        self._consumed = 0
        self._error: str | None = None

    @property
    def result(self) -> ProxyResult | None:
        """The parsed header once :meth:`feed` has returned it, else ``None``."""
        return self._result

    @property
    def remainder(self) -> bytes:
        """Bytes received after the header; they belong to the next protocol. Only after a result."""
        if self._result is None:
            raise RuntimeError("no PROXY header parsed yet")
        return bytes(self._buf[self._consumed :])

    def feed(self, data: bytes) -> ProxyResult | None:
        """Add bytes; return the header once complete, ``None`` while more bytes are needed.

        ``None`` is only returned while everything received so far can still begin a valid
        header. Raises :class:`ProxyProtocolError` if it cannot, and ``RuntimeError`` if called
        again after a result was returned.
        """
        if self._error is not None:
            raise ProxyProtocolError(self._error)
        if self._result is not None:
            raise RuntimeError("PROXY header already parsed; use .remainder")
        self._buf += data
        try:
            self._result = self._step()
        except ProxyProtocolError as exc:
            self._error = str(exc)
            raise
        return self._result

    def _step(self) -> ProxyResult | None:
        buf = self._buf
        if buf[:6] == _V1_PREFIX[: len(buf[:6])]:
            return self._step_v1() if len(buf) >= len(_V1_PREFIX) else None
        if buf[:12] == V2_SIGNATURE[: len(buf[:12])]:
            return self._step_v2()
        raise ProxyProtocolError("no PROXY header")

    def _step_v1(self) -> ProxyResult | None:
        buf = self._buf
        lf = buf.find(b"\n", 0, V1_MAX_LENGTH)
        if lf < 0:
            if len(buf) >= V1_MAX_LENGTH:
                raise ProxyProtocolError("v1 header too long")
            if buf.endswith(b"\r"):  # only "\n" may follow, so the line is already complete
                _parse_v1(bytes(buf[:-1]), complete=True)
            else:
                _parse_v1(bytes(buf), complete=False)
            return None
        if buf[lf - 1] != 0x0D:
            raise ProxyProtocolError("v1 header must end with CRLF")
        self._consumed = lf + 1
        return _parse_v1(bytes(buf[: lf - 1]), complete=True)

    def _step_v2(self) -> ProxyResult | None:
        buf, size = self._buf, len(self._buf)
        if size > 12 and (buf[12] >> 4 != 2):
            raise ProxyProtocolError("unsupported v2 version")
        if size > 12 and (buf[12] & 0x0F) not in (0, 1):
            raise ProxyProtocolError("bad v2 command")
        if size > 13 and buf[13] not in _V2_FAMILIES:
            raise ProxyProtocolError("bad v2 address family or transport")
        if size < _V2_FIXED:
            return None
        length = int.from_bytes(buf[14:16], "big")
        total = _V2_FIXED + length
        if total > self._max_v2:
            raise ProxyProtocolError("v2 header longer than allowed")
        if length < _V2_ADDRESS_LENGTH[buf[13] >> 4]:
            raise ProxyProtocolError("v2 address block truncated")
        if size < total:
            return None
        self._consumed = total
        return _parse_v2(bytes(buf[:total]))


def _parse_v1(line: bytes, *, complete: bool) -> ProxyResult | None:
    """Check a v1 line (CRLF stripped). If not ``complete``, its last field may be cut short."""
    if line.startswith(b"PROXY UNKNOWN") and line[13:14] in (b"", b" "):
        return ProxyResult(version=1, command="proxy") if complete else None  # rest is ignored
    try:
        fields = line.decode("ascii").split(" ")[1:]
    except UnicodeDecodeError:
        raise ProxyProtocolError("v1 header is not ASCII") from None
    if len(fields) > 5 or (complete and len(fields) < 5):
        raise ProxyProtocolError("v1 header needs exactly 5 fields after PROXY")
    cut = -1 if complete else len(fields) - 1
    for i, field in enumerate(fields):
        if i == cut:
            _check_v1_prefix(i, field, fields[0])
        elif i == 0 and field not in ("TCP4", "TCP6"):
            raise ProxyProtocolError("bad v1 protocol")
        elif i in (1, 2):
            _v1_address(field, fields[0])
        elif i in (3, 4):
            _v1_port(field)
    if not complete:
        return None
    source = (_v1_address(fields[1], fields[0]), _v1_port(fields[3]))
    destination = (_v1_address(fields[2], fields[0]), _v1_port(fields[4]))
    return ProxyResult(version=1, command="proxy", source=source, destination=destination)


def _check_v1_prefix(index: int, field: str, protocol: str) -> None:
    if index == 0:
        ok = any(name.startswith(field) for name in ("TCP4", "TCP6", "UNKNOWN"))
    elif index <= 2:
        chars, longest = _ADDRESS_CHARS[protocol]
        ok = len(field) <= longest and set(field) <= chars
    else:
        ok = _PORT_PREFIX.fullmatch(field) is not None and int(field or "0") <= 0xFFFF
    if not ok:
        raise ProxyProtocolError("bad v1 field")


def _v1_address(text: str, protocol: str) -> str:
    kind = ipaddress.IPv4Address if protocol == "TCP4" else ipaddress.IPv6Address
    try:
        address = kind(text)
    except ValueError:
        address = None
    if address is None or "%" in text:
        raise ProxyProtocolError(f"bad {protocol} address")
    return _text(address)


def _v1_port(text: str) -> int:
    if _PORT.fullmatch(text) is None or int(text) > 0xFFFF:
        raise ProxyProtocolError("bad v1 port")
    return int(text)


def _text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return f"::ffff:{mapped}" if mapped is not None else str(address)


def _parse_v2(header: bytes) -> ProxyResult:
    """Parse a complete v2 header whose fixed part the caller has already checked."""
    command: Literal["proxy", "local"] = "local" if header[12] & 0x0F == 0 else "proxy"
    family, transport = header[13] >> 4, header[13] & 0x0F
    tlvs = _parse_tlvs(header, _V2_FIXED + _V2_ADDRESS_LENGTH[family])
    if command == "local" or family == 0:
        return ProxyResult(version=2, command=command, tlvs=tlvs)
    if transport != 1:
        raise ProxyProtocolError("v2 DGRAM transport not supported")
    if family == 3:
        raise ProxyProtocolError("v2 AF_UNIX not supported")
    kind = ipaddress.IPv4Address if family == 1 else ipaddress.IPv6Address
    n = 4 if family == 1 else 16
    ports = _V2_FIXED + 2 * n
    source = (_text(kind(header[16 : 16 + n])), int.from_bytes(header[ports : ports + 2], "big"))
    destination = (_text(kind(header[16 + n : ports])), int.from_bytes(header[ports + 2 : ports + 4], "big"))
    return ProxyResult(version=2, command=command, source=source, destination=destination, tlvs=tlvs)


def _parse_tlvs(header: bytes, start: int) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    pos = start
    while pos < len(header):
        if len(header) - pos < 3:
            raise ProxyProtocolError("v2 TLV truncated")
        kind, begin = header[pos], pos + 3
        pos = begin + int.from_bytes(header[pos + 1 : begin], "big")
        if pos > len(header):
            raise ProxyProtocolError("v2 TLV overruns header")
        value = header[begin:pos]
        if kind == TLV_CRC32C:
            zeroed = header[:begin] + bytes(len(value)) + header[pos:]
            if len(value) != 4 or crc32c(zeroed) != int.from_bytes(value, "big"):
                raise ProxyProtocolError("v2 CRC32C mismatch")
        tlvs.append((kind, value))
    return tuple(tlvs)


def _crc32c_entry(crc: int) -> int:
    for _ in range(8):
        crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc


_CRC32C_TABLE = tuple(_crc32c_entry(byte) for byte in range(256))


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``, as used by the v2 PP2_TYPE_CRC32C TLV."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


class TrustedProxies:
    """The set of peers whose PROXY headers may be believed, from CIDR strings (IPv4 and IPv6).

    A bare address counts as a single host; an empty list trusts nobody. Invalid entries, including
    networks with host bits set (``10.0.0.1/8``), raise ``ValueError`` naming the entry. The parsed
    networks are available, in order, as :attr:`networks`.
    """

    def __init__(self, cidrs: Iterable[str]) -> None:
        """Validate and store every entry of ``cidrs``."""
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in cidrs:
            try:
                network = ipaddress.ip_network(entry, strict=True) if isinstance(entry, str) else None
            except ValueError:
                network = None
            if network is None:
                raise ValueError(f"invalid trusted proxy network {entry!r}")
            networks.append(network)
        self.networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(networks)

    def contains(self, peer_ip: str) -> bool:
        """True if ``peer_ip`` lies in a trusted network; unparsable input is never trusted.

        An IPv4-mapped IPv6 peer (``::ffff:1.2.3.4``) also matches IPv4 networks containing
        ``1.2.3.4``, and an IPv4 peer also matches IPv6 networks containing its mapped form.
        """
        try:
            address = ipaddress.ip_address(peer_ip)
        except ValueError:
            return False
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        elif isinstance(address, ipaddress.IPv4Address):
            candidates.append(ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed))
        return any(candidate in network for candidate in candidates for network in self.networks)
