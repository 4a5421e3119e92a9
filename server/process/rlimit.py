"""The open-files limit of a worker process.

Every connection is a file descriptor, and the soft ``RLIMIT_NOFILE`` that a shell or a plain
service inherits is often 1,024. A worker lifts its soft limit to the hard limit at start (which
an unprivileged process may always do) and warns when even that is below what the connection
caps allow, so the caps, not ``EMFILE``, are what turns clients away.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

SPARE_FILES = 64
"""Descriptors kept for what is not a client connection: listeners, the store, logs, peers."""


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return ``(before, after)``.

    An infinite hard limit is capped at the kernel's ``nr_open`` where it can be read (setting
    ``RLIM_INFINITY`` is refused). A refusal leaves the limit as it was (logged)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if target <= soft:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-files limit from %d to %d: %s", soft, target, exc)
        return soft, soft
    return soft, target


def check_open_files(max_connections: int) -> int:
    """Raise the limit (:func:`raise_open_files_limit`), log it, and warn when it is below
    ``max_connections`` plus :data:`SPARE_FILES`; return the soft limit now in force."""
    before, after = raise_open_files_limit()
    if after != before:
        log.info("open-files limit raised from %d to %d", before, after)
    if after < max_connections + SPARE_FILES:
        log.warning(
            "open-files limit %d is below limits.max_connections (%d) + %d: connections past it fail with EMFILE;"
            " raise LimitNOFILE (systemd) or lower limits.max_connections",
            after,
            max_connections,
            SPARE_FILES,
        )
    return after


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1 << 20
