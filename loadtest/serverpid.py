"""Which process a Sluice server is, asked of the server itself: its ``/metrics`` carries
``sluice_supervisor_info{pid="<supervisor pid>"} 1`` (see ``docs/METRICS.md``), the process
whose tree the harness samples. Used when ``--server-pid`` is not given; only for targets on
this host (loopback), where that pid means the same process to the harness."""

from __future__ import annotations

import contextlib
import http.client
import os
import re

from loadtest.clients.common import Endpoint

INFO = re.compile(rb'^sluice_supervisor_info\{pid="(\d+)"\} 1$', re.MULTILINE)
TIMEOUT = 5.0  # seconds for the whole request
MAX_BODY = 4 * 1024 * 1024  # a /metrics page is a few KiB; read no more than this


def supervisor_pid(endpoint: Endpoint, timeout: float = TIMEOUT) -> tuple[int | None, str]:
    """The supervisor's pid from ``GET /metrics`` and a note saying how it was found or why not."""
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
    match = INFO.search(body)
    if match is None:
        return None, "GET /metrics has no sluice_supervisor_info line"
    pid = int(match.group(1))
    if not os.path.isdir(f"/proc/{pid}"):
        return None, f"/metrics names pid {pid}, which is not a process on this host"
    return pid, f"pid {pid}, from the server's /metrics"
