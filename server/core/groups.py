"""Exception groups from nurseries that own one resource's tasks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def lone_error_unwrapped() -> Iterator[None]:
    """Re-raise the only exception of a ``BaseExceptionGroup`` (one of a nursery's tasks failed)
    as itself, keeping its cause, so callers can catch ``StoreUnavailable``, ``OSError``...
    directly; a group of several propagates as it is."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            only = group.exceptions[0]
            raise only from only.__cause__
        raise
