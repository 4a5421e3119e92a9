"""The notice bus's runtime directory (see :mod:`server.bus.local`): socket files, binding, listing.

Each worker's socket is ``worker-<ident>.sock`` in one directory shared by the host's workers
(systemd's ``RuntimeDirectory``, mode ``0700``). Blocking calls here touch only that directory,
which lives on a memory file system (``/run``), so they are made from the trio thread.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import stat

log = logging.getLogger(__name__)

PREFIX, SUFFIX = "worker-", ".sock"
"""A worker's socket file is ``<PREFIX><ident><SUFFIX>``."""

SOCKET_BUFFER = 4 * 1024 * 1024
"""Requested SO_SNDBUF and SO_RCVBUF (the kernel caps it at ``net.core.[wr]mem_max``)."""

_opened = itertools.count()


def default_ident() -> str:
    """The PID, with a suffix for every further bus opened in this process (``1234``, ``1234.1``)."""
    n = next(_opened)
    return f"{os.getpid()}.{n}" if n else str(os.getpid())


def bind(peers_dir: str | os.PathLike[str], ident: str) -> tuple[socket.socket, str, int]:
    """A non-blocking datagram socket bound at ``<peers_dir>/worker-<ident>.sock``, that path and its inode.

    Creates the directory (``0700``) if missing and replaces a stale socket file of the same name.
    """
    directory = os.path.realpath(peers_dir)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, f"{PREFIX}{ident}{SUFFIX}")
    try:
        if stat.S_ISSOCK(os.stat(path, follow_symlinks=False).st_mode):
            os.unlink(path)  # left by an earlier process with this identity
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
        sock.setblocking(False)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        ino = os.stat(path, follow_symlinks=False).st_ino
    except BaseException:
        sock.close()
        raise
    return sock, path, ino


def inode(path: str) -> int | None:
    """The inode of the file at ``path`` (not following links), or ``None`` if there is none."""
    try:
        return os.stat(path, follow_symlinks=False).st_ino
    except OSError:
        return None


def unlink_if(path: str, ino: int) -> None:
    """Remove ``path`` if it is still the file with inode ``ino`` (not a successor's socket)."""
    if inode(path) == ino:
        with contextlib.suppress(OSError):
            os.unlink(path)


def list_sockets(directory: str, own: str, limit: int) -> dict[str, int] | None:
    """``{path: inode}`` of the worker sockets in ``directory`` other than ``own`` (at most
    ``limit``), or ``None`` if the directory cannot be listed."""
    found: dict[str, int] = {}
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                name = entry.name
                if not (name.startswith(PREFIX) and name.endswith(SUFFIX)):
                    continue
                path = os.path.join(directory, name)
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if path != own and stat.S_ISSOCK(st.st_mode):
                    found[path] = st.st_ino
                    if len(found) >= limit:
                        break
    except OSError as exc:
        log.warning("peer bus: cannot list %s: %s", directory, exc)
        return None
    return found
