"""Listening sockets and the accept loop.

Socket creation is separate from serving: the supervisor creates the listening sockets (one
SO_REUSEPORT socket per worker slot) and hands them to workers, which only accept on them.

The accept loop drains the whole backlog on every wake-up (trio's own listener takes one
connection per scheduler pass, which made connection bursts queue for tens of seconds), and
backs off briefly, logging, when the process or system is out of file descriptors.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from typing import Any, NoReturn

import trio

from server.http.stats import HttpStats

log = logging.getLogger(__name__)

DEFAULT_BACKLOG = 4096
ACCEPT_BACKOFF = 0.1  # seconds to pause accepting when out of file descriptors or memory
ACCEPT_LOG_INTERVAL = 10.0  # at most one warning per this many seconds per listener

# Out of a resource: accepting again at once would spin. Pause, the backlog keeps the clients.
_BACKOFF_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The connection died in the backlog, or a filter refused it: skip it, keep accepting.
_SKIP_ERRNOS = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.EHOSTUNREACH, errno.EINTR}
)


def bind_tcp_listener(
    host: str | None,
    port: int,
    *,
    reuse_port: bool = False,
    backlog: int = DEFAULT_BACKLOG,
    family: socket.AddressFamily = socket.AF_UNSPEC,
) -> socket.socket:
    """Create, bind and listen on one non-blocking TCP socket for the first address of ``host``.

    Always sets SO_REUSEADDR; sets SO_REUSEPORT when ``reuse_port`` (several processes may then
    listen on the same port, the kernel spreading connections between them). An IPv6 socket also
    accepts IPv4 unless ``family`` is given. Synchronous, so it works before trio runs.
    """
    infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    fam, type_, proto, _, addr = infos[0]
    return _make_listener(fam, type_, proto, addr, reuse_port=reuse_port, backlog=backlog, v6only=False)


async def open_tcp_listeners_reuseport(
    port: int, host: str | None = None, *, reuse_port: bool = True, backlog: int = DEFAULT_BACKLOG
) -> list[socket.socket]:
    """Listening sockets on every address of ``host`` (all interfaces when ``None``), like
    ``trio.open_tcp_listeners`` but returning stdlib sockets, with SO_REUSEADDR always and
    SO_REUSEPORT when ``reuse_port``. Port 0 picks a free port (per socket)."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen: set[Any] = set()
    sockets: list[socket.socket] = []
    try:
        for fam, type_, proto, _, addr in infos:
            if addr in seen:
                continue
            seen.add(addr)
            sockets.append(_make_listener(fam, type_, proto, addr, reuse_port=reuse_port, backlog=backlog, v6only=True))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _make_listener(
    family: int, type_: int, proto: int, addr: Any, *, reuse_port: bool, backlog: int, v6only: bool
) -> socket.socket:
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def accept_loop(
    listener: socket.socket, on_accept: Callable[[socket.socket, Any], None], stats: HttpStats
) -> NoReturn:
    """Accept forever on the non-blocking ``listener``, calling ``on_accept(sock, addr)`` for each
    connection (synchronously; it should only spawn a task). Every wake-up accepts until the
    backlog is empty. EMFILE/ENFILE/ENOBUFS/ENOMEM are counted in ``stats.accept_errors``, logged
    at most every ``ACCEPT_LOG_INTERVAL`` seconds and followed by a short pause; never fatal."""
    last_warning = -ACCEPT_LOG_INTERVAL
    while True:
        await trio.lowlevel.wait_readable(listener)
        # Readable and cancelled at once (accepting was stopped): accept nothing more, so what is
        # queued stays for whoever else listens on this socket.
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                sock, addr = listener.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _SKIP_ERRNOS:
                    continue
                if exc.errno not in _BACKOFF_ERRNOS:
                    raise
                stats.accept_errors += 1
                now = trio.current_time()
                if now - last_warning >= ACCEPT_LOG_INTERVAL:
                    last_warning = now
                    log.warning("accept failed (%s): pausing accepts for %.2fs", exc.strerror, ACCEPT_BACKOFF)
                await trio.sleep(ACCEPT_BACKOFF)
                break
            on_accept(sock, addr)
