"""Interest routing for the notice bus (:mod:`server.bus.local`): which worker watches what.

Each worker tells its peers the streams it has watchers on, so that a commit is sent only to the
workers that have a subscriber on its stream. What a worker tells (:class:`LocalInterest`) is a
set at a *version* of a *generation* (one random generation per bus, so a restarted worker is
never mistaken for its predecessor): changes go out batched per scheduling pass, each item a
change from the version before it; the whole set goes out in parts to a peer that may have
missed something (it is new, it said hello, a send to it failed, it asked).

What a worker was told (:class:`RemoteInterest`, one per peer) is applied only in order: a change
that does not follow on from the version held, a missing part of a whole set, or a check naming
another version makes the interest *unknown* until the whole set arrives again, and a peer whose
interest is unknown (an older worker, one that just started) is sent everything: loss of an
interest message costs datagrams, never events. Past ``limit`` streams a peer's interest counts
as everything, too.

The race of a new subscription: it registers (and its stream is announced) before its first store
read, but a peer may commit before it learns of the interest, and then not send the notice.
Receivers acknowledge each version they apply; once every peer has acknowledged the version that
announced a stream (or ``wait`` seconds passed), the bus reads the stream's head from the store
and hints its hub (see :meth:`LocalInterest.settle`). A commit a peer did not send was made before
the peer applied the interest, hence before its acknowledgement, so that read sees it.

"""

from __future__ import annotations

import math
import secrets
from collections import deque
from collections.abc import Iterable, Iterator

import msgpack

from server.bus import local_wire as wire

ITEM_OVERHEAD = 48
"""Generous bytes an interest item adds to its stream names (kind, generation, versions, headers)."""


def _cost(stream: str) -> int:
    return 4 * len(stream) + 5  # UTF-8 at most 4 bytes a character, a string header at most 5


def _chunks(streams: Iterable[tuple[str, bool]], budget: int) -> Iterator[list[tuple[str, bool]]]:
    """``streams`` grouped so that each group fits one item of at most ``budget`` bytes."""
    group: list[tuple[str, bool]] = []
    size = ITEM_OVERHEAD
    for entry in streams:
        cost = _cost(entry[0])
        if group and size + cost > budget:
            yield group
            group, size = [], ITEM_OVERHEAD
        group.append(entry)
        size += cost
    if group:
        yield group


class LocalInterest:
    """The streams this worker has watchers on, as told to its peers.

    Promises: :attr:`streams` is the set as of :attr:`version`; every change given to
    :meth:`change` is in the items of the next :meth:`take_changes`, which bump the version;
    :meth:`full` is the whole set at the current version. Bounded by the streams watched here.
    """

    def __init__(self, wait: float) -> None:
        """``wait``: seconds a stream's announcement waits for acknowledgements before it is read anyway."""
        self.gen = secrets.randbits(62) | 1
        self.version = 0
        self.streams: set[str] = set()
        self._dirty: dict[str, bool] = {}  # stream -> watched, changed since the last take
        self._waiting: deque[tuple[int, float, list[str]]] = deque()  # (version, deadline, streams added)
        self._wait = wait

    @property
    def dirty(self) -> bool:
        """Whether there are changes not yet taken."""
        return bool(self._dirty)

    def change(self, stream: str, watched: bool) -> None:
        """``stream`` gained its first watcher here (``watched``) or lost its last one."""
        self._dirty[stream] = watched

    def take_changes(self, budget: int, now: float) -> list[bytes]:
        """The pending changes as items of at most ``budget`` bytes (one version each), applied
        to :attr:`streams`; the streams added wait for acknowledgements from ``now`` on."""
        dirty, self._dirty = self._dirty, {}
        streams = self.streams
        changes = [(s, w) for s, w in dirty.items() if w != (s in streams)]
        items: list[bytes] = []
        for group in _chunks(changes, budget):
            base = self.version
            self.version += 1
            added = [s for s, w in group if w]
            removed = [s for s, w in group if not w]
            items.append(msgpack.packb([wire.INTEREST, self.gen, base, self.version, added, removed]))
            streams.update(added)
            streams.difference_update(removed)
            if added:
                self._waiting.append((self.version, now + self._wait, added))
        return items

    def full(self, budget: int) -> list[bytes]:
        """The whole set at the current version, in parts of at most ``budget`` bytes."""
        groups = list(_chunks(((s, True) for s in self.streams), budget)) or [[]]
        last = len(groups) - 1
        return [
            msgpack.packb([wire.INTEREST_FULL, self.gen, self.version, i, i == last, [s for s, _ in group]])
            for i, group in enumerate(groups)
        ]

    def check(self) -> bytes:
        """A check datagram: the current version, for peers to compare with what they hold."""
        return wire.datagram([msgpack.packb([wire.INTEREST_CHECK, self.gen, self.version])])

    def next_deadline(self) -> float:
        """When the oldest waiting announcement times out (``inf``: none waits)."""
        return self._waiting[0][1] if self._waiting else math.inf

    def settle(self, acked: int, now: float) -> tuple[list[str], list[str]]:
        """The streams whose wait is over, given that every peer acknowledged version ``acked``:
        (acknowledged, timed out). Each stream is returned once."""
        done: list[str] = []
        late: list[str] = []
        waiting = self._waiting
        while waiting and (waiting[0][0] <= acked or waiting[0][1] <= now):
            version, _, streams = waiting.popleft()
            (done if version <= acked else late).extend(streams)
        return done, late


