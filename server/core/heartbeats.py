"""The heartbeat ticker: one task per worker checks every subscription that asked for heartbeats.

Subscriptions are queued per interval in the order of their next check (FIFO: every entry of one
queue is due ``interval`` after it was queued), so a check costs no timer per subscription.
"""

from __future__ import annotations

import math
from collections import deque
from typing import NoReturn, Protocol

import trio

__all__ = ["BEAT_SLACK", "Beating", "HeartbeatTicker", "heartbeat_or_none"]

BEAT_SLACK = 0.5
"""Heartbeat checks due within this many seconds (at most a quarter of the interval) are made
together, early: one wake-up of the ticker serves every subscription that connected in that
window, instead of one per subscription. A heartbeat is never later than its interval."""


class Beating(Protocol):
    """What the ticker checks (a :class:`~server.core.subscription.Subscription`)."""

    def beat(self) -> bool:
        """One check; False once it needs no more."""


class HeartbeatTicker:
    """Calls ``beat()`` of each watched object every ``interval`` seconds while :meth:`run` runs."""

    __slots__ = ("_beats", "_scope")

    def __init__(self) -> None:
        self._beats: dict[float, deque[tuple[float, Beating]]] = {}
        self._scope: trio.CancelScope | None = None  # the ticker's sleep, while it sleeps

    def watch(self, sub: Beating, interval: float) -> None:
        """Check ``sub`` every ``interval`` seconds from now on, until its ``beat()`` says False."""
        due = trio.current_time() + interval
        queue = self._beats.get(interval)
        if queue is None:
            queue = self._beats[interval] = deque()
        queue.append((due, sub))
        scope = self._scope
        if scope is not None and due < scope.deadline:
            scope.deadline = due

    async def run(self) -> NoReturn:
        """Make the checks as they fall due (cancel to stop)."""
        beats = self._beats
        try:
            while True:
                now = trio.current_time()
                wake = math.inf
                for interval, queue in list(beats.items()):
                    due_by = now + min(BEAT_SLACK, interval / 4)
                    while queue and queue[0][0] <= due_by:
                        sub = queue.popleft()[1]
                        if sub.beat():
                            queue.append((now + interval, sub))
                    if queue:
                        wake = min(wake, queue[0][0])
                    else:
                        del beats[interval]
                with trio.CancelScope(deadline=wake) as scope:
                    self._scope = scope
                    await trio.sleep_forever()
                self._scope = None
        finally:
            self._scope = None


def heartbeat_or_none(seconds: float) -> float | None:
    """``None`` for a non-positive or infinite interval (no heartbeats), else ``seconds``."""
    return seconds if 0 < seconds < math.inf else None
