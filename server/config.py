"""Configuration: defaults < TOML file < environment < command line, as one frozen :class:`Config`.

* The TOML file is named by ``--config PATH`` or the ``SLUICE_CONFIG`` environment variable.
  Unknown sections and keys are errors (typos never pass silently).
* Every key can be set from the environment as ``SLUICE_<SECTION>_<KEY>`` (``SLUICE_SERVER_PORT``);
  the text is parsed to the key's type. ``SLUICE_*`` variables whose second word is not a section
  name are ignored, with a warning (:func:`unknown_env_vars`) unless they are Sluice's own
  (:data:`OTHER_ENV_VARS`); within a known section an unknown key is an error.
* Command-line values (:class:`Override`) are applied last.

Every problem raises :class:`ConfigError`, whose message names the key and where its value came
from, e.g. ``config error: http.max_header_bytes: must be a positive integer, got -3 (from
SLUICE_HTTP_MAX_HEADER_BYTES)``. The ``[http]`` section is generated from
:class:`server.http.base.HttpLimits`, so its keys and defaults cannot drift from the engine's.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Literal

from server.config_check import cross_check
from server.config_meta import (
    ANY_PATH,
    META,
    NON_EMPTY,
    POSITIVE_INT,
    POSITIVE_SECONDS,
    Meta,
    Rule,
    plain_value,
    toml_literal,
)
from server.config_meta import ConfigError as ConfigError  # noqa: PLC0414 (re-exported: its public home)
from server.core.ports.store import Retention
from server.edge.auth import AuthConfig
from server.edge.compress import CompressionConfig
from server.edge.cors import CorsConfig
from server.edge.limits import LimitsConfig
from server.edge.proxy_protocol import ProxyConfig
from server.http.base import HttpLimits

ENV_PREFIX = "SLUICE_"
CONFIG_ENV = "SLUICE_CONFIG"
OTHER_ENV_VARS = frozenset(
    {
        CONFIG_ENV,
        "SLUICE_WORKER_CONFIG",  # the supervisor hands each worker its configuration (server.process.worker)
        "SLUICE_WORKER_CRASH_SLOTS",  # fault injection for the crash policy (server.process.worker)
        "SLUICE_VENV",  # scripts/bootstrap.sh: where to make the virtualenv
    }
)
"""The ``SLUICE_*`` variables that are Sluice's own without naming a configuration key."""
OTHER_ENV_PREFIXES = ("SLUICE_TEST_",)
"""Prefixes of ``SLUICE_*`` variables owned by the test suite and its scripts."""

