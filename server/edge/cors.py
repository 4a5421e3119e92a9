"""CORS and WebSocket ``Origin`` policy: pure decisions, no I/O.

The HTTP layer asks :class:`CorsPolicy` three questions: which headers to add to an actual
response, what to answer an ``OPTIONS`` preflight, and whether a WebSocket upgrade from a given
``Origin`` may proceed (when it may not, answer ``403`` before the upgrade).

Origins are compared the way browsers serialise them: scheme and host case-insensitively, port
exactly, with the scheme's default port (80 for http/ws, 443 for https/wss) equal to no port.
The opaque origin ``null`` (sandboxed iframes, ``file:`` pages, some redirects) is refused
unless ``null`` itself is listed; ``*`` does not cover it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["CorsConfig", "CorsPolicy"]

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_ORIGIN_RE = re.compile(r"([a-z][a-z0-9+.\-]*)://(\[[0-9a-f:.]+\]|[a-z0-9\-._~%]+)(?::([0-9]{1,5}))?")
_WILDCARD_RE = re.compile(r"([a-z][a-z0-9+.\-]*)://\*\.([a-z0-9\-_~%]+(?:\.[a-z0-9\-_~%]+)*)(?::([0-9]{1,5}))?")
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

_Parsed = tuple[str, str, int | None]


def _port(scheme: str, digits: str | None) -> int | None:
    if digits is None:
        return None
    port = int(digits)
    if port > 65535:
        raise ValueError(f"port out of range: {digits}")
    return None if _DEFAULT_PORTS.get(scheme) == port else port


def _parse(text: str) -> _Parsed | None:
    """Parse a serialised origin into (scheme, host, port); ``None`` when malformed."""
    m = _ORIGIN_RE.fullmatch(text.lower())
    if m is None:
        return None
    try:
        return m[1], m[2], _port(m[1], m[3])
    except ValueError:
        return None


class _Matcher:
    """A compiled allow-list: exact origins, one-label subdomain wildcards, ``*``, ``null``."""

    def __init__(self, entries: tuple[str, ...]) -> None:
        self.any = False
        self.null = False
        self.exact: set[_Parsed] = set()
        self.wildcards: list[_Parsed] = []
        for entry in entries:
            text = entry.strip().lower()
            if text == "*":
                self.any = True
            elif text == "null":
                self.null = True
            elif (m := _WILDCARD_RE.fullmatch(text)) is not None:
                self.wildcards.append((m[1], m[2], _port(m[1], m[3])))
            elif (parsed := _parse(text)) is not None:
                self.exact.add(parsed)
            else:
                raise ValueError(f"not an origin or origin pattern: {entry!r}")

    def matches(self, origin: bytes) -> bool:
        try:
            text = origin.decode("ascii").strip()
        except UnicodeDecodeError:
            return False
        if text.lower() == "null":
            return self.null
        parsed = _parse(text)
        if parsed is None:
            return False
        if self.any or parsed in self.exact:
            return True
        scheme, host, port = parsed
        for w_scheme, suffix, w_port in self.wildcards:
            if scheme == w_scheme and port == w_port and host.endswith("." + suffix):
                label = host[: -len(suffix) - 1]
                if label and "." not in label:
                    return True
        return False


@dataclass(frozen=True, slots=True)
class CorsConfig:
    """Settings for cross-origin browser access (the TOML ``[cors]`` table).

    ``allow_origins`` entries are exact origins (``https://app.example.com``, with an optional
    port), ``https://*.example.com`` (``*`` stands for exactly one leading DNS label, so it matches
    ``https://a.example.com`` but neither ``https://example.com`` nor ``https://a.b.example.com``),
    ``*`` (any origin; only allowed without credentials), or ``null``. An empty tuple (the
    default) disables CORS: no browser page on another origin may read responses.

    ``ws_allowed_origins`` guards WebSocket upgrades, which browsers do not subject to CORS but
    always send cookies with (cross-site WebSocket hijacking). ``None`` (the default; the key is
    omitted from TOML) means "the same list as ``allow_origins``"; an explicit empty tuple admits
    no browser origin at all. Requests without an ``Origin`` header (non-browser clients) are
    always admitted, on both HTTP and WebSocket, since ``Origin`` is only a browser safeguard.

    Construction raises :class:`ValueError` for a malformed entry or for ``*`` combined with
    ``allow_credentials`` (which browsers reject anyway).
    """

    allow_origins: tuple[str, ...] = ()
    allow_credentials: bool = False
    allow_methods: tuple[str, ...] = ("GET", "HEAD", "POST", "DELETE")
    allow_headers: tuple[str, ...] = ("authorization", "content-type", "last-event-id", "idempotency-key")
    expose_headers: tuple[str, ...] = ("sluice-binary", "retry-after")
    max_age: int = 600
    ws_allowed_origins: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.allow_credentials and "*" in (o.strip() for o in self.allow_origins):
            raise ValueError("allow_origins '*' cannot be combined with allow_credentials")
        if self.max_age < 0:
            raise ValueError("max_age must be >= 0")
        for name in (*self.allow_methods, *self.allow_headers, *self.expose_headers):
            if _TOKEN_RE.fullmatch(name) is None:
                raise ValueError(f"not a valid HTTP token: {name!r}")
        _Matcher(self.allow_origins)
        _Matcher(self.ws_allowed_origins or ())


@dataclass(slots=True)
class CorsPolicy:
    """Answers CORS questions for one :class:`CorsConfig`; immutable after construction."""

    config: CorsConfig
    _http: _Matcher = field(init=False, repr=False)
    _ws: _Matcher = field(init=False, repr=False)
    _methods: frozenset[str] = field(init=False, repr=False)
    _headers: frozenset[str] = field(init=False, repr=False)
    _common: list[tuple[bytes, bytes]] = field(init=False, repr=False)
    _preflight: list[tuple[bytes, bytes]] = field(init=False, repr=False)
    _expose: list[tuple[bytes, bytes]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        cfg = self.config
        self._http = _Matcher(cfg.allow_origins)
        ws = cfg.allow_origins if cfg.ws_allowed_origins is None else cfg.ws_allowed_origins
        self._ws = _Matcher(ws)
        self._methods = frozenset(m.upper() for m in cfg.allow_methods)
        self._headers = frozenset(h.lower() for h in cfg.allow_headers)
        self._common = [(b"access-control-allow-credentials", b"true")] if cfg.allow_credentials else []
        self._preflight = [
            (b"access-control-allow-methods", ", ".join(m.upper() for m in cfg.allow_methods).encode()),
            (b"access-control-allow-headers", ", ".join(h.lower() for h in cfg.allow_headers).encode()),
            (b"access-control-max-age", str(cfg.max_age).encode()),
        ]
        expose = ", ".join(h.lower() for h in cfg.expose_headers).encode()
        self._expose = [(b"access-control-expose-headers", expose)] if cfg.expose_headers else []

    def origin_allowed(self, origin: bytes | None) -> bool:
        """True when ``origin`` (the raw ``Origin`` header) is on the HTTP allow-list.

        An absent header is not a cross-origin browser request, so it is not "allowed" here;
        such requests simply get no CORS headers (and are served normally).
        """
        return origin is not None and self._http.matches(origin)

    def _allow_origin(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        if self._http.any and origin.strip().lower() != b"null":
            return [(b"access-control-allow-origin", b"*"), *self._common]
        return [(b"access-control-allow-origin", origin.strip()), (b"vary", b"Origin"), *self._common]

    def response_headers(self, origin: bytes | None) -> list[tuple[bytes, bytes]]:
        """Headers to add to an actual (non-preflight) response for a request from ``origin``.

        For an allowed origin: ``Access-Control-Allow-Origin`` (``*`` when the list contains
        ``*``, otherwise the origin echoed together with ``Vary: Origin``), then
        ``Access-Control-Allow-Credentials: true`` when configured, then
        ``Access-Control-Expose-Headers`` when any are configured. Returns ``[]`` when the
        origin is absent or not allowed (the response is still served; the browser hides it).
        """
        if origin is None or not self._http.matches(origin):
            return []
        return [*self._allow_origin(origin), *self._expose]

    def preflight(
        self, origin: bytes | None, request_method: bytes | None, request_headers: bytes | None
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Answer an ``OPTIONS`` preflight: ``(status, headers)``.

        ``request_method`` and ``request_headers`` are the raw ``Access-Control-Request-Method``
        and ``Access-Control-Request-Headers`` values. Returns ``204`` with allow-origin,
        allow-methods, allow-headers, max-age (and credentials) when the origin, the method and
        every requested header are allowed; otherwise ``(403, [])``. An ``OPTIONS`` without
        ``Origin`` or without a request method is not a preflight and also gets ``403``.
        """
        if origin is None or request_method is None or not self._http.matches(origin):
            return 403, []
        try:
            method = request_method.decode("ascii").strip().upper()
            names = (request_headers or b"").decode("ascii").lower().split(",")
        except UnicodeDecodeError:
            return 403, []
        if method not in self._methods:
            return 403, []
        if any(n.strip() and n.strip() not in self._headers for n in names):
            return 403, []
        return 204, [*self._allow_origin(origin), *self._preflight]

    def websocket_origin_ok(self, origin: bytes | None) -> bool:
        """True when a WebSocket upgrade with this ``Origin`` may proceed.

        No ``Origin`` header (non-browser client): True. Otherwise the origin must match
        ``ws_allowed_origins`` (or ``allow_origins`` when that is ``None``). When False the
        caller answers ``403`` before upgrading.
        """
        return origin is None or self._ws.matches(origin)
