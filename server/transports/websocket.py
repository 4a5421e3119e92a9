"""WebSocket: ``GET /v1/ws`` with ``sluice.json.v1`` / ``sluice.msgpack.v1`` (API.md "WebSocket").

One socket carries any number of subscriptions, each a child task in the socket's nursery;
publishes are handled in order, in the receive loop, so ``published`` acks come in send order.
Publish ops that have arrived together (a producer sending without waiting for each ack) are
committed together, up to ``PUBLISH_GROUP`` at a time (:meth:`Store.append_each`: with SQLite,
one transaction and one fsync): each is still its own append with its own ack or error.
Client mistakes get ``{"op": "error", "ref"?, "code", "message"}`` and the socket stays open;
a frame of the wrong kind for the subprotocol closes it with 1003.

A ``subscribe`` is answered at once (once its start is fixed, before any of its output) with
``{"op": "subscribed", "stream", "from", "ref"?}``: ``from`` is the id the subscription starts
after (the ``last_event_id`` sent; for ``from: "now"`` the stream's last id; ``null`` for
``from: "start"`` or a stream with no events yet). Then come any ``reset`` and replayed events,
then ``{"op": "live", "stream"}`` once the subscription is live (sent also when there was
nothing to replay; not sent when the stream is closed and ends during the replay), then live
events. A client that leaves ends its subscriptions quietly (counted, never an error).

With a guard, the upgrade was checked already (origin, token); each ``subscribe`` and
``publish`` op is authorised and rate limited on its own (a refusal is an ``error`` op with code
``unauthorized``, ``forbidden``, ``rate_limited`` or ``too_large``; the socket stays open), and
the socket closes with ``4401`` when the token it was opened with expires.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, Literal

import msgpack
import trio

from server.core.encoding import EncodedEvent, EventBatch, ws_end, ws_message, ws_reset
from server.core.events import InvalidInput, NewEvent, check_stream
from server.core.ports.store import StoreUnavailable, StreamClosed
from server.core.replay import Reset, Start, parse_start
from server.core.subscription import Subscription
from server.edge.auth import Action
from server.edge.limits import retry_after
from server.http.base import Exchange, HTTPError, WebSocket, WebSocketClosed
from server.transports.batch import item_event
from server.transports.context import STORE_UNAVAILABLE, Context
from server.transports.guard import Access

PUBLISH_GROUP = 64  # most publish ops already received that are committed together
TOKEN_EXPIRED = 4401
POLICY_VIOLATION = 1008
JSON_PROTOCOL = "sluice.json.v1"
MSGPACK_PROTOCOL = "sluice.msgpack.v1"
Fmt = Literal["json", "msgpack"]
# what a message that is not valid JSON / msgpack raises when decoded
BAD_MESSAGE = (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError)


class _CloseWith(Exception):
    """The client broke the subprotocol's rules: close the socket with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class WSSink:
    """One subscription's output on a shared socket."""

    __slots__ = ("_fmt", "_json", "_stream", "_ws")

    def __init__(self, ws: WebSocket, stream: str, fmt: Fmt) -> None:
        self._ws = ws
        self._stream = stream
        self._fmt: Fmt = fmt
        self._json = fmt == "json"

    def deliver(self, enc: EncodedEvent) -> bool:
        """Write the shared pre-built frame for this subprotocol."""
        return self._ws.send_frame(enc.ws_json if self._json else enc.ws_msgpack)

    def deliver_batch(self, batch: EventBatch) -> bool:
        """Write the shared frames of every event of the batch, in one write."""
        return self._ws.send_frame(batch.ws_json if self._json else batch.ws_msgpack)

    def reset(self, reset: Reset) -> bool:
        """Send ``{"op": "reset", ...}``."""
        return self._ws.send_frame(ws_reset(self._stream, reset, self._fmt))

    def end(self) -> None:
        """Send ``{"op": "end", "stream"}``."""
        self._ws.send_frame(ws_end(self._stream, self._fmt))

    def idle(self) -> bool:
        """The engine pings idle sockets; nothing to do per subscription."""
        return True

    def went_live(self) -> None:
        """Send ``{"op": "live", "stream"}``: any replay is done, what follows is live."""
        self._ws.send_frame(ws_message({"op": "live", "stream": self._stream}, self._fmt))

    def fell_behind(self) -> bool:
        """The socket was cut for falling behind (not the client leaving)."""
        return self._ws.fell_behind()

    async def drain(self) -> None:
        """Wait for the socket's buffer to go down."""
        await self._ws.drain()


