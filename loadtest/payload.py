"""What the harness puts in an event's data, and reads back: a sequence number and a send time.

The data is ASCII text ``"<seq> <t_ns>"`` padded with ``.`` to the requested size, so it is valid
on every transport (SSE text, WebSocket JSON, msgpack, long-poll JSON) and token-sized by default.
``t_ns`` is ``time.monotonic_ns()`` in the publishing process: CLOCK_MONOTONIC is one clock for
the whole host, so the subscriber's ``monotonic_ns()`` at arrival minus it is publish->deliver
latency.
"""

from __future__ import annotations

MIN_SIZE = 24


def encode(seq: int, t_ns: int, size: int = 0) -> bytes:
    """The data of event ``seq`` sent at ``t_ns``, padded to at least ``size`` bytes."""
    data = b"%d %d" % (seq, t_ns)
    if len(data) < size:
        data += b"." * (size - len(data))
    return data


def decode(data: bytes | str) -> tuple[int, int]:
    """``(seq, t_ns)`` of a harness event; ValueError for anything else (counted as foreign)."""
    if data.__class__ is not bytes:
        data = data.encode() if isinstance(data, str) else bytes(data)
    head, _, rest = data.partition(b" ")
    return int(head), int(rest.rstrip(b"."))
