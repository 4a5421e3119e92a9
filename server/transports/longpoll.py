"""Long-poll: ``GET /v1/streams/{stream}/poll`` (API.md "Long-poll").

Answers at once when anything is due (events, a reset, the end), else waits up to ``timeout``
seconds. ``next`` is the id to pass back as ``last_event_id``; it is ``null`` only while the
stream has never had an event, and then the client polls again with ``from=start``.
"""

from __future__ import annotations

import math

import trio

from server.core.encoding import EncodedEvent
from server.core.ports.store import StoreUnavailable
from server.core.replay import Reset
from server.http.base import Exchange, HTTPError
from server.transports.context import JSON_HEADERS, Context, send_json, store_unavailable
from server.transports.guard import Access
from server.transports.sse import start_of

FIRST_READ_LIMIT = 10.0  # seconds a poll waits for its first store read before answering anyway


class CollectSink:
    """Collects one response's worth of output; signals ``ready`` once there is something to send."""

    __slots__ = ("checked", "end_seen", "events", "limit", "ready", "reset_seen")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.events: list[dict[str, object]] = []
        self.reset_seen: Reset | None = None
        self.end_seen = False
        self.ready = trio.Event()  # there is something to answer with
        self.checked = trio.Event()  # the store was read once: what was due then is collected

    def _answer(self) -> None:
        self.ready.set()
        self.checked.set()

    def deliver(self, enc: EncodedEvent) -> bool:
        """Keep the event unless the response is full (then the subscription stops)."""
        if len(self.events) >= self.limit:
            self._answer()
            return False
        self.events.append(enc.poll)
        self._answer()
        return True

    def reset(self, reset: Reset) -> bool:
        """Keep the first reset (one response carries at most one)."""
        if self.events:
            self._answer()
            return False
        if self.reset_seen is None:
            self.reset_seen = reset
        return True

    def end(self) -> None:
        """Note the end of the stream."""
        self.end_seen = True
        self._answer()

    def idle(self) -> bool:
        """Long-polls have no heartbeats."""
        return True

    async def drain(self) -> None:
        """A page of replay is complete: answer if it produced anything."""
        self.checked.set()
        if self.events or self.reset_seen is not None or self.end_seen:
            self._answer()


def _timeout(ex: Exchange, ctx: Context) -> float:
    raw = ex.request.query.get("timeout")
    if raw is None:
        return min(ctx.settings.poll_default_timeout, ctx.settings.poll_max_timeout)
    try:
        value = float(raw)
    except ValueError:
        raise HTTPError(400, "bad_timeout", "timeout must be a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise HTTPError(400, "bad_timeout", "timeout must be a non-negative number of seconds")
    return min(value, ctx.settings.poll_max_timeout)


async def handle_poll(ex: Exchange, ctx: Context, stream: str, access: Access) -> None:
    """Answer one long-poll, at the latest when the timeout is up or the token expires."""
    start = start_of(ex)
    timeout = _timeout(ex, ctx)
    deadline = access.deadline
    sink = CollectSink(ctx.settings.poll_max_events)
    try:
        async with ctx.hub.open_subscription(stream, start) as sub, trio.open_nursery() as nursery:

            def wind_down() -> None:  # drain or rotation: answer now with what there is
                sub.stop()
                sink.ready.set()
                sink.checked.set()

            nursery.start_soon(sub.run, sink)
            ex.on_close_request(wind_down)
            # "At once when events are available": the timeout only starts once the store was read.
            with trio.move_on_at(min(trio.current_time() + FIRST_READ_LIMIT, deadline)):
                await sink.checked.wait()
            if not sink.ready.is_set():
                with trio.move_on_at(min(trio.current_time() + timeout, deadline)):
                    await sink.ready.wait()
            if not sub.stopped:
                nursery.cancel_scope.cancel()  # stopped: run() returns by itself, its reset sent
    except StoreUnavailable:  # the subscription could not be planned: nothing was sent yet
        raise store_unavailable() from None
    events = sink.events
    next_id = events[-1]["id"] if events else sub.position
    reset = sink.reset_seen if sink.reset_seen is not None else sub.pending_reset
    await send_json(
        ex,
        200,
        {
            "events": events,
            "next": next_id,
            "reset": reset.as_dict() if reset is not None else None,
            "end": sink.end_seen,
        },
    )


async def handle_poll_head(ex: Exchange, ctx: Context, stream: str, access: Access) -> None:
    """``HEAD`` on a long-poll: GET's checks (a bad start position or ``timeout`` is 400) and GET's
    status and content type, at once: nothing is subscribed or waited for, and since the body GET
    would send is not known yet, there is no ``content-length``."""
    start_of(ex)
    _timeout(ex, ctx)
    resp = await ex.open_stream(200, JSON_HEADERS)
    await resp.finish()
