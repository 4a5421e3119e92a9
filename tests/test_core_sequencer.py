"""The sequencer puts commit notices back in order per stream: late ones are waited for, gaps that
stay open are read once, and what the store cannot fill is passed on as it is; never reordered,
never twice."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.core.events import Event
from server.core.sequencer import Gap, Sequencer


def ev(seq: int, stream: str = "s", epoch: str = "e1") -> Event:
    return Event(stream, epoch, seq, "message", b"%d" % seq)


def evs(first: int, last: int, stream: str = "s", epoch: str = "e1") -> list[Event]:
    return [ev(n, stream, epoch) for n in range(first, last + 1)]


def seqs(runs: list[list[Event]]) -> list[int]:
    return [e.seq for run in runs for e in run]


def test_notices_in_order_pass_straight_on() -> None:
    q = Sequencer(0.05)
    assert seqs(q.accept(evs(1, 2), 0.0)) == [1, 2]
    assert seqs(q.accept(evs(3, 3), 0.0)) == [3]
    assert q.held == 0 and q.due(1.0) == []


def test_a_notice_ahead_of_a_late_one_waits_for_it_then_both_go_in_order() -> None:
    q = Sequencer(0.05)
    q.accept(evs(1, 8), 0.0)
    assert q.accept(evs(10, 10), 0.0) == []  # 9 is still on its way
    assert q.holding("s") and q.held == 1
    assert q.next_deadline == pytest.approx(0.05)
    assert seqs(q.accept(evs(9, 9), 0.01)) == [9, 10]
    assert not q.holding("s") and q.due(1.0) == []


def test_what_was_passed_on_is_never_passed_on_again() -> None:
    q = Sequencer(0.05)
    q.accept(evs(1, 3), 0.0)
    assert q.accept(evs(2, 3), 0.0) == []
    assert seqs(q.accept(evs(2, 5), 0.0)) == [4, 5]  # the overlap is cut
    q.accept(evs(8, 9), 0.0)
    q.accept(evs(7, 9), 0.0)  # held twice over: trimmed when released
    assert seqs(q.accept(evs(6, 6), 0.0)) == [6, 7, 8, 9]


def test_a_gap_that_stays_open_is_due_after_the_window_and_filled_from_the_store() -> None:
    q = Sequencer(0.05)
    q.accept(evs(1, 3), 0.0)
    q.accept(evs(7, 8), 0.01)
    assert q.due(0.05) == []
    (gap,) = q.due(0.07)
    assert gap == Gap("s", "e1", 3, 7)
    runs, filled = q.fill(gap, evs(4, 6), 0.07)
    assert filled and seqs(runs) == [4, 5, 6, 7, 8]
    assert not q.holding("s")


def test_a_gap_the_store_cannot_fill_is_given_up_and_passed_on_as_it_is() -> None:
    q = Sequencer(0.05)
    q.accept(evs(1, 3), 0.0)
    q.accept(evs(7, 8), 0.0)
    (gap,) = q.due(1.0)
    runs, filled = q.fill(gap, [], 1.0)  # trimmed away, or the read failed
    assert not filled and seqs(runs) == [7, 8]
    assert seqs(q.accept(evs(9, 9), 1.0)) == [9]  # and on from there


def test_a_gap_closed_by_a_late_notice_during_the_read_makes_the_answer_a_no_op() -> None:
    q = Sequencer(0.05)
    q.accept(evs(1, 3), 0.0)
    q.accept(evs(5, 5), 0.0)
    (gap,) = q.due(1.0)
    assert seqs(q.accept(evs(4, 4), 1.0)) == [4, 5]
    assert q.fill(gap, evs(4, 4), 1.0) == ([], True)


def test_a_short_read_passes_on_what_it_has_and_keeps_waiting_for_the_rest() -> None:
    q = Sequencer(0.05)
    q.accept(evs(1, 1), 0.0)
    q.accept(evs(10, 10), 0.0)
    (gap,) = q.due(1.0)
    runs, filled = q.fill(gap, evs(2, 5), 1.0)
    assert filled and seqs(runs) == [2, 3, 4, 5]
    assert q.due(1.0) == [] and q.due(1.05) == [Gap("s", "e1", 5, 10)]


def test_too_much_held_for_one_stream_is_given_up_at_once() -> None:
    q = Sequencer(0.05, max_held=3)
    q.accept(evs(1, 1), 0.0)
    assert q.accept(evs(3, 4), 0.0) == []
    assert seqs(q.accept(evs(5, 6), 0.0)) == [3, 4, 5, 6]


def test_a_new_epoch_passes_what_was_held_first_then_starts_over() -> None:
    q = Sequencer(0.05)
    q.accept(evs(1, 1), 0.0)
    q.accept(evs(3, 3), 0.0)
    runs = q.accept(evs(1, 1, epoch="e2"), 0.0)
    assert [(e.epoch, e.seq) for run in runs for e in run] == [("e1", 3), ("e2", 1)]
    assert seqs(q.accept(evs(2, 2, epoch="e2"), 0.0)) == [2]


def test_streams_are_ordered_independently_and_forgotten() -> None:
    q = Sequencer(0.05)
    q.accept(evs(1, 1, "a"), 0.0)
    q.accept(evs(3, 3, "a"), 0.0)
    assert seqs(q.accept(evs(1, 2, "b"), 0.0)) == [1, 2]
    assert seqs(q.forget("a")) == [3]
    assert seqs(q.accept(evs(7, 7, "a"), 0.0)) == [7]  # no position any more: taken as it comes


def test_window_zero_passes_everything_on_as_it_comes() -> None:
    q = Sequencer(0.0)
    q.accept(evs(1, 1), 0.0)
    assert seqs(q.accept(evs(3, 3), 0.0)) == [3]


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=25),
    data=st.data(),
    store_has_them=st.booleans(),
)
def test_property_whatever_the_arrival_order_the_output_is_in_order_and_never_twice(
    sizes: list[int], data: st.DataObject, store_has_them: bool
) -> None:
    history: list[Event] = []
    runs: list[list[Event]] = []
    for size in sizes:
        run = evs(len(history) + 1, len(history) + size)
        history += run
        runs.append(run)
    # the first run comes first (it anchors the position); the rest in any order, some twice, some never
    rest = data.draw(st.permutations(runs[1:]))
    lost = data.draw(st.sets(st.integers(0, max(0, len(rest) - 1)), max_size=3)) if rest else set()
    dups = data.draw(st.lists(st.sampled_from(runs), max_size=3))
    arrivals = [runs[0]] + [r for i, r in enumerate(rest) if i not in lost] + dups
    q = Sequencer(0.05)
    out: list[Event] = []
    now = 0.0
    for run in arrivals:
        now += data.draw(st.sampled_from([0.0, 0.01, 0.1]))
        for gap in q.due(now):
            got = [e for e in history if gap.after_seq < e.seq < gap.before_seq] if store_has_them else []
            out += [e for r in q.fill(gap, got, now)[0] for e in r]
        out += [e for r in q.accept(run, now) for e in r]
    for _ in range(len(history) + 1):  # the gap reader's later passes
        now += 1.0
        for gap in q.due(now):
            got = [e for e in history if gap.after_seq < e.seq < gap.before_seq] if store_has_them else []
            out += [e for r in q.fill(gap, got, now)[0] for e in r]
    got_seqs = [e.seq for e in out]
    assert got_seqs == sorted(set(got_seqs))  # in order, nothing twice
    assert not q.holding("s")
    if store_has_them:
        last_heard = max(e.seq for run in arrivals for e in run)
        assert got_seqs == list(range(1, last_heard + 1))  # every gap filled
    else:
        # nothing is withheld: the newest heard is out (a notice heard after its gap was given up
        # is dropped: the subscriptions that saw the gap ask the store, which has it)
        heard = {e.seq for run in arrivals for e in run}
        assert set(got_seqs) <= heard and max(got_seqs) == max(heard)
