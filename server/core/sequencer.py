"""Puts one worker's commit notices back in order per stream before they are fanned out.

A worker hears of its own commits from its store and of the other workers' commits by messages
(:mod:`server.bus.local`), so two notices of one stream can arrive out of order: worker A's
seq 9 is still on its way back from A's store thread when worker B's seq 10 arrives by datagram.
Fanned out as it came, seq 10 would show every subscriber of the stream a gap, and every one of
them would go back to the store on its own: a thousand reads for one late notice.

:class:`Sequencer` (pure: no I/O, no clock of its own) keeps, per stream, the last position it
passed on. A notice that follows on is passed on at once, with any held notices it now joins; a
notice that leaves a gap is held until ``window`` seconds after the gap opened. A gap still open
then is read from the store once for all subscribers (the hub does that and hands the events to
:meth:`Sequencer.fill`); if the store cannot fill it (the events are gone, or the read fails),
:meth:`Sequencer.give_up` passes on what is held as it is, and each subscription finds the gap
and asks the store itself, exactly as without a sequencer. Nothing is ever dropped but events
already passed on (duplicates), and what is passed on per stream is in order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.core.events import Event

__all__ = ["Gap", "Sequencer"]


@dataclass(frozen=True, slots=True)
class Gap:
    """Events ``after_seq + 1`` .. ``before_seq - 1`` of ``stream`` in ``epoch`` were not heard of."""

    stream: str
    epoch: str
    after_seq: int
    before_seq: int


@dataclass(slots=True)
class _Held:
    deadline: float
    runs: list[list[Event]] = field(default_factory=list)  # sorted by first seq, after the gap
    size: int = 0


class Sequencer:
    """Per-stream ordering of notices (see the module doc).

    ``window``: seconds a gap may stay open before it is reported by :meth:`due`; 0 passes every
    notice on as it comes (no ordering). ``max_held``: events held for one stream; past it the
    stream's gap is given up at once (what is held is passed on).
    """

    __slots__ = ("_held", "_pos", "max_held", "window")

    def __init__(self, window: float, *, max_held: int = 10_000) -> None:
        if window < 0 or max_held < 1:
            raise ValueError("window must be >= 0 and max_held >= 1")
        self.window = window
        self.max_held = max_held
        self._pos: dict[str, tuple[str, int]] = {}  # stream -> (epoch, last seq passed on)
        self._held: dict[str, _Held] = {}

    @property
    def held(self) -> int:
        """Events held now, all streams."""
        return sum(h.size for h in self._held.values())

    def holding(self, stream: str) -> bool:
        """True while ``stream`` has notices held behind a gap."""
        return stream in self._held

    def accept(self, events: Sequence[Event], now: float) -> list[list[Event]]:
        """Take a notice (consecutive events of one stream and epoch); return the runs to pass on
        now, in order (each consecutive; together they follow on from the last one passed on)."""
        if not events:
            return []
        first = events[0]
        stream, epoch = first.stream, first.epoch
        pos = self._pos.get(stream)
        if pos is None or pos[0] != epoch or not self.window:
            # First notice heard, or a new history (the stream was deleted and written again):
            # what was held belongs to the old one; pass it on first, the subscriptions sort it out.
            out = self._release_all(stream)
            self._pos[stream] = (epoch, events[-1].seq)
            out.append(list(events))
            return out
        last = pos[1]
        if events[-1].seq <= last:
            return []  # heard before
        run = list(events) if first.seq > last else [e for e in events if e.seq > last]
        if run[0].seq == last + 1:
            self._pos[stream] = (epoch, run[-1].seq)
            out = [run]
            out.extend(self._release_following(stream))
            return out
        held = self._held.get(stream)
        if held is None:
            held = self._held[stream] = _Held(now + self.window)
        _insert(held.runs, run)
        held.size += len(run)
        if held.size > self.max_held:
            return self.give_up(stream)
        return []

    def due(self, now: float) -> list[Gap]:
        """The gaps open for ``window`` seconds or more at ``now`` (read them from the store)."""
        gaps = []
        for stream, held in self._held.items():
            if held.deadline <= now:
                epoch, last = self._pos[stream]
                gaps.append(Gap(stream, epoch, last, held.runs[0][0].seq))
        return gaps

    @property
    def next_deadline(self) -> float:
        """When the earliest open gap falls due (``inf`` when none is open)."""
        return min((h.deadline for h in self._held.values()), default=math.inf)

    def fill(self, gap: Gap, events: Sequence[Event], now: float) -> tuple[list[list[Event]], bool]:
        """The store's answer for ``gap``: the runs to pass on now, in order, and whether the gap
        was filled. A gap the events do not fill (they are gone, or the read failed) is given up:
        what is held is passed on as it is. A gap closed meanwhile by a late notice is a no-op."""
        pos = self._pos.get(gap.stream)
        if pos is None or pos != (gap.epoch, gap.after_seq) or gap.stream not in self._held:
            return [], True  # it moved on meanwhile
        found = [e for e in events if e.epoch == gap.epoch and gap.after_seq < e.seq < gap.before_seq]
        if not found or found[0].seq != gap.after_seq + 1:
            return self.give_up(gap.stream), False
        out = self.accept(found, now)
        held = self._held.get(gap.stream)
        if held is not None:
            held.deadline = now + self.window  # a further gap (or a short read): its own window
        return out, True

    def give_up(self, stream: str) -> list[list[Event]]:
        """Pass on what is held for ``stream`` as it is, gaps and all (in order)."""
        return self._release_all(stream)

    def forget(self, stream: str) -> list[list[Event]]:
        """Drop ``stream``'s position (no watcher left, or deleted); returns what was held, to
        pass on before it goes."""
        out = self._release_all(stream)
        self._pos.pop(stream, None)
        return out

    def _release_following(self, stream: str) -> list[list[Event]]:
        held = self._held.get(stream)
        if held is None:
            return []
        epoch, last = self._pos[stream]
        out = []
        runs = held.runs
        while runs and runs[0][0].seq <= last + 1:
            run = runs.pop(0)
            held.size -= len(run)
            if run[-1].seq <= last:
                continue
            if run[0].seq <= last:
                run = [e for e in run if e.seq > last]
            out.append(run)
            last = run[-1].seq
        self._pos[stream] = (epoch, last)
        if not runs:
            del self._held[stream]
        return out

    def _release_all(self, stream: str) -> list[list[Event]]:
        held = self._held.pop(stream, None)
        if held is None:
            return []
        pos = self._pos.get(stream)
        last = pos[1] if pos is not None else 0
        out = []
        for run in held.runs:
            if run[-1].seq <= last:
                continue
            fresh = run if run[0].seq > last else [e for e in run if e.seq > last]
            out.append(fresh)
            last = fresh[-1].seq
        if pos is not None and out:
            self._pos[stream] = (pos[0], last)
        return out


def _insert(runs: list[list[Event]], run: list[Event]) -> None:
    """Insert ``run`` into ``runs`` keeping them sorted by first seq (overlaps are trimmed on release)."""
    seq = run[0].seq
    i = len(runs)
    while i and runs[i - 1][0].seq > seq:
        i -= 1
    runs.insert(i, run)
