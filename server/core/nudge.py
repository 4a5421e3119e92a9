"""A watcher for long-poll waits: it only records that its stream changed."""

from __future__ import annotations

import trio

from server.core.encoding import EventBatch
from server.core.ports.store import Closed

__all__ = ["Nudge"]


class Nudge:
    """A watcher (see :class:`~server.core.subscription.Watcher`) whose :attr:`event` is set on
    the stream's next change: an append, a close or a hint. It takes no events."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        """A fresh, unset :attr:`event`."""
        self.event = trio.Event()

    def on_appended(self, batch: EventBatch) -> int:
        """Set the event; nothing was delivered."""
        self.event.set()
        return 0

    def on_closed(self, notice: Closed) -> None:
        """Set the event."""
        self.event.set()

    def on_hint(self, epoch: str, last_seq: int) -> bool:
        """Set the event; a nudged waiter always has to look."""
        self.event.set()
        return True
