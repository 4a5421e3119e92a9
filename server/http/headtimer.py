"""One clock for every HTTP/1.1 connection waiting for a request head: no cancel scope per request.

A keep-alive connection waits for each request's head under a deadline (``idle_timeout`` while
nothing of it came, ``header_timeout`` once it started). A trio cancel scope with a deadline per
request costs more than parsing the head (entering and leaving it, and the run loop's deadline
heap), so the server keeps one :class:`HeadTimer` instead: a waiter is put in the slot of its
deadline rounded up to :data:`TICK`, taken out again when its head arrives (two set operations),
and the timer's one task calls :meth:`HeadWaiter.head_expired` for what is still in a slot when
its time comes. A deadline therefore fires no earlier than asked and at most ``TICK`` later.
"""

from __future__ import annotations

import heapq
import math
from typing import Protocol

import trio

TICK = 0.05
"""Seconds: the timer's resolution (deadlines are rounded up to a multiple of it)."""

_PER_SECOND = 1.0 / TICK


class HeadWaiter(Protocol):
    """What the timer knows of a connection waiting for a head."""

    head_slot: int
    """The slot the waiter is armed in (``-1``: none); kept by the timer only."""

    def head_expired(self) -> None:
        """The deadline passed while armed: called once per arming, on the timer's task."""


class HeadTimer:
    """Deadlines for many waiters, kept by one task (:meth:`run`).

    Promises: after :meth:`arm` ``(w, deadline)``, ``w.head_expired()`` is called once, no earlier
    than ``deadline`` (trio's clock) and at most :data:`TICK` after it, unless :meth:`disarm`
    ``(w)`` or another :meth:`arm` came first. What it holds is bounded by the armed waiters (each
    in one slot) plus one slot per :data:`TICK` of the longest deadline armed.
    """

    __slots__ = ("_due", "_earlier", "_slots", "_target")

    def __init__(self) -> None:
        self._slots: dict[int, set[HeadWaiter]] = {}
        self._due: list[int] = []  # heap of the slots' keys
        self._target = math.inf  # the key the timer sleeps until
        self._earlier = trio.Event()  # set when a slot before the target is made

    def arm(self, waiter: HeadWaiter, deadline: float) -> None:
        """Expire ``waiter`` at ``deadline`` (replacing any deadline it was armed with)."""
        key = math.ceil(deadline * _PER_SECOND)
        old = waiter.head_slot
        if old == key:
            return
        if old >= 0:
            self._take(waiter, old)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = set()
            heapq.heappush(self._due, key)
            if key < self._target:
                self._earlier.set()
        slot.add(waiter)
        waiter.head_slot = key

    def disarm(self, waiter: HeadWaiter) -> None:
        """Forget ``waiter``'s deadline (a no-op if it has none)."""
        old = waiter.head_slot
        if old >= 0:
            self._take(waiter, old)
            waiter.head_slot = -1

    def _take(self, waiter: HeadWaiter, key: int) -> None:
        slot = self._slots.get(key)
        if slot is not None:
            slot.discard(waiter)

    async def run(self) -> None:
        """Expire waiters as their slots come due, forever (cancel to stop)."""
        due, slots = self._due, self._slots
        while True:
            now_key = math.floor(trio.current_time() * _PER_SECOND)
            expired: list[tuple[int, set[HeadWaiter]]] = []
            while due and due[0] <= now_key:
                key = heapq.heappop(due)
                expired.append((key, slots.pop(key)))
            for key, slot in expired:  # a waiter re-armed from here lands in a later pass
                for waiter in slot:
                    if waiter.head_slot == key:  # not disarmed by an earlier waiter's expiry
                        waiter.head_slot = -1
                        waiter.head_expired()
            self._target = due[0] if due else math.inf
            self._earlier = trio.Event()
            with trio.move_on_at(self._target * TICK):
                await self._earlier.wait()
