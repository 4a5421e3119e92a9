"""What a Sluice server says of itself on ``GET /metrics`` (see ``docs/METRICS.md``).

* Which process it is: ``sluice_supervisor_info{pid="<supervisor pid>"} 1`` names the process
  whose tree the harness samples. Used when ``--server-pid`` is not given; only for targets on
  this host (loopback), where that pid means the same process to the harness.
* What its notice bus did: the ``sluice_bus_*_total`` counters, read at the marks of a run's
  publishing window to say which path carried the events to the subscribers' host.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re

from loadtest.clients.common import Endpoint

INFO = re.compile(rb'^sluice_supervisor_info\{pid="(\d+)"\} 1$', re.MULTILINE)
BUS = re.compile(rb"^sluice_bus_([A-Za-z0-9_]+_total(?:\{[^}]*\})?) ([0-9.eE+-]+)$", re.MULTILINE)
TIMEOUT = 5.0  # seconds for the whole request
MAX_BODY = 4 * 1024 * 1024  # a /metrics page is a few KiB; read no more than this


def scrape(endpoint: Endpoint, timeout: float = TIMEOUT) -> tuple[bytes | None, str]:
    """The body of ``GET /metrics`` (the endpoint's token sent), or None and why not."""
    headers = {"Authorization": f"Bearer {endpoint.token}"} if endpoint.token else {}
    try:
        with contextlib.closing(http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=timeout)) as conn:
            conn.request("GET", "/metrics", headers=headers)
            response = conn.getresponse()
            body = response.read(MAX_BODY)
    except (OSError, http.client.HTTPException) as exc:
        return None, f"GET /metrics failed: {exc}"
    if response.status != 200:
        return None, f"GET /metrics answered {response.status}"
    return body, "ok"


def supervisor_pid(endpoint: Endpoint, timeout: float = TIMEOUT) -> tuple[int | None, str]:
    """The supervisor's pid from ``GET /metrics`` and a note saying how it was found or why not."""
    body, note = scrape(endpoint, timeout)
    if body is None:
        return None, note
    match = INFO.search(body)
    if match is None:
        return None, "GET /metrics has no sluice_supervisor_info line"
    pid = int(match.group(1))
    if not os.path.isdir(f"/proc/{pid}"):
        return None, f"/metrics names pid {pid}, which is not a process on this host"
    return pid, f"pid {pid}, from the server's /metrics"


def bus_counters(endpoint: Endpoint, timeout: float = TIMEOUT) -> dict[str, int] | None:
    """The host's ``sluice_bus_<name>_total`` counters by ``<name>`` (labels kept), or None when
    ``/metrics`` cannot be read."""
    body, _ = scrape(endpoint, timeout)
    return None if body is None else parse_bus(body)


def parse_bus(body: bytes) -> dict[str, int]:
    """The ``sluice_bus_<name>_total`` counters of a ``/metrics`` page by ``<name>`` (labels
    kept: ``name{label="value"}``); gauges and other families are left out."""
    return {m.group(1).decode().replace("_total", "", 1): int(float(m.group(2))) for m in BUS.finditer(body)}


def growth(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int] | None:
    """How much each counter grew from ``before`` to ``after`` (None when either is unknown)."""
    if before is None or after is None:
        return None
    return {k: v - before.get(k, 0) for k, v in sorted(after.items())}
