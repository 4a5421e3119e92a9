"""The Redis store's pure parts: key names, the script's arguments and what its replies mean."""

from __future__ import annotations

import pytest

from server.core.events import Event, NewEvent, StreamInfo
from server.core.ids import MAX_SEQ, format_id
from server.core.ports.store import (
    Appended,
    AppendResult,
    Closed,
    Deleted,
    Head,
    IdempotencyKeyReused,
    Page,
    Retention,
    StreamClosed,
)
from server.store.fingerprint import fingerprint
from server.store.redis_keys import Keys, prefix_problem
from server.store.redis_ops import (
    SCRIPT,
    Unreplicated,
    head,
    ms,
    read_call,
    read_page,
    trim_call,
    write_call,
    write_outcome,
)
from server.store.writes import AppendOp, CloseOp, DeleteOp, append_op

KEYS = Keys("p:")
RETENTION = Retention(max_events=5, max_bytes=100, max_age=1.5, idempotency_window=60)


def test_a_streams_keys_share_one_hash_tag_under_the_prefix() -> None:
    assert KEYS.meta("a:b") == "p:{a:b}:meta" and KEYS.log("a:b") == "p:{a:b}:log"
    assert KEYS.ages == "p:ages" and KEYS.idempotency("k 1") == "p:idem:k 1" and KEYS.lineage == "p:lineage"
    assert KEYS.stream_keys("s") == ["p:{s}:meta", "p:{s}:log", "p:ages"]


@pytest.mark.parametrize("prefix", ["", "a b", "x{", "}", "é", "x" * 65])
def test_a_prefix_that_would_break_the_layout_is_refused(prefix: str) -> None:
    assert prefix_problem(prefix) is not None
    with pytest.raises(ValueError, match="redis prefix"):
        Keys(prefix)


def test_good_prefixes_pass() -> None:
    assert prefix_problem("sluice:") is None and prefix_problem("a") is None and prefix_problem("x" * 64) is None


def test_times_cross_as_whole_milliseconds() -> None:
    assert ms(1.5) == 1500 and ms(0.0019) == 1 and ms(1_700_000_000.123456) == 1_700_000_000_123


def test_an_append_call_carries_the_events_retention_and_key() -> None:
    op = append_op("s", [NewEvent("t", b"\x00\xff", True), NewEvent("m", b"hi")], "k")
    names, args = write_call(KEYS, op, 10.25, RETENTION, "0123456789", strict=True)
    assert names == ["p:{s}:meta", "p:{s}:log", "p:ages", "p:lineage", "p:idem:k"]
    assert args[:10] == [
        "append",
        "10250",
        "0123456789",
        "5",
        "100",
        "1500",
        "60000",
        "s",
        "p:",
        fingerprint(op.events),
    ]
    assert args[10:] == ["2", "1", "t", b"\x00\xff", b"1", "m", b"hi", b"0"]
    names, args = write_call(KEYS, append_op("s", [NewEvent("m", b"")], None), 1, RETENTION, "e", strict=False)
    assert len(names) == 4 and args[9] == b"" and args[11] == "0"


def test_an_empty_append_is_refused_before_any_call() -> None:
    with pytest.raises(ValueError):
        append_op("s", [], None)


def test_close_delete_trim_and_read_calls() -> None:
    close = write_call(KEYS, CloseOp("s"), 2, RETENTION, "e", strict=True)
    assert close == (["p:{s}:meta", "p:{s}:log", "p:lineage"], ["close", "2000", "e", "1"])
    delete = write_call(KEYS, DeleteOp("s"), 2, RETENTION, "e", strict=True)
    assert delete == (KEYS.stream_keys("s"), ["delete", "s"])
    assert trim_call(KEYS, "s", 3, RETENTION) == (KEYS.stream_keys("s"), ["trim", "3000", "1500", "s"])
    assert read_call(KEYS, "s", 4, 10) == (["p:{s}:meta", "p:{s}:log", "p:lineage"], ["read", "5-0", "10", "0", ""])
    assert read_call(KEYS, "s", -7, -1)[1] == ["read", "1-0", "0", "0", ""]
    assert read_call(KEYS, "s", MAX_SEQ, 1, strict=True, epoch="e")[1] == ["read", f"{MAX_SEQ}-0", "1", "1", "e"]


def test_unreplicated_streams_are_remembered_until_acknowledged_within_a_bound() -> None:
    streams = Unreplicated(limit=2)
    streams.mark("a")
    streams.mark("b")
    streams.mark("a")  # marked again: the newest
    streams.mark("c")  # over the bound: the longest remembered ("b") goes
    assert ("a" in streams, "b" in streams, "c" in streams, len(streams)) == (True, False, True, 2)
    streams.clear("a")
    streams.clear("never")
    assert "a" not in streams and len(streams) == 1


def test_append_replies() -> None:
    op = AppendOp("s", (NewEvent("t", b"a"), NewEvent("t", b"b", True)), "k")
    ok = write_outcome(op, [b"ok", b"abcdefabcd", b"7"])
    events = [Event("s", "abcdefabcd", 7, "t", b"a"), Event("s", "abcdefabcd", 8, "t", b"b", True)]
    assert ok.value == AppendResult([e.id for e in events], events) and ok.notices == [Appended(events)]
    dup = write_outcome(op, [b"dup", b"abcdefabcd", b"3", b"2"])
    ids = [format_id("abcdefabcd", 3), format_id("abcdefabcd", 4)]
    assert dup.value == AppendResult(ids, duplicate=True) and dup.notices == []
    assert isinstance(write_outcome(op, [b"closed"]).error, StreamClosed)
    assert isinstance(write_outcome(op, [b"reused"]).error, IdempotencyKeyReused)
    with pytest.raises(ValueError):
        write_outcome(op, [b"what", b"e", b"1"])


def test_close_and_delete_replies() -> None:
    changed = write_outcome(CloseOp("s"), [1, b"abcdefabcd", b"9", 3])
    assert changed.value == StreamInfo("s", "abcdefabcd", 7, 9, True, 3)
    assert changed.notices == [Closed("s", "abcdefabcd", 9)]
    again = write_outcome(CloseOp("s"), [0, b"abcdefabcd", b"0", 0])
    assert again.value == StreamInfo("s", "abcdefabcd", 0, 0, True, 0) and again.notices == []
    assert write_outcome(DeleteOp("s"), 1).notices == [Deleted("s")]
    assert write_outcome(DeleteOp("s"), 0).value is False


def test_read_replies() -> None:
    assert read_page("s", None) == Page(None)
    fields = [b"t", b"m", b"d", b"x", b"b", b"0", b"s", b"1", b"c", b"0"]
    page = read_page(
        "s", [b"abcdefabcd", b"12", b"0", 2, [[b"11-0", fields], [b"12-0", [*fields[:5], b"1", *fields[6:]]]]]
    )
    assert page.info == StreamInfo("s", "abcdefabcd", 11, 12, False, 2)
    assert page.events == [Event("s", "abcdefabcd", 11, "m", b"x"), Event("s", "abcdefabcd", 12, "m", b"x", True)]
    assert head([b"abcdefabcd", b"5", b"1"]) == Head("abcdefabcd", 5, True) and head([None, None, None]) is None


def test_the_script_knows_every_operation() -> None:
    for op in ("append", "close", "delete", "trim", "read"):
        assert f"{op} = {op}" in SCRIPT
