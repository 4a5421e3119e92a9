"""The harness's third-party modules (the ``loadtest`` extra), checked before anything imports
them, so a virtualenv without them gets the command that installs them instead of a traceback."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

# module -> the distribution that provides it (all in pyproject.toml's ``loadtest`` extra)
MODULES: dict[str, str] = {
    "trio": "trio",
    "h2": "h2",
    "msgpack": "msgpack",
    "trio_websocket": "trio-websocket",
    "hdrh": "hdrhistogram",
    "matplotlib": "matplotlib",
    "uvicorn": "uvicorn",
    "uvloop": "uvloop",
    "httptools": "httptools",
    "jwt": "PyJWT",
}
CHECKOUT = Path(__file__).resolve().parent.parent


def missing() -> list[str]:
    """The distributions of the ``loadtest`` extra whose modules cannot be imported."""
    return [dist for module, dist in MODULES.items() if importlib.util.find_spec(module) is None]


def install_hint() -> str:
    """How to install the ``loadtest`` extra into the Python running the harness."""
    if (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / "scripts" / "loadtest").is_file():
        return (f"run the harness as {CHECKOUT / 'scripts' / 'loadtest'} (it installs them), or: "
                f"{sys.executable} -m pip install -e '{CHECKOUT}[loadtest]'")
    return f"{sys.executable} -m pip install 'sluice[loadtest]'"


def problem() -> str | None:
    """A one-paragraph error naming what is missing and the command that installs it, or ``None``."""
    absent = missing()
    if not absent:
        return None
    return f"the load-test dependencies are not installed ({', '.join(absent)} missing); {install_hint()}"
