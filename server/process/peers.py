"""Cross-worker notices: the workers of one host tell each other of their commits by Unix datagrams.

Each worker binds an ``AF_UNIX`` datagram socket ``worker-<ident>.sock`` (``ident``: its PID by
default) in a runtime directory shared by the host's workers (systemd's ``RuntimeDirectory``).
The store's listener hears only this worker's own commits; :meth:`PeerBus.broadcast` sends each
of them to every other worker, and the receiving task feeds what arrives to the local hub as if
it had been committed here. Nothing is shared but the store file and these messages.

Notices committed in one scheduling pass share datagrams (format: :mod:`server.process.peers_wire`),
each encoded once for all peers, one ``sendto`` per peer and datagram. Sending never blocks: a
peer whose queue is full is owed a hint per stream it missed (past :data:`MAX_OWED` streams, a
resync), resent with backoff and before its next datagram; a peer whose socket is gone or
refuses is forgotten.

Loss is repaired from the store, the source of truth. Live, a subscription checks that every
event is the next ``seq`` of its epoch, so a missed notice followed by any later one sends it
back to the store; hints do the same without the payload. For a notice that is missed with
nothing after it, every ``reconcile_interval`` the bus reads the head (epoch, last seq, closed)
of every stream watched on this worker in one batched store read and hands each to
:meth:`server.core.hub.Hub.on_hint`, which wakes only the watchers that are behind.

Discovery: on start a worker lists the directory, says hello to every worker there and waits
(at most ``hello_timeout``) for their welcomes, so that every commit they make afterwards is
sent to it. The directory is listed again every ``rescan_interval``: newcomers are added,
vanished sockets forgotten. On exit a worker says bye and removes its socket file.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields

import trio

from server.core.groups import lone_error_unwrapped
from server.core.hub import Hub
from server.process import peers_dir as files
from server.process import peers_wire as wire
from server.store.base import Appended, Closed, Deleted, Head, Notice, Store

log = logging.getLogger(__name__)

MAX_OWED = 1024
"""Streams one peer may be owed hints for; beyond, it is owed one resync instead."""

RECV_BATCH = 256
"""Datagrams handled per wake-up of the receiving task before other tasks run."""

RECONCILE_MAX_STREAMS = 50_000
RECONCILE_GRACE = 0.1  # seconds a head read waits for notices in flight before it counts as news
"""Streams checked per reconciliation pass; with more, successive passes take turns."""

RETRY_MIN, RETRY_MAX = 0.005, 0.25
"""Backoff bounds (seconds) for resending what a peer is owed."""


@dataclass(slots=True)
class BusStats:
    """What the bus has done since it opened (read them, do not write them)."""

    sent: int = 0  # datagrams sent (one per peer and datagram)
    received: int = 0  # datagrams received
    send_failures: int = 0  # datagrams a peer could not take (queue full, socket gone or refusing)
    hints_sent: int = 0  # hint items sent to peers: events too big for a datagram, or owed after a failure
    hints_received: int = 0
    resyncs_sent: int = 0  # peers told to check the store for everything (they were owed too much)
    reconciles: int = 0  # reconciliation passes (only when something is watched here)
    repairs: int = 0  # streams whose watchers reconciliation found behind the store
    peers: int = 0  # workers currently known
    peers_lost: int = 0  # workers forgotten because their socket vanished or refused
    bad: int = 0  # datagrams or items that could not be decoded (each triggers a reconciliation)

    def as_dict(self) -> dict[str, int]:
        """A snapshot, for tests and metrics."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(eq=False, slots=True)
class _Peer:
    path: str
    owed: dict[str, Head] = field(default_factory=dict)  # stream -> newest head it missed
    resync: bool = False  # owed a resync (covers every stream)
    gone: bool = False

    @property
    def owes(self) -> bool:
        return self.resync or bool(self.owed)


