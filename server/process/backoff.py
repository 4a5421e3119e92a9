"""When to restart a crashed worker: exponential backoff, and a crash budget per slot.

Pure and clock-free (times are passed in), so the policy is tested without processes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CrashPolicy:
    """The numbers of the restart policy.

    A crashed worker is restarted after ``initial`` seconds, doubling (``factor``) on each further
    crash up to ``maximum``; a worker that stayed up ``stable_after`` seconds resets the delay. A
    slot whose workers crash more than ``max_crashes`` times within ``window`` seconds is given up
    (not restarted until the next reload)."""

    initial: float = 0.1
    maximum: float = 30.0
    factor: float = 2.0
    stable_after: float = 60.0
    max_crashes: int = 5
    window: float = 60.0


DEFAULT_POLICY = CrashPolicy()


class SlotBackoff:
    """The crash history of one worker slot under a :class:`CrashPolicy`."""

    def __init__(self, policy: CrashPolicy = DEFAULT_POLICY) -> None:
        self.policy = policy
        self._crashes: deque[float] = deque()
        self._delay = policy.initial

    @property
    def recent_crashes(self) -> int:
        """Crashes counted in the current window (as of the last :meth:`record_crash`)."""
        return len(self._crashes)

    def record_crash(self, now: float, uptime: float) -> float | None:
        """Record a crash at time ``now`` of a worker that ran ``uptime`` seconds.

        Returns the delay in seconds before starting its replacement, or ``None`` when the slot
        has used up its crash budget and must not be restarted."""
        policy = self.policy
        if uptime >= policy.stable_after:
            self._delay = policy.initial
        self._crashes.append(now)
        while self._crashes and self._crashes[0] <= now - policy.window:
            self._crashes.popleft()
        if len(self._crashes) > policy.max_crashes:
            return None
        delay = self._delay
        self._delay = min(self._delay * policy.factor, policy.maximum)
        return delay

    def reset(self) -> None:
        """Forget the history (after a reload gives the slot a fresh start)."""
        self._crashes.clear()
        self._delay = self.policy.initial
