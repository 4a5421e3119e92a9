"""Configuration loading: precedence, parsing, validation messages, docs and example file."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from server.config import (
    CONFIG_ENV,
    KEYS,
    UNDOCUMENTED,
    Config,
    ConfigError,
    KeySpec,
    Override,
    load_config,
    resolve_config,
    unknown_env_vars,
)
from server.config_render import render_example, render_reference, render_toml
from server.core.ports.store import Retention
from server.http.base import HttpLimits

ROOT = Path(__file__).resolve().parent.parent
ALL_SPECS = [spec for keys in KEYS.values() for spec in keys.values()]


def write(tmp_path: Path, text: str, name: str = "sluice.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_of(**kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)  # type: ignore[arg-type]
    return info.value


# --- defaults and structure --------------------------------------------------------------------


def test_defaults() -> None:
    config = load_config(environ={})
    assert config == Config()
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8080
    assert config.server.workers == 0  # one per CPU, resolved when the server starts
    assert config.server.tls_cert is None and config.server.tls_key is None
    assert not config.server.tls_enabled
    assert config.server.log_level == "info"
    assert config.server.max_event_bytes == 262144
    assert config.http.ws_max_message == 2097152
    assert config.server.max_body_bytes == 8388608
    assert config.server.max_batch_events == 1000
    assert config.store.backend == "sqlite"
    assert config.store.path == "./var/sluice.db"
    assert config.sse.retry_ms == 2000 and config.sse.retry_jitter_ms == 1000 and config.sse.heartbeat == 15.0
    assert (config.longpoll.default_timeout, config.longpoll.max_timeout, config.longpoll.max_events) == (
        25.0,
        60.0,
        1000,
    )
    assert config.websocket.max_subscriptions == 256
    assert config.hub.replay_page == 500


def test_retention_and_http_limits_helpers() -> None:
    assert load_config(environ={}).retention() == Retention()
    assert load_config(environ={}).http_limits() == HttpLimits()
    config = load_config({"store": {"max_events": 5, "max_age": 1.5}, "http": {"max_headers": 7}}, environ={})
    assert config.retention() == Retention(max_events=5, max_age=1.5)
    assert config.http_limits() == HttpLimits(max_headers=7)


def test_http_section_mirrors_http_limits() -> None:
    http_fields = dataclasses.fields(HttpLimits)
    assert list(KEYS["http"]) == [f.name for f in http_fields]
    assert {f.name: f.default for f in http_fields} == {k: s.default for k, s in KEYS["http"].items()}
    assert all(spec.doc != UNDOCUMENTED for spec in KEYS["http"].values()), "describe new HttpLimits fields"


def test_config_is_frozen_with_slots() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server = config.server  # type: ignore[misc]
    for section in KEYS:
        part = getattr(config, section)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(part, next(iter(KEYS[section])), 1)
        assert not hasattr(part, "__dict__")
    assert not hasattr(config, "__dict__")


def test_every_key_has_a_meaning() -> None:
    assert all(spec.doc for spec in ALL_SPECS)
    assert all("_" not in section for section in KEYS)


# --- precedence --------------------------------------------------------------------------------


def test_precedence_defaults_file_env_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 1001\nworkers = 3\nhost = '0.0.0.0'\n[sse]\nheartbeat = 5\n")
    environ = {"SLUICE_SERVER_PORT": "1002", "SLUICE_SERVER_WORKERS": "4"}
    overrides = {"server": {"port": Override("1003", "--port")}}
    resolved = resolve_config(overrides, environ=environ, config_path=path)
    config = resolved.config
    assert config.server.port == 1003  # flag beats env, file and default
    assert config.server.workers == 4  # env beats file
    assert config.server.host == "0.0.0.0"  # file beats default
    assert config.sse.heartbeat == 5.0  # int accepted for a float key, converted
    assert config.server.log_level == "info"  # default
    assert resolved.sources == {
        "server.port": "--port",
        "server.workers": "SLUICE_SERVER_WORKERS",
        "server.host": path,
        "sse.heartbeat": path,
    }
    assert resolved.config_path == path


def test_config_file_from_environment(tmp_path: Path) -> None:
    from_env = write(tmp_path, "[server]\nport = 2001\n", "env.toml")
    explicit = write(tmp_path, "[server]\nport = 2002\n", "explicit.toml")
    assert load_config(environ={CONFIG_ENV: from_env}).server.port == 2001
    assert load_config(environ={CONFIG_ENV: from_env}, config_path=explicit).server.port == 2002
    assert load_config(environ={CONFIG_ENV: ""}).server.port == 8080


def test_typed_overrides_and_default_source() -> None:
    config = load_config({"server": {"port": 0}, "store": {"backend": "memory"}}, environ={})
    assert (config.server.port, config.store.backend) == (0, "memory")
    error = error_of(overrides={"server": {"port": -1}}, environ={})
    assert str(error) == "config error: server.port: must be an integer in 0..65535, got -1 (from overrides)"


# --- environment parsing -----------------------------------------------------------------------


def test_environment_values_are_parsed_to_the_key_type() -> None:
    config = load_config(
        environ={
            "SLUICE_SERVER_PORT": " 9000 ",
            "SLUICE_STORE_BACKEND": "MEMORY",
            "SLUICE_STORE_MAX_AGE": "1.5",
            "SLUICE_STORE_MAX_BYTES": "1_000_000",
            "SLUICE_SERVER_LOG_LEVEL": "Debug",
            "SLUICE_HTTP_WS_PING_INTERVAL": "0",
            "SLUICE_SERVER_TLS_CERT": "",
            "SLUICE_WORKER_SLOT": "3",  # not a config section: somebody else's variable
            "OTHER": "x",
        }
    )
    assert config.server.port == 9000
    assert config.store.backend == "memory"
    assert config.store.max_age == 1.5
    assert config.store.max_bytes == 1_000_000
    assert config.server.log_level == "debug"
    assert config.http.ws_ping_interval == 0.0
    assert config.server.tls_cert is None


def test_unknown_key_in_a_known_env_section_is_an_error() -> None:
    error = error_of(environ={"SLUICE_SERVER_PROT": "80"})
    assert error.key == "server.prot"
    assert str(error) == "config error: server.prot: unknown key; did you mean 'port'? (from SLUICE_SERVER_PROT)"


def test_unknown_sluice_variables_are_reported_with_the_nearest_name() -> None:
    environ = {
        "SLUICE_SEVER_PORT": "1",
        "SLUICE_SERVER_PORT": "9000",
        "SLUICE_CONFIG": "",
        "SLUICE_WORKER_CONFIG": "{}",
        "SLUICE_WORKER_CRASH_SLOTS": "1",
        "SLUICE_VENV": "/opt/venv",
        "SLUICE_TEST_NO_NCHAN": "1",
        "SLUICE_NOTHING_LIKE_IT": "x",
        "OTHER": "x",
    }
    assert unknown_env_vars(environ) == [
        "environment variable SLUICE_NOTHING_LIKE_IT is not a Sluice setting and is ignored"
        " (settings are SLUICE_<SECTION>_<KEY>: see docs/CONFIG.md)",
        "environment variable SLUICE_SEVER_PORT is not a Sluice setting and is ignored;"
        " did you mean SLUICE_SERVER_PORT?",
    ]
    resolved = resolve_config(environ=environ)
    assert resolved.config.server.port == 9000 and resolved.warnings == tuple(unknown_env_vars(environ))
    assert resolve_config(environ={"SLUICE_SERVER_PORT": "9000"}).warnings == ()


def test_message_format_matches_the_documented_example() -> None:
    error = error_of(environ={"SLUICE_HTTP_MAX_HEADER_BYTES": "-3"})
    assert str(error) == (
        "config error: http.max_header_bytes: must be a positive integer, got -3 (from SLUICE_HTTP_MAX_HEADER_BYTES)"
    )
    assert (error.key, error.source) == ("http.max_header_bytes", "SLUICE_HTTP_MAX_HEADER_BYTES")


# --- validation: every key names itself --------------------------------------------------------


def bad_text(spec: KeySpec) -> str | None:
    """A value of the right syntax class that the key must refuse (None: every string is fine)."""
    return {"int": "12x", "float": "fast", "choice": "bogus", "str": "  "}.get(spec.kind)


@pytest.mark.parametrize("spec", [s for s in ALL_SPECS if bad_text(s) is not None], ids=lambda s: s.name)
def test_every_key_rejects_bad_text_and_names_itself(spec: KeySpec) -> None:
    error = error_of(environ={spec.env_var: bad_text(spec)})
    assert error.key == spec.name
    assert str(error).startswith(f"config error: {spec.name}: must be ")
    assert str(error).endswith(f"(from {spec.env_var})")


@pytest.mark.parametrize("spec", [s for s in ALL_SPECS if s.kind in ("int", "float")], ids=lambda s: s.name)
def test_every_number_rejects_negative_values_and_wrong_types(spec: KeySpec, tmp_path: Path) -> None:
    assert spec.name in str(error_of(environ={spec.env_var: "-1"}))
    path = write(tmp_path, f'[{spec.section}]\n{spec.key} = "7"\n')
    error = error_of(environ={}, config_path=path)
    assert str(error) == f'config error: {spec.name}: must be {spec.rule.what}, got "7" (from {path})'
    path = write(tmp_path, f"[{spec.section}]\n{spec.key} = true\n")
    assert f"{spec.name}: must be {spec.rule.what}, got true" in str(error_of(environ={}, config_path=path))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SLUICE_SERVER_PORT": "65536"}, "server.port: must be an integer in 0..65535, got 65536"),
        ({"SLUICE_SERVER_WORKERS": "-1"}, "server.workers: must be a non-negative integer, got -1"),
        ({"SLUICE_SERVER_HOST": ""}, 'server.host: must be a non-empty string, got ""'),
        ({"SLUICE_SERVER_LOG_LEVEL": "loud"}, 'must be one of "critical", "error", "warning", "info", "debug"'),
        ({"SLUICE_STORE_BACKEND": "pg"}, 'store.backend: must be one of "sqlite", "memory", "redis", got "pg"'),
        ({"SLUICE_STORE_REDIS_URL": "http://x"}, "store.redis_url: must be a redis://, rediss:// or unix:// URL"),
        ({"SLUICE_STORE_REDIS_SENTINELS": "a:1,b"}, 'store.redis_sentinels: must be a list of host:port, got ["a:1",'),
        ({"SLUICE_STORE_REDIS_PREFIX": "s{1}:"}, "store.redis_prefix: must be 1-64 printable ASCII characters without"),
        ({"SLUICE_STORE_REDIS_TIMEOUT": "61"}, "store.redis_timeout: must be a number of seconds in 0.01..60, got 61"),
        ({"SLUICE_STORE_REDIS_WAIT_REPLICAS": "-1"}, "store.redis_wait_replicas: must be a non-negative integer"),
        ({"SLUICE_STORE_SYNC": "off"}, 'store.sync: must be one of "full", "normal", got "off"'),
        ({"SLUICE_STORE_MAX_AGE": "-0.5"}, "store.max_age: must be a non-negative number (seconds), got -0.5"),
        ({"SLUICE_SSE_HEARTBEAT": "0"}, "sse.heartbeat: must be a positive number (seconds), got 0.0"),
        ({"SLUICE_SSE_HEARTBEAT": "inf"}, 'sse.heartbeat: must be a positive number (seconds), got "inf"'),
        ({"SLUICE_LONGPOLL_MAX_TIMEOUT": "nan"}, "longpoll.max_timeout: must be a positive number"),
        ({"SLUICE_HTTP_H2_MAX_INBOUND_FRAME": "1024"}, "http.h2_max_inbound_frame: must be an integer in 16384.."),
        ({"SLUICE_SERVER_PORT": "80.0"}, 'server.port: must be an integer in 0..65535, got "80.0"'),
    ],
)
def test_constraints(env: dict[str, str], message: str) -> None:
    assert message in str(error_of(environ=env))


def test_redis_settings_load() -> None:
    config = load_config(
        environ={
            "SLUICE_STORE_BACKEND": "redis",
            "SLUICE_STORE_REDIS_SENTINELS": "10.0.0.1:26379, [::1]:26380",
            "SLUICE_STORE_REDIS_MASTER": "main",
            "SLUICE_STORE_REDIS_WAIT_REPLICAS": "1",
            "SLUICE_STORE_REDIS_PREFIX": "app:",
            "SLUICE_STORE_REDIS_TIMEOUT": "0.5",
        }
    )
    store = config.store
    assert (store.backend, store.redis_url, store.redis_master) == ("redis", None, "main")
    assert store.redis_sentinels == ("10.0.0.1:26379", "[::1]:26380")
    assert (store.redis_wait_replicas, store.redis_prefix, store.redis_timeout) == (1, "app:", 0.5)
    url = load_config({"store": {"backend": "redis", "redis_url": "unix:///run/redis.sock"}}, environ={})
    assert url.store.redis_url == "unix:///run/redis.sock"


def test_zero_means_no_limit_where_documented() -> None:
    config = load_config(
        {"store": {"max_events": 0, "max_bytes": 0, "max_age": 0, "idempotency_window": 0}}, environ={}
    )
    assert config.retention() == Retention(0, 0, 0.0, 0.0)
    assert load_config({"sse": {"retry_jitter_ms": 0}, "server": {"port": 0}}, environ={}).sse.retry_jitter_ms == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"server": {"max_event_bytes": 10_000_000}},
            "server.max_event_bytes: must not exceed server.max_body_bytes (8388608), got 10000000",
        ),
        (
            {"server": {"max_body_bytes": 10}},
            "server.max_body_bytes: must be at least server.max_event_bytes (262144), got 10",
        ),
        (
            {"http": {"ws_max_message": 100_000}},
            "http.ws_max_message: must be at least 353624 (the base64 publish op of a server.max_event_bytes event)",
        ),
        (
            {"server": {"max_event_bytes": 2_000_000}},
            "server.max_event_bytes: needs http.ws_max_message of at least 2670764 (its base64 publish op)",
        ),
        ({"http": {"send_low_water": 2_000_000}}, "http.send_low_water: must not exceed http.send_buffer"),
        ({"longpoll": {"max_timeout": 10}}, "longpoll.max_timeout: must be at least longpoll.default_timeout"),
        ({"server": {"workers": 2}, "store": {"backend": "memory"}}, "server.workers: must be 1 with store.backend"),
        ({"store": {"backend": "redis"}}, 'store.redis_url: is required with store.backend = "redis" (or store.redis'),
        (
            {"store": {"backend": "redis", "redis_url": "redis://h:1", "redis_sentinels": ["h:2"]}},
            "store.redis_sentinels: set either store.redis_url or store.redis_sentinels, not both",
        ),
        (
            {"store": {"backend": "redis", "redis_sentinels": ["h:2"]}},
            "store.redis_master: is required with store.redis_sentinels",
        ),
    ],
)
def test_cross_key_constraints_name_the_key_that_was_set(overrides: dict[str, dict[str, object]], message: str) -> None:
    assert message in str(error_of(overrides=overrides, environ={}))


# --- the TOML file -----------------------------------------------------------------------------


def test_unknown_key_in_file_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "[store]\nbakend = 'memory'\n")
    error = error_of(environ={}, config_path=path)
    assert error.key == "store.bakend"
    assert str(error) == f"config error: store.bakend: unknown key; did you mean 'backend'? (from {path})"


def test_unknown_section_in_file_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "[sever]\nport = 1\n")
    assert str(error_of(environ={}, config_path=path)) == (
        f"config error: [sever]: unknown section; did you mean 'server'? (from {path})"
    )
    path = write(tmp_path, "port = 1\n")
    assert "[port]: unknown section" in str(error_of(environ={}, config_path=path))
    path = write(tmp_path, "[server.tls]\ncert = 'x'\n")
    assert "server.tls: unknown key" in str(error_of(environ={}, config_path=path))


def test_section_must_be_a_table(tmp_path: Path) -> None:
    path = write(tmp_path, "server = 3\n")
    assert "config error: server: must be a table ([server]), got 3" in str(error_of(environ={}, config_path=path))


def test_unreadable_or_invalid_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    assert "cannot read config file" in str(error_of(environ={}, config_path=missing))
    assert missing in str(error_of(environ={CONFIG_ENV: missing}))
    broken = write(tmp_path, "[server\nport = 1\n")
    assert f"invalid TOML in {broken!r}" in str(error_of(environ={}, config_path=broken))


def test_file_values_keep_their_types(tmp_path: Path) -> None:
    path = write(
        tmp_path, "[server]\ntls_cert = ''\n[store]\nbackend = 'Memory'\nmax_age = 60\n[http]\nmax_headers = 5\n"
    )
    config = load_config(environ={}, config_path=path)
    assert config.server.tls_cert is None
    assert config.store.backend == "memory"
    assert config.store.max_age == 60.0 and isinstance(config.store.max_age, float)
    assert config.http.max_headers == 5


# --- TLS ---------------------------------------------------------------------------------------


def test_tls_both_or_neither(tmp_path: Path) -> None:
    cert, key = write(tmp_path, "cert", "cert.pem"), write(tmp_path, "key", "key.pem")
    error = error_of(overrides={"server": {"tls_cert": Override(cert, "--tls-cert")}}, environ={})
    assert str(error) == (
        "config error: server.tls_cert: is set but server.tls_key is not (set both or neither) (from --tls-cert)"
    )
    error = error_of(environ={"SLUICE_SERVER_TLS_KEY": key})
    assert error.key == "server.tls_key" and "server.tls_cert is not" in str(error)
    config = load_config({"server": {"tls_cert": cert, "tls_key": key}}, environ={})
    assert config.server.tls_enabled
    assert (config.server.tls_cert, config.server.tls_key) == (cert, key)


def test_tls_files_must_exist(tmp_path: Path) -> None:
    cert = write(tmp_path, "cert", "cert.pem")
    missing = str(tmp_path / "missing.pem")
    error = error_of(environ={"SLUICE_SERVER_TLS_CERT": cert, "SLUICE_SERVER_TLS_KEY": missing})
    assert str(error) == (f"config error: server.tls_key: no readable file at {missing!r} (from SLUICE_SERVER_TLS_KEY)")
    error = error_of(environ={"SLUICE_SERVER_TLS_CERT": str(tmp_path), "SLUICE_SERVER_TLS_KEY": cert})
    assert error.key == "server.tls_cert"  # a directory is not a file


# --- rendering, docs and the example file ------------------------------------------------------


def test_rendered_config_round_trips(tmp_path: Path) -> None:
    cert, key = write(tmp_path, "c", "cert.pem"), write(tmp_path, "k", "key.pem")
    config = load_config(
        {
            "server": {"host": 'we"ird\\host', "tls_cert": cert, "tls_key": key, "port": 0},
            "store": {"max_age": 0.25},
            "sse": {"retry_ms": 1},
        },
        environ={},
    )
    text = render_toml(config, notes={"server.port": "from --port"})
    assert "port = 0  # from --port" in text
    path = write(tmp_path, text, "rendered.toml")
    assert load_config(environ={}, config_path=path) == config
    assert "# tls_cert is not set" in render_toml(Config())


def test_example_file_is_generated_and_loads_as_defaults() -> None:
    example = ROOT / "sluice.example.toml"
    text = example.read_text(encoding="utf-8")
    assert text == render_example(), "regenerate sluice.example.toml (see docs/CONFIG.md)"
    assert load_config(environ={}, config_path=str(example)) == Config()
    for spec in ALL_SPECS:
        assert re.search(rf"^(# )?{spec.key} = ", text, re.M), spec.name
        assert spec.doc in text
    for section, keys in tomllib.loads(text).items():
        assert set(keys) <= set(KEYS[section])


def test_reference_documents_every_key() -> None:
    doc = (ROOT / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    begin, end = "<!-- reference:begin -->\n", "<!-- reference:end -->"
    assert doc[doc.index(begin) + len(begin) : doc.index(end)] == render_reference(), "regenerate docs/CONFIG.md"
    for spec in ALL_SPECS:
        assert f"| `{spec.section}` | `{spec.key}` |" in doc, spec.name
        assert spec.env_var in doc
    for field in dataclasses.fields(Config):
        assert f"[{field.name}]" in doc
