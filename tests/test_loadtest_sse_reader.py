"""The shared SSE-over-HTTP/1.1 reader against a scripted server on 127.0.0.1: connections that
end (by their stream, the chunked body, end of file, an error) leave the others reading; a
cancelled session takes its socket out of the reader; errors reach the session that owns the
socket; a full batch does not stop the reading; a stopped reader wakes its sessions.

Every step waits for ``wait_all_tasks_blocked``: loopback data is in the peer's buffer when
``send`` returns, so by then every client has read what was sent.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import AsyncIterator

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from loadtest import payload
from loadtest.clients import sse_h1
from loadtest.clients.common import Conn, Endpoint, Load
from loadtest.track import Track
from loadtest.wire import ProtocolError

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
SOURCE = "127.0.0.2"


def event(seq: int) -> bytes:
    """One harness event as an SSE block."""
    return b"id: %d\ndata: %s\n\n" % (seq + 1, payload.encode(seq, time.monotonic_ns()))


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Server:
    """Accepts the clients' connections; the test writes their responses."""

    def __init__(self, listener: trio.socket.SocketType) -> None:
        self.listener = listener
        self.port: int = listener.getsockname()[1]
        self.accepted: list[trio.socket.SocketType] = []

    async def accept(self) -> trio.socket.SocketType:
        """The next connection, its request read."""
        sock, _ = await self.listener.accept()
        self.accepted.append(sock)
        request = b""
        while b"\r\n\r\n" not in request:
            data = await sock.recv(4096)
            assert data, "client closed before its request"
            request += data
        assert request.startswith(b"GET /v1/streams/")
        return sock


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        server = Server(listener)
        yield server
        for sock in server.accepted:
            sock.close()


class Sub:
    """One connection's session run directly (no reconnecting), with its outcome."""

    def __init__(self, load: Load, index: int) -> None:
        self.load = load
        self.conn = Conn(index, [Track(f"s{index}")], SOURCE)
        self.scope = trio.CancelScope()
        self.outcome: BaseException | str | None = "running"  # or "cancelled", or None: returned

    @property
    def track(self) -> Track:
        return self.conn.tracks[0]

    async def run(self, reader: sse_h1.Reader | None) -> None:
        with self.scope:
            try:
                await sse_h1.session(self.load, self.conn, reader)
            except Exception as exc:
                self.outcome = exc
            else:
                self.outcome = None
            return
        self.outcome = "cancelled"


async def connect(
    nursery: trio.Nursery, server: Server, reader: sse_h1.Reader | None, n: int, *, chunked: bool = True
) -> tuple[list[Sub], list[trio.socket.SocketType]]:
    """``n`` sessions of one load, subscribed (response head sent), with one event each."""
    load = Load(Endpoint("127.0.0.1", server.port), limits={"timeout": 5.0})
    subs = [Sub(load, i) for i in range(n)]
    peers = []
    for sub in subs:
        nursery.start_soon(sub.run, reader)
        peer = await server.accept()
        head = HEAD + (b"transfer-encoding: chunked\r\n\r\n" if chunked else b"\r\n")
        await peer.send(head)
        await wait_all_tasks_blocked()  # the head is read: the stream goes to the reader
        await peer.send(chunk(event(0)) if chunked else event(0))
        peers.append(peer)
    await wait_all_tasks_blocked()
    assert load.connected == n and all(sub.track.received == 1 for sub in subs)
    assert reader is None or len(reader) == n
    return subs, peers


async def test_one_connection_ends_while_the_others_keep_reading(server: Server) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            reader: sse_h1.Reader = await nursery.start(sse_h1.serve_reader)
            subs, peers = await connect(nursery, server, reader, 4)
            assert len(reader) == 4
            await peers[0].send(chunk(b"event: sluice.end\ndata: {}\n\n"))  # the stream's end
            await peers[1].send(b"0\r\n\r\n")  # the chunked body's end
            peers[2].close()  # end of file
            await wait_all_tasks_blocked()
            assert [sub.outcome for sub in subs] == [None, None, None, "running"]
            assert subs[0].track.ended and not subs[1].track.ended
            assert len(reader) == 1
            for seq in range(1, 4):  # the last one still reads, event by event
                await peers[3].send(chunk(event(seq)))
                await wait_all_tasks_blocked()
                assert subs[3].track.received == seq + 1
            assert subs[3].track.last_id == "4" and subs[3].load.events == 3 + 4
            subs[3].scope.cancel()  # how the load stops a connection (conn.scope)
            await wait_all_tasks_blocked()
            assert subs[3].outcome == "cancelled" and len(reader) == 0
            assert await peers[3].recv(100) == b""  # the client closed its socket
            assert subs[3].load.errors == {}
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("shared", [True, False], ids=["reader", "alone"])
@pytest.mark.parametrize("how", ["bad-chunk", "bad-utf8", "reset", "eof"])
async def test_what_ends_a_connection_reaches_its_session(server: Server, shared: bool, how: str) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            reader = await nursery.start(sse_h1.serve_reader) if shared else None
            (sub, other), peers = await connect(nursery, server, reader, 2)
            peer = peers[0]
            if how == "bad-chunk":
                await peer.send(b"zz\r\n")
            elif how == "bad-utf8":
                await peer.send(chunk(b"id: \xff\ndata: x\n\n"))
            elif how == "reset":
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                peer.close()
            else:
                peer.close()
            await wait_all_tasks_blocked()
            expected = {"bad-chunk": ProtocolError, "bad-utf8": UnicodeDecodeError, "reset": ConnectionResetError}
            if how in expected:
                assert isinstance(sub.outcome, expected[how]), sub.outcome
            else:
                assert sub.outcome is None
            assert other.outcome == "running"
            if reader is not None:
                assert len(reader) == 1
            await peers[1].send(chunk(event(1)))
            await wait_all_tasks_blocked()
            assert other.track.received == 2
            nursery.cancel_scope.cancel()


async def test_a_full_batch_yields_and_reads_on(server: Server) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            reader: sse_h1.Reader = await nursery.start(sse_h1.serve_reader, 2)
            subs, peers = await connect(nursery, server, reader, 5, chunked=False)
            for peer in peers:  # all five ready at once: three batches of at most two
                await peer.send(event(1) + event(2))
            await wait_all_tasks_blocked()
            assert all(sub.track.received == 3 and sub.track.disorder == 0 for sub in subs)
            nursery.cancel_scope.cancel()


async def test_a_stopped_reader_wakes_its_sessions(server: Server) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as readers:
                reader: sse_h1.Reader = await readers.start(sse_h1.serve_reader)
                (sub,), _ = await connect(nursery, server, reader, 1)
                readers.cancel_scope.cancel()
            await wait_all_tasks_blocked()
            assert isinstance(sub.outcome, trio.ClosedResourceError) and len(reader) == 0
            again = Sub(sub.load, 1)
            nursery.start_soon(again.run, reader)
            peer = await server.accept()
            await peer.send(HEAD + b"\r\n")
            await wait_all_tasks_blocked()
            assert isinstance(again.outcome, trio.ClosedResourceError)
