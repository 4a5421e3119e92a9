"""The sd_notify client against real AF_UNIX datagram sockets (a path and an abstract name)."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from server.process import sdnotify


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a short path (AF_UNIX paths are limited to 107 bytes)."""
    directory = tempfile.mkdtemp(prefix="sdn-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(directory)


def test_notify_sends_one_datagram_to_a_path(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    assert sdnotify.notify("READY=1\nSTATUS=serving", environ={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
    assert sdnotify.notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_to_an_abstract_socket() -> None:
    name = f"sluice-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        assert sdnotify.notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_reads_the_process_environment(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sdnotify.notify("READY=1")
    assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize("value", [None, "", "@", "vsock:2:1234", "relative/path"])
def test_no_usable_socket_means_false(value: str | None) -> None:
    environ = {} if value is None else {"NOTIFY_SOCKET": value}
    assert sdnotify.notify_address(environ) is None
    assert sdnotify.notify("READY=1", environ=environ) is False


def test_notify_never_raises(tmp_path: Path) -> None:
    missing = str(tmp_path / "nobody-listens")
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": missing}) is False
    stream_path = tempfile.mktemp(prefix="sdn-stream-", dir="/tmp")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream:  # wrong socket type
        stream.bind(stream_path)
        try:
            assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": stream_path}) is False
        finally:
            os.unlink(stream_path)
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": "/" + "x" * 200}) is False  # path too long


def test_watchdog_interval() -> None:
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 2.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 2.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "7"}, pid=7) == 2.0
    for bad in ("", "0", "-5", "soon"):
        assert sdnotify.watchdog_interval({"WATCHDOG_USEC": bad}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "100", "WATCHDOG_PID": "x"}) is None


def test_monotonic_usec_is_microseconds() -> None:
    before = time.monotonic()
    usec = sdnotify.monotonic_usec()
    assert abs(usec / 1_000_000 - before) < 1.0


async def test_serve_watchdog_pings_every_half_interval(
    receiver: tuple[socket.socket, str],
    autojump_clock: trio.abc.Clock,
) -> None:
    sock, path = receiver
    sock.setblocking(False)
    environ = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000"}  # 10 s: a ping every 5 s
    with trio.move_on_after(12):
        await sdnotify.serve_watchdog(environ)
    pings = []
    while True:
        try:
            pings.append(sock.recv(4096))
        except BlockingIOError:
            break
    assert pings == [b"WATCHDOG=1"] * 3  # at 0, 5 and 10 s
    with trio.fail_after(1):  # nothing asked of this process: returns at once
        await sdnotify.serve_watchdog({"NOTIFY_SOCKET": path})
        await sdnotify.serve_watchdog({**environ, "WATCHDOG_PID": str(os.getpid() + 1)})
