"""The notice bus interface: how workers (of one host, or of every host) tell each other of their commits.

A worker's store tells only that worker of what it commits (:data:`~server.core.ports.store.Listener`).
A :class:`Bus` carries those notices to the host's other workers, and hands what they commit to
this worker's :class:`Receiver` (its hub, :class:`server.core.hub.Hub`), as if committed here.
Every implementation (``server/bus/``: ``local``, over Unix datagrams between one host's workers;
``redis``, over Redis PUB/SUB between the workers of every host that shares the Redis store)
keeps the promises below and passes ``tests/test_bus_contract.py``.

An implementation is opened by an ``open_*`` async context manager (a :data:`BusOpener` once its
own settings are bound): it joins the bus, runs its tasks until the block exits, and leaves.
The store stays the source of truth: the bus may lose a notice, and repairs every loss from the
store (:meth:`~server.core.ports.store.Store.heads`) within a bounded time.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from server.core.ports.store import Notice, Store

InterestListener = Callable[[str, bool], None]
"""``listener(stream, watched)``: ``stream`` gained its first watcher on this worker
(``watched`` True) or lost its last one (False)."""


class Receiver(Protocol):
    """What a bus delivers to and learns interest from: the worker's hub.

    Every method is called on the trio thread and must not block.
    """

    def on_notice(self, notice: Notice, *, remote: bool = False) -> None:
        """A change another worker committed (``remote`` True when a bus calls it)."""

    def on_hint(self, stream: str, epoch: str, last_seq: int, closed: bool = False) -> bool:
        """``stream`` reached ``last_seq`` of ``epoch`` (and is ``closed``), without its events:
        whoever is behind reads the store. Returns whether a watcher was behind."""

    def watcher_count(self, stream: str) -> int:
        """How many watchers ``stream`` has on this worker (0: it is not watched here)."""

    def streams(self) -> list[str]:
        """The streams watched on this worker."""

    def set_interest_listener(self, listener: InterestListener | None) -> None:
        """Have ``listener`` called whenever a stream gains its first watcher or loses its last
        (``None``: no longer)."""


class BusCounters(Protocol):
    """A bus's counters, exported as ``sluice_bus_*`` metrics (a dataclass of ``int`` fields)."""

    def as_dict(self) -> dict[str, int]:
        """A snapshot of every counter."""


class Bus(Protocol):
    """One worker's end of the host's notice bus.

    Promises, for every implementation, while it is open:

    * a notice given to :meth:`publish` reaches, as :meth:`Receiver.on_notice` (or, when it cannot
      travel whole, as :meth:`Receiver.on_hint`), every other worker of the bus that watches its
      stream, and is not sent to a worker whose interest is known not to include it;
    * interest follows the receiver: the bus is its receiver's interest listener, and a worker
      that stops watching a stream stops being sent its notices; a stream that starts being
      watched misses nothing committed elsewhere before the others learnt of the interest (the
      bus reads its head once they did);
    * nothing blocks: :meth:`publish` and :meth:`declare_interest` return at once, and a worker that
      is slow, stalled or gone never holds the others up; what is held for a worker that cannot
      take it is bounded (past the bound it is told to check the store instead);
    * loss is repaired from the store: a notice lost with nothing after it is delivered within a
      bounded time (about two reconciliation intervals).
    """

    @property
    def stats(self) -> BusCounters:
        """What this bus has done since it opened."""

    def publish(self, notice: Notice) -> None:
        """Send a change this worker committed to the other workers watching its stream (the
        store's listener calls this, in commit order). Synchronous and non-blocking."""

    def declare_interest(self, stream: str, watched: bool) -> None:
        """``stream`` gained its first watcher on this worker (``watched``) or lost its last one;
        the bus registers this as its receiver's :data:`InterestListener`."""


BusOpener = Callable[[Receiver, Store], AbstractAsyncContextManager[Bus]]
"""An implementation's ``open_*`` with its own settings bound: given the worker's receiver and
store (read to repair losses), an async context manager that yields the joined :class:`Bus`
and leaves the bus when the block exits."""
