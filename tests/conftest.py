"""Shared fixtures: a real Sluice worker on 127.0.0.1, port 0, in the test's nursery."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.client import Running, start_sluice


@pytest.fixture(params=["sqlite", "memory"])
def backend(request: pytest.FixtureRequest) -> str:
    """Every end-to-end test that takes this fixture runs against both store backends."""
    return str(request.param)


@pytest.fixture
async def sluice(nursery: trio.Nursery, tmp_path: Path) -> Running:
    """A worker on the embedded default (sqlite) store."""
    return await start_sluice(nursery, tmp_path)
