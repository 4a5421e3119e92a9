"""The ``sluice`` command: flags, --set, check-config, serve and exit statuses."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tomllib
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server import cli
from server.config import KEYS, Config, ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the caller's SLUICE_* variables out of these tests."""
    for name in list(os.environ):
        if name.startswith("SLUICE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def fake_app(monkeypatch: pytest.MonkeyPatch) -> list[Config]:
    """Stand in for ``server.process.supervisor``: record the configs ``run_supervisor`` is called
    with, and the configs its reload callback reads."""
    calls: list[Config] = []

    def run_supervisor(config: Config, reread: Callable[[], Config]) -> int:
        calls.append(config)
        calls.append(reread())
        return 0

    module = types.ModuleType("server.process.supervisor")
    module.run_supervisor = run_supervisor  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "server.process.supervisor", module)
    return calls


def effective(out: str) -> dict[str, dict[str, object]]:
    return tomllib.loads(out)


def test_check_config_prints_effective_toml(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Effective Sluice configuration\n# config file: (none)\n")
    expected = {s: {k: v for k, v in keys.items() if v is not None} for s, keys in Config().as_dict().items()}
    assert effective(out) == expected


def test_dedicated_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("c")
    key.write_text("k")
    argv = ["check-config", "--host", "::", "--port", "0", "--workers", "3", "--store", "sqlite"]
    argv += ["--db", "/tmp/x.db", "--tls-cert", str(cert), "--tls-key", str(key), "--log-level", "WARNING"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    server = effective(out)["server"]
    assert server["host"] == "::" and server["port"] == 0 and server["workers"] == 3
    assert server["tls_cert"] == str(cert) and server["tls_key"] == str(key)
    assert server["log_level"] == "warning"
    assert effective(out)["store"]["path"] == "/tmp/x.db"
    assert "port = 0  # from --port" in out


def test_every_dedicated_flag_names_a_real_key() -> None:
    for _flag, name, _metavar, _help in cli.FLAGS:
        section, _, key = name.partition(".")
        assert key in KEYS[section]


def test_set_any_key_and_the_last_one_wins(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["check-config", "--set", "sse.heartbeat=30", "--set", "http.max_headers=7", "--set", "http.max_headers=9"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert effective(out)["sse"]["heartbeat"] == 30.0
    assert effective(out)["http"]["max_headers"] == 9
    assert "max_headers = 9  # from --set http.max_headers=9" in out


def test_dedicated_flag_wins_over_set(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config", "--port", "1", "--set", "server.port=2"]) == 0
    assert effective(capsys.readouterr().out)["server"]["port"] == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "sse.heartbeat"], "config error: --set: expected SECTION.KEY=VALUE, got 'sse.heartbeat'"),
        (["--set", "heartbeat=3"], "config error: --set: expected SECTION.KEY=VALUE"),
        (["--set", "sse.hartbeat=3"], "sse.hartbeat: unknown key; did you mean 'heartbeat'? (from --set sse.har"),
        (["--set", "nope.x=3"], "config error: nope: unknown section"),
        (["--set", "sse.heartbeat=-1"], "sse.heartbeat: must be a positive number (seconds), got -1.0"),
        (["--port", "http"], 'server.port: must be an integer in 0..65535, got "http" (from --port)'),
        (["--store", "pg"], 'store.backend: must be one of "sqlite", "memory", "redis", got "pg" (from --store)'),
        (["--store", "redis"], 'store.redis_url: is required with store.backend = "redis" (or store.redis_sent'),
        (["--redis-url", "tcp://h"], 'store.redis_url: must be a redis://, rediss:// or unix:// URL, got "tcp://h"'),
        (["--tls-cert", "/nonexistent/cert.pem"], "server.tls_cert: is set but server.tls_key is not"),
    ],
)
@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_config_errors_exit_2_naming_the_key(
    command: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str], fake_app: list[Config]
) -> None:
    assert cli.main([command, *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("sluice: config error: ")
    assert message in captured.err
    assert captured.out == ""
    assert fake_app == []  # serve never started


def test_precedence_file_env_flags(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "s.toml"
    path.write_text("[server]\nport = 1\nworkers = 2\nhost = '10.0.0.1'\n")
    monkeypatch.setenv("SLUICE_CONFIG", str(path))
    monkeypatch.setenv("SLUICE_SERVER_PORT", "2")
    monkeypatch.setenv("SLUICE_SERVER_WORKERS", "5")
    assert cli.main(["check-config", "--port", "3"]) == 0
    out = capsys.readouterr().out
    assert f"# config file: {path}" in out
    server = effective(out)["server"]
    assert (server["port"], server["workers"], server["host"]) == (3, 5, "10.0.0.1")
    other = tmp_path / "other.toml"
    other.write_text("[server]\nhost = '10.0.0.2'\n")
    assert cli.main(["check-config", "--config", str(other)]) == 0
    assert effective(capsys.readouterr().out)["server"]["host"] == "10.0.0.2"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo what ``configure_logging`` does to the root logger."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_serve_runs_the_app_with_the_config(fake_app: list[Config]) -> None:
    assert cli.main(["serve", "--store", "memory", "--port", "0", "--log-level", "debug"]) == 0
    [config, reread] = fake_app
    assert config.store.backend == "memory" and config.server.port == 0
    assert reread == config  # a reload applies the same flags again
    assert logging.getLogger().level == logging.DEBUG
    [handler] = logging.getLogger().handlers
    assert handler.formatter is not None and handler.formatter._fmt == cli.LOG_FORMAT


def test_serve_reports_interrupt_and_config_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)

    def interrupted(config: Config, reread: object) -> int:
        raise KeyboardInterrupt

    def refused(config: Config, reread: object) -> int:
        raise ConfigError("cannot bind", key="server.port")

    module = types.ModuleType("server.process.supervisor")
    monkeypatch.setitem(sys.modules, "server.process.supervisor", module)
    module.run_supervisor = interrupted  # type: ignore[attr-defined]
    assert cli.main(["serve"]) == 130
    module.run_supervisor = refused  # type: ignore[attr-defined]
    assert cli.main(["serve"]) == 2
    module.run_supervisor = lambda config, reread: 1  # type: ignore[attr-defined]
    assert cli.main(["serve"]) == 1  # e.g. every worker slot failed
    assert capsys.readouterr().err == "sluice: config error: server.port: cannot bind\n"


def test_version_help_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("sluice ")
    assert cli.main(["check-config", "--help"]) == 0
    assert "--set SECTION.KEY=VALUE" in capsys.readouterr().out
    assert cli.main([]) == 2
    assert "check-config" in capsys.readouterr().err
    assert cli.main(["check-config", "--bogus"]) == 2


def run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *argv],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_subprocess_bad_value_exits_2() -> None:
    result = run_cli("check-config", "--port", "70000")
    assert result.returncode == 2
    assert result.stderr == (
        "sluice: config error: server.port: must be an integer in 0..65535, got 70000 (from --port)\n"
    )
    result = run_cli("check-config", env={"SLUICE_HTTP_MAX_HEADER_BYTES": "-3"})
    assert result.returncode == 2
    assert result.stderr == (
        "sluice: config error: http.max_header_bytes: must be a positive integer, got -3 "
        "(from SLUICE_HTTP_MAX_HEADER_BYTES)\n"
    )


def test_check_config_subprocess_with_example_file() -> None:
    result = run_cli("check-config", "--config", "sluice.example.toml", "--set", "store.backend=memory")
    assert result.returncode == 0, result.stderr
    values = tomllib.loads(result.stdout)
    assert values["store"]["backend"] == "memory"
    assert values["server"]["port"] == 8080


def test_check_config_subprocess_warns_about_a_misspelt_variable() -> None:
    result = run_cli(
        "check-config",
        env={"SLUICE_SEVER_PORT": "1", "SLUICE_VENV": "/opt/venv", "SLUICE_TEST_NO_NCHAN": "1", "SLUICE_CONFIG": ""},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        "sluice: warning: environment variable SLUICE_SEVER_PORT is not a Sluice setting and is ignored;"
        " did you mean SLUICE_SERVER_PORT?\n"
    )
    assert tomllib.loads(result.stdout)["server"]["port"] == 8080
    assert run_cli("check-config", env={"SLUICE_SERVER_PORT": "9000"}).stderr == ""


def test_serve_logs_unknown_variables_as_warnings(
    monkeypatch: pytest.MonkeyPatch, fake_app: list[Config], caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SLUICE_LIMIT_MAX_CONNECTIONS", "5")
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)
    with caplog.at_level(logging.WARNING):
        assert cli.main(["serve"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    expected = (
        "environment variable SLUICE_LIMIT_MAX_CONNECTIONS is not a Sluice setting and is ignored;"
        " did you mean SLUICE_LIMITS_MAX_CONNECTIONS?"
    )
    assert warnings == [expected, expected]  # at start, and again when the configuration is read again
    assert fake_app[0].limits.max_connections == Config().limits.max_connections