class PeerBus:
    """One worker's end of the host's notice bus. Obtain it from :func:`open_peer_bus`.

    Promises: every change passed to :meth:`broadcast` is sent to every known peer, or that peer
    is owed a hint for the stream, resent until it has room; what a peer receives it hands to its
    hub (:meth:`Hub.on_notice` with ``remote=True``, :meth:`Hub.on_hint`); and every
    ``reconcile_interval`` the store's head of every locally watched stream is checked, so even a
    notice lost entirely is delivered within about one interval. Everything runs on the trio
    thread; nothing blocks.
    """

    def __init__(
        self,
        sock: socket.socket,
        path: str,
        ino: int,
        hub: Hub,
        store: Store,
        *,
        max_datagram: int,
        reconcile_interval: float,
        rescan_interval: float,
        max_peers: int,
    ) -> None:
        self.path = path
        self.directory = os.path.dirname(path)
        self.stats = BusStats()
        self._sock = sock
        self._ino = ino  # of our socket file: remove only that one
        self._hub = hub
        self._store = store
        self._recv_size = max_datagram
        # A datagram may not exceed the socket's send buffer (less the kernel's 32-byte margin).
        sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self.max_datagram = max(1024, min(max_datagram, sndbuf - 64))
        self._budget = self.max_datagram - wire.HEADER_MAX
        self._reconcile_interval = reconcile_interval
        self._rescan_interval = rescan_interval
        self._max_peers = max_peers
        self._peers: dict[str, _Peer] = {}
        self._refused: dict[str, int] = {}  # path -> inode of a socket file that refused
        self._pending: list[bytes] = []
        self._pending_keys: list[wire.Key] = []
        self._pending_size = 0
        self._pending_hints = 0
        self._flush_wanted = trio.Event()
        self._owing = trio.Event()
        self._reconcile_wanted = trio.Event()
        self._awaiting: set[str] = set()
        self._welcomed = trio.Event()
        self._cursor = 0
        self._closed = False

    # -- sending ------------------------------------------------------------------------------

    def peer_paths(self) -> list[str]:
        """The socket paths of the workers this one currently sends to."""
        return list(self._peers)

    def broadcast(self, notice: Notice) -> None:
        """Send a change this worker committed to every peer (the store's listener calls this).

        Synchronous and non-blocking: the notice is encoded once and queued; the queue is sent at
        the end of the current scheduling pass (sooner when a datagram is full).
        """
        if self._closed or not self._peers:
            return
        for item, key, hint in wire.encode_notice(notice, self._budget):
            if self._pending_size + len(item) > self._budget:
                self._flush()
            self._pending.append(item)
            self._pending_keys.append(key)
            self._pending_size += len(item)
            self._pending_hints += hint
        self._flush_wanted.set()

    def _flush(self) -> None:
        """Send the queued items as one datagram to every peer."""
        if not self._pending:
            return
        data, keys, hints = wire.datagram(self._pending), self._pending_keys, self._pending_hints
        self._pending, self._pending_keys, self._pending_size, self._pending_hints = [], [], 0, 0
        for peer in tuple(self._peers.values()):
            if peer.owes and not self._send_owed(peer):
                self._owe(peer, keys)  # still no room: do not even try
            elif self._send(peer, data):
                self.stats.hints_sent += hints
            else:
                self._owe(peer, keys)

    def _send(self, peer: _Peer, data: bytes) -> bool:
        """One ``sendto``; on a full queue return False, on a dead peer forget it and return False."""
        try:
            self._sock.sendto(data, peer.path)
        except (BlockingIOError, InterruptedError):
            self.stats.send_failures += 1
            return False
        except OSError as exc:
            self.stats.send_failures += 1
            if exc.errno in (errno.ENOBUFS, errno.ENOMEM, errno.EMSGSIZE):
                return False  # transient, or too big for this socket: owed hints are small
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                log.warning("peer bus: forgetting %s: %s", peer.path, exc)
            self._forget(peer, refused=exc.errno == errno.ECONNREFUSED)
            return False
        self.stats.sent += 1
        return True

    def _owe(self, peer: _Peer, keys: Sequence[wire.Key]) -> None:
        """Record that ``peer`` missed the items described by ``keys``."""
        if peer.gone:
            return
        self._owing.set()
        if peer.resync:
            return  # a resync covers everything
        owed = peer.owed
        for stream, head in keys:
            if head is None:
                owed.pop(stream, None)  # deleted: nothing left to read
            elif stream in owed or len(owed) < MAX_OWED:
                owed[stream] = head  # keys are in commit order: the newest wins
            else:
                owed.clear()
                peer.resync = True
                return

    def _send_owed(self, peer: _Peer) -> bool:
        """Send what ``peer`` is owed; True once it is owed nothing."""
        if peer.resync:
            if not self._send(peer, wire.RESYNC_DGRAM):
                return False
            peer.resync = False
            self.stats.resyncs_sent += 1
        owed = peer.owed
        while owed:
            items: list[bytes] = []
            size = 0
            for stream, head in owed.items():
                item = wire.hint_item(stream, head)
                if size + len(item) > self._budget:
                    break
                items.append(item)
                size += len(item)
            if not self._send(peer, wire.datagram(items)):
                return False
            for stream in list(owed)[: len(items)]:
                del owed[stream]
            self.stats.hints_sent += len(items)
        return True

    async def _flush_loop(self) -> None:
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted = trio.Event()
            self._flush()

    async def _retry_loop(self) -> None:
        """Resend what peers are owed, backing off while they stay full."""
        while True:
            await self._owing.wait()
            self._owing = trio.Event()
            delay = RETRY_MIN
            while True:
                await trio.sleep(delay)
                owing = False
                for peer in tuple(self._peers.values()):
                    if peer.owes and not self._send_owed(peer) and not peer.gone:
                        owing = True
                if not owing:
                    break
                delay = min(delay * 2, RETRY_MAX)

    # -- peers --------------------------------------------------------------------------------

    def _add(self, path: str) -> _Peer | None:
        peer = self._peers.get(path)
        if peer is not None:
            return peer
        if path == self.path or os.path.dirname(path) != self.directory or len(self._peers) >= self._max_peers:
            return None
        peer = self._peers[path] = _Peer(path)
        self._refused.pop(path, None)
        self.stats.peers = len(self._peers)
        return peer

    def _forget(self, peer: _Peer, *, refused: bool = False, lost: bool = True) -> None:
        peer.gone = True
        if self._peers.get(peer.path) is peer:
            del self._peers[peer.path]
            self.stats.peers = len(self._peers)
            self.stats.peers_lost += int(lost)
            ino = files.inode(peer.path) if refused else None
            if ino is not None:  # a socket file left behind: ignore it until it is replaced
                self._refused[peer.path] = ino
        self._welcome(peer.path)

    def _welcome(self, path: str) -> None:
        self._awaiting.discard(path)
        if not self._awaiting:
            self._welcomed.set()

    def rescan(self) -> None:
        """List the runtime directory now: add workers that came, forget those whose socket vanished.

        A socket file that refused a datagram is not added back until it is replaced."""
        found = files.list_sockets(self.directory, self.path, 4 * self._max_peers)
        if found is None:
            return
        for path, peer in tuple(self._peers.items()):
            if path not in found:
                self._forget(peer)
        self._refused = {p: ino for p, ino in self._refused.items() if found.get(p) == ino}
        for path, ino in found.items():
            if self._refused.get(path) != ino:
                self._add(path)

    async def _rescan_loop(self) -> None:
        while True:
            await trio.sleep(self._rescan_interval)
            self.rescan()

    async def _greet(self, timeout: float) -> None:
        """Say hello to every worker in the directory; wait (bounded) until each has welcomed us."""
        self.rescan()
        self._awaiting = set(self._peers)
        for peer in tuple(self._peers.values()):
            if not self._send(peer, wire.HELLO_DGRAM):
                self._welcome(peer.path)
        if self._awaiting:
            with trio.move_on_after(timeout):
                await self._welcomed.wait()
            if self._awaiting:
                log.info("peer bus: %d peer(s) did not welcome %s in time", len(self._awaiting), self.path)
        self._awaiting.clear()

    def _leave(self) -> None:
        """Send what is queued, then say bye; nothing is sent afterwards."""
        self._flush()
        for peer in tuple(self._peers.values()):
            self._send(peer, wire.BYE_DGRAM)
        self._closed = True

    def _release(self) -> None:
        self._sock.close()
        files.unlink_if(self.path, self._ino)

    # -- receiving ----------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        sock, size = self._sock, self._recv_size
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(RECV_BATCH):
                try:
                    data, addr = sock.recvfrom(size)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    log.warning("peer bus: receive failed: %s", exc)
                    break
                self.stats.received += 1
                self._handle(data, addr if isinstance(addr, str) else "")

    def _handle(self, data: bytes, sender: str) -> None:
        """Act on one datagram from the worker bound at ``sender`` ("" if unknown).

        What cannot be decoded is counted in ``bad`` and triggers a reconciliation (it may have
        carried a notice), as does a failure while handing a notice on. Unknown kinds are ignored.
        """
        try:
            items = wire.decode(data)
        except ValueError:
            self._bad(sender)
            return
        for item in items:
            try:
                self._dispatch(item, sender)
            except (ValueError, TypeError, IndexError):
                self._bad(sender)
            except Exception:
                log.exception("peer bus: handing on a notice from %s failed", sender)
                self.request_reconcile()

    def _bad(self, sender: str) -> None:
        self.stats.bad += 1
        log.warning("peer bus: bad datagram from %s", sender or "an unbound socket", exc_info=True)
        self.request_reconcile()

    def _dispatch(self, item: list[object], sender: str) -> None:
        kind = item[0]
        hub = self._hub
        if kind == wire.EVENTS:
            if hub.watcher_count(wire.text(item[1])):
                hub.on_notice(Appended(wire.events_of(item)), remote=True)
        elif kind == wire.HINT:
            self.stats.hints_received += 1
            hub.on_hint(wire.text(item[1]), wire.text(item[2]), wire.count(item[3]), wire.flag(item[4]))
        elif kind == wire.CLOSED:
            hub.on_notice(Closed(wire.text(item[1]), wire.text(item[2]), wire.count(item[3])), remote=True)
        elif kind == wire.DELETED:
            hub.on_notice(Deleted(wire.text(item[1])), remote=True)
        elif kind == wire.HELLO:
            peer = self._add(sender) if sender else None
            if peer is not None:
                self._send(peer, wire.WELCOME_DGRAM)
        elif kind == wire.WELCOME:
            if sender:
                self._add(sender)
                self._welcome(sender)
        elif kind == wire.BYE:
            peer = self._peers.get(sender)
            if peer is not None:
                self._forget(peer, lost=False)
        elif kind == wire.RESYNC:
            self.request_reconcile()

    # -- reconciliation -----------------------------------------------------------------------

    def request_reconcile(self) -> None:
        """Run a reconciliation pass soon (also when periodic passes are off)."""
        self._reconcile_wanted.set()

    async def reconcile(self) -> int:
        """Check the store's head of every stream watched on this worker; return how many were behind.

        Watchers that are behind are woken (:meth:`Hub.on_hint`) and catch up from the store.
        One batched store read; at most :data:`RECONCILE_MAX_STREAMS` streams, taking turns.
        """
        streams = self._hub.streams()
        if not streams:
            return 0
        if len(streams) > RECONCILE_MAX_STREAMS:
            start = self._cursor % len(streams)
            streams = (streams[start:] + streams[:start])[:RECONCILE_MAX_STREAMS]
            self._cursor = start + RECONCILE_MAX_STREAMS
        heads = await self._store.heads(streams)
        # The read may see commits whose notices are still on their way (a datagram in flight, the
        # committing writer not yet back on its thread): give them a moment, so that a race does
        # not send every subscriber of a busy stream back to the store for nothing.
        await trio.sleep(RECONCILE_GRACE)
        self.stats.reconciles += 1
        behind = 0
        for stream, head in heads.items():
            behind += int(self._hub.on_hint(stream, head.epoch, head.last_seq, head.closed))
        self.stats.repairs += behind
        return behind

    async def _reconcile_loop(self) -> None:
        interval = self._reconcile_interval if self._reconcile_interval > 0 else math.inf
        while True:
            with trio.move_on_after(interval):
                await self._reconcile_wanted.wait()
            self._reconcile_wanted = trio.Event()
            try:
                await self.reconcile()
            except Exception:
                log.warning("peer bus: reconciliation failed", exc_info=True)


