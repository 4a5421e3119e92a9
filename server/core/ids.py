"""Event ids and stream positions.

An id is ``<epoch>-<seq>``: ``epoch`` is 10 lowercase hex characters chosen at random when a
stream's history begins, ``seq`` is the event's sequence number in that history, written as 16
lowercase hex digits. Ids of one epoch therefore sort lexicographically in publish order, and
contain none of ``, & = ? / # %``, whitespace or control characters.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

EPOCH_LEN = 10
SEQ_DIGITS = 16
MAX_SEQ = (1 << 64) - 1
_ID_RE = re.compile(r"([0-9a-f]{10})-([0-9a-f]{16})\Z")


def new_epoch() -> str:
    """Return a fresh random epoch (10 lowercase hex characters)."""
    return secrets.token_hex(EPOCH_LEN // 2)


def format_id(epoch: str, seq: int) -> str:
    """Return the wire id of event ``seq`` in history ``epoch``."""
    return f"{epoch}-{seq:016x}"


@dataclass(frozen=True, slots=True)
class Position:
    """A point in a stream's history: every event with ``seq`` greater than this one follows it."""

    epoch: str
    seq: int

    @property
    def id(self) -> str:
        """The wire id of this position."""
        return format_id(self.epoch, self.seq)


def parse_id(text: str) -> Position | None:
    """Parse a wire id; return ``None`` for anything that is not exactly a well-formed id."""
    if len(text) != EPOCH_LEN + 1 + SEQ_DIGITS:
        return None
    m = _ID_RE.match(text)
    if m is None:
        return None
    return Position(m.group(1), int(m.group(2), 16))
