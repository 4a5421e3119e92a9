"""Configuration: defaults < TOML file < environment < command line, as one frozen :class:`Config`.

* The TOML file is named by ``--config PATH`` or the ``SLUICE_CONFIG`` environment variable.
  Unknown sections and keys are errors (typos never pass silently).
* Every key can be set from the environment as ``SLUICE_<SECTION>_<KEY>`` (``SLUICE_SERVER_PORT``);
  the text is parsed to the key's type. ``SLUICE_*`` variables whose second word is not a section
  name are ignored; within a known section an unknown key is an error.
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
from dataclasses import Field, dataclass, field, fields
from typing import Any, Literal

from server.http.base import HttpLimits
from server.store.base import Retention

ENV_PREFIX = "SLUICE_"
CONFIG_ENV = "SLUICE_CONFIG"

LogLevel = Literal["critical", "error", "warning", "info", "debug"]
Backend = Literal["sqlite", "memory"]


class ConfigError(Exception):
    """An invalid configuration. ``key`` (``section.key``) and ``source`` say what and where."""

    def __init__(self, reason: str, *, key: str | None = None, source: str | None = None) -> None:
        self.reason = reason
        self.key = key
        self.source = source
        text = f"config error: {key}: {reason}" if key else f"config error: {reason}"
        if source:
            text += f" (from {source})"
        super().__init__(text)


@dataclass(frozen=True, slots=True)
class Rule:
    """A constraint on a value; ``what`` completes "must be ..." in error messages."""

    what: str
    test: Callable[[Any], bool]


POSITIVE_INT = Rule("a positive integer", lambda v: v >= 1)
NON_NEGATIVE_INT = Rule("a non-negative integer", lambda v: v >= 0)
PORT = Rule("an integer in 0..65535", lambda v: 0 <= v <= 65535)
H2_FRAME = Rule("an integer in 16384..16777215", lambda v: 16384 <= v <= 16777215)
POSITIVE_SECONDS = Rule("a positive number (seconds)", lambda v: v > 0)
NON_NEGATIVE_SECONDS = Rule("a non-negative number (seconds)", lambda v: v >= 0)
NON_EMPTY = Rule("a non-empty string", lambda v: bool(v.strip()))
ANY_PATH = Rule("a file path", lambda v: True)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``[server]``: listening, process model, logging and publish size limits."""

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 0  # 0: one per CPU (one with the memory store), resolved at start
    tls_cert: str | None = None
    tls_key: str | None = None
    log_level: LogLevel = "info"
    max_event_bytes: int = 1024 * 1024
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


@dataclass(frozen=True, slots=True)
class BusConfig:
    """``[bus]``: how the workers of one host tell each other of commits (Unix datagrams)."""

    max_datagram: int = 64 * 1024
    reconcile_interval: float = 1.0
    rescan_interval: float = 1.0
    max_peers: int = 256


@dataclass(frozen=True, slots=True)
class DrainConfig:
    """``[drain]``: how a stopping worker lets its clients go (paced, then a hard deadline)."""

    window: float = 10.0
    deadline: float = 30.0


@dataclass(frozen=True, slots=True)
class _Meta:
    doc: str
    rule: Rule | None = None  # None: the default rule for the key's type
    example: str | None = None  # shown for an unset optional key in the example file


