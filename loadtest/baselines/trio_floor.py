"""The trio floor: the least a trio server does to publish and deliver one event, as a baseline.

One process, one trio loop, non-blocking sockets waited on with ``trio.lowlevel.wait_readable``
(as Sluice's engine does), requests parsed by httptools (llhttp, as Sluice's engine does), one
task per connection, streams in memory, nothing else: no store, no auth, no limits, no
heartbeats, no replay. It is what Sluice's per-event CPU would be if everything it adds to the
event loop cost nothing, so ``Sluice - floor`` is what Sluice's own code costs on that path.

Wire (the part the topics and fan-out runs use, on Sluice's paths):

* ``POST /v1/streams/{s}`` (body = data) -> ``201 {"id":N}``, ``N`` counting up per stream;
* ``GET /v1/streams/{s}`` -> SSE of the events published from then on (``Last-Event-ID`` is
  ignored: nothing is kept);
* ``GET /healthz`` -> ``200``.

Run it with ``python -m loadtest.baselines.trio_floor --port 8095`` (``--port 0``: any free
port); it prints ``listening on http://HOST:PORT`` to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
from collections.abc import Sequence

import httptools
import trio
from trio.lowlevel import wait_readable, wait_writable

RECV_SIZE = 65536
MAX_BODY = 1024 * 1024
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-store\r\n\r\n"
OK_HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
CREATED_HEAD = b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
BAD = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class Subscriber:
    """One SSE client: frames waiting for it, and the event that wakes its task."""

    __slots__ = ("frames", "wake")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.wake = trio.Event()


class Stream:
    """The id counter and live subscribers of one stream."""

    __slots__ = ("last_id", "subscribers")

    def __init__(self) -> None:
        self.last_id = 0
        self.subscribers: set[Subscriber] = set()


class Requests:
    """httptools callbacks: collects each complete request as (method, path, body)."""

    def __init__(self) -> None:
        self.url = b""
        self.body: list[bytes] = []
        self.size = 0
        self.done: list[tuple[bytes, bytes]] = []
        self.parser = httptools.HttpRequestParser(self)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > MAX_BODY:
            raise ValueError("body too large")
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done.append((self.url, b"".join(self.body)))
        self.url, self.body, self.size = b"", [], 0


class FloorServer:
    """The streams of this process and the connection handler."""

    def __init__(self) -> None:
        self.streams: dict[bytes, Stream] = {}

    def stream(self, name: bytes) -> Stream:
        s = self.streams.get(name)
        if s is None:
            s = self.streams[name] = Stream()
        return s

    async def connection(self, sock: socket.socket) -> None:
        """Serve one connection until the client leaves (an SSE response holds it to the end)."""
        reqs = Requests()
        try:
            while True:
                try:
                    data = sock.recv(RECV_SIZE)
                except BlockingIOError:
                    await wait_readable(sock)
                    continue
                if not data:
                    return
                try:
                    reqs.parser.feed_data(data)
                except (httptools.HttpParserError, ValueError):
                    await send_all(sock, BAD)
                    return
                while reqs.done:
                    url, body = reqs.done.pop(0)
                    if await self.answer(sock, reqs.parser.get_method(), url, body):
                        return
        except OSError:
            pass
        finally:
            sock.close()

    async def answer(self, sock: socket.socket, method: bytes, url: bytes, body: bytes) -> bool:
        """Answer one request; True when the connection is over (an SSE response ended)."""
        path = url.split(b"?", 1)[0]
        if path == b"/healthz":
            await send_all(sock, OK_HEAD)
            return False
        prefix, _, name = path.rpartition(b"/")
        if prefix != b"/v1/streams" or not name:
            await send_all(sock, NOT_FOUND)
            return False
        stream = self.stream(name)
        if method == b"POST":
            stream.last_id += 1
            frame = b"id: %d\ndata: %s\n\n" % (stream.last_id, body.replace(b"\n", b"\ndata: "))
            for sub in stream.subscribers:
                sub.frames.append(frame)
                sub.wake.set()
            out = b'{"id":%d}' % stream.last_id
            await send_all(sock, CREATED_HEAD % len(out) + out)
            return False
        await send_all(sock, SSE_HEAD)
        sub = Subscriber()
        stream.subscribers.add(sub)
        try:
            while True:
                await sub.wake.wait()
                sub.wake = trio.Event()
                frames, sub.frames = sub.frames, []
                await send_all(sock, b"".join(frames))
        finally:
            stream.subscribers.discard(sub)


async def send_all(sock: socket.socket, data: bytes) -> None:
    """Write all of ``data``, waiting for room when the socket is full."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await wait_writable(sock)
            continue
        view = view[sent:]


async def serve(listener: socket.socket, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Accept on the non-blocking ``listener`` forever, a task per connection."""
    server = FloorServer()
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                await wait_readable(listener)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(server.connection, sock)


def listen(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket on ``host``:``port`` (0: any free port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m loadtest.baselines.trio_floor [--host H] [--port P]``."""
    parser = argparse.ArgumentParser(description="the least a trio SSE pub/sub server does per event")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8095)
    args = parser.parse_args(argv)
    listener = listen(args.host, args.port)
    print(f"listening on http://{args.host}:{listener.getsockname()[1]}", file=sys.stderr, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, listener)


if __name__ == "__main__":
    main()
