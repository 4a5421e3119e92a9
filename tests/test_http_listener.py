"""Listening sockets and the accept loop: SO_REUSEPORT, draining the backlog, EMFILE back-off."""

from __future__ import annotations

import os
import resource
import socket

import pytest
import trio
import trio.testing

from server.http.listener import bind_tcp_listener, open_tcp_listeners_reuseport
from server.http.server import serve_http
from tests.http_helpers import App, client_socket, connect, read_response, running_server


def test_reuseport_listeners_share_a_port() -> None:
    first = bind_tcp_listener("127.0.0.1", 0, reuse_port=True)
    try:
        port = first.getsockname()[1]
        second = bind_tcp_listener("127.0.0.1", port, reuse_port=True)
        try:
            assert second.getsockname()[1] == port
            assert second.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            assert second.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
            assert not second.getblocking()
        finally:
            second.close()
    finally:
        first.close()


async def test_open_listeners_and_serve_on_a_trio_socket() -> None:
    socks = await open_tcp_listeners_reuseport(0, "127.0.0.1")
    assert len(socks) == 1
    trio_sock = trio.socket.from_stdlib_socket(socks[0])
    port = socks[0].getsockname()[1]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_http([trio_sock], App(), task_status=task_status))
            sock = await connect(port)
            await sock.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            status, _, _ = await read_response(sock, bytearray())
            assert status == 200
            nursery.cancel_scope.cancel()
    trio_sock.close()


async def test_a_burst_is_accepted_in_one_wake_up(monkeypatch: pytest.MonkeyPatch) -> None:
    waits = 0
    real_wait = trio.lowlevel.wait_readable

    async def counting_wait(fd: socket.socket) -> None:
        nonlocal waits
        waits += 1
        await real_wait(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counting_wait)
    burst = 200
    with trio.fail_after(10):
        async with running_server() as (server, port, _):
            await trio.testing.wait_all_tasks_blocked()
            assert waits == 1  # the accept loop is parked on the listener
            clients = []
            try:
                for _ in range(burst):  # blocking connects: all queue in the backlog at once
                    clients.append(socket.create_connection(("127.0.0.1", port)))
                await trio.testing.wait_all_tasks_blocked()
                assert server.stats.connections_total == burst
                assert waits == 2  # woken once, drained the whole backlog, parked again
            finally:
                for client in clients:
                    client.close()


async def test_out_of_file_descriptors_backs_off_and_recovers() -> None:
    with trio.fail_after(20):
        async with running_server() as (server, port, _):
            clients = [client_socket() for _ in range(3)]
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            lowest_free = os.dup(0)
            os.close(lowest_free)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no new descriptor fits
            try:
                for client in clients:
                    await client.connect(("127.0.0.1", port))
                await trio.testing.wait_all_tasks_blocked()
                assert server.stats.accept_errors >= 1
                assert server.stats.connections_total == 0
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for client in clients:  # the loop resumes after its pause and serves them all
                await client.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
                status, _, _ = await read_response(client, bytearray())
                assert status == 200
                client.close()
            assert server.stats.connections_total == 3