# The meaning (and any non-default constraint) of every key. [http] is HttpLimits itself.
_META: dict[str, _Meta] = {
    "server.host": _Meta("Address to listen on (IPv4, IPv6 or host name)", NON_EMPTY),
    "server.port": _Meta("TCP port to listen on (0: any free port)", PORT),
    "server.workers": _Meta(
        "Worker processes, each with its own event loop and listening socket (0: one per CPU; 1 with the memory store)",
        NON_NEGATIVE_INT,
    ),
    "server.tls_cert": _Meta(
        "PEM certificate chain; enables TLS and HTTP/2 over ALPN (needs tls_key)", ANY_PATH, "/etc/sluice/cert.pem"
    ),
    "server.tls_key": _Meta("PEM private key for tls_cert", ANY_PATH, "/etc/sluice/key.pem"),
    "server.log_level": _Meta("Logging threshold: critical, error, warning, info or debug"),
    "server.max_event_bytes": _Meta("Largest data of one event in bytes (larger: 413)"),
    "server.max_body_bytes": _Meta("Largest publish request body in bytes, batches included (larger: 413)"),
    "server.max_batch_events": _Meta("Most events in one batch publish"),
    "store.backend": _Meta("sqlite (durable, shared by the host's workers) or memory (one worker, not durable)"),
    "store.path": _Meta("SQLite database file; a relative path is relative to the working directory", NON_EMPTY),
    "store.max_events": _Meta("Events kept per stream (0: no limit)", NON_NEGATIVE_INT),
    "store.max_bytes": _Meta("Bytes of event data kept per stream (0: no limit)", NON_NEGATIVE_INT),
    "store.max_age": _Meta("Seconds an event is kept (0: no limit)", NON_NEGATIVE_SECONDS),
    "store.idempotency_window": _Meta("Seconds an Idempotency-Key is remembered (0: no limit)", NON_NEGATIVE_SECONDS),
    "http.max_header_bytes": _Meta("Largest request line plus headers in bytes (larger: 431)"),
    "http.max_headers": _Meta("Most header fields in one request (more: 431)"),
    "http.header_timeout": _Meta("Seconds to receive a complete request head"),
    "http.body_timeout": _Meta("Seconds to receive a complete request body (expiry: 408)"),
    "http.idle_timeout": _Meta("Seconds a keep-alive connection may stay open with no request in flight"),
    "http.send_timeout": _Meta("Seconds a pending write may make no progress before the connection is dropped"),
    "http.send_buffer": _Meta("Bytes queued per connection before it counts as a slow consumer and is closed"),
    "http.send_low_water": _Meta("Queued bytes at or below which a waiting writer resumes"),
    "http.h2_max_concurrent_streams": _Meta("HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS per connection"),
    "http.h2_max_inbound_frame": _Meta("HTTP/2 SETTINGS_MAX_FRAME_SIZE in bytes (16384..16777215)", H2_FRAME),
    "http.ws_max_message": _Meta("Largest inbound WebSocket message in bytes (larger: close 1009)"),
    "http.ws_ping_interval": _Meta(
        "Seconds between server pings on an idle WebSocket (0: never)", NON_NEGATIVE_SECONDS
    ),
    "sse.retry_ms": _Meta("Reconnect delay sent in the SSE retry: field, in milliseconds"),
    "sse.retry_jitter_ms": _Meta("Random 0..N milliseconds added to retry_ms per connection", NON_NEGATIVE_INT),
    "sse.heartbeat": _Meta("Seconds without events before a comment line keeps the stream alive"),
    "longpoll.default_timeout": _Meta(
        "Seconds a poll waits for events when it gives no ?timeout= (0: answer at once)", NON_NEGATIVE_SECONDS
    ),
    "longpoll.max_timeout": _Meta("Upper bound in seconds for a poll's ?timeout="),
    "longpoll.max_events": _Meta("Most events in one poll response"),
    "websocket.max_subscriptions": _Meta("Most streams one WebSocket may subscribe to at once"),
    "hub.replay_page": _Meta("Events read from the store per page while replaying history"),
    "bus.max_datagram": _Meta(
        "Largest notice datagram in bytes sent to the other workers; larger events go as a hint to read the store",
        Rule("an integer in 1024..4194304", lambda v: 1024 <= v <= 4 * 1024 * 1024),
    ),
    "bus.reconcile_interval": _Meta(
        "Seconds between checks of the store for changes whose notice was missed (0: never)", NON_NEGATIVE_SECONDS
    ),
    "bus.rescan_interval": _Meta("Seconds between scans of the runtime directory for workers that came or went"),
    "bus.max_peers": _Meta("Most other workers one worker sends notices to"),
    "http.max_connection_age": _Meta(
        "Seconds after which a connection is asked to close gracefully, so clients rebalance (0: never)",
        NON_NEGATIVE_SECONDS,
    ),
    "http.max_connection_age_jitter": _Meta(
        "Each connection's age limit is max_connection_age times a random factor in 1 +/- this (0..0.9)",
        Rule("a number in 0..0.9", lambda v: 0 <= v <= 0.9),
    ),
    "drain.window": _Meta(
        "Seconds over which a stopping worker asks its connections to close, evenly spread (0: all at once)",
        NON_NEGATIVE_SECONDS,
    ),
    "drain.deadline": _Meta(
        "Seconds after a drain starts when connections still open are cut (more than window; below systemd's"
        " TimeoutStopSec)"
    ),
}
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
        """``{section: {key: value}}`` for every key (``None`` for unset optional values)."""
        return {section: {key: getattr(getattr(self, section), key) for key in keys} for section, keys in KEYS.items()}


@dataclass(frozen=True, slots=True)
class KeySpec:
    """What is known about one key: type kind, default, meaning and constraint."""

    section: str
    key: str
    kind: Literal["int", "float", "str", "path", "choice"]
    default: object
    doc: str
    rule: Rule
    example: str | None = None

    @property
    def name(self) -> str:
        """``section.key``."""
        return f"{self.section}.{self.key}"

    @property
    def env_var(self) -> str:
        """The environment variable that sets this key."""
        return f"{ENV_PREFIX}{self.section.upper()}_{self.key.upper()}"


