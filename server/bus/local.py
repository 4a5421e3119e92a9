"""Cross-worker notices: the workers of one host tell each other of their commits by Unix datagrams.

This is the host-local implementation of :class:`server.core.ports.bus.Bus`.

Each worker binds an ``AF_UNIX`` datagram socket ``worker-<ident>.sock`` (``ident``: its PID by
default) in a runtime directory shared by the host's workers (systemd's ``RuntimeDirectory``).
The store's listener hears only this worker's own commits; :meth:`LocalBus.publish` sends each
of them to every other worker that has watchers on its stream (interest routing,
:mod:`server.bus.local_interest`: each worker tells the others which streams it watches; a worker
whose interest is not known is sent everything), and the receiving task feeds what arrives to
the local hub as if it had been committed here. Nothing is shared but the store file and these
messages.

Notices committed in one scheduling pass share datagrams (format: :mod:`server.bus.local_wire`),
each encoded once for all peers, one ``sendto`` per peer and datagram. Sending never blocks: a
peer whose queue is full is owed a hint per stream it missed (past :data:`MAX_OWED` streams, a
resync), resent with backoff and before its next datagram; a peer whose socket is gone or
refuses is forgotten.

Loss is repaired from the store, the source of truth. Live, a subscription checks that every
event is the next ``seq`` of its epoch, so a missed notice followed by any later one sends it
back to the store; hints do the same without the payload. For a notice that is missed with
nothing after it, every ``reconcile_interval`` the bus reads the head (epoch, last seq, closed)
of the streams watched on this worker that heard of no change for an interval (or are suspect: a
hint, an interest not acknowledged in time, found behind) in one batched store read and hands
each to :meth:`server.core.hub.Hub.on_hint`, which wakes only the watchers that are behind.

Discovery: on start a worker lists the directory, says hello to every worker there and waits
(at most ``hello_timeout``) for their welcomes, so that every commit they make afterwards is
sent to it. The directory is listed again every ``rescan_interval``: newcomers are added,
vanished sockets forgotten. On exit a worker says bye and removes its socket file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from server.bus import local_dir as files
from server.bus import local_wire as wire
from server.bus.deliver import NOTICE_KINDS, deliver
from server.bus.local_interest import ack_datagram
from server.bus.local_send import BusSender, Peer
from server.bus.stats import BusStats
from server.core.groups import lone_error_unwrapped
from server.core.ports.bus import Receiver
from server.core.ports.store import Store

__all__ = ["BusStats", "LocalBus", "open_local_bus"]

log = logging.getLogger(__name__)

RECV_BATCH = 256
"""Datagrams handled per wake-up of the receiving task before other tasks run."""

INTEREST_KINDS = frozenset(range(wire.INTEREST, wire.INTEREST_NEED + 1))


class LocalBus(BusSender):
    """One worker's end of the host's notice bus. Obtain it from :func:`open_local_bus`.

    Promises (those of :class:`server.core.ports.bus.Bus`, kept this way): every change passed
    to :meth:`publish` is sent to every known peer that watches its stream or whose interest is
    unknown, or that peer is owed a hint for the stream, resent until it has room; what a peer
    receives it hands to its hub (:meth:`Hub.on_notice` with ``remote=True``, :meth:`Hub.on_hint`);
    a stream that starts being watched here is read from the store once every peer acknowledged
    the interest (or after ``hello_timeout``), so nothing a peer committed before it knew is
    missed; and every ``reconcile_interval`` the store's head of every locally watched stream
    that heard of no change for an interval (or is suspect) is checked, so even a notice lost
    entirely is delivered within about two intervals. Everything
    runs on the trio thread; nothing blocks.
    """

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
        check = self._interest.check()  # peers holding another version ask for the whole set
        for peer in tuple(self._peers.values()):
            if not peer.announce:
                self._send(peer, check)

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
        if kind in NOTICE_KINDS:
            deliver(self._hub, self._fresh, self.stats, item)
        elif kind == wire.HELLO:
            peer = self._add(sender) if sender else None
            if peer is not None:
                self._restarted(peer)
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
        elif kind in INTEREST_KINDS:
            peer = self._peers.get(sender)
            if peer is not None:
                self._on_interest_item(peer, kind, item)

    def _restarted(self, peer: Peer) -> None:
        """``peer`` (re)started: it knows nothing of our interest, and what it told is void."""
        peer.interest.reset()
        peer.announce, peer.acked = True, -1
        self._flush_wanted.set()

    def _on_interest_item(self, peer: Peer, kind: object, item: list[object]) -> None:
        """Act on an interest item from ``peer``: apply it and queue the reply (see :mod:`.interest`)."""
        if kind == wire.INTEREST_NEED:
            peer.announce = True
            self._flush_wanted.set()
            return
        gen, version = wire.count(item[1]), wire.count(item[2])
        if kind == wire.INTEREST_ACK:
            if gen == self._interest.gen and version > peer.acked:
                peer.acked = version
                self._interest_wake.set()
            return
        theirs = peer.interest
        done: bool | None
        if kind == wire.INTEREST_CHECK:
            done = theirs.check(gen, version)
        else:
            self.stats.interest_received += 1
            if kind == wire.INTEREST:
                added, removed = wire.texts(item[4]), wire.texts(item[5])
                done = theirs.apply_change(gen, version, wire.count(item[3]), added, removed)
            else:
                streams = wire.texts(item[5])
                done = theirs.apply_part(gen, version, wire.count(item[3]), wire.flag(item[4]), streams)
        if done is None:
            return
        peer.reply = ack_datagram(theirs.gen or 0, theirs.version) if done else wire.INTEREST_NEED_DGRAM
        self._flush_wanted.set()

    # -- reconciliation -----------------------------------------------------------------------

    def request_reconcile(self) -> None:
        """Run a reconciliation pass over every watched stream soon (also when periodic passes are off)."""
        self._recon.request()

    async def reconcile(self, *, everything: bool = True) -> int:
        """Check the store's heads of the streams watched here (see :mod:`.reconcile`); how many were behind.

        ``everything``: every watched stream; else (what a periodic pass does) only those that
        heard of no change for an interval, or are suspect."""
        return await self._recon.reconcile(everything=everything)

    async def _interest_loop(self) -> None:
        """Read the head of each newly watched stream once every peer acknowledged its interest
        (or it waited too long): what a peer committed before it knew is then delivered too."""
        local = self._interest
        while True:
            with trio.move_on_at(local.next_deadline()):
                await self._interest_wake.wait()
            self._interest_wake = trio.Event()
            acked = min((p.acked for p in self._peers.values()), default=local.version)
            done, late = local.settle(acked, trio.current_time())
            if not self._peers:
                continue  # nobody else commits
            self._fresh.suspect(late)  # and the next reconciliation reads them again
            watched = self._hub.watcher_count
            streams = [s for s in done + late if watched(s)]
            if not streams:
                continue
            self.stats.interest_reads += len(streams)
            try:
                await self._recon.hint_heads(streams)
            except Exception:
                log.warning("peer bus: reading newly watched streams failed", exc_info=True)
                self._fresh.suspect(streams)


@asynccontextmanager
async def open_local_bus(
    peers_dir: str | os.PathLike[str],
    hub: Receiver,
    store: Store,
    *,
    ident: str | None = None,
    max_datagram: int = 64 * 1024,
    reconcile_interval: float = 1.0,
    rescan_interval: float = 1.0,
    max_peers: int = 256,
    max_interest: int = 100_000,
    hello_timeout: float = 1.0,
) -> AsyncIterator[LocalBus]:
    """Join the bus of the workers whose sockets are in ``peers_dir``; leave it when the block exits.

    Binds ``worker-<ident>.sock`` (``ident``: the PID, see :func:`.local_dir.default_ident`) in
    ``peers_dir`` (created ``0700`` if missing), greets the workers there and returns once each
    has welcomed this one (or after ``hello_timeout`` seconds). The caller must pass every change
    its store commits to :meth:`LocalBus.publish`. ``max_datagram`` bounds a datagram in bytes
    (the same on every worker); ``reconcile_interval`` (seconds, 0: off) paces the store checks
    that repair lost notices; ``rescan_interval`` paces directory listings; ``max_peers`` bounds
    the workers sent to. On exit: queued notices are sent, peers told bye, the file removed.
    """
    if max_datagram < 1024 or max_peers < 1 or max_interest < 1 or reconcile_interval < 0 or rescan_interval <= 0:
        raise ValueError(
            "max_datagram >= 1024, max_peers >= 1, max_interest >= 1, reconcile_interval >= 0, rescan_interval > 0"
        )
    sock, path, ino = files.bind(peers_dir, ident if ident is not None else files.default_ident())
    bus = LocalBus(
        sock,
        path,
        ino,
        hub,
        store,
        max_datagram=max_datagram,
        reconcile_interval=reconcile_interval,
        rescan_interval=rescan_interval,
        max_peers=max_peers,
        max_interest=max_interest,
        interest_wait=hello_timeout,
    )
    for stream in hub.streams():
        bus.declare_interest(stream, True)
    hub.set_interest_listener(bus.declare_interest)
    try:
        with lone_error_unwrapped():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bus._receive_loop)
                nursery.start_soon(bus._flush_loop)
                nursery.start_soon(bus._retry_loop)
                nursery.start_soon(bus._rescan_loop)
                nursery.start_soon(bus._recon.run)
                nursery.start_soon(bus._interest_loop)
                await bus._greet(hello_timeout)
                try:
                    yield bus
                finally:
                    bus._leave()
                    nursery.cancel_scope.cancel()
    finally:
        hub.set_interest_listener(None)
        bus._release()
