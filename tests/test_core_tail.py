"""The in-memory replay buffer (``server.core.tail``): contiguous, one epoch, bounded twice."""

from __future__ import annotations

import pytest

from server.core.encoding import EncodedEvent
from server.core.events import Event
from server.core.tail import EVENT_OVERHEAD, Tails


def encs(first: int, last: int, epoch: str = "e1", stream: str = "s") -> list[EncodedEvent]:
    return [EncodedEvent(Event(stream, epoch, seq, "message", b"%d" % seq, False)) for seq in range(first, last + 1)]


def seqs(found: list[EncodedEvent] | None) -> list[int] | None:
    return None if found is None else [e.event.seq for e in found]


def test_extend_follows_on_and_skips_what_is_held() -> None:
    tails = Tails(per_stream=100, total=1000)
    tails.extend("s", encs(1, 3))
    tails.extend("s", encs(2, 5))  # 2, 3 again (a notice twice), then 4, 5
    assert seqs(tails.after("s", "e1", 0)) == [1, 2, 3, 4, 5]
    assert seqs(tails.after("s", "e1", 3)) == [4, 5]
    assert tails.after("s", "e1", 5) == []  # caught up with what is held
    assert tails.size == 5
    tails.extend("s", encs(1, 2))  # old news: nothing changes
    assert tails.size == 5


def test_positions_it_cannot_answer() -> None:
    tails = Tails(per_stream=100, total=1000)
    tails.extend("s", encs(10, 12))
    assert seqs(tails.after("s", "e1", 9)) == [10, 11, 12]
    assert tails.after("s", "e1", 8) is None  # seq 9 is not held: the store must say
    assert tails.after("s", "e1", 13) is None  # beyond what it knows
    assert tails.after("s", "e2", 10) is None  # another epoch
    assert tails.after("t", "e1", 10) is None  # another stream


def test_a_gap_or_a_new_epoch_starts_again() -> None:
    tails = Tails(per_stream=100, total=1000)
    tails.extend("s", encs(1, 3))
    tails.extend("s", encs(6, 7))  # 4 and 5 never came by this way
    assert tails.after("s", "e1", 3) is None
    assert seqs(tails.after("s", "e1", 5)) == [6, 7]
    tails.extend("s", encs(1, 1, epoch="e2"))
    assert tails.after("s", "e1", 6) is None
    assert seqs(tails.after("s", "e2", 0)) == [1]
    assert tails.size == 1


def test_bounded_per_stream() -> None:
    tails = Tails(per_stream=4, total=1000)
    tails.extend("s", encs(1, 3))
    tails.extend("s", encs(4, 10))
    assert seqs(tails.after("s", "e1", 6)) == [7, 8, 9, 10]
    assert tails.after("s", "e1", 5) is None
    assert tails.size == 4


def test_bounded_in_total_least_recently_extended_goes_first() -> None:
    tails = Tails(per_stream=4, total=6)
    tails.extend("a", encs(1, 3, stream="a"))
    tails.extend("b", encs(1, 2, stream="b"))
    tails.extend("a", encs(4, 4, stream="a"))  # a is now the most recent
    assert tails.size == 6
    tails.extend("c", encs(1, 1, stream="c"))  # 7 > 6: b, the least recently extended, goes
    assert tails.get("b") is None
    assert tails.get("a") is not None and tails.get("c") is not None
    assert tails.size == 5
    assert len(tails) == 2


def test_prepend_joins_older_events_only_without_a_gap() -> None:
    tails = Tails(per_stream=10, total=1000)
    tails.extend("s", encs(20, 22))
    tails.prepend("s", encs(10, 15))  # ends at 15: a gap before 20
    assert tails.after("s", "e1", 15) is None
    tails.prepend("s", encs(15, 21))  # overlaps: 15..19 join
    assert seqs(tails.after("s", "e1", 14)) == list(range(15, 23))
    tails.prepend("s", encs(5, 14, epoch="e0"))  # another epoch
    assert tails.get("s").first_seq == 15  # type: ignore[union-attr]
    tails.prepend("s", encs(1, 14))  # room for 2 more (10 per stream): the newest two, 13 and 14
    assert tails.get("s").first_seq == 13  # type: ignore[union-attr]
    assert tails.size == 10
    tails.prepend("t", encs(1, 2, stream="t"))  # no tail to join: nothing is kept
    assert tails.get("t") is None


def test_prepend_respects_the_total() -> None:
    tails = Tails(per_stream=10, total=4)
    tails.extend("s", encs(10, 12))
    tails.prepend("s", encs(1, 9))
    assert tails.size == 4
    assert tails.get("s").first_seq == 9  # type: ignore[union-attr]


def test_drop_and_off() -> None:
    tails = Tails(per_stream=10, total=100)
    tails.extend("s", encs(1, 3))
    tails.drop("s")
    tails.drop("s")
    assert tails.size == 0 and tails.after("s", "e1", 0) is None
    off = Tails(per_stream=0, total=0)
    off.extend("s", encs(1, 3))
    assert off.size == 0 and off.after("s", "e1", 0) is None
    with pytest.raises(ValueError):
        Tails(per_stream=-1, total=0)


def big(first: int, last: int, size: int, stream: str = "s") -> list[EncodedEvent]:
    return [EncodedEvent(Event(stream, "e1", seq, "message", b"x" * size, False)) for seq in range(first, last + 1)]


def test_bounded_in_bytes() -> None:
    cost = 1000 + EVENT_OVERHEAD
    tails = Tails(per_stream=100, total=1000, max_bytes=5 * cost)
    tails.extend("a", big(1, 3, 1000, stream="a"))
    tails.extend("b", big(1, 2, 1000, stream="b"))
    assert tails.bytes == 5 * cost
    tails.extend("b", big(3, 3, 1000, stream="b"))  # over: a, the least recently extended, goes
    assert tails.get("a") is None and tails.bytes == 3 * cost
    tails.extend("b", big(4, 9, 1000, stream="b"))  # alone and over: its oldest events go
    assert seqs(tails.after("b", "e1", 4)) == [5, 6, 7, 8, 9]
    assert tails.bytes == 5 * cost and tails.size == 5
    tails.prepend("b", big(1, 4, 1000, stream="b"))  # no room in bytes: nothing joins
    assert tails.get("b").first_seq == 5  # type: ignore[union-attr]
    huge = Tails(per_stream=100, total=1000, max_bytes=cost)
    huge.extend("h", big(1, 2, 5000, stream="h"))  # one event over the bound: the newest is kept
    assert seqs(huge.after("h", "e1", 1)) == [2]
    huge.drop("h")
    assert (huge.size, huge.bytes) == (0, 0)
