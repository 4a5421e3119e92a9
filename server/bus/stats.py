"""The notice bus's counters (see :mod:`server.bus.local`), exported as ``sluice_bus_*`` metrics."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True)
class BusStats:
    """What the bus has done since it opened (read them, do not write them)."""

    sent: int = 0  # datagrams sent (one per peer and datagram)
    received: int = 0  # datagrams received
    send_failures: int = 0  # datagrams a peer could not take (queue full, socket gone or refusing)
    hints_sent: int = 0  # hint items sent to peers: events too big for a datagram, or owed after a failure
    hints_received: int = 0
    resyncs_sent: int = 0  # peers told to check the store for everything (they were owed too much)
    reconciles: int = 0  # reconciliation passes (only when something is watched here)
    repairs: int = 0  # streams whose watchers reconciliation found behind the store
    peers: int = 0  # workers currently known
    peers_lost: int = 0  # workers forgotten because their socket vanished or refused
    bad: int = 0  # datagrams or items that could not be decoded (each triggers a reconciliation)
    unrouted: int = 0  # notice items sent to no peer, as none has watchers on their stream
    interest_sent: int = 0  # interest items sent (changes, parts of whole sets)
    interest_received: int = 0
    interest_reads: int = 0  # newly watched streams read once their interest was acknowledged (or not in time)
    reconcile_reads: int = 0  # streams whose head reconciliation read from the store

    def as_dict(self) -> dict[str, int]:
        """A snapshot, for tests and metrics."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
