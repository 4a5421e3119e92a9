"""Latency histograms (HdrHistogram), shipped between processes as their compact encoding."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # one hour
DIGITS = 2


def new() -> HdrHistogram:
    """An empty histogram of microseconds, two significant digits."""
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


def from_ns(values: Iterable[int]) -> HdrHistogram:
    """A histogram of nanosecond samples, recorded in microseconds (negative ones as 1 µs)."""
    hist = new()
    for value, count in Counter(max(LOWEST_US, min(HIGHEST_US, v // 1000)) for v in values).items():
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
