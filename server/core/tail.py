"""The replay buffer in memory: the newest events of each watched stream, already encoded.

A client that reconnects (a network blip, a drain, a rotation) asks for the events after its
Last-Event-ID, which are nearly always a few seconds old. :class:`Tails` keeps, per stream, one
contiguous run of the newest events this worker has seen (from live notices, and from store
reads that reach up to it), so such a resume is answered without a store read, from the same
:class:`~server.core.encoding.EncodedEvent` objects the live fan-out shares.

What a tail promises: every event in it was committed, in one epoch, with consecutive ``seq``.
It does not promise to reach the stream's head (a notice may be in flight or lost): a reader that
goes live at a tail's end still relies on the live path's gap checks, as every subscription does.
Memory is bounded three ways: ``per_stream`` events per stream, and ``total`` events and
``max_bytes`` bytes (each event's data plus :data:`EVENT_OVERHEAD`) per worker, past which the
least recently extended streams lose their tails.
"""

from __future__ import annotations

from collections.abc import Sequence

from server.core.encoding import EncodedEvent

__all__ = ["EVENT_OVERHEAD", "Tail", "Tails"]

EVENT_OVERHEAD = 512  # bytes counted per event besides its data: the records and the encoded forms' framing


def _cost(encs: Sequence[EncodedEvent]) -> int:
    return sum(len(e.event.data) for e in encs) + EVENT_OVERHEAD * len(encs)


class Tail:
    """One contiguous run of committed events of one stream and epoch, oldest first."""

    __slots__ = ("encs", "epoch", "first_seq")

    def __init__(self, encs: list[EncodedEvent]) -> None:
        """Wrap ``encs`` (non-empty, one epoch, consecutive ``seq``)."""
        first = encs[0].event
        self.epoch = first.epoch
        self.first_seq = first.seq
        self.encs = encs

    @property
    def last_seq(self) -> int:
        """The ``seq`` of the newest event held."""
        return self.first_seq + len(self.encs) - 1

    def covers(self, epoch: str, seq: int) -> bool:
        """True when every event after ``seq`` that this tail knows of follows on from ``seq``:
        ``seq`` is in ``epoch`` and no older than the event before the first one held."""
        return epoch == self.epoch and self.first_seq - 1 <= seq <= self.first_seq + len(self.encs) - 1

    def after(self, seq: int) -> list[EncodedEvent]:
        """The held events with ``seq`` greater than ``seq`` (call only when :meth:`covers`)."""
        return self.encs[seq + 1 - self.first_seq :]


class Tails:
    """Every stream's :class:`Tail` on one worker, bounded per stream and in total."""

    __slots__ = ("_bytes", "_size", "_tails", "max_bytes", "per_stream", "total")

    def __init__(self, *, per_stream: int, total: int, max_bytes: int = 64 * 1024 * 1024) -> None:
        """``per_stream``: most events kept for one stream; ``total``: events for all streams;
        ``max_bytes``: bytes for all streams, as counted by :data:`EVENT_OVERHEAD` (any 0: none)."""
        if per_stream < 0 or total < 0 or max_bytes < 0:
            raise ValueError("per_stream, total and max_bytes must be >= 0")
        self.per_stream = min(per_stream, total) if max_bytes else 0
        self.total = total
        self.max_bytes = max_bytes
        self._tails: dict[str, Tail] = {}  # least recently extended first
        self._size = 0
        self._bytes = 0

    @property
    def size(self) -> int:
        """Events held, over all streams."""
        return self._size

    @property
    def bytes(self) -> int:
        """Bytes held, over all streams, as counted against ``max_bytes``."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._tails)

    def get(self, stream: str) -> Tail | None:
        """``stream``'s tail, if it has one."""
        return self._tails.get(stream)

    def after(self, stream: str, epoch: str, seq: int) -> list[EncodedEvent] | None:
        """The held events after position (``epoch``, ``seq``) of ``stream``, or ``None`` when the
        tail does not reach back to it (the store must answer). ``[]``: nothing newer is held."""
        tail = self._tails.get(stream)
        if tail is None or not tail.covers(epoch, seq):
            return None
        return tail.after(seq)

    def extend(self, stream: str, encs: Sequence[EncodedEvent]) -> None:
        """Events just committed (one epoch, consecutive, in order), as live notices bring them.

        They extend the tail when they follow on from it; events already held are skipped; a gap
        or another epoch starts the tail again from these events."""
        if not encs or not self.per_stream:
            return
        tails = self._tails
        tail = tails.pop(stream, None)  # re-inserted last: the most recently extended
        first = encs[0].event
        if tail is not None and first.epoch == tail.epoch and first.seq <= tail.last_seq + 1:
            skip = tail.last_seq + 1 - first.seq
            if skip < len(encs):
                new = encs[skip:] if skip else encs
                tail.encs.extend(new)
                self._size += len(new)
                self._bytes += _cost(new)
        else:
            if tail is not None:
                self._forget(tail)
            tail = Tail(list(encs))
            self._size += len(encs)
            self._bytes += _cost(encs)
        tails[stream] = tail
        self._trim(tail)
        self._evict()

    def prepend(self, stream: str, encs: Sequence[EncodedEvent]) -> None:
        """Older events read from the store (one epoch, consecutive, in order): the part that
        reaches up to the tail, without a gap, is added in front of it while there is room."""
        tail = self._tails.get(stream)
        if tail is None or not encs:
            return
        first = encs[0].event
        if first.epoch != tail.epoch or first.seq >= tail.first_seq:
            return
        last_seq = first.seq + len(encs) - 1
        if last_seq < tail.first_seq - 1 or encs[-1].event.seq != last_seq:
            return  # a gap before the tail (or not consecutive): nothing to join
        room = min(self.per_stream - len(tail.encs), self.total - self._size)
        if room <= 0:
            return
        older = list(encs[: tail.first_seq - first.seq])[-room:]
        cost = _cost(older)
        while older and self._bytes + cost > self.max_bytes:  # keep the newest that fit
            cost -= _cost(older[:1])
            del older[0]
        if not older:
            return
        tail.encs[:0] = older
        tail.first_seq -= len(older)
        self._size += len(older)
        self._bytes += cost

    def drop(self, stream: str) -> None:
        """Forget ``stream``'s tail (it was closed or deleted, or nobody here watches it)."""
        tail = self._tails.pop(stream, None)
        if tail is not None:
            self._forget(tail)

    def _forget(self, tail: Tail) -> None:
        self._size -= len(tail.encs)
        self._bytes -= _cost(tail.encs)

    def _trim(self, tail: Tail) -> None:
        excess = len(tail.encs) - self.per_stream
        if excess > 0:
            self._bytes -= _cost(tail.encs[:excess])
            del tail.encs[:excess]
            tail.first_seq += excess
            self._size -= excess

    def _evict(self) -> None:
        """Over a bound: drop the least recently extended tails; the last one left (the one just
        extended) loses its oldest events instead, down to one."""
        tails = self._tails
        while self._size > self.total or self._bytes > self.max_bytes:
            if len(tails) > 1:
                self._forget(tails.pop(next(iter(tails))))
                continue
            for tail in tails.values():
                encs, n, freed = tail.encs, 0, 0
                while n < len(encs) - 1 and (self._size - n > self.total or self._bytes - freed > self.max_bytes):
                    freed += len(encs[n].event.data) + EVENT_OVERHEAD
                    n += 1
                del encs[:n]
                tail.first_seq += n
                self._size -= n
                self._bytes -= freed
            return
