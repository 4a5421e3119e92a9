"""What every configuration key means and which values it accepts (the tables behind ``server.config``),
the error every configuration problem raises, and how values are written as TOML."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from server.store.redis_keys import prefix_problem


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


def plain_value(value: object) -> Any:
    """``value`` with table entries (dataclasses) as dicts of their set fields, for TOML and JSON."""
    if isinstance(value, tuple | list):
        return [plain_value(v) for v in value]
    if is_dataclass(value) and not isinstance(value, type):
        items = ((f.name, getattr(value, f.name)) for f in fields(value))
        return {k: v if isinstance(v, str | int | float) else str(v) for k, v in items if v is not None}
    return value


def toml_literal(value: object) -> str:
    """``value`` as a TOML literal (also used to show values in error messages)."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    if is_dataclass(value) and not isinstance(value, type):  # a table entry
        value = plain_value(value)
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{k} = {toml_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


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
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
REDIS_URL = Rule("a redis://, rediss:// or unix:// URL", lambda v: v.startswith(REDIS_SCHEMES) and len(v) > 8)


def _host_port(text: str) -> bool:
    """True for ``host:port`` (``[v6]:port`` too) with a port in 1..65535."""
    host, sep, port = text.rpartition(":")
    return bool(sep and host.strip("[]") and port.isdigit() and 0 < int(port) <= 65535)


@dataclass(frozen=True, slots=True)
class Meta:
    """The meaning of one key and, where the type's default rule is not enough, its constraint."""

    doc: str
    rule: Rule | None = None  # None: the default rule for the key's type
    example: str | None = None  # shown for an unset optional key in the example file


# The meaning (and any non-default constraint) of every key. [http] is HttpLimits itself.
META: dict[str, Meta] = {
    "server.host": Meta("Address to listen on (IPv4, IPv6 or host name)", NON_EMPTY),
    "server.port": Meta("TCP port to listen on (0: any free port)", PORT),
    "server.workers": Meta(
        "Worker processes, each with its own event loop and listening socket (0: one per CPU; 1 with the memory store)",
        NON_NEGATIVE_INT,
    ),
    "server.tls_cert": Meta(
        "PEM certificate chain; enables TLS and HTTP/2 over ALPN (needs tls_key)", ANY_PATH, "/etc/sluice/cert.pem"
    ),
    "server.tls_key": Meta("PEM private key for tls_cert", ANY_PATH, "/etc/sluice/key.pem"),
    "server.tls_allow_plaintext": Meta(
        "With TLS: also serve plaintext HTTP/1.1 and h2c on the same port (false: plaintext gets a 400"
        " tls_required, an h2c preface is closed)"
    ),
    "server.log_level": Meta("Logging threshold: critical, error, warning, info or debug"),
    "server.sighup": Meta(
        "What SIGHUP (systemctl reload) does: restart = reload the TLS certificate in place, then a rolling "
        "restart onto the code and configuration on disk; certificate = only the in-place certificate reload "
        "(no connection closed)"
    ),
    "server.max_event_bytes": Meta(
        "Largest data of one event in bytes (larger: 413); text whose JSON-escaped form is longer than "
        "4x this less 1 KiB is refused too, so an event fits a 4x-this WebSocket message (1 MiB by default)"
    ),
    "server.max_body_bytes": Meta("Largest publish request body in bytes, batches included (larger: 413)"),
    "server.max_batch_events": Meta("Most events in one batch publish"),
    "store.backend": Meta(
        "sqlite (durable, shared by the host's workers), memory (one worker, not durable) or redis"
        " (Redis Streams, shared by every host on the same Redis: see redis_url)"
    ),
    "store.path": Meta("SQLite database file; a relative path is relative to the working directory", NON_EMPTY),
    "store.sync": Meta(
        "sqlite durability: full = fsync at every commit (an acknowledged publish survives power loss);"
        " normal = no fsync per commit, commits on the event loop's thread (survives a crash or kill -9"
        " of the server, not a power loss or kernel crash)"
    ),
    "store.redis_url": Meta(
        "With backend = redis: the Redis to use, redis://[user:password@]host:port[/db], rediss:// (TLS)"
        " or unix:///path/to/socket (or set redis_sentinels instead)",
        REDIS_URL,
        "redis://127.0.0.1:6379/0",
    ),
    "store.redis_sentinels": Meta(
        "With backend = redis: Sentinels (host:port each) to ask for the primary named redis_master,"
        " instead of redis_url",
        Rule("a list of host:port", lambda v: all(_host_port(s) for s in v)),
    ),
    "store.redis_master": Meta("With redis_sentinels: the name of the monitored primary", NON_EMPTY, "mymaster"),
    "store.redis_wait_replicas": Meta(
        "With backend = redis: replicas that must acknowledge each write (WAIT) before a publish succeeds;"
        " fewer within redis_timeout fail the publish (0: do not wait)",
        NON_NEGATIVE_INT,
    ),
    "store.redis_prefix": Meta(
        "With backend = redis: prefix of every key Sluice keeps in Redis (printable ASCII, no spaces or braces)",
        Rule("1-64 printable ASCII characters without spaces, '{' or '}'", lambda v: prefix_problem(v) is None),
    ),
    "store.redis_timeout": Meta(
        "With backend = redis: seconds every Redis call (connecting included) may take before the request fails",
        Rule("a number of seconds in 0.01..60", lambda v: 0.01 <= v <= 60),
    ),
    "store.max_events": Meta("Events kept per stream (0: no limit)", NON_NEGATIVE_INT),
    "store.max_bytes": Meta("Bytes of event data kept per stream (0: no limit)", NON_NEGATIVE_INT),
    "store.max_age": Meta("Seconds an event is kept (0: no limit)", NON_NEGATIVE_SECONDS),
    "store.idempotency_window": Meta("Seconds an Idempotency-Key is remembered (0: no limit)", NON_NEGATIVE_SECONDS),
    "http.max_header_bytes": Meta("Largest request line plus headers in bytes (larger: 431)"),
    "http.max_headers": Meta("Most header fields in one request (more: 431)"),
    "http.header_timeout": Meta("Seconds to receive a complete request head"),
    "http.body_timeout": Meta("Seconds to receive a complete request body (expiry: 408)"),
    "http.idle_timeout": Meta("Seconds a keep-alive connection may stay open with no request in flight"),
    "http.send_timeout": Meta("Seconds a pending write may make no progress before the connection is dropped"),
    "http.send_buffer": Meta("Bytes queued per connection before it counts as a slow consumer and is closed"),
    "http.send_low_water": Meta("Queued bytes at or below which a waiting writer resumes"),
    "http.h2_max_concurrent_streams": Meta("HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS per connection"),
    "http.h2_max_inbound_frame": Meta("HTTP/2 SETTINGS_MAX_FRAME_SIZE in bytes (16384..16777215)", H2_FRAME),
    "http.ws_max_message": Meta(
        "Largest inbound WebSocket message in bytes (larger: close 1009); at least the base64 publish op "
        "of a server.max_event_bytes binary event, so a too-large event gets a too_large error op instead"
    ),
    "http.ws_ping_interval": Meta("Seconds between server pings on an idle WebSocket (0: never)", NON_NEGATIVE_SECONDS),
    "sse.retry_ms": Meta("Reconnect delay sent in the SSE retry: field, in milliseconds"),
    "sse.retry_jitter_ms": Meta("Random 0..N milliseconds added to retry_ms per connection", NON_NEGATIVE_INT),
    "sse.heartbeat": Meta("Seconds without events before a comment line keeps the stream alive"),
    "longpoll.default_timeout": Meta(
        "Seconds a poll waits for events when it gives no ?timeout= (0: answer at once)", NON_NEGATIVE_SECONDS
    ),
    "longpoll.max_timeout": Meta("Upper bound in seconds for a poll's ?timeout="),
    "longpoll.max_events": Meta("Most events in one poll response"),
    "websocket.max_subscriptions": Meta("Most streams one WebSocket may subscribe to at once"),
    "hub.replay_page": Meta("Events read from the store per page while replaying history"),
    "hub.replay_buffer": Meta(
        "Newest events kept in memory per watched stream, so a client resuming a few seconds back"
        " needs no store read (0: off)",
        NON_NEGATIVE_INT,
    ),
    "hub.replay_buffer_total": Meta(
        "Most events kept in memory for all streams of one worker; past it the least recently"
        " published streams lose theirs",
        NON_NEGATIVE_INT,
    ),
    "hub.replay_buffer_bytes": Meta(
        "Most bytes of event data (plus 512 per event) kept in memory for all streams of one worker",
        NON_NEGATIVE_INT,
    ),
    "hub.coalesce": Meta(
        "Least seconds between two fan-outs of one stream: events that come faster go out together, "
        "several per write (0: each at once)",
        NON_NEGATIVE_SECONDS,
    ),
    "hub.reorder_window": Meta(
        "Seconds a commit notice that arrives ahead of an earlier one is held for it, before the missing"
        " events are read from the store once for all subscribers (0: never held)",
        NON_NEGATIVE_SECONDS,
    ),
    "bus.max_datagram": Meta(
        "Largest notice message in bytes (a datagram to the host's other workers, or a Redis PUB/SUB message"
        " with the Redis store); larger events go as a hint to read the store",
        Rule("an integer in 1024..4194304", lambda v: 1024 <= v <= 4 * 1024 * 1024),
    ),
    "bus.reconcile_interval": Meta(
        "Seconds between checks of the store for changes whose notice was missed (0: never)", NON_NEGATIVE_SECONDS
    ),
    "bus.rescan_interval": Meta(
        "Seconds between scans of the runtime directory for workers that came or went (not with the Redis store)"
    ),
    "bus.max_peers": Meta("Most other workers one worker sends notices to (not with the Redis store)"),
    "bus.max_interest": Meta(
        "Most streams a worker remembers another worker watches (interest routing); a worker watching "
        "more is sent every notice (not with the Redis store, where Redis routes by channel)"
    ),
    "http.max_connection_age": Meta(
        "Seconds after which a connection is asked to close gracefully, so clients rebalance (0: never)",
        NON_NEGATIVE_SECONDS,
    ),
    "http.max_connection_age_jitter": Meta(
        "Each connection's age limit is max_connection_age times a random factor in 1 +/- this (0..0.9)",
        Rule("a number in 0..0.9", lambda v: 0 <= v <= 0.9),
    ),
    "drain.window": Meta(
        "Seconds over which a stopping worker asks its connections to close, evenly spread (0: all at once)",
        NON_NEGATIVE_SECONDS,
    ),
    "drain.deadline": Meta(
        "Seconds after a drain starts when connections still open are cut (more than window; below systemd's"
        " TimeoutStopSec)"
    ),
    "drain.unready_delay": Meta(
        "Seconds a stopping Sluice keeps accepting and serving with /readyz answering 503 before its workers"
        " drain, so a load balancer's health checks take the host out first (more than the balancer's check"
        " interval times its fall count; 0: drain at once). Reloads skip it: the new workers take the sockets over",
        NON_NEGATIVE_SECONDS,
    ),
}

# The edge: PROXY protocol, auth, limits, CORS, compression.
META.update(
    {
        "proxy.trusted": Meta(
            "CIDRs of load balancers allowed to send a PROXY protocol (v1/v2) header; a connection from one of them"
            " must start with one, any other connection must not (empty: PROXY protocol off)"
        ),
        "proxy.max_v2_bytes": Meta(
            "Largest PROXY v2 header (TLVs included) in bytes",
            Rule("an integer in 16..65551", lambda v: 16 <= v <= 65551),
        ),
        "auth.enabled": Meta("Require a JWT for what the anonymous_* patterns do not allow"),
        "auth.keys": Meta('Verification keys, each pinned to one alg: [{alg = "RS256", file = "...", kid = "..."}]'),
        "auth.jwks_file": Meta("JSON Web Key Set file of public keys; each key must state its alg", ANY_PATH),
        "auth.audience": Meta("Required aud claim (unset: tokens carrying aud are refused)", ANY_PATH, "sluice"),
        "auth.issuer": Meta("Required iss claim (unset: not checked)", ANY_PATH, "https://issuer.example"),
        "auth.leeway_seconds": Meta("Clock skew allowed on exp and nbf, in seconds", NON_NEGATIVE_SECONDS),
        "auth.anonymous_subscribe": Meta("Stream patterns anyone may subscribe to without a token"),
        "auth.anonymous_publish": Meta("Stream patterns anyone may publish to without a token"),
        "auth.cookie_name": Meta("Cookie that may carry the token"),
        "auth.query_param": Meta("Query parameter that may carry the token (EventSource cannot set headers)"),
        "auth.max_token_bytes": Meta("Largest token in bytes (larger: 401)"),
        "auth.cache_size": Meta("Verified tokens remembered per worker (0: verify every time)", NON_NEGATIVE_INT),
        "limits.max_connections": Meta(
            "Open connections per worker (more: 503 + Retry-After, answered at accept; 0: no cap)", NON_NEGATIVE_INT
        ),
        "limits.max_connections_per_address": Meta(
            "Open connections per client address per host, split between the workers (more: 503 + Retry-After,"
            " logged; 0: no cap; behind a balancer without PROXY protocol, the balancer's address)",
            NON_NEGATIVE_INT,
        ),
        "limits.retry_after_seconds": Meta("Retry-After sent with the 503 of a connection cap"),
        "limits.refusal_log_interval": Meta(
            "Seconds between warnings for one address refused by limits.max_connections_per_address"
        ),
        "limits.refusal_log_max_addresses": Meta(
            "Addresses a worker remembers for limits.refusal_log_interval (more: the oldest is forgotten)"
        ),
        "limits.h2_max_resets_per_second": Meta(
            "HTTP/2 stream resets a connection may cause per second (more: GOAWAY)"
        ),
        "limits.h2_reset_burst": Meta("Burst of HTTP/2 stream resets allowed above the rate"),
        "limits.h2_max_streams_per_second": Meta("HTTP/2 streams a connection may open per second (more: GOAWAY)"),
        "limits.h2_stream_burst": Meta("Burst of HTTP/2 streams allowed above the rate"),
        "limits.ws_max_pings_per_second": Meta("WebSocket pings a client may send per second (more: close 1008)"),
        "limits.ws_ping_burst": Meta("Burst of WebSocket pings allowed above the rate"),
        "limits.rules": Meta(
            'Token-bucket rate limits: [{route = "publish", rate = 10, burst = 20, key = "address", streams = "**"}];'
            " route: connect, subscribe, publish or publish_bytes; key: address, header:NAME, query:NAME, cookie:NAME"
            " or claim:NAME (over the limit: 429 + Retry-After)"
        ),
        "cors.allow_origins": Meta('Origins browsers may call from ("https://app.example", "https://*.example", "*")'),
        "cors.allow_credentials": Meta("Allow cookies and Authorization on cross-origin requests (not with *)"),
        "cors.allow_methods": Meta("Methods a preflight may ask for"),
        "cors.allow_headers": Meta("Request headers a preflight may ask for"),
        "cors.expose_headers": Meta("Response headers scripts may read"),
        "cors.max_age": Meta("Seconds a browser may cache a preflight answer", NON_NEGATIVE_INT),
        "cors.ws_allowed_origins": Meta(
            "Origins allowed to open a WebSocket (unset: cors.allow_origins; without an Origin header: allowed)"
        ),
        "compression.sse_gzip": Meta("gzip SSE responses for clients that accept it, flushed after every event"),
        "compression.gzip_level": Meta("gzip level for SSE (1..9)", Rule("an integer in 1..9", lambda v: 1 <= v <= 9)),
        "compression.ws_deflate": Meta(
            "Offer permessage-deflate on WebSocket (inflation capped by http.ws_max_message)"
        ),
        "compression.ws_window_bits": Meta(
            "Largest deflate window the server keeps per WebSocket (9..15)",
            Rule("an integer in 9..15", lambda v: 9 <= v <= 15),
        ),
    }
)
