"""Configuration as text: the effective TOML (``sluice config``), ``sluice.example.toml`` and the
reference table of ``docs/CONFIG.md``, all generated from :data:`server.config.KEYS`."""

from __future__ import annotations

from collections.abc import Mapping

from server.config import KEYS, Config
from server.config_meta import toml_literal


def render_toml(config: Config, *, notes: Mapping[str, str] | None = None, example: bool = False) -> str:
    """Render ``config`` as TOML; ``notes`` (by ``section.key``) become comments.

    With ``example``, each note is a comment line above its key and unset optional keys are shown
    commented out with an example value; otherwise notes trail the value.
    """
    notes = notes or {}
    out: list[str] = []
    for section, keys in KEYS.items():
        out.append(f"[{section}]")
        for key, spec in keys.items():
            value = getattr(getattr(config, section), key)
            note = notes.get(spec.name)
            if example and note:
                out.append(f"# {note}")
            if value is None:
                line = f"# {key} = {toml_literal(spec.example or '')}" if example else f"# {key} is not set"
            else:
                line = f"{key} = {toml_literal(value)}"
            out.append(f"{line}  # {note}" if note and not example else line)
        out.append("")
    return "\n".join(out)


def render_example() -> str:
    """The text of ``sluice.example.toml``: every key with its default and meaning."""
    header = (
        "# Sluice configuration: every key with its default.\n"
        "# Load with `sluice serve --config FILE` or SLUICE_CONFIG=FILE. Precedence, lowest first:\n"
        "# defaults < this file < environment (SLUICE_<SECTION>_<KEY>) < command-line flags.\n"
        "# Relative paths are relative to the working directory of the server process.\n\n"
    )
    docs = {spec.name: spec.doc for keys in KEYS.values() for spec in keys.values()}
    return header + render_toml(Config(), notes=docs, example=True).rstrip("\n") + "\n"


def render_reference() -> str:
    """The reference table of ``docs/CONFIG.md`` (Markdown)."""
    rows = ["| Section | Key | Default | Environment variable | Meaning |", "|---|---|---|---|---|"]
    for keys in KEYS.values():
        for spec in keys.values():
            default = "(not set)" if spec.default is None else f"`{toml_literal(spec.default)}`"
            rows.append(f"| `{spec.section}` | `{spec.key}` | {default} | `{spec.env_var}` | {spec.doc} |")
    return "\n".join(rows) + "\n"
