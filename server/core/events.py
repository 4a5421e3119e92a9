"""Streams, events and their validation (API.md, "Streams and event ids")."""

from __future__ import annotations

import re
from dataclasses import dataclass

from server.core.ids import format_id

MAX_STREAM_NAME = 200
_SEGMENT = r"[A-Za-z0-9._~@-]+"
_STREAM_RE = re.compile(rf"{_SEGMENT}(?::{_SEGMENT})*\Z")
_TYPE_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")
RESERVED_TYPE_PREFIX = "sluice."
DEFAULT_TYPE = "message"


class InvalidInput(ValueError):
    """Input that breaks the wire contract; ``code`` is the short machine-readable error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def is_valid_stream(name: str) -> bool:
    """True when ``name`` is a legal stream name: 1-200 chars, ``:``-separated non-empty segments."""
    return 0 < len(name) <= MAX_STREAM_NAME and _STREAM_RE.match(name) is not None


def check_stream(name: str) -> str:
    """Return ``name`` if it is a legal stream name, else raise ``InvalidInput('bad_stream')``."""
    if not is_valid_stream(name):
        raise InvalidInput("bad_stream", "stream names are 1-200 chars of [A-Za-z0-9._~:@-], no empty segment")
    return name


def check_type(event_type: str | None) -> str:
    """Return a legal publishable type (``message`` for ``None``), else raise ``InvalidInput('bad_type')``."""
    if event_type is None:
        return DEFAULT_TYPE
    if not _TYPE_RE.match(event_type):
        raise InvalidInput("bad_type", "event types are 1-64 chars of [A-Za-z0-9._:-]")
    if event_type.startswith(RESERVED_TYPE_PREFIX):
        raise InvalidInput("bad_type", "event types starting with 'sluice.' are reserved")
    return event_type


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event as published, before the store gives it an id. ``binary`` marks non-text data."""

    type: str
    data: bytes
    binary: bool = False


@dataclass(frozen=True, slots=True)
class Event:
    """A stored event: position ``seq`` in history ``epoch`` of ``stream``."""

    stream: str
    epoch: str
    seq: int
    type: str
    data: bytes
    binary: bool = False

    @property
    def id(self) -> str:
        """The event's wire id."""
        return format_id(self.epoch, self.seq)


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A stream's state. ``first_seq``/``last_seq`` are 0 when nothing is retained / ever published.

    ``last_seq`` never decreases within an epoch, even when retention trims every event.
    """

    stream: str
    epoch: str
    first_seq: int
    last_seq: int
    closed: bool
    length: int

    @property
    def first_id(self) -> str | None:
        """Id of the oldest retained event, or ``None`` when none is retained."""
        return format_id(self.epoch, self.first_seq) if self.length else None

    @property
    def last_id(self) -> str | None:
        """Id of the newest event ever appended in this epoch, or ``None`` before the first."""
        return format_id(self.epoch, self.last_seq) if self.last_seq else None
