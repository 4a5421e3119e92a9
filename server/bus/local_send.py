"""The sending half of the notice bus (see :mod:`server.bus.local`): the table of peers, the
queue of notices, interest routing, and what peers are owed after a send failed.

A notice goes only to the peers whose interest (:mod:`server.bus.local_interest`) includes its
stream, or is unknown; a peer whose queue is full is owed a hint per stream it missed (past
:data:`MAX_OWED`, a resync) and, if an interest change could not be sent, the whole set.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from server.bus import local_dir as files
from server.bus import local_wire as wire
from server.bus.local_interest import LocalInterest, RemoteInterest
from server.bus.reconcile import Reconciler
from server.bus.stats import BusStats
from server.core.ports.bus import Receiver
from server.core.ports.store import Appended, Head, Notice, Store

log = logging.getLogger(__name__)

MAX_OWED = 1024
"""Streams one peer may be owed hints for; beyond, it is owed one resync instead."""

RETRY_MIN, RETRY_MAX = 0.005, 0.25
"""Backoff bounds (seconds) for resending what a peer is owed."""


@dataclass(eq=False, slots=True)
class Peer:
    """Another worker, as this one knows it."""

    path: str
    interest: RemoteInterest  # the streams it watches, as it told us
    owed: dict[str, Head] = field(default_factory=dict)  # stream -> newest head it missed
    resync: bool = False  # owed a resync (covers every stream)
    announce: bool = True  # owed the whole set of our interest (new, restarted, missed some, asked)
    acked: int = -1  # the newest version of our interest it acknowledged
    reply: bytes | None = None  # an acknowledgement or request about its interest, to send
    gone: bool = False

    @property
    def owes(self) -> bool:
        return self.resync or self.announce or bool(self.owed)


def _stream_of(notice: Notice) -> str:
    if isinstance(notice, Appended):
        return notice.events[0].stream if notice.events else ""
    return notice.stream


class BusSender:
    """The peers and everything sent to them; :class:`server.bus.local.LocalBus` adds
    discovery, receiving and repair. Everything runs on the trio thread; nothing blocks."""

    def __init__(
        self,
        sock: socket.socket,
        path: str,
        ino: int,
        hub: Receiver,
        store: Store,
        *,
        max_datagram: int,
        reconcile_interval: float,
        rescan_interval: float,
        max_peers: int,
        max_interest: int = 100_000,
        interest_wait: float = 1.0,
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
        self._rescan_interval = rescan_interval
        self._max_peers = max_peers
        self._max_interest = max_interest
        self._interest = LocalInterest(interest_wait)
        self._interest_wake = trio.Event()
        self._recon = Reconciler(hub, store, self.stats, reconcile_interval)
        self._fresh = self._recon.fresh
        self._peers: dict[str, Peer] = {}
        self._refused: dict[str, int] = {}  # path -> inode of a socket file that refused
        self._pending: list[bytes] = []
        self._pending_keys: list[wire.Key] = []
        self._pending_hints: list[bool] = []
        self._pending_size = 0
        self._flush_wanted = trio.Event()
        self._owing = trio.Event()
        self._awaiting: set[str] = set()
        self._welcomed = trio.Event()
        self._closed = False

    # -- sending ------------------------------------------------------------------------------

    def peer_paths(self) -> list[str]:
        """The socket paths of the workers this one currently sends to."""
        return list(self._peers)

    def publish(self, notice: Notice) -> None:
        """Send a change this worker committed to the peers watching its stream (the store's
        listener calls this).

        Synchronous and non-blocking: the notice is encoded once and queued; the queue is sent at
        the end of the current scheduling pass (sooner when a datagram is full).
        """
        if self._closed:
            return
        stream = _stream_of(notice)
        if self._hub.watcher_count(stream):
            self._fresh.heard(stream, trio.current_time())
        if not self._peers:
            return
        for item, key, hint in wire.encode_notice(notice, self._budget):
            if self._pending_size + len(item) > self._budget:
                self._flush_notices()
            self._pending.append(item)
            self._pending_keys.append(key)
            self._pending_hints.append(hint)
            self._pending_size += len(item)
        self._flush_wanted.set()

    def declare_interest(self, stream: str, watched: bool) -> None:
        """``stream`` gained its first watcher on this worker, or lost its last one (the hub's
        interest listener): the peers are told at the end of the scheduling pass."""
        self._interest.change(stream, watched)
        if not watched:
            self._fresh.forget(stream)
        self._flush_wanted.set()

    def _flush(self) -> None:
        """Send what the scheduling pass queued: interest, replies about the peers' interest, notices."""
        self._flush_interest()
        self._flush_notices()

    def _flush_interest(self) -> None:
        local = self._interest
        if local.dirty:
            items = local.take_changes(self._budget, trio.current_time())
            self._interest_wake.set()
            datagrams = [wire.datagram([item]) for item in items]
            for peer in tuple(self._peers.values()):
                if peer.announce:
                    continue  # the whole set it is owed covers these
                for data in datagrams:
                    if not self._send(peer, data):
                        peer.announce = True  # it may have missed a change: send it everything
                        break
                    self.stats.interest_sent += 1
        for peer in tuple(self._peers.values()):
            if peer.reply is not None:
                reply, peer.reply = peer.reply, None
                self._send(peer, reply)  # if lost: a check repeats a request, a wait times out
            if peer.owes and not self._send_owed(peer):
                self._owing.set()

    def _flush_notices(self) -> None:
        """Send the queued items to every peer watching their streams, one datagram per peer."""
        if not self._pending:
            return
        items, keys, hints = self._pending, self._pending_keys, self._pending_hints
        self._pending, self._pending_keys, self._pending_hints, self._pending_size = [], [], [], 0
        everything: bytes | None = None
        routed = [False] * len(items)
        for peer in tuple(self._peers.values()):
            wants = peer.interest.wants
            chosen = [i for i, (stream, _) in enumerate(keys) if wants(stream)]
            if not chosen:
                continue
            for i in chosen:
                routed[i] = True
            if len(chosen) == len(items):
                if everything is None:
                    everything = wire.datagram(items)
                data, peer_keys = everything, keys
            else:
                data, peer_keys = wire.datagram([items[i] for i in chosen]), [keys[i] for i in chosen]
            if peer.owes and not self._send_owed(peer):
                self._owe(peer, peer_keys)  # still no room: do not even try
            elif self._send(peer, data):
                self.stats.hints_sent += sum(hints[i] for i in chosen)
            else:
                self._owe(peer, peer_keys)
        self.stats.unrouted += routed.count(False)

    def _send(self, peer: Peer, data: bytes) -> bool:
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

    def _owe(self, peer: Peer, keys: Sequence[wire.Key]) -> None:
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

    def _send_owed(self, peer: Peer) -> bool:
        """Send what ``peer`` is owed; True once it is owed nothing."""
        if peer.announce:
            parts = self._interest.full(self._budget)
            for part in parts:
                if not self._send(peer, wire.datagram([part])):
                    return False
            peer.announce = False
            self.stats.interest_sent += len(parts)
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

    def _add(self, path: str) -> Peer | None:
        peer = self._peers.get(path)
        if peer is not None:
            return peer
        if path == self.path or os.path.dirname(path) != self.directory or len(self._peers) >= self._max_peers:
            return None
        peer = self._peers[path] = Peer(path, RemoteInterest(self._max_interest))
        self._refused.pop(path, None)
        self.stats.peers = len(self._peers)
        self._flush_wanted.set()  # it is owed our interest
        return peer

    def _forget(self, peer: Peer, *, refused: bool = False, lost: bool = True) -> None:
        peer.gone = True
        if self._peers.get(peer.path) is peer:
            del self._peers[peer.path]
            self.stats.peers = len(self._peers)
            self.stats.peers_lost += int(lost)
            ino = files.inode(peer.path) if refused else None
            if ino is not None:  # a socket file left behind: ignore it until it is replaced
                self._refused[peer.path] = ino
            self._interest_wake.set()  # its acknowledgements are no longer awaited
        self._welcome(peer.path)

    def _welcome(self, path: str) -> None:
        self._awaiting.discard(path)
        if not self._awaiting:
            self._welcomed.set()
