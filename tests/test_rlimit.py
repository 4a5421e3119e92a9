"""The worker's open-files limit: the soft limit is lifted to the hard one, and a limit below the
connection cap is reported. Runs in a child process, so this process's limits stay as they are."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from server.edge.limits import LimitsConfig
from server.process.rlimit import SPARE_FILES
from tests.supervised import supervisor

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


@pytest.mark.slow
@pytest.mark.parametrize(("hard", "warns"), [(20_000, False), (4096, True)])
async def test_the_default_configuration_warns_only_when_the_hard_limit_is_too_low(
    tmp_path: Path, hard: int, warns: bool
) -> None:
    """``sluice serve`` with the default caps, started with a soft open-files limit of 1,024 (a
    shell's) and the given hard limit: its workers lift the soft limit and stay quiet when the hard
    limit holds ``limits.max_connections`` plus the spare descriptors (20,000 does, as do Debian's
    524,288 and 1,048,576), and warn when it cannot."""
    assert LimitsConfig().max_connections + SPARE_FILES <= 20_000
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < hard:
        pytest.skip(f"this process's hard open-files limit is below {hard}")
    with trio.fail_after(60):
        async with supervisor(tmp_path, "--workers", "1", prefix=["prlimit", f"--nofile=1024:{hard}", "--"]) as sup:
            await sup.ready()
            log = sup.log()
    assert f"open-files limit raised from 1024 to {hard}" in log
    assert ("WARNING" in log) == warns, log
    if warns:
        assert f"open-files limit {hard} is below limits.max_connections ({LimitsConfig().max_connections})" in log
