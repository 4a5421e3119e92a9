"""A minimal ``sd_notify(3)`` client: service state messages to systemd, no dependency.

:func:`notify` sends one datagram to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or
an abstract socket when the name starts with ``@``). It never raises: outside systemd, or when
the message cannot be sent, it returns ``False`` and the service carries on.

Messages used by the supervisor (see ``systemd.service(5)``, ``Type=notify`` / ``notify-reload``):
``READY=1``, ``RELOADING=1`` with ``MONOTONIC_USEC=``, ``STOPPING=1``, ``WATCHDOG=1`` and
``STATUS=<text>``; several may share one datagram, separated by newlines.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

import trio

log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"
SEND_TIMEOUT = 1.0  # seconds; the datagram socket is blocking with this timeout


def notify_address(environ: Mapping[str, str] | None = None) -> str | bytes | None:
    """The address ``$NOTIFY_SOCKET`` names (``bytes`` for an abstract socket), or ``None``.

    ``None`` when the variable is unset, empty, or not an AF_UNIX address (e.g. ``vsock:``)."""
    env = os.environ if environ is None else environ
    name = env.get(NOTIFY_SOCKET, "")
    if name.startswith("@") and len(name) > 1:
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None


def notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving"``) to ``$NOTIFY_SOCKET``.

    Returns ``True`` when the datagram was sent, ``False`` when there is no notify socket or
    sending failed (logged at debug level). Never raises."""
    try:
        address = notify_address(environ)
        if address is None:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except Exception as exc:
        log.debug("sd_notify %r failed: %s", state.split("\n", 1)[0], exc)
        return False


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, as systemd wants in ``MONOTONIC_USEC=``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """The watchdog timeout in seconds when systemd expects ``WATCHDOG=1`` from this process.

    ``None`` when ``$WATCHDOG_USEC`` is unset or invalid, or ``$WATCHDOG_PID`` names another
    process (``pid`` defaults to ours). Send ``WATCHDOG=1`` at least every half of it."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get(WATCHDOG_USEC, ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get(WATCHDOG_PID)
    if owner:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 1_000_000


async def serve_watchdog(environ: Mapping[str, str] | None = None) -> None:
    """Send ``WATCHDOG=1`` every half watchdog interval until cancelled; return at once when
    systemd expects no pings from this process (see :func:`watchdog_interval`)."""
    interval = watchdog_interval(environ)
    if interval is None:
        return
    log.info("systemd watchdog: pinging every %.1fs", interval / 2)
    while True:
        notify("WATCHDOG=1", environ=environ)
        await trio.sleep(interval / 2)
