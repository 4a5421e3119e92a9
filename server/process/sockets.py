"""The supervisor's listening sockets: one SO_REUSEPORT socket per worker slot, or systemd's.

Each worker slot has its own listening socket (its own accept queue: the kernel spreads new
connections over the sockets of the port). The socket outlives the slot's workers, so a worker
that is replaced hands its queue to the next one and no queued connection is reset.

Under systemd socket activation (``LISTEN_FDS`` / ``LISTEN_PID`` / ``LISTEN_FDNAMES``, file
descriptors from 3) the sockets come from systemd instead; they must be listening TCP sockets.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from server.config import Config, ConfigError
from server.http.listener import DEFAULT_BACKLOG, bind_tcp_listener

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3
ACTIVATION_VARS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


class SocketActivationError(Exception):
    """The socket activation variables are malformed or name something other than a listening TCP socket."""


@dataclass(frozen=True, slots=True)
class ActivatedSocket:
    """One socket handed in by systemd, with its name from ``LISTEN_FDNAMES`` (``""`` if none)."""

    sock: socket.socket
    name: str


def activated_sockets(environ: Mapping[str, str] | None = None, pid: int | None = None) -> list[ActivatedSocket]:
    """The sockets systemd passed to this process, or ``[]`` when it passed none.

    The variables count only when ``LISTEN_PID`` equals ``pid`` (default: ours). Each
    descriptor is checked to be a listening TCP (IPv4/IPv6) stream socket and made
    non-inheritable (a worker gets it only when it is passed on explicitly). Raises
    :class:`SocketActivationError` naming the bad descriptor or variable."""
    env = os.environ if environ is None else environ
    count_text = env.get("LISTEN_FDS")
    if not count_text:
        return []
    try:
        owner = int(env.get("LISTEN_PID", ""))
    except ValueError:
        raise SocketActivationError(f"LISTEN_PID must be a process id, got {env.get('LISTEN_PID')!r}") from None
    if owner != (os.getpid() if pid is None else pid):
        return []
    try:
        count = int(count_text)
    except ValueError:
        raise SocketActivationError(f"LISTEN_FDS must be a number, got {count_text!r}") from None
    if count < 0:
        raise SocketActivationError(f"LISTEN_FDS must not be negative, got {count}")
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    found: list[ActivatedSocket] = []
    try:
        for i in range(count):
            fd = LISTEN_FDS_START + i
            found.append(ActivatedSocket(_listening_tcp_socket(fd), names[i] if i < len(names) else ""))
    except BaseException:
        for item in found:
            item.sock.detach()  # not ours to close: systemd keeps its copy
        raise
    return found


def _listening_tcp_socket(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise SocketActivationError(f"file descriptor {fd} is not a socket ({exc.strerror or exc})") from None
    problem = None
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        problem = f"is not a TCP socket ({sock.family.name}, {sock.type.name})"
    elif not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        problem = "is a TCP socket that is not listening"
    if problem is not None:
        sock.detach()  # not ours to close
        raise SocketActivationError(f"file descriptor {fd} {problem}")
    sock.set_inheritable(False)
    return sock


def bind_slot_sockets(host: str, port: int, count: int, *, backlog: int = DEFAULT_BACKLOG) -> list[socket.socket]:
    """``count`` SO_REUSEPORT listening sockets on ``host``:``port``, one per worker slot.

    With port 0 the first socket gets a free port and the others bind to that same port. On
    failure every socket made so far is closed and the ``OSError`` propagates."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            bound = sockets[0].getsockname()[1] if sockets else port
            sockets.append(bind_tcp_listener(host, bound, reuse_port=True, backlog=backlog))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def spread(sockets: Sequence[socket.socket], slots: int) -> list[list[socket.socket]]:
    """Which sockets each of ``slots`` slots accepts on: socket ``j`` goes to slot ``j % slots``;
    with fewer sockets than slots, slot ``i`` shares socket ``i % len(sockets)`` (round-robin)."""
    if not sockets:
        raise ValueError("no sockets to spread")
    per_slot: list[list[socket.socket]] = [[] for _ in range(slots)]
    for j, sock in enumerate(sockets):
        per_slot[j % slots].append(sock)
    for i, mine in enumerate(per_slot):
        if not mine:
            mine.append(sockets[i % len(sockets)])
    return per_slot


def describe(sock: socket.socket) -> str:
    """``host:port`` (``[v6]:port``) of a listening socket, for logs and status lines."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def open_sockets(
    config: Config,
    slots: int,
    environ: Mapping[str, str],
    *,
    before_bind: Callable[[str, int], None] | None = None,
) -> tuple[list[list[socket.socket]], bool]:
    """The sockets of each slot, and whether the supervisor bound them (``False``: systemd's).

    ``before_bind(host, port)`` runs just before the configured address is bound (not with
    systemd's sockets); what it raises propagates. Raises :class:`ConfigError` when the
    configured address cannot be bound and :class:`SocketActivationError` when systemd's
    sockets are unusable."""
    activated = activated_sockets(environ)
    if activated:
        names = ", ".join(f"{describe(a.sock)}{f' ({a.name})' if a.name else ''}" for a in activated)
        log.info("using %d socket(s) from systemd: %s", len(activated), names)
        return spread([a.sock for a in activated], slots), False
    host, port = config.server.host, config.server.port
    if before_bind is not None:
        before_bind(host, port)
    try:
        sockets = bind_slot_sockets(host, port, slots)
    except OSError as exc:
        key = "server.host" if isinstance(exc, socket.gaierror) else "server.port"
        raise ConfigError(f"cannot listen on {host} port {port}: {exc.strerror or exc}", key=key) from None
    return [[sock] for sock in sockets], True
