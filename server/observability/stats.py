"""The guard's counters: what a worker's edge refused (the hub's are in :mod:`server.core.hub_stats`).

Plain integer attributes, bumped on the hot path without locks (one trio thread per worker).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class EdgeStats:
    """Requests (and WebSocket operations) the streams API's guard refused, since the worker started.

    ``auth_refused`` is keyed ``(status, reason)``: 401/403 with the :class:`~server.edge.auth.AuthError`
    reason (``missing``, ``expired``, ``invalid``, ``forbidden``...), ``origin`` for a WebSocket
    ``Origin`` not allowed, ``preflight`` for a refused CORS preflight. ``rate_limited`` is keyed
    ``(status, route)``: 429, or 413 when the cost can never fit the rule's burst.
    """

    auth_refused: dict[tuple[int, str], int] = field(default_factory=dict)
    rate_limited: dict[tuple[int, str], int] = field(default_factory=dict)

    def refused(self, status: int, reason: str) -> None:
        """Count one authentication/authorisation/origin refusal."""
        key = (status, reason)
        self.auth_refused[key] = self.auth_refused.get(key, 0) + 1

    def limited(self, status: int, route: str) -> None:
        """Count one request refused by the rate rules of ``route``."""
        key = (status, route)
        self.rate_limited[key] = self.rate_limited.get(key, 0) + 1
