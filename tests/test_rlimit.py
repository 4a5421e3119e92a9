"""The worker's open-files limit: the soft limit is lifted to the hard one, and a limit below the
connection cap is reported. Runs in a child process, so this process's limits stay as they are."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import logging, resource, sys
from server.process.rlimit import check_open_files
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
now = check_open_files(int(sys.argv[1]))
if hard == resource.RLIM_INFINITY:
    hard = int(open("/proc/sys/fs/nr_open").read())
print(now, hard, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def _run(max_connections: int) -> tuple[list[int], str]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(max_connections)], capture_output=True, text=True, timeout=60, check=True
    )
    return [int(x) for x in done.stdout.split()], done.stderr


def test_soft_limit_is_raised_to_the_hard_limit() -> None:
    (now, hard, soft), log = _run(100)
    assert now == soft == hard
    assert f"open-files limit raised from 256 to {hard}" in log
    assert "WARNING" not in log


def test_a_limit_below_the_connection_cap_is_reported() -> None:
    (now, hard, _), log = _run(10_000_000)
    assert now == hard
    assert "WARNING open-files limit" in log and "limits.max_connections (10000000)" in log
