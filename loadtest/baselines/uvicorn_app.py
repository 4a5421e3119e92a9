"""The "uvicorn + ASGI" baseline: a small in-memory SSE pub/sub app, written the usual way.

It speaks the part of the Sluice wire contract the load test uses, on the same paths:

* ``POST /v1/streams/{s}`` (body = data, optional ``?type=``) -> ``201 {"id": "<n>"}``, ids are
  decimal strings counting up per stream;
* ``POST /v1/streams/{s}/close`` -> ``204``; subscribers get ``event: sluice.end`` and the
  response ends;
* ``GET /v1/streams/{s}`` -> an SSE response starting at ``Last-Event-ID``, else
  ``?last_event_id=``, else ``?from=start|now`` (default ``now``);
* ``GET /healthz`` -> ``200``.

Each stream keeps its last ``--buffer`` events in memory; each subscriber has its own
:class:`asyncio.Queue` and gets one ``send`` per event. Run it with::

    python -m loadtest.baselines.uvicorn_app --host 127.0.0.1 --port 8080

``--port 0`` picks a free port; the address is printed to stderr either way
(``listening on http://HOST:PORT``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any
from urllib.parse import parse_qs

import uvicorn

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

STREAM_NAME = re.compile(r"[A-Za-z0-9._~:@-]{1,200}")
EVENT_TYPE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
STREAM_PATH = re.compile(r"/v1/streams/([^/]+)(/close)?")
LINE_BREAK = re.compile(r"\r\n|\r|\n")

MAX_EVENT_BYTES = 1024 * 1024
END_FRAME = b"event: sluice.end\ndata: {}\n\n"
HEARTBEAT_FRAME = b": \n\n"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]


def encode_event(event_id: int, event_type: str, data: bytes) -> bytes:
    """One SSE event: ``id:``, ``event:`` unless it is a plain message, one ``data:`` line per line."""
    lines = [f"id: {event_id}"]
    if event_type != "message":
        lines.append(f"event: {event_type}")
    lines.extend(f"data: {line}" for line in LINE_BREAK.split(data.decode("utf-8", errors="replace")))
    return ("\n".join(lines) + "\n\n").encode()


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    frame: bytes  # the event already encoded for SSE


class Stream:
    """The retained events of one stream and the queues of its live subscribers."""

    def __init__(self, capacity: int) -> None:
        self.events: deque[Event] = deque(maxlen=capacity)
        self.last_id = 0
        self.closed = False
        # A queued None means "stop": the client went away.
        self.subscribers: set[asyncio.Queue[bytes | None]] = set()

    def publish(self, data: bytes, event_type: str) -> int:
        self.last_id += 1
        event = Event(self.last_id, encode_event(self.last_id, event_type, data))
        self.events.append(event)
        for queue in self.subscribers:
            queue.put_nowait(event.frame)
        return event.id

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for queue in self.subscribers:
                queue.put_nowait(END_FRAME)

    def after(self, event_id: int) -> list[bytes]:
        """The retained events with an id greater than ``event_id``, oldest first."""
        newer = min(max(self.last_id - event_id, 0), len(self.events))  # ids have no gaps
        frames = [event.frame for event in islice(reversed(self.events), newer)]
        frames.reverse()
        return frames


class App:
    """The ASGI application."""

    def __init__(self, buffer: int = 10_000, heartbeat: float = 15.0, retry_ms: int = 2000) -> None:
        self.buffer = buffer
        self.heartbeat = heartbeat
        self.retry_frame = f"retry: {retry_ms}\n\n".encode()
        self.streams: dict[str, Stream] = {}

    def stream(self, name: str) -> Stream:
        stream = self.streams.get(name)
        if stream is None:
            stream = self.streams[name] = Stream(self.buffer)
        return stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path == "/healthz":
            await respond(send, 200, b"ok\n", b"text/plain")
            return
        match = STREAM_PATH.fullmatch(path)
        if match is None:
            await respond_error(send, 404, "not_found", "no such endpoint")
            return
        name, close = match.group(1), bool(match.group(2))
        if not STREAM_NAME.fullmatch(name) or any(not part for part in name.split(":")):
            await respond_error(send, 400, "bad_stream", "invalid stream name")
            return
        query = parse_qs(scope["query_string"].decode("latin-1"))
        if close and method == "POST":
            self.stream(name).close()
            await respond(send, 204, b"")
        elif not close and method == "POST":
            await self.publish(name, query, receive, send)
        elif not close and method == "GET":
            await self.subscribe(name, scope, query, receive, send)
        else:
            await respond_error(send, 405, "method_not_allowed", f"{method} is not allowed here")

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def publish(self, name: str, query: dict[str, list[str]], receive: Receive, send: Send) -> None:
        event_type = query.get("type", ["message"])[-1]
        if not EVENT_TYPE.fullmatch(event_type) or event_type.startswith("sluice."):
            await respond_error(send, 400, "bad_type", "invalid event type")
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > MAX_EVENT_BYTES:
                await respond_error(send, 413, "too_large", "event too large")
                return
            if not message.get("more_body", False):
                break
        stream = self.stream(name)
        if stream.closed:
            await respond_error(send, 409, "closed", "the stream is closed")
            return
        event_id = stream.publish(bytes(body), event_type)
        await respond(send, 201, json.dumps({"id": str(event_id)}).encode(), b"application/json")

    async def subscribe(
        self, name: str, scope: Scope, query: dict[str, list[str]], receive: Receive, send: Send
    ) -> None:
        stream = self.stream(name)
        last_event_id = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"last-event-id"), None)
        if last_event_id is None and "last_event_id" in query:
            last_event_id = query["last_event_id"][-1]
        if last_event_id is not None:
            start = int(last_event_id) if last_event_id.isdecimal() else 0
        else:
            start = 0 if query.get("from", ["now"])[-1] == "start" else stream.last_id

        # Take the backlog and register the queue in one step: nothing is missed or repeated.
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        for backlog in stream.after(start):
            queue.put_nowait(backlog)
        if stream.closed:
            queue.put_nowait(END_FRAME)
        else:
            stream.subscribers.add(queue)

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            queue.put_nowait(None)

        watcher = asyncio.create_task(watch_disconnect())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            await send({"type": "http.response.body", "body": self.retry_frame, "more_body": True})
            while True:
                try:
                    async with asyncio.timeout(self.heartbeat):
                        frame = await queue.get()
                except TimeoutError:
                    await send({"type": "http.response.body", "body": HEARTBEAT_FRAME, "more_body": True})
                    continue
                if frame is None:
                    return
                await send({"type": "http.response.body", "body": frame, "more_body": frame is not END_FRAME})
                if frame is END_FRAME:
                    return
        except asyncio.CancelledError:  # uvicorn's shutdown timeout: end the response cleanly
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            stream.subscribers.discard(queue)
            watcher.cancel()


async def respond(send: Send, status: int, body: bytes, content_type: bytes | None = None) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type is not None:
        headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def respond_error(send: Send, status: int, code: str, text: str) -> None:
    body = json.dumps({"error": code, "message": text}).encode()
    await respond(send, status, body, b"application/json")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="uvicorn + ASGI SSE pub/sub baseline")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0: any free port")
    parser.add_argument("--buffer", type=int, default=10_000, help="events kept per stream")
    parser.add_argument("--heartbeat", type=float, default=15.0, help="idle seconds before an SSE comment")
    args = parser.parse_args(argv)
    app = App(buffer=args.buffer, heartbeat=args.heartbeat)
    settings: dict[str, Any] = {
        "loop": "uvloop",
        "http": "httptools",
        "workers": 1,
        "log_level": "warning",
        "access_log": False,
        "backlog": 4096,
        "timeout_graceful_shutdown": 1,  # SSE responses never finish by themselves
    }
    if args.port != 0:
        print(f"listening on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
        uvicorn.run(app, host=args.host, port=args.port, **settings)
        return
    # Port 0: bind here so the chosen port can be reported, then hand the socket to uvicorn.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, 0))
    port = sock.getsockname()[1]
    print(f"listening on http://{args.host}:{port}", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, **settings))
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
