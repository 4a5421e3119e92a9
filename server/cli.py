"""The ``sluice`` command: ``sluice serve``, ``sluice check-config``, ``sluice --version``.

Both subcommands take the same configuration flags (see ``docs/CONFIG.md``); an invalid
configuration prints ``sluice: config error: <section.key>: ...`` to stderr and exits with 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import sys
from collections.abc import Sequence

from server.config import Config, ConfigError, Override, Resolved, resolve_config
from server.config_render import render_toml

log = logging.getLogger("server.config")

EXIT_CONFIG = 2
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# (flag, section.key, metavar, help) for the dedicated flags; everything else goes through --set.
FLAGS: tuple[tuple[str, str, str, str], ...] = (
    ("--host", "server.host", "HOST", "address to listen on"),
    ("--port", "server.port", "PORT", "TCP port to listen on (0: any free port)"),
    ("--workers", "server.workers", "N", "worker processes"),
    ("--store", "store.backend", "{sqlite,memory,redis}", "store backend"),
    ("--redis-url", "store.redis_url", "URL", "Redis for --store redis (redis://, rediss:// or unix://)"),
    ("--db", "store.path", "PATH", "SQLite database file (relative to the working directory)"),
    ("--tls-cert", "server.tls_cert", "PATH", "PEM certificate chain (enables TLS; needs --tls-key)"),
    ("--tls-key", "server.tls_key", "PATH", "PEM private key"),
    ("--log-level", "server.log_level", "LEVEL", "critical, error, warning, info or debug"),
)


def _version() -> str:
    try:
        return importlib.metadata.version("sluice")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``sluice`` and its subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group(
        "configuration", "precedence, lowest first: defaults < --config file < SLUICE_* environment < these flags"
    )
    group.add_argument("--config", metavar="PATH", help="TOML configuration file (default: $SLUICE_CONFIG)")
    for flag, _name, metavar, text in FLAGS:
        group.add_argument(flag, dest=_dest(flag), metavar=metavar, help=text)
    group.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="set any key, e.g. --set sse.heartbeat=30 (repeatable; the flags above win over it)",
    )

    parser = argparse.ArgumentParser(prog="sluice", description="Sluice streaming server.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", parents=[common], help="run the server", description="Run the server.")
    commands.add_parser(
        "check-config",
        parents=[common],
        help="validate the configuration and print it",
        description="Validate the configuration and print the effective values as TOML.",
    )
    return parser


def _dest(flag: str) -> str:
    return "flag_" + flag.lstrip("-").replace("-", "_")


def parse_set(text: str) -> tuple[str, str, str]:
    """Split a ``--set`` argument ``section.key=value`` into its parts; :class:`ConfigError` if malformed."""
    name, sep, value = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not (sep and dot and section and key):
        raise ConfigError(f"expected SECTION.KEY=VALUE, got {text!r}", key="--set")
    return section, key, value


def overrides_from_args(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """The command-line layer of the configuration, each value labelled with its flag."""
    overrides: dict[str, dict[str, object]] = {}
    for text in args.settings:
        section, key, value = parse_set(text)
        overrides.setdefault(section, {})[key] = Override(value, f"--set {text}")
    for flag, name, _metavar, _text in FLAGS:
        value = getattr(args, _dest(flag))
        if value is not None:
            section, _, key = name.partition(".")
            overrides.setdefault(section, {})[key] = Override(value, flag)
    return overrides


def configure_logging(level: str) -> None:
    """Send log records to stderr as ``time level logger: message`` at ``level`` and above."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)


def render_effective(resolved: Resolved) -> str:
    """The effective configuration as TOML, each non-default value annotated with its source."""
    header = [
        "# Effective Sluice configuration",
        f"# config file: {resolved.config_path or '(none)'}",
        "",
    ]
    notes = {name: f"from {source}" for name, source in resolved.sources.items()}
    return "\n".join(header) + "\n" + render_toml(resolved.config, notes=notes)


def _warn(resolved: Resolved) -> None:
    for warning in resolved.warnings:
        log.warning("%s", warning)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sluice`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        return EXIT_CONFIG
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_CONFIG
    try:
        resolved = resolve_config(overrides_from_args(args), config_path=args.config)
    except ConfigError as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        for warning in resolved.warnings:
            print(f"sluice: warning: {warning}", file=sys.stderr)
        sys.stdout.write(render_effective(resolved))
        return 0

    config = resolved.config
    configure_logging(config.server.log_level)
    _warn(resolved)
    supervisor = importlib.import_module("server.process.supervisor")
    overrides, config_path = overrides_from_args(args), args.config

    def reread() -> Config:  # on SIGHUP: the file and environment again, the same flags
        again = resolve_config(overrides, config_path=config_path)
        _warn(again)
        return again.config

    try:
        return int(supervisor.run_supervisor(config, reread))
    except ConfigError as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
