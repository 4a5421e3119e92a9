"""One Sluice per address and per store file on this host.

A second ``sluice serve`` on an address another live Sluice serves would join its SO_REUSEPORT
group, and the kernel would spread connections (and publishes) over both; one on another
instance's store file would mix two supervisors' workers in one file. The supervisor takes two
kinds of lock before it binds, held for its whole life and never inherited by its workers:

* an **address lock** per listening address: an abstract-namespace Unix stream socket named
  ``sluice:addr:<host>:<port>``, bound and listening. The kernel frees the name when the holder
  dies, so no lock is ever stale. A second supervisor that finds the name taken connects to it
  and learns the holder's pid (``SO_PEERCRED``) to name it in the error. Before binding a
  configured port, :func:`check_port_free` also refuses a port another process listens on at an
  overlapping address (a wildcard and a specific address of the same port, say);
* a **store lock**: ``flock`` on ``<store file>.lock`` (the sqlite file itself uses POSIX
  record locks, kept apart), holding the holder's pid as text. The kernel drops the ``flock``
  when the holder dies; the file may stay behind and only the lock counts.

Workers never hold these locks (every descriptor here is close-on-exec): the workers of a
supervisor that was killed drain and exit by themselves, and must not keep a new supervisor out
of the store file meanwhile.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Mapping
from pathlib import Path

import trio

from server.config import Config, ConfigError
from server.process.sockets import open_sockets

log = logging.getLogger(__name__)

ADDRESS_PREFIX = "sluice:addr:"
PROBE_TIMEOUT = 1.0  # seconds to wait for a lock holder to answer the connect that names it
LOCK_BACKLOG = 16  # pending connects on an address lock (each one is accepted and closed at once)
CLAIM_ATTEMPTS = 3  # a holder that vanishes between our bind and our connect: try the bind again
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class InstanceConflict(Exception):
    """Another live process already serves the address or uses the store file; the message names it."""


def address_text(host: str, port: int) -> str:
    """``host:port`` (``[v6]:port``), as the supervisor's logs and the lock names spell an address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve(host: str, port: int) -> tuple[socket.AddressFamily, str] | None:
    """The family and numeric host the supervisor binds for ``host`` (the first address, as
    :func:`server.http.listener.bind_tcp_listener` takes it); ``None`` if it does not resolve
    (binding then reports the error)."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return None
    family, _type, _proto, _name, addr = infos[0]
    return family, str(addr[0])


def holder_pid(name: bytes) -> int | None:
    """The pid of the process listening on the abstract Unix socket ``name`` (without the leading
    NUL), ``None`` if nobody answers within :data:`PROBE_TIMEOUT`, ``0`` if it is not visible from
    here (another pid namespace)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(b"\0" + name)
            pid, _uid, _gid = _PEERCRED.unpack(probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        except OSError:
            return None
    return int(pid)


def _pid_text(pid: int | None) -> str:
    return f"pid {pid}" if pid else "pid unknown"


def check_port_free(host: str, port: int) -> None:
    """Refuse (:class:`InstanceConflict`) when a process already listens on ``host``:``port`` or
    on an address overlapping it (the wildcard of the same port, or a specific address under our
    wildcard): a trial bind without SO_REUSEPORT, closed at once. Port 0 and hosts that do not
    resolve pass (binding reports the latter)."""
    resolved = resolve(host, port) if port else None
    if resolved is None:
        return
    family, numeric = resolved
    with socket.socket(family, socket.SOCK_STREAM) as trial:
        trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count
        if family == socket.AF_INET6:
            trial.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # as the real listener
        try:
            trial.bind((numeric, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return  # not a conflict; the real bind reports what is wrong
            raise InstanceConflict(
                f"another process already listens on {address_text(numeric, port)} or an address "
                "overlapping it (the workers of a stopped Sluice may still be draining)"
            ) from None


class InstanceLocks:
    """The address and store locks one supervisor holds; see the module docstring.

    Each ``lock_*`` method raises :class:`InstanceConflict` naming the holder when another live
    process holds that lock, and is idempotent for a lock already held here. :meth:`close`
    releases everything (the kernel does too when the process dies)."""

    def __init__(self) -> None:
        self._addresses: dict[str, socket.socket] = {}
        self._stores: dict[str, int] = {}

    @property
    def addresses(self) -> list[str]:
        """The addresses locked, as ``host:port``."""
        return list(self._addresses)

    @property
    def stores(self) -> list[str]:
        """The lock files held (resolved paths)."""
        return list(self._stores)

    # ---- addresses ------------------------------------------------------------------------

    def lock_address(self, host: str, port: int) -> None:
        """Take the lock of ``host``:``port`` (``host`` numeric or a name, resolved as the bind
        resolves it). Port 0 names no address yet and is skipped."""
        resolved = resolve(host, port) if port else None
        if resolved is None:
            return
        text = address_text(resolved[1], port)
        if text in self._addresses:
            return
        name = (ADDRESS_PREFIX + text).encode()
        for _ in range(CLAIM_ATTEMPTS):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # close-on-exec (PEP 446)
            try:
                sock.bind(b"\0" + name)
                sock.listen(LOCK_BACKLOG)
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
                pid = holder_pid(name)
                if pid is not None:
                    raise InstanceConflict(f"another Sluice ({_pid_text(pid)}) already serves {text}") from None
                continue  # gone between our bind and our connect, or not listening yet
            self._addresses[text] = sock
            return
        raise InstanceConflict(f"another Sluice (pid unknown) already serves {text}")

    async def answer_probes(self) -> None:
        """Accept and close every connect to the address locks (a second Sluice learning who holds
        them), so their queues never fill. Runs until cancelled."""
        async with trio.open_nursery() as nursery:
            for sock in self._addresses.values():
                nursery.start_soon(_answer, trio.socket.from_stdlib_socket(sock))

    # ---- store ----------------------------------------------------------------------------

    def lock_store(self, config: Config) -> None:
        """Take the lock of the sqlite store file of ``config`` (none for the memory store),
        creating its directory as the workers would. Raises :class:`ConfigError` (key
        ``store.path``) when the lock file cannot be created."""
        if config.store.backend != "sqlite":
            return
        given = config.store.path
        path = Path(given)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock_path = os.path.realpath(path) + ".lock"
            if lock_path in self._stores:
                return
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the lock file of {given}: {exc.strerror or exc}", key="store.path"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(f"cannot lock {lock_path}: {exc.strerror or exc}", key="store.path") from None
            raise InstanceConflict(f"store file {given} is in use by another Sluice ({_pid_text(holder)})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._stores[lock_path] = fd

    def release_stores_except(self, config: Config) -> None:
        """Release the store locks other than the one of ``config``'s store (after a reload moved
        every worker to another file)."""
        keep = os.path.realpath(config.store.path) + ".lock" if config.store.backend == "sqlite" else None
        for lock_path in [p for p in self._stores if p != keep]:
            os.close(self._stores.pop(lock_path))

    def close(self) -> None:
        """Release every lock held here."""
        for sock in self._addresses.values():
            sock.close()
        self._addresses.clear()
        for fd in self._stores.values():
            os.close(fd)
        self._stores.clear()


def claim(
    config: Config, slots: int, locks: InstanceLocks, environ: Mapping[str, str]
) -> tuple[list[list[socket.socket]], bool]:
    """Take the store lock, then open the listening sockets (:func:`open_sockets`) with the lock
    of each address they listen on. A configured port is locked and checked
    (:func:`check_port_free`) before it is bound, so a refused start never joins another
    instance's SO_REUSEPORT group; port 0 (once bound) and systemd's sockets are locked after.

    On failure every lock taken is released, every socket bound here closed, and the error
    propagates: :class:`InstanceConflict`, :class:`ConfigError`,
    :class:`~server.process.sockets.SocketActivationError`."""

    def before_bind(host: str, port: int) -> None:
        locks.lock_address(host, port)
        check_port_free(host, port)

    try:
        locks.lock_store(config)
        sockets, owned = open_sockets(config, slots, environ, before_bind=before_bind)
    except BaseException:
        locks.close()
        raise
    unique = list({id(sock): sock for socks in sockets for sock in socks}.values())
    try:
        for sock in unique:
            host, port = sock.getsockname()[:2]
            locks.lock_address(str(host), int(port))
    except BaseException:
        locks.close()
        if owned:
            for sock in unique:
                sock.close()
        raise
    return sockets, owned


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


async def _answer(sock: trio.socket.SocketType) -> None:
    while True:
        try:
            conn, _ = await sock.accept()
        except OSError as exc:  # EMFILE and the like: try again a little later
            log.warning("instance lock: accept failed: %s", exc)
            await trio.sleep(0.1)
            continue
        conn.close()