class _Session:
    def __init__(self, ws: WebSocket, ctx: Context, fmt: Fmt, nursery: trio.Nursery, access: Access) -> None:
        self.ws = ws
        self.ctx = ctx
        self.access = access
        self.fmt: Fmt = fmt
        self.nursery = nursery
        self.subs: dict[str, trio.CancelScope] = {}

    def send(self, obj: dict[str, Any]) -> None:
        self.ws.send_frame(ws_message(obj, self.fmt))

    def error(self, code: str, message: str, ref: object = None) -> None:
        msg: dict[str, Any] = {"op": "error", "code": code, "message": message}
        if ref is not None:
            msg["ref"] = ref
        self.send(msg)

    def decode(self, message: str | bytes) -> Any:
        if self.fmt == "json":
            if not isinstance(message, str):
                raise _CloseWith(1003, "sluice.json.v1 takes text frames")
            return json.loads(message)
        if not isinstance(message, bytes):
            raise _CloseWith(1003, "sluice.msgpack.v1 takes binary frames")
        return msgpack.unpackb(message, raw=False, max_map_len=64, max_array_len=64)

    async def handle(self, msg: Any) -> None:
        """Answer one decoded message other than a publish (those go to :meth:`publish`)."""
        if not isinstance(msg, dict):
            self.error("bad_message", "messages are objects with an 'op'")
            return
        op = msg.get("op")
        ref = msg.get("ref")
        try:
            if op == "subscribe":
                self.subscribe(msg)
            elif op == "unsubscribe":
                stream = check_stream(_str(msg.get("stream")))
                scope = self.subs.pop(stream, None)
                if scope is not None:
                    scope.cancel()
            elif op == "ping":
                if not self.ws.take_ping():  # charged like Ping frames: a flood closes 1008
                    raise _CloseWith(POLICY_VIOLATION, "too many pings")
                self.send({"op": "pong"})
            else:
                self.error("bad_op", f"unknown op {op!r}", ref)
        except InvalidInput as exc:
            self.error(exc.code, exc.message, ref)

    def admit(self, action: Action, stream: str, cost: float = 1.0, cost_bytes: int | None = None) -> None:
        """Authorise ``action`` on ``stream`` and charge its rate rules; ``InvalidInput`` if refused."""
        access = self.access
        refusal = access.refusal(action, stream)
        if refusal is not None:
            raise InvalidInput(*refusal)
        wait = access.wait(action, stream, cost)
        if not wait and cost_bytes is not None:
            wait = access.wait("publish_bytes", stream, cost_bytes)
            if wait:  # refused on its size: the publish token is given back
                access.refund(action, stream, cost)
        if wait:
            raise InvalidInput(*_rate_refusal(wait))

    def subscribe(self, msg: dict[str, Any]) -> None:
        stream = check_stream(_str(msg.get("stream")))
        if stream in self.subs:
            raise InvalidInput("already_subscribed", f"already subscribed to {stream!r}")
        if len(self.subs) >= self.ctx.settings.ws_max_subscriptions:
            raise InvalidInput("too_many_subscriptions", "subscription limit reached for this socket")
        last = msg.get("last_event_id")
        start_from = msg.get("from")
        if last is not None and not isinstance(last, str):
            raise InvalidInput("bad_last_event_id", "last_event_id must be a string")
        if start_from is not None and not isinstance(start_from, str):
            raise InvalidInput("bad_from", "from must be 'start' or 'now'")
        start = parse_start(None, last, start_from)
        self.admit("subscribe", stream)
        scope = trio.CancelScope()
        self.subs[stream] = scope
        self.nursery.start_soon(self.run_subscription, stream, start, scope, msg.get("ref"))

    async def run_subscription(self, stream: str, start: Start, scope: trio.CancelScope, ref: object) -> None:
        """Register and plan, answer ``subscribed``, then run the subscription until it ends, is
        unsubscribed or the socket goes (a send to a peer that has left ends it quietly)."""
        with scope:
            async with self.ctx.hub.open_subscription(stream, start) as sub:
                reply: dict[str, Any] = {"op": "subscribed", "stream": stream, "from": _starts_after(start, sub)}
                if ref is not None:
                    reply["ref"] = ref
                self.send(reply)
                await sub.run(WSSink(self.ws, stream, self.fmt))
        if self.subs.get(stream) is scope:
            del self.subs[stream]

    async def publish(self, msgs: list[dict[str, Any]]) -> None:
        """Check, authorise and charge each publish op, commit the admitted ones together, then
        answer every op in order: ``published`` with its id, or an ``error``."""
        admitted: list[tuple[str, Sequence[NewEvent]]] = []
        refusals: list[InvalidInput | None] = []
        for msg in msgs:
            try:
                stream = check_stream(_str(msg.get("stream")))
                event = item_event(msg, self.ctx.settings.max_event_bytes, where="publish")
                self.admit("publish", stream, cost_bytes=len(event.data))
            except InvalidInput as exc:
                refusals.append(exc)
                continue
            refusals.append(None)
            admitted.append((stream, [event]))
        unavailable = False
        try:
            results = iter(await self.ctx.store.append_each(admitted) if admitted else [])
        except StoreUnavailable:  # nothing (or not knowably anything) was committed: each op is told
            results, unavailable = iter(()), True
        for msg, refusal in zip(msgs, refusals, strict=True):
            ref = msg.get("ref")
            if refusal is not None:
                self.error(refusal.code, refusal.message, ref)
                continue
            if unavailable:
                self.error("store_unavailable", STORE_UNAVAILABLE, ref)
                continue
            result = next(results)
            if isinstance(result, StreamClosed):
                self.error("closed", f"stream {msg.get('stream')!r} is closed", ref)
                continue
            reply: dict[str, Any] = {"op": "published", "id": result.ids[0]}
            if ref is not None:
                reply["ref"] = ref
            self.send(reply)

    def more_publishes(self, first: dict[str, Any]) -> tuple[list[dict[str, Any]], str | bytes | None]:
        """``first`` and the publish ops right behind it that have arrived already (at most
        ``PUBLISH_GROUP``), and the message after them that is not one (to handle next), if any."""
        group = [first]
        while len(group) < PUBLISH_GROUP:
            message = self.ws.receive_nowait()
            if message is None:
                break
            try:
                msg = self.decode(message)
            except (_CloseWith, *BAD_MESSAGE):
                return group, message  # handled on its own turn, after these are answered
            if not (isinstance(msg, dict) and msg.get("op") == "publish"):
                return group, message
            group.append(msg)
        return group, None


