"""One task watches the input side of many busy HTTP/1.1 connections at once.

While an HTTP/1.1 handler runs (an SSE response can run for hours), the engine must still notice
a client that goes away, and buffer a pipelined request. Instead of a reader task per connection
parked in ``recv``, each such connection registers its plain TCP socket here: one
``select.epoll`` set, whose own descriptor trio waits on, calls the connection's callback
(synchronously, on the trio thread) when input or a hang-up arrives. An idle streaming connection
then costs one epoll entry, not a task with its stack and cancel scopes.

Level-triggered: a callback must consume the input or :meth:`ReadWatch.remove` its descriptor,
else it is called again on the next pass.
"""

from __future__ import annotations

import contextlib
import logging
import select
from collections.abc import Callable
from typing import NoReturn

from trio.lowlevel import wait_readable

log = logging.getLogger(__name__)

_EVENTS = select.EPOLLIN | select.EPOLLRDHUP
MAX_EVENTS = 1024  # descriptors handled per pass before the watcher yields


class ReadWatch:
    """A set of sockets waited on by one task (:meth:`run`); callbacks run on the trio thread.

    Promises: :meth:`add` and :meth:`remove` are synchronous and idempotent per descriptor; a
    descriptor must be removed before its socket is closed (its number may be reused at once);
    a callback that raises is logged and its descriptor removed, the watcher keeps running.
    """

    __slots__ = ("_callbacks", "_epoll")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}

    def __len__(self) -> int:
        return len(self._callbacks)

    def add(self, fd: int, callback: Callable[[], None]) -> bool:
        """Call ``callback()`` whenever ``fd`` has input or the peer hung up, until removed.

        Returns False (and watches nothing) once the watcher is closed."""
        if fd in self._callbacks:
            self._callbacks[fd] = callback
            return True
        try:
            self._epoll.register(fd, _EVENTS)
        except (OSError, ValueError):
            return False
        self._callbacks[fd] = callback
        return True

    def remove(self, fd: int) -> None:
        """Stop watching ``fd`` (a no-op if it is not watched)."""
        if self._callbacks.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def close(self) -> None:
        """Forget every descriptor and close the epoll set."""
        self._callbacks.clear()
        self._epoll.close()

    async def run(self) -> NoReturn:
        """Dispatch readiness forever (cancel to stop); one pass per wake-up of trio's loop."""
        epoll = self._epoll
        callbacks = self._callbacks
        try:
            while True:
                await wait_readable(epoll.fileno())
                for fd, _ in epoll.poll(0, MAX_EVENTS):
                    callback = callbacks.get(fd)
                    if callback is None:
                        continue
                    try:
                        callback()
                    except Exception:
                        log.exception("input callback for descriptor %d failed", fd)
                        self.remove(fd)
        finally:
            self.close()
