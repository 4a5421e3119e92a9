"""A real haproxy in front of Sluice for tests: TCP mode, PROXY protocol v1 or v2 to the servers,
round robin over one or several, health checks on a path when asked.

haproxy cannot report the port of a port-0 bind, so a free port is picked by binding a socket to
port 0 and closing it; if haproxy then fails to bind it (another process took it meanwhile) it
exits, and a fresh port is tried.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import trio

HAPROXY = "/usr/sbin/haproxy"
ATTEMPTS = 5  # ports tried before giving up
START_TIMEOUT = 10.0  # seconds for haproxy to accept connections
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
POLL_INTERVAL = 0.02  # seconds between readiness probes (waiting for an external process)
CHECK_INTERVAL_MS = 100  # haproxy's health-check interval, when checks are on

SendProxy = Literal["send-proxy", "send-proxy-v2"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def haproxy_config(
    frontend_port: int,
    backend_ports: Sequence[int],
    send_proxy: SendProxy,
    *,
    health: str | None = None,
    stats_socket: Path | None = None,
) -> str:
    """The configuration text: one TCP frontend on 127.0.0.1, round robin over ``backend_ports``
    (servers ``h0``, ``h1``...) with PROXY headers. With ``health`` (a path such as ``/readyz``)
    each server is checked over HTTP every :data:`CHECK_INTERVAL` (the check sends the PROXY header
    too), down after 2 failures, up after 1 success; a connection refused by a server is retried
    on another one. ``stats_socket`` enables the runtime API there (``show stat``)."""
    check = ""
    if health is not None:
        check = f" check check-send-proxy inter {CHECK_INTERVAL_MS}ms fall 2 rise 1"
    servers = "".join(f"    server h{i} 127.0.0.1:{port} {send_proxy}{check}\n" for i, port in enumerate(backend_ports))
    httpchk = ""
    if health is not None:
        httpchk = (
            "    option httpchk\n"
            f"    http-check send meth GET uri {health} ver HTTP/1.1 hdr Host balancer\n"
            "    http-check expect status 200\n"
        )
    stats = f"    stats socket {stats_socket} mode 600 level admin\n" if stats_socket is not None else ""
    return f"""global
    maxconn 4096
{stats}
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch 1

frontend fe
    bind 127.0.0.1:{frontend_port}
    default_backend be

backend be
    balance roundrobin
{httpchk}{servers}"""


async def _accepts(port: int) -> bool:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        try:
            await sock.connect(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def _stop(process: trio.Process) -> None:
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_TIMEOUT):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


@dataclass
class Balancer:
    """A running haproxy: its frontend ``port`` and its runtime API socket."""

    port: int
    stats_socket: Path

    async def states(self) -> dict[str, str]:
        """Each server's state as haproxy sees it (``UP``, ``DOWN``, ``MAINT``...), by name."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with sock:
            await sock.connect(str(self.stats_socket))
            await sock.send(b"show stat\n")
            chunks = []
            while data := await sock.recv(65536):
                chunks.append(data)
        lines = b"".join(chunks).decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r["status"].split()[0] for r in rows if r["pxname"] == "be" and r["svname"] != "BACKEND"}

    async def wait_state(self, server: str, state: str) -> None:
        """Poll :meth:`states` until ``server`` is in ``state`` (the caller sets the deadline)."""
        while (await self.states()).get(server) != state:
            await trio.sleep(POLL_INTERVAL)


@asynccontextmanager
async def running_balancer(
    tmp_path: Path, backend_ports: Sequence[int], send_proxy: SendProxy = "send-proxy-v2", *, health: str | None = None
) -> AsyncIterator[Balancer]:
    """Run haproxy (``-db``: foreground) in front of 127.0.0.1:``backend_ports``
    (:func:`haproxy_config`); yields it once its frontend accepts connections, stops it on exit
    (SIGTERM, then SIGKILL). Its output goes to ``tmp_path / "haproxy.log"``."""
    log_path = tmp_path / "haproxy.log"
    stats_socket = tmp_path / "haproxy.sock"
    for attempt in range(ATTEMPTS):
        port = free_port()
        config = tmp_path / f"haproxy-{attempt}.cfg"
        config.write_text(haproxy_config(port, backend_ports, send_proxy, health=health, stats_socket=stats_socket))
        with log_path.open("ab") as output:
            process = await trio.lowlevel.open_process(
                [HAPROXY, "-db", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=output, stderr=output
            )
        try:
            ready = False
            with trio.fail_after(START_TIMEOUT):
                while process.poll() is None:
                    if await _accepts(port):
                        ready = True
                        break
                    await trio.sleep(POLL_INTERVAL)
            if ready:
                yield Balancer(port, stats_socket)
                return
        finally:
            await _stop(process)
    raise RuntimeError(f"haproxy did not start after {ATTEMPTS} attempts:\n{log_path.read_text()}")


@asynccontextmanager
async def running_haproxy(
    tmp_path: Path, backend_port: int, send_proxy: SendProxy = "send-proxy-v2"
) -> AsyncIterator[int]:
    """:func:`running_balancer` in front of one server with no health check; yields the frontend port."""
    async with running_balancer(tmp_path, [backend_port], send_proxy) as balancer:
        yield balancer.port


async def open_from(source_ip: str, port: int) -> trio.SocketStream:
    """A TCP stream to 127.0.0.1:``port`` from ``source_ip`` (any 127.0.0.0/8 address works on
    loopback), so a test can be several clients on one host."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        await sock.bind((source_ip, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def read_head(stream: trio.abc.ReceiveStream, buf: bytearray) -> tuple[int, dict[str, str]]:
    """Read one response head from ``stream`` (``buf`` holds what was read past it); returns the
    status and the lower-cased headers. Fails on EOF before a complete head."""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        assert data, f"EOF before a response head: {bytes(buf)!r}"
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    buf[:] = rest
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers


async def get(stream: trio.abc.Stream, path: str = "/healthz") -> tuple[int, dict[str, str], bytes]:
    """One keep-alive ``GET`` on ``stream`` with a ``Content-Length`` response: (status, headers, body)."""
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    buf = bytearray()
    status, headers = await read_head(stream, buf)
    length = int(headers["content-length"])
    while len(buf) < length:
        data = await stream.receive_some(65536)
        assert data, "EOF inside a response body"
        buf += data
    return status, headers, bytes(buf[:length])


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything the peer sends until it closes (a reset or broken TLS counts as the end)."""
    chunks = []
    while True:
        try:
            data = await stream.receive_some(65536)
        except (trio.BrokenResourceError, ConnectionResetError):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)
