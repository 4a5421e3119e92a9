"""permessage-deflate (RFC 7692) for wsproto with a cap on inflated message size.

wsproto's :class:`~wsproto.extensions.PerMessageDeflate` inflates each frame payload with
``decompressobj.decompress(data)`` and no ``max_length``, so one 64 KiB frame of deflated zeros
becomes 64 MiB in memory before anyone can look at its size. :class:`BoundedPerMessageDeflate`
uses the hooks wsproto gives extensions (``frame_inbound_header``, ``frame_inbound_payload_data``,
``frame_inbound_complete``; returning a :class:`~wsproto.frame_protocol.CloseReason` from them
fails the connection) to inflate with ``max_length`` = remaining budget + 1. Once a message's
inflated size would pass ``max_message_bytes`` it returns ``CloseReason.MESSAGE_TOO_BIG``;
wsproto then yields ``CloseConnection(code=1009)`` and the caller sends the close frame. At most
the budget + 1 bytes are ever inflated for one frame chunk (wsproto then copies an accepted chunk
two or three times on its way into an event; that is bounded by the same cap).

It also bounds per-connection memory, which with wsproto's defaults is ~262 KiB for the
compressor alone (window 15, memLevel 8), and never answers a window larger than the client
offered or than configured here:

- ``server_max_window_bits`` (default 12) is always announced, lowered to the client's offer
  when that is smaller (RFC 7692 7.1.2.1 lets the server pick a value no larger than offered);
- ``client_max_window_bits`` (default 15) is answered only when the client offered the parameter
  (browsers do, without a value); otherwise the client may use 15 and inflation must too;
- ``mem_level`` (default 5) and ``compress_level`` (default 4) shape the compressor.

Measured with ``tracemalloc``, the defaults hold a 38,928-byte (~38 KiB) compressor and a
~44 KiB decompressor (7,368 bytes of state + a 32 KiB window at 15 bits) per connection.
Uses wsproto 1.3's private attributes ``_decompressor``, ``_compressor``,
``_inbound_compressed``, ``_inbound_is_compressible`` and ``_enabled``; the tests pin that behaviour.
Create one instance per connection: it holds the compression state.
"""

from __future__ import annotations

import zlib

from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits

__all__ = ["BoundedPerMessageDeflate"]

_TAIL = b"\x00\x00\xff\xff"


