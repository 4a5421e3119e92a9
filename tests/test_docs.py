"""The documentation stands alone: no links out of the repository, relative links resolve, and
``docs/API.md`` names every WebSocket op and every error code the server can send.

The ops and codes are read from the server's source (the literals it builds its answers from),
so a new op or error code without a line in the API reference fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "API.md"
SERVER = ROOT / "server"
SKIP_DIRS = {".git", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", "__pycache__", "var", "node_modules"}
TEXT_SUFFIXES = {".md", ".py", ".toml", ".txt", ".cfg", ".ini", ".service", ".socket", ".conf", ".sh", ".json", ".yml"}
OUTSIDE = "../" + "shared/"  # split so this file does not contain the string it looks for
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")

# literals the server answers with: WebSocket ops ...
OP_PATTERNS = [
    re.compile(r"""\bop["')]*\s*==\s*"([a-z_]+)\""""),  # op == "subscribe", msg.get("op") == "publish"
    re.compile(r""""op"\s*:\s*"([a-z_]+)\""""),  # {"op": "pong"}, '{"op":"event",...'
]
# ... and error codes: HTTP errors, engine refusals, WebSocket error ops, auth and rate refusals
CODE_PATTERNS = [
    re.compile(r"""HTTPError\(\s*\d{3},\s*"([a-z_]+)\""""),
    re.compile(r"""(?:_reject|send_error)\(\s*\d{3},\s*"([a-z_]+)\""""),
    re.compile(r"""InvalidInput\(\s*"([a-z_]+)\""""),
    re.compile(r"""\.error\(\s*"([a-z_]+)\""""),
    re.compile(r""""error"\s*:\s*"([a-z_]+)\""""),  # fixed bodies: b'{"error":"overloaded",...}'
    re.compile(r"""Decision\(\s*False,\s*\d{3},\s*"([a-z_]+)\""""),
    re.compile(r"""self\.code\s*=\s*"([a-z_]+)"(?:\s+if\s.*?\selse\s+"([a-z_]+)")?"""),
    re.compile(r"""return\s+"([a-z_]+)",\s*f?["']"""),  # (code, message) refusal tuples
]
# a floor, so a pattern that stops matching fails the test instead of emptying the sets
KNOWN_OPS = {"subscribe", "unsubscribe", "publish", "ping", "event", "reset", "end", "published", "error", "pong"}
KNOWN_CODES = {"bad_stream", "closed", "too_large", "rate_limited", "unauthorized", "forbidden", "overloaded"}


def _text_files() -> list[Path]:
    found = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT).parts
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel):
            continue
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name == "README"):
            found.append(path)
    return found


def _markdown_files() -> list[Path]:
    return [p for p in _text_files() if p.suffix == ".md"]


def _source() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(SERVER.rglob("*.py")))


def _matches(patterns: list[re.Pattern[str]], text: str) -> set[str]:
    return {group for pattern in patterns for m in pattern.finditer(text) for group in m.groups() if group}


def test_no_file_links_outside_the_repository() -> None:
    offenders = [
        str(p.relative_to(ROOT)) for p in _text_files() if OUTSIDE in p.read_text(encoding="utf-8", errors="replace")
    ]
    assert offenders == [], f"files referring to {OUTSIDE}: {offenders}"


def test_relative_markdown_links_resolve() -> None:
    broken = []
    for doc in _markdown_files():
        for target in MARKDOWN_LINK.findall(doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # URLs and in-page anchors
            path = target.split("#", 1)[0]
            if not (doc.parent / path).resolve().exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert broken == [], f"links to files that do not exist: {broken}"


def test_api_reference_exists_and_is_linked_from_the_readme() -> None:
    assert API.is_file(), "docs/API.md is the API reference"
    assert "](docs/API.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_api_reference_names_every_websocket_op() -> None:
    source = "\n".join(
        (SERVER / rel).read_text(encoding="utf-8") for rel in ("transports/websocket.py", "core/encoding.py")
    )
    ops = _matches(OP_PATTERNS, source)
    assert ops >= KNOWN_OPS, f"op literals not found in the source: {KNOWN_OPS - ops}"
    text = API.read_text(encoding="utf-8")
    missing = sorted(op for op in ops if f"`{op}`" not in text)
    assert missing == [], f"docs/API.md does not name these WebSocket ops: {missing}"


def test_api_reference_names_every_error_code() -> None:
    codes = _matches(CODE_PATTERNS, _source())
    assert codes >= KNOWN_CODES, f"error code literals not found in the source: {KNOWN_CODES - codes}"
    text = API.read_text(encoding="utf-8")
    missing = sorted(code for code in codes if f"`{code}`" not in text)
    assert missing == [], f"docs/API.md does not name these error codes: {missing}"
