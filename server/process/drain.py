"""Draining one worker: paced, lossless, with a hard deadline (DESIGN.md "Drain is paced and lossless").

Order matters and is kept here: ``/readyz`` turns 503 first (load balancers stop sending new
clients), then the HTTP engine stops accepting (the slot's listening socket stays open: what is
queued on it waits for the replacement worker) and asks its connections to wind down, spread
over ``window`` seconds. SSE clients get a fresh jittered ``retry:`` and a clean end and resume
from the store with their Last-Event-ID; WebSocket clients get close 1012; long-polls answer at
once; requests in flight (publishes) are answered first. What is still open ``deadline`` seconds
after the start is cut.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.app import Worker


async def drain_worker(worker: Worker, *, window: float, deadline: float) -> None:
    """Drain ``worker``; returns when it has no connection left (at the latest ``deadline``
    seconds after the call, plus a moment for cut connections to unwind).

    Sets ``worker.ctx.draining`` (``/readyz`` answers 503 from now on) before anything else, then
    runs :meth:`server.http.server.HttpServer.drain`. Pass ``deadline`` below systemd's
    ``TimeoutStopSec`` and above ``window``. A second call waits for the first drain to finish.
    """
    worker.ctx.draining = True
    await worker.http.drain(window, deadline)