@asynccontextmanager
async def open_peer_bus(
    peers_dir: str | os.PathLike[str],
    hub: Hub,
    store: Store,
    *,
    ident: str | None = None,
    max_datagram: int = 64 * 1024,
    reconcile_interval: float = 1.0,
    rescan_interval: float = 1.0,
    max_peers: int = 256,
    hello_timeout: float = 1.0,
) -> AsyncIterator[PeerBus]:
    """Join the bus of the workers whose sockets are in ``peers_dir``; leave it when the block exits.

    Binds ``worker-<ident>.sock`` (``ident``: the PID, see :func:`.peers_dir.default_ident`) in
    ``peers_dir`` (created ``0700`` if missing), greets the workers there and returns once each
    has welcomed this one (or after ``hello_timeout`` seconds). The caller must pass every change
    its store commits to :meth:`PeerBus.broadcast`. ``max_datagram`` bounds a datagram in bytes
    (the same on every worker); ``reconcile_interval`` (seconds, 0: off) paces the store checks
    that repair lost notices; ``rescan_interval`` paces directory listings; ``max_peers`` bounds
    the workers sent to. On exit: queued notices are sent, peers told bye, the file removed.
    """
    if max_datagram < 1024 or max_peers < 1 or reconcile_interval < 0 or rescan_interval <= 0:
        raise ValueError("max_datagram >= 1024, max_peers >= 1, reconcile_interval >= 0, rescan_interval > 0")
    sock, path, ino = files.bind(peers_dir, ident if ident is not None else files.default_ident())
    bus = PeerBus(
        sock,
        path,
        ino,
        hub,
        store,
        max_datagram=max_datagram,
        reconcile_interval=reconcile_interval,
        rescan_interval=rescan_interval,
        max_peers=max_peers,
    )
    try:
        with lone_error_unwrapped():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bus._receive_loop)
                nursery.start_soon(bus._flush_loop)
                nursery.start_soon(bus._retry_loop)
                nursery.start_soon(bus._rescan_loop)
                nursery.start_soon(bus._reconcile_loop)
                await bus._greet(hello_timeout)
                try:
                    yield bus
                finally:
                    bus._leave()
                    nursery.cancel_scope.cancel()
    finally:
        bus._release()