def _starts_after(start: Start, sub: Subscription) -> str | None:
    """The ``from`` of a ``subscribed`` reply: the id sent, the stream's last id for ``now``
    (fixed by the subscription's plan), ``None`` for ``start``."""
    if start.kind == "now":
        return sub.position
    return start.requested


def _rate_refusal(wait: float) -> tuple[str, str]:
    if math.isinf(wait):
        return "too_large", "the message is larger than the rate limit allows at once"
    return "rate_limited", f"too many requests; retry after {retry_after(wait)} s"


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidInput("bad_stream", "'stream' must be a string")
    return value


def pick_subprotocol(offered: list[str]) -> str | None:
    """The subprotocol to accept: the client's first of ours; JSON if it offered none at all."""
    for p in offered:
        if p in (JSON_PROTOCOL, MSGPACK_PROTOCOL):
            return p
    if offered:
        raise HTTPError(400, "bad_subprotocol", f"offer {JSON_PROTOCOL} or {MSGPACK_PROTOCOL}")
    return None


async def handle_ws(ex: Exchange, ctx: Context, access: Access) -> None:
    """Serve one WebSocket until either side closes it or the token expires (close 4401)."""
    if not ex.websocket_requested:
        raise HTTPError(400, "websocket_required", "GET /v1/ws needs a WebSocket upgrade")
    proto = pick_subprotocol(ex.offered_subprotocols())
    fmt: Fmt = "msgpack" if proto == MSGPACK_PROTOCOL else "json"
    ws = await ex.accept_websocket(proto)
    expired = False
    async with trio.open_nursery() as nursery:
        session = _Session(ws, ctx, fmt, nursery, access)
        try:
            with trio.CancelScope(deadline=access.deadline) as expiry:
                held: str | bytes | None = None
                while True:
                    if held is None:
                        message = await ws.receive()
                    else:  # the message that ended the last group of publishes
                        message, held = held, None
                    try:
                        msg = session.decode(message)
                    except BAD_MESSAGE:
                        session.error("bad_message", "not a valid message for this subprotocol")
                        continue
                    if isinstance(msg, dict) and msg.get("op") == "publish":
                        group, held = session.more_publishes(msg)
                        await session.publish(group)
                    else:
                        await session.handle(msg)
            expired = expiry.cancelled_caught
        except _CloseWith as exc:
            await ws.close(exc.code, exc.reason)
        except WebSocketClosed:
            pass
        finally:
            nursery.cancel_scope.cancel()
    if expired:
        await ws.close(TOKEN_EXPIRED, "token expired")