class BoundedPerMessageDeflate(PerMessageDeflate):
    """Server-side permessage-deflate whose inflation never exceeds ``max_message_bytes``.

    ``max_message_bytes`` caps the payload of one message after inflation (uncompressed messages
    on a connection that negotiated the extension are counted too, so the cap is uniform). A
    message of exactly ``max_message_bytes`` passes; one byte more closes the connection with
    1009. Invalid deflate data closes it with 1007. Window bits must be 9..15 (zlib cannot do 8).
    """

    def __init__(
        self,
        max_message_bytes: int = 2 * 1024 * 1024,
        *,
        server_max_window_bits: int = 12,
        client_max_window_bits: int = 15,
        client_no_context_takeover: bool = False,
        server_no_context_takeover: bool = False,
        compress_level: int = 4,
        mem_level: int = 5,
    ) -> None:
        if max_message_bytes < 0:
            raise ValueError("max_message_bytes must be >= 0")
        if not 0 <= compress_level <= 9 or not 1 <= mem_level <= 9:
            raise ValueError("compress_level must be 0..9 and mem_level 1..9")
        for bits in (server_max_window_bits, client_max_window_bits):
            if not 9 <= bits <= 15:
                raise ValueError("window bits must be 9..15")
        super().__init__(
            client_no_context_takeover=client_no_context_takeover,
            server_no_context_takeover=server_no_context_takeover,
            server_max_window_bits=server_max_window_bits,
        )
        self.max_message_bytes = max_message_bytes
        self.compress_level = compress_level
        self.mem_level = mem_level
        self._server_bits_limit = server_max_window_bits
        self._client_bits_limit = client_max_window_bits
        self._message_bytes = 0
        self._in_data_frame = False

    def accept(self, offer: str) -> bool | str | None:
        """Accept a client offer, clamping both window sizes to this side's limits.

        Returns the response parameters, or ``None`` (decline the extension) when the offer
        carries a window size outside 9..15.
        """
        try:
            client_bits, server_bits = self._parse_params(offer)
        except ValueError:
            return None
        params = []
        if self.client_no_context_takeover:
            params.append("client_no_context_takeover")
        if self.server_no_context_takeover:
            params.append("server_no_context_takeover")
        if client_bits is not None and not 9 <= client_bits <= 15:
            return None
        if server_bits is not None and not 9 <= server_bits <= 15:
            return None
        if client_bits is None:
            self.client_max_window_bits = self.DEFAULT_CLIENT_MAX_WINDOW_BITS
        else:
            self.client_max_window_bits = min(client_bits, self._client_bits_limit)
            params.append(f"client_max_window_bits={self.client_max_window_bits}")
        self.server_max_window_bits = min(server_bits or 15, self._server_bits_limit)
        if server_bits is not None or self.server_max_window_bits < 15:
            params.append(f"server_max_window_bits={self.server_max_window_bits}")
        self._enabled = True
        return "; ".join(params)

    def frame_inbound_header(
        self, proto: FrameDecoder | FrameProtocol, opcode: Opcode, rsv: RsvBits, payload_length: int
    ) -> CloseReason | RsvBits:
        """As the base class; also starts a fresh size count at the first frame of a message.

        A control frame leaves the message's compression state alone (the base class would record
        the control frame's RSV1 as the next message's, or reset it mid-message).
        """
        saved = self._inbound_compressed
        result: CloseReason | RsvBits = super().frame_inbound_header(proto, opcode, rsv, payload_length)
        self._in_data_frame = not opcode.iscontrol()
        if not self._in_data_frame:
            self._inbound_compressed = saved
        if self._in_data_frame and opcode is not Opcode.CONTINUATION:
            self._message_bytes = 0
        return result

    def frame_inbound_payload_data(self, proto: FrameDecoder | FrameProtocol, data: bytes) -> bytes | CloseReason:
        """Inflate one chunk of frame payload, at most up to the message's remaining budget."""
        if not self._in_data_frame:
            return data
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return self._count(data)
        return self._inflate(data)

    def frame_inbound_complete(self, proto: FrameDecoder | FrameProtocol, fin: bool) -> bytes | CloseReason | None:
        """Finish a frame; at the end of a compressed message inflate the sync tail, bounded."""
        if not fin or not self._in_data_frame:
            return None
        compressed = self._inbound_compressed and self._inbound_is_compressible
        self._inbound_compressed = None
        if not compressed:
            return None
        out = self._inflate(_TAIL)
        no_takeover = self.server_no_context_takeover if proto.client else self.client_no_context_takeover
        if no_takeover:
            self._decompressor = None
        return out

    def _count(self, data: bytes) -> bytes | CloseReason:
        self._message_bytes += len(data)
        if self._message_bytes > self.max_message_bytes:
            return CloseReason.MESSAGE_TOO_BIG
        return data

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        decompressor = self._decompressor
        assert decompressor is not None
        budget = self.max_message_bytes - self._message_bytes
        try:
            # max_length >= 1 always (0 would mean "unlimited").
            out: bytes = decompressor.decompress(data, budget + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        # Output shorter than max_length means zlib consumed all input and holds nothing back.
        if len(out) > budget or decompressor.unconsumed_tail:
            return CloseReason.MESSAGE_TOO_BIG
        self._message_bytes += len(out)
        return out

    def frame_outbound(
        self, proto: FrameDecoder | FrameProtocol, opcode: Opcode, rsv: RsvBits, data: bytes, fin: bool
    ) -> tuple[RsvBits, bytes]:
        """As the base class, but the compressor uses ``compress_level`` and ``mem_level``."""
        if self._compressor is None and opcode in (Opcode.TEXT, Opcode.BINARY):
            bits = self.client_max_window_bits if proto.client else self.server_max_window_bits
            self._compressor = zlib.compressobj(self.compress_level, zlib.DEFLATED, -int(bits), self.mem_level)
        result: tuple[RsvBits, bytes] = super().frame_outbound(proto, opcode, rsv, data, fin)
        return result
