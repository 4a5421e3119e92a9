"""What the stores tell idempotent requests apart by: a digest of their events.

Implementation help shared by the backends (:mod:`server.store.memory`, :mod:`server.store.sqlite_ops`),
not part of the store interface (:mod:`server.core.ports.store`), which only promises that a
key replays for "the same events".
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from server.core.events import NewEvent

FINGERPRINT_BYTES = 16
"""Length of a :func:`fingerprint` (a BLAKE2b digest)."""


def fingerprint(events: Sequence[NewEvent]) -> bytes:
    """A digest of ``events`` as an idempotent request is told apart by: each event's type,
    text-or-binary mark and data, in order. Equal lists give equal digests; any change in one of
    those, or in the number or order of events, gives another (barring a BLAKE2b collision)."""
    h = hashlib.blake2b(digest_size=FINGERPRINT_BYTES)
    h.update(len(events).to_bytes(8, "big"))
    for e in events:
        etype = str(e.type).encode("utf-8", "surrogatepass")
        h.update(len(etype).to_bytes(8, "big") + etype + (b"b" if e.binary else b"t"))
        h.update(len(e.data).to_bytes(8, "big"))
        h.update(e.data)
    return h.digest()
