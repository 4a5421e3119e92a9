"""The floors the performance figures are measured against: the trio floor baseline
(``loadtest.baselines.trio_floor``) over real sockets, which must really publish and deliver or
the floor it measures would be a floor of nothing, and the store's commit bench
(``loadtest.sqlite_floor``) on a real file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from loadtest import sqlite_floor
from loadtest.baselines.trio_floor import listen, serve
from tests.http_helpers import connect, read_response


async def _read_until(sock: trio.socket.SocketType, buf: bytearray, marker: bytes) -> bytes:
    while marker not in buf:
        data = await sock.recv(65536)
        assert data, "connection closed early"
        buf += data
    end = buf.index(marker) + len(marker)
    out = bytes(buf[:end])
    del buf[:end]
    return out


async def test_a_publish_is_answered_with_its_id_and_reaches_every_subscriber_in_order() -> None:
    listener = listen("127.0.0.1", 0)
    port = listener.getsockname()[1]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, listener)
            subs = []
            for _ in range(2):
                sock = await connect(port)
                await sock.send(b"GET /v1/streams/t HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
                buf = bytearray()
                head = await _read_until(sock, buf, b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
                subs.append((sock, buf))
            pub = await connect(port)
            pbuf = bytearray()
            for n in (1, 2):
                body = b'{"n":%d}' % n
                head = b"POST /v1/streams/t HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                await pub.send(head + body)
                status, _, answer = await read_response(pub, pbuf)
                assert status == 201 and json.loads(answer) == {"id": n}
            for sock, buf in subs:
                assert await _read_until(sock, buf, b"\n\n") == b'id: 1\ndata: {"n":1}\n\n'
                assert await _read_until(sock, buf, b"\n\n") == b'id: 2\ndata: {"n":2}\n\n'
            await pub.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, _ = await read_response(pub, pbuf)
            assert status == 200
            bad = await connect(port)
            await bad.send(b"NOT HTTP\r\n\r\n")
            status, _, _ = await read_response(bad, bytearray())
            assert status == 400
            nursery.cancel_scope.cancel()
    listener.close()


def test_the_sqlite_floor_commits_every_event_and_prints_one_row_per_mode_and_group(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sqlite_floor.main(["--dir", str(tmp_path), "--events", "64", "--streams", "10"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| full", "| normal"))]
    assert [(r.split("|")[1].strip(), int(r.split("|")[2])) for r in rows] == [
        (sync, group) for sync in ("full", "normal") for group in sqlite_floor.GROUPS
    ]
    assert all(float(r.split("|")[5]) > 0 for r in rows)  # wall time (CPU may round to 0 on so few)
    assert list(tmp_path.iterdir()) == []  # its files are gone


def test_each_group_is_committed_in_full(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "f.db"
    sqlite_floor.measure(path, "full", 4, 40, 10)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (10 + 40,)
