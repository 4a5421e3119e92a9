"""The checks of a configuration that involve more than one key, or files: run once every key has
been read and converted (see :func:`server.config.resolve_config`)."""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from server.config_meta import ConfigError, toml_literal
from server.edge.auth import Verifier
from server.http.tls import make_server_ssl_context

if TYPE_CHECKING:
    from server.config import Config


def cross_check(config: Config, sources: Mapping[str, str]) -> None:
    """Raise :class:`ConfigError` for the first broken constraint between keys (or unreadable TLS
    or key file), blaming the key the user set; ``sources`` says where each set key came from."""

    def at_most(low: str, high: str) -> None:
        lo, hi = _get(config, low), _get(config, high)
        lo_text, hi_text = toml_literal(lo), toml_literal(hi)
        if lo > hi:
            if low in sources or high not in sources:
                raise ConfigError(
                    f"must not exceed {high} ({hi_text}), got {lo_text}", key=low, source=sources.get(low)
                )
            raise ConfigError(f"must be at least {low} ({lo_text}), got {hi_text}", key=high, source=sources.get(high))

    at_most("server.max_event_bytes", "server.max_body_bytes")
    ws_floor = ws_publish_floor(config.server.max_event_bytes)
    if config.http.ws_max_message < ws_floor:
        if "server.max_event_bytes" in sources and "http.ws_max_message" not in sources:
            key = "server.max_event_bytes"
            raise ConfigError(
                f"needs http.ws_max_message of at least {ws_floor} (its base64 publish op), "
                f"got {config.http.ws_max_message}",
                key=key,
                source=sources.get(key),
            )
        raise ConfigError(
            f"must be at least {ws_floor} (the base64 publish op of a server.max_event_bytes event), "
            f"got {config.http.ws_max_message}",
            key="http.ws_max_message",
            source=sources.get("http.ws_max_message"),
        )
    at_most("http.send_low_water", "http.send_buffer")
    at_most("longpoll.default_timeout", "longpoll.max_timeout")
    drain = config.drain
    if drain.deadline <= drain.window:
        if "drain.window" in sources and "drain.deadline" not in sources:
            raise ConfigError(
                f"must be less than drain.deadline ({toml_literal(drain.deadline)}), got {toml_literal(drain.window)}",
                key="drain.window",
                source=sources["drain.window"],
            )
        raise ConfigError(
            f"must be more than drain.window ({toml_literal(drain.window)}), got {toml_literal(drain.deadline)}",
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
    _check_redis(config, sources)
    for name, other in (("tls_cert", "tls_key"), ("tls_key", "tls_cert")):
        path, key = getattr(server, name), f"server.{name}"
        if path is not None and getattr(server, other) is None:
            raise ConfigError(f"is set but server.{other} is not (set both or neither)", key=key, source=sources[key])
        if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise ConfigError(f"no readable file at {path!r}", key=key, source=sources[key])
    if config.auth.keys or config.auth.jwks_file is not None:
        try:  # every key file read and checked now, not first at a worker's start
            Verifier(config.auth)
        except ValueError as exc:
            jwks = config.auth.jwks_file
            key = "auth.jwks_file" if jwks and (not config.auth.keys or repr(jwks) in str(exc)) else "auth.keys"
            raise ConfigError(str(exc), key=key, source=sources.get(key)) from None


def _check_redis(config: Config, sources: Mapping[str, str]) -> None:
    """With ``store.backend = "redis"``: exactly one of ``redis_url`` and ``redis_sentinels``, and
    ``redis_master`` with the sentinels."""
    store = config.store
    if store.backend != "redis":
        return
    if store.redis_url is not None and store.redis_sentinels:
        raise ConfigError(
            "set either store.redis_url or store.redis_sentinels, not both",
            key="store.redis_sentinels",
            source=sources.get("store.redis_sentinels"),
        )
    if store.redis_url is None and not store.redis_sentinels:
        raise ConfigError(
            'is required with store.backend = "redis" (or store.redis_sentinels with store.redis_master)',
            key="store.redis_url",
            source=sources.get("store.backend"),
        )
    if store.redis_sentinels and store.redis_master is None:
        raise ConfigError(
            "is required with store.redis_sentinels (the name the Sentinels monitor the primary by)",
            key="store.redis_master",
            source=sources.get("store.redis_sentinels"),
        )


WS_PUBLISH_MARGIN = 4096  # bytes of a publish op besides its base64 data (op, stream, type, ref)


def ws_publish_floor(max_event_bytes: int) -> int:
    """The smallest ``http.ws_max_message`` that carries the ``sluice.json.v1`` publish op of a
    binary event of ``max_event_bytes`` (base64: 4 bytes per 3, plus ``WS_PUBLISH_MARGIN``), so
    an event just past the limit is answered with a ``too_large`` error op, not close 1009."""
    return 4 * ((max_event_bytes + 2) // 3) + WS_PUBLISH_MARGIN


def check_tls(config: Config) -> None:
    """Load the TLS certificate and key once up front, so a bad pair is one clear error, not a
    crash loop of workers. Raises :class:`ConfigError`."""
    server = config.server
    if not (server.tls_cert and server.tls_key):
        return
    try:
        make_server_ssl_context(server.tls_cert, server.tls_key)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"cannot load the certificate and key: {exc}", key="server.tls_cert") from None


def _get(config: Config, name: str) -> Any:
    section, _, key = name.partition(".")
    return getattr(getattr(config, section), key)
