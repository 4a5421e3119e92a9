"""Shared per-event gzip for SSE: any sequence of shared runs forms a valid gzip member, every
prefix decodes to exactly what was sent so far, and the trailer checks out."""

from __future__ import annotations

import gzip
import zlib

from hypothesis import given
from hypothesis import strategies as st

from server.core.frame import Frame
from server.core.gzipsse import GzipFraming, deflated


@given(st.lists(st.binary(max_size=3000), max_size=12), st.binary(max_size=200))
def test_runs_concatenate_into_one_gzip_member(events: list[bytes], first: bytes) -> None:
    frames = [Frame(e) for e in events]
    g = GzipFraming()
    body = g.start(first)
    decoder = zlib.decompressobj(31)
    sent = first
    assert decoder.decompress(body) == first  # decodable at once: nothing held back
    for f in frames:
        chunk = g.frame(f).raw
        body += chunk
        sent += f.raw
        assert decoder.decompress(chunk) == f.raw
    body += g.trailer()
    assert gzip.decompress(body) == sent  # checks CRC-32 and length


def test_the_compressed_form_is_built_once_and_shared() -> None:
    f = Frame(b"data: " + b"token " * 200 + b"\n\n")
    a, b = GzipFraming(), GzipFraming()
    assert a.frame(f) is b.frame(f) is deflated(f)
    assert len(deflated(f).raw) < len(f.raw) // 4


def test_a_connection_own_bytes_are_counted() -> None:
    g = GzipFraming()
    body = g.start(b"retry: 2000\n\n") + g.data(b": heartbeat\n\n") + g.trailer()
    assert gzip.decompress(body) == b"retry: 2000\n\n: heartbeat\n\n"


def test_small_or_incompressible_payloads_are_stored_not_grown() -> None:
    import os

    from server.core.gzipsse import deflate_run

    for data in (b"", b"data: 1\n\n", os.urandom(5000), os.urandom(70_000)):
        run = deflate_run(data)
        assert len(run) <= len(data) + 5 * (len(data) // 0xFFFF + 1)
        assert zlib.decompressobj(-15).decompress(run) == data
