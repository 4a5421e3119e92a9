"""A real haproxy in front of Sluice for tests: TCP mode, PROXY protocol v1 or v2 to the server.

haproxy cannot report the port of a port-0 bind, so a free port is picked by binding a socket to
port 0 and closing it; if haproxy then fails to bind it (another process took it meanwhile) it
exits, and a fresh port is tried.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import trio

HAPROXY = "/usr/sbin/haproxy"
ATTEMPTS = 5  # ports tried before giving up
START_TIMEOUT = 10.0  # seconds for haproxy to accept connections
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
POLL_INTERVAL = 0.02  # seconds between readiness probes (waiting for an external process)

SendProxy = Literal["send-proxy", "send-proxy-v2"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def haproxy_config(frontend_port: int, backend_port: int, send_proxy: SendProxy) -> str:
    """The configuration text: one TCP frontend on 127.0.0.1 to one server with PROXY headers."""
    return f"""global
    maxconn 4096

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend fe
    bind 127.0.0.1:{frontend_port}
    default_backend be

backend be
    server sluice 127.0.0.1:{backend_port} {send_proxy}
"""


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


@asynccontextmanager
async def running_haproxy(
    tmp_path: Path, backend_port: int, send_proxy: SendProxy = "send-proxy-v2"
) -> AsyncIterator[int]:
    """Run haproxy (``-db``: foreground) forwarding to 127.0.0.1:``backend_port`` with
    ``send_proxy``; yields the frontend port once it accepts connections, stops it on exit
    (SIGTERM, then SIGKILL). Its output goes to ``tmp_path / "haproxy.log"``."""
    log_path = tmp_path / "haproxy.log"
    for attempt in range(ATTEMPTS):
        port = free_port()
        config = tmp_path / f"haproxy-{attempt}.cfg"
        config.write_text(haproxy_config(port, backend_port, send_proxy))
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
                yield port
                return
        finally:
            await _stop(process)
    raise RuntimeError(f"haproxy did not start after {ATTEMPTS} attempts:\n{log_path.read_text()}")


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
