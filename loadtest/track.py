"""Per-subscriber transcript checks: loss, duplicates, order, resets and ends (pure, no I/O).

A :class:`Track` follows one subscriber on one stream. The publisher numbers each stream's events
0, 1, 2... in the order it publishes them (one publish in flight per stream, so that is also the
server's order). Every subscriber starts at the stream's beginning, so it must see each number
exactly once, in increasing order; what it lacks at the end is lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class Track:
    """What one subscriber received on one stream."""

    __slots__ = ("disorder", "dups", "ended", "foreign", "last_id", "max_seq", "received", "resets", "seen", "stream")

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.last_id: str | None = None  # the id to resume after (Last-Event-ID)
        self.seen = bytearray()
        self.received = 0  # distinct sequence numbers
        self.dups = 0
        self.disorder = 0
        self.max_seq = -1
        self.resets = 0
        self.foreign = 0  # events whose data is not the harness's
        self.ended = False

    def on_event(self, seq: int) -> None:
        """Record event ``seq``."""
        seen = self.seen
        if seq >= len(seen):
            seen.extend(bytes(seq + 1 - len(seen) + 256))
        if seen[seq]:
            self.dups += 1
            return
        seen[seq] = 1
        self.received += 1
        if seq < self.max_seq:
            self.disorder += 1
        else:
            self.max_seq = seq

    def lost(self, expected: int) -> int:
        """How many of the events 0..expected-1 never arrived."""
        return expected - self.seen.count(1, 0, expected)

    def complete(self, expected: int) -> bool:
        """True when every event 0..expected-1 has arrived."""
        return self.received >= expected and self.lost(expected) == 0


@dataclass
class Verdict:
    """Totals over many tracks, compared with what was published."""

    tracks: int = 0
    expected: int = 0
    received: int = 0
    lost: int = 0
    duplicated: int = 0
    disorder: int = 0
    resets: int = 0
    foreign: int = 0
    ended: int = 0
    incomplete: int = 0  # tracks that lost at least one event
    samples: list[str] = field(default_factory=list)  # a few examples of what went wrong

    def add(self, track: Track, expected: int) -> None:
        """Fold one track in; ``expected`` is how many events its stream published."""
        lost = track.lost(expected)
        self.tracks += 1
        self.expected += expected
        self.received += min(track.received, expected)
        self.lost += lost
        self.duplicated += track.dups
        self.disorder += track.disorder
        self.resets += track.resets
        self.foreign += track.foreign
        self.ended += track.ended
        if lost:
            self.incomplete += 1
        if (lost or track.dups or track.disorder) and len(self.samples) < 5:
            missing = [i for i in range(expected) if i >= len(track.seen) or not track.seen[i]][:5]
            self.samples.append(
                f"{track.stream}: lost {lost} (first {missing}), duplicated {track.dups}, out of order {track.disorder}"
            )

    def merge(self, other: Verdict) -> None:
        """Add another verdict's totals to this one."""
        for name in ("tracks", "expected", "received", "lost", "duplicated", "disorder", "resets", "foreign", "ended",
                     "incomplete"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.samples.extend(other.samples[: max(0, 5 - len(self.samples))])

    @property
    def clean(self) -> bool:
        """Nothing lost, duplicated or out of order."""
        return not (self.lost or self.duplicated or self.disorder)
