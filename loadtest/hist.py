"""Latency histograms (HdrHistogram), shipped between processes as their compact encoding."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # one hour
DIGITS = 2
SUB_BUCKET_BITS = 8  # 2 significant digits: 2 * 10**2 rounded up to a power of two is 2**8


def new() -> HdrHistogram:
    """An empty histogram of microseconds, two significant digits."""
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


def from_ns(values: Iterable[int]) -> HdrHistogram:
    """A histogram of nanosecond samples, recorded in microseconds (negative ones as 1 µs).

    Equal to recording each sample, but each distinct slot of the histogram is recorded once:
    samples are counted per microsecond, then folded to the resolution the histogram keeps
    (:data:`DIGITS` significant digits: 256 sub-buckets, so a value of ``b`` bits is kept to a
    multiple of ``2 ** (b - 8)``). The histogram's ``record_value`` is pure Python, and a load
    process records tens of thousands of samples a second."""
    hist = new()
    folded: Counter[int] = Counter()
    for raw, count in Counter(v // 1000 for v in values).items():
        us = max(LOWEST_US, min(HIGHEST_US, raw))
        shift = us.bit_length() - SUB_BUCKET_BITS
        folded[us >> shift << shift if shift > 0 else us] += count
    for value, count in folded.items():
        hist.record_value(value, count)
    return hist


def encode(hist: HdrHistogram) -> str:
    """The compressed, base64 form of ``hist`` (empty string when it holds nothing)."""
    return hist.encode().decode() if hist.get_total_count() else ""


def add(into: HdrHistogram, encoded: str) -> None:
    """Add an encoded histogram to ``into``."""
    if encoded:
        into.decode_and_add(encoded)


def summary(hist: HdrHistogram) -> dict[str, float]:
    """Count and the usual percentiles, in milliseconds."""
    if not hist.get_total_count():
        return {"count": 0}
    out: dict[str, float] = {"count": hist.get_total_count()}
    for name, pct in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9)):
        out[name] = hist.get_value_at_percentile(pct) / 1000
    out["max"] = hist.get_max_value() / 1000
    out["mean"] = hist.get_mean_value() / 1000
    return out
