"""Subscription start parsing and replay planning (server.core.replay)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.core.events import InvalidInput, StreamInfo
from server.core.ids import Position, format_id
from server.core.replay import Plan, Reset, Start, parse_start, plan_replay

E = "0123456789"
OTHER = "abcdefabcd"


def pid(seq: int, epoch: str = E) -> str:
    return format_id(epoch, seq)


def info(first: int, last: int, *, epoch: str = E) -> StreamInfo:
    """A stream retaining seqs first..last (empty when first > last)."""
    length = max(0, last - first + 1)
    return StreamInfo("s", epoch, first if length else 0, last, False, length)


def after(seq: int, epoch: str = E) -> Start:
    return Start("after", Position(epoch, seq), format_id(epoch, seq))


# --- parse_start ---------------------------------------------------------------------------


def test_default_is_now() -> None:
    assert parse_start(None, None, None) == Start("now", None, None)


def test_from_values() -> None:
    assert parse_start(None, None, "now") == Start("now")
    assert parse_start(None, None, "start") == Start("start")
    assert parse_start(None, None, "") == Start("now")


@pytest.mark.parametrize("bad", ["START", "begin", "0", " now"])
def test_bad_from_raises(bad: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_start(None, None, bad)
    assert exc.value.code == "bad_from"


def test_bad_from_raises_even_with_an_id() -> None:
    with pytest.raises(InvalidInput):
        parse_start(pid(1), None, "later")


def test_header_wins_over_query_and_from() -> None:
    assert parse_start(pid(3), pid(9), "start") == Start("after", Position(E, 3), pid(3))


def test_query_wins_over_from() -> None:
    assert parse_start(None, pid(9), "start") == Start("after", Position(E, 9), pid(9))


def test_empty_values_count_as_absent() -> None:
    assert parse_start("", pid(4), None) == Start("after", Position(E, 4), pid(4))
    assert parse_start("", "", "start") == Start("start")
    assert parse_start("", None, None) == Start("now")


@pytest.mark.parametrize("raw", ["nope", pid(1, OTHER).upper(), pid(1) + " ", "0123456789-1", E])
def test_malformed_id_is_invalid_not_an_error(raw: str) -> None:
    assert parse_start(raw, None, None) == Start("invalid", None, raw)
    assert parse_start(None, raw, "start") == Start("invalid", None, raw)


def test_malformed_header_does_not_fall_back_to_query() -> None:
    assert parse_start("junk", pid(2), None).kind == "invalid"


# --- plan_replay ---------------------------------------------------------------------------


def test_reset_as_dict() -> None:
    assert Reset("gone", pid(5), pid(1)).as_dict() == {"reason": "gone", "earliest": pid(5), "requested": pid(1)}
    assert Reset("epoch", None, None).as_dict() == {"reason": "epoch", "earliest": None, "requested": None}


def test_now() -> None:
    assert plan_replay(Start("now"), None) == Plan(0, None, None)
    assert plan_replay(Start("now"), info(3, 10)) == Plan(10, E, None)
    assert plan_replay(Start("now"), info(11, 10)) == Plan(10, E, None)


def test_start() -> None:
    assert plan_replay(Start("start"), None) == Plan(0, None, None)
    assert plan_replay(Start("start"), info(3, 10)) == Plan(0, E, None)


def test_invalid() -> None:
    assert plan_replay(Start("invalid", None, "x"), None) == Plan(0, None, Reset("invalid", None, "x"))
    assert plan_replay(Start("invalid", None, "x"), info(3, 10)) == Plan(0, E, Reset("invalid", pid(3), "x"))
    assert plan_replay(Start("invalid", None, "x"), info(11, 10)) == Plan(0, E, Reset("invalid", None, "x"))


def test_after_without_stream_is_epoch_reset() -> None:
    assert plan_replay(after(4), None) == Plan(0, None, Reset("epoch", None, pid(4)))


def test_after_other_epoch_is_epoch_reset() -> None:
    assert plan_replay(after(4, OTHER), info(1, 10)) == Plan(0, E, Reset("epoch", pid(1), pid(4, OTHER)))


def test_after_never_issued_is_invalid_reset() -> None:
    assert plan_replay(after(11), info(1, 10)) == Plan(0, E, Reset("invalid", pid(1), pid(11)))
    assert plan_replay(after(1), info(1, 0)) == Plan(0, E, Reset("invalid", None, pid(1)))


def test_after_trimmed_is_gone_reset() -> None:
    assert plan_replay(after(3), info(5, 10)) == Plan(0, E, Reset("gone", pid(5), pid(3)))
    assert plan_replay(after(0), info(2, 10)) == Plan(0, E, Reset("gone", pid(2), pid(0)))


def test_after_everything_trimmed_is_gone_unless_caught_up() -> None:
    assert plan_replay(after(9), info(11, 10)) == Plan(0, E, Reset("gone", None, pid(9)))
    assert plan_replay(after(10), info(11, 10)) == Plan(10, E, None)


def test_after_exact() -> None:
    assert plan_replay(after(4), info(5, 10)) == Plan(4, E, None)  # just before the first retained
    assert plan_replay(after(7), info(5, 10)) == Plan(7, E, None)
    assert plan_replay(after(10), info(5, 10)) == Plan(10, E, None)  # caught up
    assert plan_replay(after(0), info(1, 10)) == Plan(0, E, None)  # nothing ever trimmed
    assert plan_replay(after(0), info(1, 0)) == Plan(0, E, None)  # empty new stream


def test_inconsistent_start_is_treated_as_invalid() -> None:
    # An "after" without a position cannot be honoured: it is announced, not skipped.
    assert plan_replay(Start("after", None, "x"), info(1, 3)).reset == Reset("invalid", pid(1), "x")


@given(
    last=st.integers(min_value=0, max_value=60),
    first_off=st.integers(min_value=0, max_value=61),
    seq=st.integers(min_value=0, max_value=70),
)
def test_never_a_silent_skip(last: int, first_off: int, seq: int) -> None:
    first = min(first_off + 1, last + 1)  # first == last + 1: nothing retained
    stream = info(first, last)
    retained = list(range(first, last + 1))
    plan = plan_replay(after(seq), stream)
    delivered = [s for s in retained if s > plan.after_seq]
    assert plan.epoch == E
    if plan.reset is None:
        # Exact: precisely the ids after the requested one, none missing, none repeated.
        assert delivered == list(range(seq + 1, last + 1))
    else:
        assert plan.reset.requested == pid(seq)
        assert plan.reset.earliest == (pid(first) if retained else None)
        assert delivered == retained
        assert plan.reset.reason in ("gone", "invalid")
    # Gone exactly when ids after `seq` were issued but are no longer retained.
    lost = seq <= last and any(s not in retained for s in range(seq + 1, last + 1))
    assert (plan.reset is not None and plan.reset.reason == "gone") == lost
    assert (plan.reset is not None and plan.reset.reason == "invalid") == (seq > last)
