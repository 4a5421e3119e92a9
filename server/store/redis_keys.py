"""Where the Redis store keeps what: the key names, all under one configurable prefix.

Per stream ``s`` (its name inside a ``{...}`` hash tag, so all of a stream's keys hash to one
Redis Cluster slot; stream names never contain braces):

* ``<prefix>{s}:meta``: a hash: ``epoch``, ``last`` (newest seq issued), ``closed`` (``0``/``1``),
  ``ts`` (newest event's stamp, ms), ``cum`` (bytes of data appended since the stream was
  created), ``gen`` (the lineage generation of its last write) and, once a failover relabelled
  it, ``prev`` and ``pivot`` (the epoch and last seq before);
* ``<prefix>{s}:log``: a Redis stream of the retained events, entry id ``<seq>-0``.

Shared by every stream:

* ``<prefix>ages``: a sorted set, stream name -> stamp (ms) of its oldest retained event, which
  :meth:`~server.store.redis.RedisStore.trim_expired` walks instead of every stream;
* ``<prefix>idem:<key>``: a hash per live idempotency key (one namespace for all streams);
* ``<prefix>lineage``: a hash: ``rid`` (the ``master_replid`` of the Redis run that last checked
  it) and ``gen``, the lineage generation, bumped when a promoted replica first checks it.

Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "sluice:"
"""The prefix of every key when ``store.redis_prefix`` is not set."""

MAX_PREFIX = 64
"""Longest accepted prefix, in characters."""


def prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` cannot prefix the store's keys (``None`` when it can): it must be 1 to
    :data:`MAX_PREFIX` printable ASCII characters without space or braces (a brace would change
    which part of a key Redis Cluster hashes)."""
    if not 1 <= len(prefix) <= MAX_PREFIX:
        return f"must be 1-{MAX_PREFIX} characters"
    if not all(33 <= ord(c) <= 126 for c in prefix) or "{" in prefix or "}" in prefix:
        return "must be printable ASCII without spaces, '{' or '}'"
    return None


@dataclass(frozen=True, slots=True)
class Keys:
    """The key names of one store (one ``prefix``); see the module docstring."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        problem = prefix_problem(self.prefix)
        if problem is not None:
            raise ValueError(f"redis prefix {self.prefix!r} {problem}")

    def meta(self, stream: str) -> str:
        """The hash holding ``stream``'s epoch, last seq, closed mark, newest stamp and byte count."""
        return f"{self.prefix}{{{stream}}}:meta"

    def log(self, stream: str) -> str:
        """The Redis stream holding ``stream``'s retained events."""
        return f"{self.prefix}{{{stream}}}:log"

    @property
    def ages(self) -> str:
        """The sorted set of streams by the stamp of their oldest retained event."""
        return f"{self.prefix}ages"

    @property
    def lineage(self) -> str:
        """The hash naming the lineage generation of the data (see ``redis_store.lua``)."""
        return f"{self.prefix}lineage"

    def idempotency(self, key: str) -> str:
        """The hash recording the append made with idempotency key ``key``."""
        return f"{self.prefix}idem:{key}"

    def stream_keys(self, stream: str) -> list[str]:
        """``stream``'s keys then the ages index: the ``KEYS`` of every script call on it."""
        return [self.meta(stream), self.log(stream), self.ages]
