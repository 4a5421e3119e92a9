"""Where a subscription starts (API.md, "Subscribe: where to start").

``parse_start`` turns what the client sent into a ``Start``; ``plan_replay`` checks it against the
stream's current state and returns a ``Plan``: the sequence number after which to deliver, and the
``Reset`` to announce first when the exact resume the client asked for is impossible. Resume is
exact or announced, never a silent skip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from server.core.events import InvalidInput, StreamInfo
from server.core.ids import Position, parse_id

__all__ = ["Plan", "Reset", "ResetReason", "Start", "StartKind", "parse_start", "plan_replay"]

StartKind = Literal["after", "start", "now", "invalid"]
ResetReason = Literal["gone", "epoch", "invalid"]


@dataclass(frozen=True, slots=True)
class Start:
    """A subscriber's requested start.

    ``after``: resume after ``position`` (``requested`` is the id text the client sent);
    ``start``: everything retained; ``now``: only events published from now on;
    ``invalid``: the client sent ``requested``, which is not a well-formed id (``position`` None).
    """

    kind: StartKind
    position: Position | None = None
    requested: str | None = None


_NOW = Start("now")
_START = Start("start")


def parse_start(
    header_last_event_id: str | None,
    query_last_event_id: str | None,
    from_: str | None,
) -> Start:
    """Return the start named by a subscribe request; never raises for a malformed id.

    Precedence: the ``Last-Event-ID`` header, then the ``last_event_id`` query parameter, then
    ``from`` (``start`` or ``now``; ``now`` when absent). An empty id value counts as absent
    (browsers may send an empty ``Last-Event-ID``), as does an empty ``from``. A malformed id gives
    kind ``invalid``. Values are used as given: callers pass header values already stripped of
    surrounding whitespace, as HTTP parsers do.

    Raises ``InvalidInput("bad_from")`` when ``from`` is neither ``start`` nor ``now``, even when
    an id takes precedence, so a bad URL fails on every connect, not only on the first.
    """
    if from_ == "now" or not from_:
        fallback = _NOW
    elif from_ == "start":
        fallback = _START
    else:
        raise InvalidInput("bad_from", "from must be 'start' or 'now'")
    raw = header_last_event_id or query_last_event_id
    if not raw:
        return fallback
    position = parse_id(raw)
    if position is None:
        return Start("invalid", None, raw)
    return Start("after", position, raw)


@dataclass(frozen=True, slots=True)
class Reset:
    """Why an exact resume is impossible, announced to the client before any event.

    ``reason``: ``gone`` (events after the requested id were trimmed), ``epoch`` (the id is from a
    history that no longer exists) or ``invalid`` (malformed, or never issued by this history).
    ``earliest``: id of the first event that will be delivered, ``None`` when nothing is retained.
    ``requested``: the id text the client sent.
    """

    reason: ResetReason
    earliest: str | None
    requested: str | None

    def as_dict(self) -> dict[str, str | None]:
        """Return ``{"reason", "earliest", "requested"}``, the reset's wire fields (a new dict)."""
        return {"reason": self.reason, "earliest": self.earliest, "requested": self.requested}


@dataclass(frozen=True, slots=True)
class Plan:
    """What to send a new subscriber: ``reset`` first if set, then every event with seq > ``after_seq``.

    ``epoch`` is the history the plan applies to (``None`` when the stream does not exist yet):
    events of any other epoch are not covered by it.
    """

    after_seq: int
    epoch: str | None
    reset: Reset | None = None


def plan_replay(start: Start, info: StreamInfo | None) -> Plan:
    """Return the replay plan for ``start`` against the stream's state ``info`` (``None``: no stream).

    ``now`` delivers after ``info.last_seq``; ``start`` delivers everything retained. ``after``
    position (E, S) is exact (deliver seq > S) when S is in the current epoch, was issued, and
    every event after it is still retained; otherwise the plan delivers everything retained,
    preceded by a reset: ``epoch`` (no stream, or another epoch), ``invalid`` (S beyond the last
    id issued, or a malformed id) or ``gone`` (events after S were trimmed).
    """
    kind = start.kind
    epoch = info.epoch if info is not None else None
    if kind == "now":
        return Plan(info.last_seq if info is not None else 0, epoch)
    if kind == "start":
        return Plan(0, epoch)
    earliest = info.first_id if info is not None else None
    position = start.position
    if kind == "invalid" or position is None:
        return Plan(0, epoch, Reset("invalid", earliest, start.requested))
    if info is None or position.epoch != info.epoch:
        return Plan(0, epoch, Reset("epoch", earliest, start.requested))
    seq = position.seq
    if seq > info.last_seq:
        return Plan(0, epoch, Reset("invalid", earliest, start.requested))
    if (info.length > 0 and seq < info.first_seq - 1) or (info.length == 0 and seq < info.last_seq):
        return Plan(0, epoch, Reset("gone", earliest, start.requested))
    return Plan(seq, epoch)
