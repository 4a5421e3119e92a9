"""Keeping CPython's cyclic GC off the hot path of a worker that holds many long-lived objects.

A worker holds tens of thousands of connections, each a few dozen GC-tracked objects. Left alone,
the GC's full collections traverse all of them again and again (DESIGN.md measured 40-68 % of the
CPU in a fan-out spike). So start-up objects are frozen, young collections are made rarer, and
every ``interval`` the objects that survived since are frozen too (:class:`FreezePolicy`). The
worker process (:mod:`server.process.worker`) applies both once its server accepts.

Freezing has one trap: a frozen object that dies in a reference cycle is never collected (h2's
connection objects keep tables of their own bound methods, for instance), so a periodic freeze
alone leaks every such connection that lived through one. :class:`FreezePolicy` therefore also
runs a full collection, frozen objects included, whenever the frozen population has grown by
:data:`FULL_GROWTH` since the last full one: the same amortised rule CPython applies to its
oldest generation, so a steady population costs no full collection at all and churn costs one
per quarter of the population replaced. A full collection pauses the worker for about 25 ms per
1,000 idle connections (measured: 240-270 ms at 10,000 idle SSE connections on one worker).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import NoReturn

import trio

log = logging.getLogger(__name__)

THRESHOLDS = (50_000, 20, 100)
"""``gc.set_threshold``: young collections every 50,000 net allocations instead of 700."""

FREEZE_INTERVAL = 60.0
"""Seconds between two steps of :class:`FreezePolicy` in :func:`run_freeze_policy`."""

FULL_GROWTH = 0.25
"""A full collection runs once the frozen population exceeds the size it had after the last full
one by this fraction."""


def tune_gc() -> None:
    """Collect and freeze what start-up made, and make young collections rarer."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


class FreezePolicy:
    """What the worker does every freeze interval (:meth:`step`); it keeps only one number."""

    __slots__ = ("after_full",)

    def __init__(self) -> None:
        self.after_full = 0  # frozen objects right after the last full collection (0: none yet)

    def step(self) -> bool:
        """Collect the unfrozen objects and freeze the survivors; then, if the frozen population
        grew past :data:`FULL_GROWTH`, collect everything (reclaiming cycles that died frozen) and
        freeze again. Returns whether a full collection ran."""
        gc.collect()  # only unfrozen objects: those made since the last step
        gc.freeze()
        if gc.get_freeze_count() <= self.after_full * (1 + FULL_GROWTH):
            return False
        started = time.perf_counter()
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        self.after_full = gc.get_freeze_count()
        log.debug(
            "gc: full collection reclaimed %d objects in %.1f ms; %d frozen",
            found,
            (time.perf_counter() - started) * 1000,
            self.after_full,
        )
        return True


async def run_freeze_policy(interval: float = FREEZE_INTERVAL) -> NoReturn:
    """Step a :class:`FreezePolicy` every ``interval`` seconds, forever (cancel to stop)."""
    policy = FreezePolicy()
    while True:
        await trio.sleep(interval)
        policy.step()
