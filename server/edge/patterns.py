"""Stream-name patterns for access rules (API.md, "Auth").

A pattern is a stream name whose ``:``-separated segments may also be wildcards:

* a literal segment (``chat``, ``42``) matches exactly that segment;
* ``*`` matches exactly one segment (any non-empty text without ``:``);
* ``**`` matches any number of whole segments, **including zero**: ``chat:**`` matches ``chat``,
  ``chat:1`` and ``chat:1:2``; ``a:**:b`` matches ``a:b`` and ``a:x:y:b``; ``**`` alone matches
  every stream. To exclude ``chat`` itself, grant ``chat:*`` and ``chat:*:**``.

Wildcards are whole segments only: ``chat*``, ``*x`` or ``a***`` are invalid (``ValueError``), as are
empty segments, characters outside ``[A-Za-z0-9._~:@*-]`` and patterns longer than 200 characters.
Matching is segment-wise and never backtracks exponentially: patterns without ``**`` (and with a
single trailing ``**``) match in one pass; others use a table bounded by ``segments x segments``.
Only legal stream names (:func:`server.core.events.is_valid_stream`) ever match.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from server.core.events import MAX_STREAM_NAME, is_valid_stream

ONE = "*"
ANY = "**"
_LITERAL_RE = re.compile(r"[A-Za-z0-9._~@-]+\Z")


@dataclass(frozen=True, slots=True)
class Pattern:
    """One compiled pattern; build it with :func:`compile_pattern`.

    ``text`` is the pattern as written; ``segments`` its segments, with runs of ``**`` collapsed.
    """

    text: str
    segments: tuple[str, ...]
    _prefix: tuple[str, ...] | None = field(default=None, repr=False, compare=False)

    @property
    def is_literal(self) -> bool:
        """True when the pattern has no wildcard: it matches the stream named ``text`` and nothing else."""
        return ONE not in self.segments and ANY not in self.segments

    @property
    def matches_all(self) -> bool:
        """True for ``**``, which matches every legal stream name."""
        return self.segments == (ANY,)

    def matches(self, stream: str) -> bool:
        """True when ``stream`` is a legal stream name matched by this pattern; never raises."""
        if not is_valid_stream(stream):
            return False
        return self._match_segments(stream.split(":"))

    def _match_segments(self, names: list[str]) -> bool:
        """Match already-split segments of a legal stream name."""
        if self._prefix is not None:  # ``p1:...:pn:**`` (or ``**``): a prefix test
            return len(names) >= len(self._prefix) and all(
                p in (ONE, n) for p, n in zip(self._prefix, names, strict=False)
            )
        if ANY not in self.segments:
            return len(names) == len(self.segments) and all(
                p in (ONE, n) for p, n in zip(self.segments, names, strict=True)
            )
        return _match_table(self.segments, names)


def _match_table(pattern: tuple[str, ...], names: list[str]) -> bool:
    """Glob over segments: ``ok[j]`` says whether the pattern so far matches ``names[:j]``.

    ``O(len(pattern) * len(names))`` time and ``O(len(names))`` space; no recursion, no backtracking.
    """
    ok = [True] + [False] * len(names)
    for p in pattern:
        if p == ANY:  # zero or more segments: ok[j] holds if any ok[i] with i <= j held before
            for j in range(1, len(ok)):
                ok[j] = ok[j] or ok[j - 1]
        else:
            for j in range(len(ok) - 1, 0, -1):
                ok[j] = ok[j - 1] and (p == ONE or p == names[j - 1])
            ok[0] = False
    return ok[-1]


def compile_pattern(text: str) -> Pattern:
    """Parse and validate ``text``; raise ``ValueError`` saying what is wrong (``TypeError`` for a non-string).

    The returned :class:`Pattern` follows the rules in this module's docstring.
    """
    if not isinstance(text, str):
        raise TypeError(f"a stream pattern must be a string, got {type(text).__name__}")
    if not 0 < len(text) <= MAX_STREAM_NAME:
        raise ValueError(f"stream pattern must be 1-{MAX_STREAM_NAME} characters, got {len(text)}")
    segments: list[str] = []
    for seg in text.split(":"):
        if seg in (ONE, ANY):
            if seg == ANY and segments and segments[-1] == ANY:
                continue  # ``**:**`` means the same as ``**``
        elif not seg:
            raise ValueError(f"stream pattern {text!r} has an empty segment")
        elif "*" in seg:
            raise ValueError(f"stream pattern {text!r}: wildcards must be whole segments ('*' or '**'), got {seg!r}")
        elif not _LITERAL_RE.match(seg):
            raise ValueError(f"stream pattern {text!r}: segments are made of [A-Za-z0-9._~@-], got {seg!r}")
        segments.append(seg)
    prefix = tuple(segments[:-1]) if segments[-1] == ANY and ANY not in segments[:-1] else None
    return Pattern(text, tuple(segments), prefix)


class PatternSet:
    """An immutable any-of set of patterns: a stream matches when at least one pattern matches.

    Literal patterns are kept in a hash set and ``**`` short-circuits, so the common grants
    (exact names, "everything") cost one lookup; other patterns are tried in order.
    """

    __slots__ = ("_all", "_exact", "_others", "patterns")

    patterns: tuple[Pattern, ...]
    """The compiled patterns, in the order given, duplicates removed."""

    def __init__(self, patterns: Iterable[str | Pattern] = ()) -> None:
        """Compile ``patterns`` (text or :class:`Pattern`); ``ValueError`` names the first bad one.

        ``TypeError`` when ``patterns`` is a single string or holds a non-string.
        """
        if isinstance(patterns, str):
            raise TypeError("PatternSet takes a list of patterns, not one string")
        compiled: dict[str, Pattern] = {}
        for item in patterns:
            pattern = item if isinstance(item, Pattern) else compile_pattern(item)
            compiled.setdefault(pattern.text, pattern)
        self.patterns = tuple(compiled.values())
        self._exact = frozenset(p.text for p in self.patterns if p.is_literal)
        self._all = any(p.matches_all for p in self.patterns)
        self._others = tuple(p for p in self.patterns if not p.is_literal and not p.matches_all)

    @property
    def matches_all(self) -> bool:
        """True when the set contains ``**`` (every legal stream matches)."""
        return self._all

    def matches(self, stream: str) -> bool:
        """True when ``stream`` is a legal stream name matched by at least one pattern; never raises."""
        if not self.patterns or not is_valid_stream(stream):
            return False
        if self._all or stream in self._exact:
            return True
        if not self._others:
            return False
        names = stream.split(":")
        return any(p._match_segments(names) for p in self._others)

    def __len__(self) -> int:
        return len(self.patterns)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PatternSet):
            return NotImplemented
        return {p.text for p in self.patterns} == {p.text for p in other.patterns}

    def __hash__(self) -> int:
        return hash(frozenset(p.text for p in self.patterns))

    def __repr__(self) -> str:
        return f"PatternSet({[p.text for p in self.patterns]!r})"


EMPTY = PatternSet()
"""The set that matches nothing."""