Kind = Literal["int", "float", "str", "path", "choice", "bool", "list", "optlist", "tables"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]
SighupAction = Literal["restart", "certificate"]
Backend = Literal["sqlite", "memory", "redis"]
Sync = Literal["full", "normal"]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``[server]``: listening, process model, logging and publish size limits."""

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 0  # 0: one per CPU (one with the memory store), resolved at start
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_allow_plaintext: bool = False  # with TLS: also serve plaintext HTTP/1.1 and h2c (default: 400 / close)
    log_level: LogLevel = "info"
    sighup: SighupAction = "restart"
    max_event_bytes: int = 256 * 1024  # every transport's encoding of it fits common clients' defaults
    max_body_bytes: int = 8 * 1024 * 1024
    max_batch_events: int = 1000

    @property
    def tls_enabled(self) -> bool:
        """True when a certificate and key are configured."""
        return self.tls_cert is not None and self.tls_key is not None


_RETENTION = Retention()


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """``[store]``: the replay log backend and how much history each stream keeps."""

    backend: Backend = "sqlite"
    path: str = "./var/sluice.db"
    sync: Sync = "full"
    redis_url: str | None = None
    redis_sentinels: tuple[str, ...] = ()
    redis_master: str | None = None
    redis_wait_replicas: int = 0
    redis_prefix: str = "sluice:"
    redis_timeout: float = 2.0
    max_events: int = _RETENTION.max_events
    max_bytes: int = _RETENTION.max_bytes
    max_age: float = _RETENTION.max_age
    idempotency_window: float = _RETENTION.idempotency_window


@dataclass(frozen=True, slots=True)
class SseConfig:
    """``[sse]``: Server-Sent Events reconnect advice and heartbeats."""

    retry_ms: int = 2000
    retry_jitter_ms: int = 1000
    heartbeat: float = 15.0


@dataclass(frozen=True, slots=True)
class LongpollConfig:
    """``[longpoll]``: long-poll waiting times and response size."""

    default_timeout: float = 25.0
    max_timeout: float = 60.0
    max_events: int = 1000


@dataclass(frozen=True, slots=True)
class WebsocketConfig:
    """``[websocket]``: per-socket limits."""

    max_subscriptions: int = 256


@dataclass(frozen=True, slots=True)
class HubConfig:
    """``[hub]``: in-process fan-out."""

    replay_page: int = 500
    coalesce: float = 0.02
    reorder_window: float = 0.05
    replay_buffer: int = 1000
    replay_buffer_total: int = 50_000
    replay_buffer_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class BusConfig:
    """``[bus]``: how the workers of one host tell each other of commits (Unix datagrams)."""

    max_datagram: int = 64 * 1024
    reconcile_interval: float = 1.0
    rescan_interval: float = 1.0
    max_peers: int = 256
    max_interest: int = 100_000


@dataclass(frozen=True, slots=True)
class DrainConfig:
    """``[drain]``: how a stopping worker lets its clients go (paced, then a hard deadline)."""

    window: float = 10.0
    deadline: float = 30.0
    unready_delay: float = 0.0


UNDOCUMENTED = "(see server.http.base.HttpLimits)"


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration: one frozen attribute per TOML section."""

    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    http: HttpLimits = field(default_factory=HttpLimits)
    sse: SseConfig = field(default_factory=SseConfig)
    longpoll: LongpollConfig = field(default_factory=LongpollConfig)
    websocket: WebsocketConfig = field(default_factory=WebsocketConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    bus: BusConfig = field(default_factory=BusConfig)
    drain: DrainConfig = field(default_factory=DrainConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)

    def retention(self) -> Retention:
        """The store's retention limits (``[store]`` max_events, max_bytes, max_age, idempotency_window)."""
        s = self.store
        return Retention(
            max_events=s.max_events, max_bytes=s.max_bytes, max_age=s.max_age, idempotency_window=s.idempotency_window
        )

    def http_limits(self) -> HttpLimits:
        """The engine's limits (``[http]``)."""
        return self.http

    def as_dict(self) -> dict[str, dict[str, object]]:
        """``{section: {key: value}}`` for every key (``None`` for unset optional values), as plain
        TOML/JSON values: lists for tuples, tables for entries."""
        return {
            section: {key: plain_value(getattr(getattr(self, section), key)) for key in keys}
            for section, keys in KEYS.items()
        }


@dataclass(frozen=True, slots=True)
class KeySpec:
    """What is known about one key: type kind, default, meaning and constraint."""

    section: str
    key: str
    kind: Kind
    default: object
    doc: str
    rule: Rule
    example: str | None = None
    entry: Any = None  # "tables": the entry class, built by its ``from_config(raw)``

    @property
    def name(self) -> str:
        """``section.key``."""
        return f"{self.section}.{self.key}"

    @property
    def env_var(self) -> str:
        """The environment variable that sets this key."""
        return f"{ENV_PREFIX}{self.section.upper()}_{self.key.upper()}"


def _kind(tp: Any) -> Kind:
    args = set(typing.get_args(tp))
    if tp is bool:
        return "bool"
    if tp in (int, float, str):
        return typing.cast(Kind, tp.__name__)
    if typing.get_origin(tp) is Literal:
        return "choice"
    if args == {str, type(None)}:
        return "path"
    if tp == tuple[str, ...]:
        return "list"
    if args == {tuple[str, ...], type(None)}:
        return "optlist"
    if typing.get_origin(tp) is tuple and hasattr(_entry_type(tp), "from_config"):
        return "tables"
    raise TypeError(f"unsupported config type {tp!r}")


def _entry_type(tp: Any) -> Any:
    return typing.get_args(tp)[0]


_DEFAULT_RULES: dict[str, Rule] = {
    "int": POSITIVE_INT,
    "float": POSITIVE_SECONDS,
    "str": NON_EMPTY,
    "path": ANY_PATH,
    "bool": Rule("true or false", lambda v: True),
    "list": Rule("a list of strings", lambda v: True),
    "optlist": Rule("a list of strings", lambda v: True),
    "tables": Rule("a list of tables", lambda v: True),
}


def _spec(section: str, f: Field[Any], tp: Any) -> KeySpec:
    try:
        kind = _kind(tp)
    except TypeError as exc:
        raise TypeError(f"{section}.{f.name}: {exc}") from None
    meta = META.get(f"{section}.{f.name}")
    if meta is None:  # a new HttpLimits field works at once, with the default rule for its type
        if section != "http":
            raise TypeError(f"{section}.{f.name}: describe the key in server.config_meta.META")
        meta = Meta(UNDOCUMENTED)
    if kind == "choice":
        choices = tuple(typing.get_args(tp))
        rule = Rule("one of " + ", ".join(toml_literal(c) for c in choices), lambda v: v in choices)
    else:
        rule = meta.rule or _DEFAULT_RULES[kind]
    default = f.default if f.default is not MISSING else typing.cast(Callable[[], object], f.default_factory)()
    entry = _entry_type(tp) if kind == "tables" else None
    return KeySpec(section, f.name, kind, default, meta.doc, rule, meta.example, entry)


_SECTION_CLASSES: dict[str, type[Any]] = typing.get_type_hints(Config)


def _build_keys() -> dict[str, dict[str, KeySpec]]:
    keys: dict[str, dict[str, KeySpec]] = {}
    for section, cls in _SECTION_CLASSES.items():
        if "_" in section:
            raise TypeError(f"section name {section!r} must not contain '_' (environment variables)")
        hints = typing.get_type_hints(cls)
        keys[section] = {f.name: _spec(section, f, hints[f.name]) for f in fields(cls)}
    return keys


KEYS: dict[str, dict[str, KeySpec]] = _build_keys()
"""Every key, by section then key name, in declaration order."""


@dataclass(frozen=True, slots=True)
class Override:
    """A value for :func:`load_config` labelled with where it came from (e.g. ``--port``)."""

    value: object
    source: str


@dataclass(frozen=True, slots=True)
class Resolved:
    """A loaded :class:`Config`, the source of every non-default value and the file used, if any."""

    config: Config
    sources: Mapping[str, str]
    config_path: str | None
    warnings: tuple[str, ...] = ()  # problems that do not stop the start (see unknown_env_vars)


def load_config(
    overrides: Mapping[str, Mapping[str, object]] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    config_path: str | None = None,
) -> Config:
    """Build the :class:`Config` from defaults, the TOML file, the environment and ``overrides``.

    ``overrides`` is ``{section: {key: value}}``; a value is typed (``9000``), text parsed like an
    environment variable (``"9000"``), or an :class:`Override` naming its source. ``environ``
    defaults to ``os.environ``; ``config_path`` to ``$SLUICE_CONFIG`` (no file when unset).
    Raises :class:`ConfigError`.
    """
    return resolve_config(overrides, environ=environ, config_path=config_path).config


def resolve_config(
    overrides: Mapping[str, Mapping[str, object]] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    config_path: str | None = None,
) -> Resolved:
    """As :func:`load_config`, also reporting where each value came from."""
    env = os.environ if environ is None else environ
    path = config_path if config_path is not None else (env.get(CONFIG_ENV) or None)
    values: dict[str, dict[str, object]] = {section: {} for section in KEYS}
    sources: dict[str, str] = {}

    def put(section: str, key: str, raw: object, source: str, text: bool) -> None:
        spec = _lookup(section, key, source)
        values[section][key] = _convert(spec, raw, source, text)
        sources[spec.name] = source

    if path is not None:
        for section, table in _read_toml(path).items():
            if section not in KEYS:
                raise ConfigError(f"unknown section{_hint(section, KEYS)}", key=f"[{section}]", source=path)
            if not isinstance(table, dict):
                raise ConfigError(f"must be a table ([{section}]), got {toml_literal(table)}", key=section, source=path)
            for key, raw in table.items():
                put(section, key, raw, path, text=False)
    for var, text in sorted(env.items()):
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV:
            continue
        section, sep, key = var[len(ENV_PREFIX) :].partition("_")
        if sep and section.lower() in KEYS:
            put(section.lower(), key.lower(), text, var, text=True)
    for section, table in (overrides or {}).items():
        for key, raw in table.items():
            value, source = (raw.value, raw.source) if isinstance(raw, Override) else (raw, "overrides")
            put(section, key, value, source, text=isinstance(value, str))

    built: dict[str, Any] = {}
    for section, vals in values.items():
        try:
            built[section] = _SECTION_CLASSES[section](**vals)
        except ValueError as exc:  # the edge sections check their keys together
            given = [sources[f"{section}.{k}"] for k in vals if f"{section}.{k}" in sources]
            raise ConfigError(str(exc), key=f"[{section}]", source=given[0] if given else None) from None
    config = Config(**built)
    cross_check(config, sources)
    return Resolved(config, dict(sources), path, tuple(unknown_env_vars(env)))


def unknown_env_vars(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each ``SLUICE_*`` variable in ``environ`` (default ``os.environ``), in name
    order, that sets no configuration key and is not one of Sluice's own (:data:`OTHER_ENV_VARS`,
    :data:`OTHER_ENV_PREFIXES`): such a variable is ignored, most likely a typo. The warning names
    the nearest known variable when there is a close one (``SLUICE_SEVER_PORT``: did you mean
    ``SLUICE_SERVER_PORT``?)."""
    env = os.environ if environ is None else environ
    known = [spec.env_var for keys in KEYS.values() for spec in keys.values()]
    names = set(known) | OTHER_ENV_VARS
    warnings = []
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in names or var.startswith(OTHER_ENV_PREFIXES):
            continue
        close = difflib.get_close_matches(var, [*known, CONFIG_ENV], n=1, cutoff=0.8)
        hint = f"; did you mean {close[0]}?" if close else " (settings are SLUICE_<SECTION>_<KEY>: see docs/CONFIG.md)"
        warnings.append(f"environment variable {var} is not a Sluice setting and is ignored{hint}")
    return warnings


def _hint(name: str, known: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; expected one of: {', '.join(known)}"


def _lookup(section: str, key: str, source: str) -> KeySpec:
    if section not in KEYS:
        raise ConfigError(f"unknown section{_hint(section, KEYS)}", key=section, source=source)
    spec = KEYS[section].get(key)
    if spec is None:
        raise ConfigError(f"unknown key{_hint(key, KEYS[section])}", key=f"{section}.{key}", source=source)
    return spec


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML in {path!r}: {exc}") from None


def _coerce(spec: KeySpec, raw: object, text: bool) -> object:
    """Turn ``raw`` into the key's type; ``ValueError`` when it has the wrong type or syntax."""
    if spec.kind == "int":
        if text:
            return int(str(raw).strip())
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError
        return raw
    if spec.kind == "float":
        if text:
            number = float(str(raw).strip())
        elif isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValueError
        else:
            number = float(raw)
        if not math.isfinite(number):
            raise ValueError
        return number
    if spec.kind == "bool":
        return _coerce_bool(raw, text)
    if spec.kind in ("list", "optlist"):
        return _coerce_list(spec, raw, text)
    if spec.kind == "tables":
        items = json.loads(str(raw)) if text else raw
        if not isinstance(items, list):
            raise TypeError
        return tuple(spec.entry.from_config(item) for item in items)
    if not isinstance(raw, str):
        raise TypeError
    if spec.kind == "path":
        return raw or None  # "" unsets an optional path
    return raw.strip().lower() if spec.kind == "choice" else raw


def _coerce_bool(raw: object, text: bool) -> bool:
    if text:
        word = str(raw).strip().lower()
        if word in ("true", "1", "yes", "on"):
            return True
        if word in ("false", "0", "no", "off"):
            return False
        raise ValueError
    if not isinstance(raw, bool):
        raise TypeError
    return raw


def _coerce_list(spec: KeySpec, raw: object, text: bool) -> tuple[str, ...] | None:
    """A list of strings; from the environment, comma-separated ("" is the empty list, or unset for optlist)."""
    if text:
        words = [w.strip() for w in str(raw).split(",")]
        if words == [""]:
            return None if spec.kind == "optlist" else ()
        return tuple(words)
    if not isinstance(raw, list) or not all(isinstance(w, str) for w in raw):
        raise TypeError
    return tuple(raw)


def _convert(spec: KeySpec, raw: object, source: str, text: bool) -> object:
    try:
        value = _coerce(spec, raw, text)
    except (TypeError, ValueError) as exc:
        detail = f" ({exc})" if spec.kind == "tables" and str(exc) else ""
        got = toml_literal(raw)
        raise ConfigError(f"must be {spec.rule.what}{detail}, got {got}", key=spec.name, source=source) from None
    if value is not None and not spec.rule.test(value):
        raise ConfigError(f"must be {spec.rule.what}, got {toml_literal(value)}", key=spec.name, source=source)
    return value