def ack_datagram(gen: int, version: int) -> bytes:
    """An acknowledgement of version ``version`` of generation ``gen`` of the addressee's interest."""
    return wire.datagram([msgpack.packb([wire.INTEREST_ACK, gen, version])])


class RemoteInterest:
    """What one peer told of its interest; :meth:`wants` says whether to send it a stream's notices.

    Promises: unknown (everything is wanted) until a whole set arrives; changes apply only in
    order; anything out of order makes it unknown again, and the caller should ask for the whole
    set (the methods return False). At most ``limit`` streams are held; past it, everything is
    wanted until the next whole set.
    """

    __slots__ = ("_collecting", "_next_part", "_parts", "gen", "limit", "streams", "version")

    def __init__(self, limit: int) -> None:
        """``limit``: most streams held for this peer."""
        self.limit = limit
        self.gen: int | None = None
        self.version = 0
        self.streams: set[str] | None = None  # None: everything
        self._collecting: tuple[int, int] | None = None  # (gen, version) of the whole set coming in
        self._parts: set[str] | None = set()
        self._next_part = 0

    @property
    def known(self) -> bool:
        """Whether the peer's interest is known (not everything)."""
        return self.streams is not None

    def wants(self, stream: str) -> bool:
        """Whether the peer may watch ``stream`` (always, while its interest is unknown)."""
        streams = self.streams
        return streams is None or stream in streams

    def reset(self) -> None:
        """Forget what the peer told: everything is wanted until its whole set arrives again."""
        self.gen, self.version, self.streams, self._collecting = None, 0, None, None

    def apply_change(self, gen: int, base: int, version: int, added: list[str], removed: list[str]) -> bool:
        """Apply a change from version ``base``; False (and unknown) if that is not the version held."""
        if self.gen != gen or self.version != base or self._collecting is not None or version <= base:
            self.reset()
            return False
        self.version = version
        streams = self.streams
        if streams is not None:
            streams.difference_update(removed)
            streams.update(added)
            if len(streams) > self.limit:
                self.streams = None
        return True

    def apply_part(self, gen: int, version: int, part: int, final: bool, streams: list[str]) -> bool | None:
        """Take one part of a whole set: True once it is complete (applied), None while parts are
        still to come, False if a part went missing (unknown until the set is sent again)."""
        if part == 0:
            self.reset()
            self._collecting, self._parts, self._next_part = (gen, version), set(), 0
        elif self._collecting != (gen, version) or part != self._next_part:
            self.reset()
            return False
        self._next_part = part + 1
        parts = self._parts
        if parts is not None:
            parts.update(streams)
            if len(parts) > self.limit:
                self._parts = None  # too many: everything is wanted, but versions still count
        if not final:
            return None
        self.gen, self.version, self.streams, self._collecting = gen, version, self._parts, None
        self._parts = set()
        return True

    def check(self, gen: int, version: int) -> bool:
        """Whether the peer's interest is held at version ``version`` of ``gen``; if not, it
        becomes unknown (the caller asks for the whole set)."""
        if self.gen == gen and self.version == version and self._collecting is None:
            return True
        self.reset()
        return False
