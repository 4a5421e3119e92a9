"""The shared input watcher (``ReadWatch``) and the HTTP/1.1 use of it: an idle streaming
connection is noticed going away without a reader task of its own."""

from __future__ import annotations

import socket

import trio
import trio.testing

from server.http.readwatch import ReadWatch
from tests.http_helpers import connect, running_server


async def test_callbacks_run_on_input_and_hang_up_until_removed() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    calls: list[bytes] = []
    watch = ReadWatch()

    def on_input() -> None:
        try:
            data = a.recv(100)
        except BlockingIOError:
            data = b"?"
        calls.append(data)
        if not data:  # level-triggered: a hang-up keeps firing until removed
            watch.remove(a.fileno())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch.run)
            assert watch.add(a.fileno(), on_input)
            await trio.testing.wait_all_tasks_blocked()
            assert calls == []
            b.send(b"hello")
            await trio.testing.wait_all_tasks_blocked()
            assert calls == [b"hello"]
            watch.remove(a.fileno())
            watch.remove(a.fileno())  # idempotent
            b.send(b"more")
            await trio.testing.wait_all_tasks_blocked()
            assert calls == [b"hello"]
            watch.add(a.fileno(), on_input)
            await trio.testing.wait_all_tasks_blocked()
            assert calls == [b"hello", b"more"]
            b.close()
            await trio.testing.wait_all_tasks_blocked()
            assert calls[-1] == b""  # EOF
            assert len(watch) == 0
            nursery.cancel_scope.cancel()
    assert not watch.add(a.fileno(), on_input)  # closed with its task
    a.close()


async def test_a_failing_callback_is_dropped_and_the_watcher_goes_on() -> None:
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    seen: list[str] = []
    watch = ReadWatch()

    def broken() -> None:
        raise RuntimeError("boom")

    def fine() -> None:
        seen.append(c.recv(10).decode())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch.run)
            watch.add(a.fileno(), broken)
            watch.add(c.fileno(), fine)
            b.send(b"x")
            d.send(b"y")
            await trio.testing.wait_all_tasks_blocked()
            assert len(watch) == 1 and seen == ["y"]
            nursery.cancel_scope.cancel()
    for s in (a, b, c, d):
        s.close()


async def test_a_streaming_response_is_watched_by_the_shared_watcher() -> None:
    with trio.fail_after(10):
        async with running_server() as (server, port, app):
            sock = await connect(port)
            await sock.send(b"GET /forever HTTP/1.1\r\nHost: t\r\n\r\n")
            data = b""
            while b"data: hello" not in data:
                data += await sock.recv(1024)
            await trio.testing.wait_all_tasks_blocked()
            assert server.stats.connections_open == 1
            watch = server._watch
            assert watch is not None and len(watch) == 1  # no reader task: an epoll entry
            assert not app.state.cancelled.is_set()
            sock.close()
            await app.state.cancelled.wait()
            while server.stats.connections_open:
                await trio.sleep(0.01)
            assert len(watch) == 0
