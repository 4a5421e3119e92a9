"""Facts read from the host: process trees, RSS and CPU time from /proc, file limits, source
addresses, the machine's description."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
from pathlib import Path

PORTS_PER_SOURCE = 8_000  # connections per local address (well inside the ~28k ephemeral ports)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> int:
    """Raise this process's open-file soft limit to the hard limit; the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def source_address(index: int, base: int = 2) -> str:
    """The local address for connection ``index``: 127.0.0.2, then 127.0.0.3 after
    PORTS_PER_SOURCE connections, and so on through 127.0.0.0/8."""
    n = base + index // PORTS_PER_SOURCE
    return f"127.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}"


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents first (from /proc/PID/task/TID/children)."""
    pids: list[int] = []
    todo = [pid]
    while todo and len(pids) < 4096:
        p = todo.pop(0)
        if p in pids:
            continue
        pids.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    todo.extend(int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split())
    return pids


def rss_kib(pids: list[int]) -> int:
    """Resident memory of the processes, KiB."""
    total = 0
    for p in pids:
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (threads included), seconds; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class CpuMeter:
    """CPU time of a changing set of processes (workers come and go during a deploy): the sum of
    each one's last reading, so time used by processes that exited is kept."""

    def __init__(self) -> None:
        self.last: dict[int, float] = {}

    def read(self, pids: list[int]) -> float:
        """Total CPU seconds seen so far."""
        for p in pids:
            value = cpu_seconds(p)
            if value:
                self.last[p] = max(value, self.last.get(p, 0.0))
        return sum(self.last.values())


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError):
        mem = f"{int(Path('/proc/meminfo').read_text().split()[1]) // 1024 // 1024} GiB"
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nofile_hard": str(resource.getrlimit(resource.RLIMIT_NOFILE)[1]),
    }