def _toml(value: object) -> str:
    """``value`` as a TOML literal (also used to show values in error messages)."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


_DEFAULT_RULES: dict[str, Rule] = {"int": POSITIVE_INT, "float": POSITIVE_SECONDS, "str": NON_EMPTY, "path": ANY_PATH}


def _spec(section: str, f: Field[Any], tp: Any) -> KeySpec:
    kind: Literal["int", "float", "str", "path", "choice"]
    if tp in (int, float, str):
        kind = tp.__name__
    elif typing.get_origin(tp) is Literal:
        kind = "choice"
    elif set(typing.get_args(tp)) == {str, type(None)}:
        kind = "path"
    else:
        raise TypeError(f"{section}.{f.name}: unsupported config type {tp!r}")
    meta = _META.get(f"{section}.{f.name}")
    if meta is None:  # a new HttpLimits field works at once, with the default rule for its type
        if section != "http":
            raise TypeError(f"{section}.{f.name}: describe the key in _META")
        meta = _Meta(UNDOCUMENTED)
    if kind == "choice":
        choices = tuple(typing.get_args(tp))
        rule = Rule("one of " + ", ".join(_toml(c) for c in choices), lambda v: v in choices)
    else:
        rule = meta.rule or _DEFAULT_RULES[kind]
    return KeySpec(section, f.name, kind, f.default, meta.doc, rule, meta.example)


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
                raise ConfigError(f"must be a table ([{section}]), got {_toml(table)}", key=section, source=path)
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

    config = Config(**{section: _SECTION_CLASSES[section](**vals) for section, vals in values.items()})
    _cross_check(config, sources)
    return Resolved(config, dict(sources), path)


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
    if not isinstance(raw, str):
        raise TypeError
    if spec.kind == "path":
        return raw or None  # "" unsets an optional path
    return raw.strip().lower() if spec.kind == "choice" else raw


def _convert(spec: KeySpec, raw: object, source: str, text: bool) -> object:
    try:
        value = _coerce(spec, raw, text)
    except (TypeError, ValueError):
        raise ConfigError(f"must be {spec.rule.what}, got {_toml(raw)}", key=spec.name, source=source) from None
    if value is not None and not spec.rule.test(value):
        raise ConfigError(f"must be {spec.rule.what}, got {_toml(value)}", key=spec.name, source=source)
    return value


def _cross_check(config: Config, sources: Mapping[str, str]) -> None:
    """Constraints between keys, and the TLS files. Blames the key the user set."""

    def at_most(low: str, high: str) -> None:
        lo, hi = _get(config, low), _get(config, high)
        if lo > hi:
            if low in sources or high not in sources:
                raise ConfigError(
                    f"must not exceed {high} ({_toml(hi)}), got {_toml(lo)}", key=low, source=sources.get(low)
                )
            raise ConfigError(
                f"must be at least {low} ({_toml(lo)}), got {_toml(hi)}", key=high, source=sources.get(high)
            )

    at_most("server.max_event_bytes", "server.max_body_bytes")
    at_most("http.send_low_water", "http.send_buffer")
    at_most("longpoll.default_timeout", "longpoll.max_timeout")
    drain = config.drain
    if drain.deadline <= drain.window:
        if "drain.window" in sources and "drain.deadline" not in sources:
            raise ConfigError(
                f"must be less than drain.deadline ({_toml(drain.deadline)}), got {_toml(drain.window)}",
                key="drain.window",
                source=sources["drain.window"],
            )
        raise ConfigError(
            f"must be more than drain.window ({_toml(drain.window)}), got {_toml(drain.deadline)}",
            key="drain.deadline",
            source=sources.get("drain.deadline"),
        )

    server = config.server
    if config.store.backend == "memory" and server.workers > 1:
        raise ConfigError(
            f'must be 1 with store.backend = "memory" (each worker would keep its own history), got {server.workers}',
            key="server.workers",
            source=sources.get("server.workers"),
        )
    for name, other in (("tls_cert", "tls_key"), ("tls_key", "tls_cert")):
        path, key = getattr(server, name), f"server.{name}"
        if path is not None and getattr(server, other) is None:
            raise ConfigError(f"is set but server.{other} is not (set both or neither)", key=key, source=sources[key])
        if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise ConfigError(f"no readable file at {path!r}", key=key, source=sources[key])


def _get(config: Config, name: str) -> Any:
    section, _, key = name.partition(".")
    return getattr(getattr(config, section), key)


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
                line = f"# {key} = {_toml(spec.example or '')}" if example else f"# {key} is not set"
            else:
                line = f"{key} = {_toml(value)}"
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
            default = "(not set)" if spec.default is None else f"`{_toml(spec.default)}`"
            rows.append(f"| `{spec.section}` | `{spec.key}` | {default} | `{spec.env_var}` | {spec.doc} |")
    return "\n".join(rows) + "\n"
