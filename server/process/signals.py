"""Signals outside trio's receiver: recorded, never fatal.

``trio.open_signal_receiver`` only covers the time it is open. Before it opens (imports, socket
setup) and after it closes (trio delivers signals it did not hand out again, to the previous
handler) a SIGTERM would kill the process with its default action: a worker that had drained
would be reported as killed, a supervisor starting up would die without stopping its workers.
:func:`hold_signals` installs a handler that records them instead; the receiver's owner looks
at the record once its receiver is open.
"""

from __future__ import annotations

import signal
from types import FrameType


def hold_signals(*signums: signal.Signals) -> list[int]:
    """Record ``signums`` in the returned list (in arrival order) instead of acting on them.

    Call it from the main thread before ``trio.run``; signals that arrive while a trio signal
    receiver is open go to the receiver, not to the list."""
    received: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    for signum in signums:
        signal.signal(signum, record)
    return received
