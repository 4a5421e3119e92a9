"""The hub's counters: what a worker delivered (exported as ``sluice_*`` metrics).

Plain integer attributes, bumped on the hot path without locks (one trio thread per worker).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(slots=True)
class HubStats:
    """What the hub has done since the worker started."""

    published: int = 0  # events committed and fanned out by this worker's hub
    delivered: int = 0  # event deliveries handed to connections (one per subscriber per event)
    replayed: int = 0  # events delivered from the store during catch-up
    replayed_memory: int = 0  # events delivered from the in-memory replay buffer during catch-up
    replay_buffered: int = 0  # events held in the in-memory replay buffer now
    subscriptions: int = 0  # currently registered subscriptions
    subscriptions_total: int = 0
    dropped: int = 0  # subscriptions ended because their connection was cut for falling behind (slow consumer)
    subscriptions_gone: int = 0  # subscriptions ended because their client left (closed or reset the connection)
    reordered: int = 0  # notices held behind a gap until the missing ones came (or were read)
    gap_reads: int = 0  # gaps read from the store once for all of a stream's subscribers
    gaps_given_up: int = 0  # gaps the store could not fill: passed on as they were
    resets: dict[str, int] = field(default_factory=lambda: {"gone": 0, "epoch": 0, "invalid": 0})

    def as_dict(self) -> dict[str, object]:
        """A snapshot, for ``/metrics`` and tests."""
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), dict) else v) for f in fields(self)}
