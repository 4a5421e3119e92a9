"""JWT authentication and stream authorisation (API.md, "Auth"); pure: no sockets, no clock reads.

Flow for one request: :meth:`Verifier.authenticate` finds the token (:func:`extract_token`) and
verifies it (:meth:`Verifier.verify`) into a :class:`Principal`, or ``None`` when there is no token;
:meth:`Verifier.authorize` then answers allow / ``401`` / ``403`` for an action on a stream.
The caller passes ``now`` (epoch seconds), so tests and trio's fake clock drive expiry.

Rules chosen here, beyond API.md:

* Every key pins one algorithm (HS256, RS256, ES256 or EdDSA/Ed25519; loaded and checked by
  :mod:`server.edge.auth_keys`); a token's header ``alg`` must equal its key's, and the key is
  only ever used with that algorithm. ``none`` is always refused; a PEM or SSH key is never
  accepted as an HMAC secret, so HS/RS confusion cannot happen.
* Key choice: a header ``kid`` naming a configured key selects that key only; otherwise (no
  ``kid``, or one naming no key) the keys *without* a kid whose algorithm matches are tried, at
  most :data:`MAX_CANDIDATES` of them (more kid-less keys of one alg are a configuration error).
  A ``kid`` that selects nothing is ``401 unknown key``; a token without ``kid`` when every key of
  its algorithm has one is ``401 the token has no kid, and every <alg> key is configured with one``
  (a key with a ``kid`` only ever checks tokens naming it), and one whose algorithm has no key at
  all is ``401 no <alg> key is configured``.
* ``exp`` is required; ``nbf`` is honoured; both allow ``leeway_seconds``. ``iat`` is optional
  (a number when present). With ``audience`` set the token's ``aud`` must contain it; without
  it a token carrying ``aud`` is refused (RFC 7519 4.1.3). With ``issuer`` set ``iss`` must equal it.
* A presented token that is invalid is ``401`` even where anonymous access would be allowed
  (a client that sends a token wants it checked; an expired session must not degrade silently).
  A valid token has at least the anonymous rights.
* A token larger than ``max_token_bytes`` is ``401`` ("token too large"), on every carrier.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import parse_qsl

import jwt

from server.edge.auth_keys import ALGORITHMS, VerificationKey, load_jwks, load_key
from server.edge.auth_keys import KeySpec as KeySpec  # noqa: PLC0414 (re-exported: part of AuthConfig)
from server.edge.cookies import cookie_value
from server.edge.patterns import PatternSet

Action = Literal["subscribe", "publish"]
MAX_CANDIDATES = 4
"""How many kid-less keys of one algorithm may be configured (each is tried for a token without ``kid``)."""
_COMPACT_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\Z")


class AuthError(Exception):
    """A refused request. ``status`` is 401 or 403, ``code`` ``"unauthorized"`` or ``"forbidden"``,
    ``message`` a short text for ``{"error": code, "message": message}`` (it never contains the
    token), ``reason`` a stable word for logs and metrics (``missing``, ``expired``, ``invalid``...).
    """

    def __init__(self, status: Literal[401, 403], message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.status = status
        self.code = "unauthorized" if status == 401 else "forbidden"
        self.message = message
        self.reason = reason


def _unauthorized(message: str, reason: str = "invalid") -> AuthError:
    return AuthError(401, message, reason)


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """``[auth]``: who may subscribe and publish. Lists may be given as lists; they are stored as tuples.

    * ``enabled``: check tokens and rules; when false everything is allowed and tokens are ignored.
    * ``keys``: :class:`KeySpec` entries (tables or ``"ALG:FILE"`` text), each pinned to its alg.
    * ``jwks_file``: a JSON Web Key Set file ``{"keys": [...]}`` of public keys (``oct`` secrets for
      HS256); every JWK must state its ``alg``, which is then pinned; ``use``, if set, must be ``sig``.
    * ``audience``: required ``aud`` value; ``None`` refuses tokens that carry any ``aud``.
    * ``issuer``: required ``iss`` value; ``None`` does not check ``iss``.
    * ``leeway_seconds``: clock skew allowed on ``exp`` and ``nbf`` (>= 0).
    * ``anonymous_subscribe`` / ``anonymous_publish``: patterns allowed without a token.
    * ``cookie_name`` / ``query_param``: where browsers put the token (``sluice_token`` / ``access_token``).
    * ``max_token_bytes``: longer tokens are refused with 401 before any parsing (default 8192).
    * ``cache_size``: verified tokens kept in an LRU cache (0 disables it).
    """

    enabled: bool = False
    keys: tuple[KeySpec, ...] = ()
    jwks_file: str | None = None
    audience: str | None = None
    issuer: str | None = None
    leeway_seconds: float = 0.0
    anonymous_subscribe: tuple[str, ...] = ()
    anonymous_publish: tuple[str, ...] = ()
    cookie_name: str = "sluice_token"
    query_param: str = "access_token"
    max_token_bytes: int = 8192
    cache_size: int = 4096

    def __post_init__(self) -> None:
        """Normalise lists to tuples and check every value that needs no file; ``ValueError`` if bad."""
        set_ = object.__setattr__
        set_(self, "keys", tuple(KeySpec.parse(k) for k in self.keys))
        for name in ("anonymous_subscribe", "anonymous_publish"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"auth.{name} must be a list of patterns, got a string")  # noqa: TRY004
            set_(self, name, tuple(value))
            try:
                PatternSet(getattr(self, name))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"auth.{name}: {exc}") from None
        if not (math.isfinite(self.leeway_seconds) and self.leeway_seconds >= 0):
            raise ValueError(f"auth.leeway_seconds must be a non-negative number, got {self.leeway_seconds!r}")
        if self.max_token_bytes < 1:
            raise ValueError(f"auth.max_token_bytes must be positive, got {self.max_token_bytes!r}")
        if self.cache_size < 0:
            raise ValueError(f"auth.cache_size must be >= 0, got {self.cache_size!r}")
        if not self.cookie_name or not self.query_param:
            raise ValueError("auth.cookie_name and auth.query_param must not be empty")


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified token: ``subject`` (``sub``), all ``claims`` (read-only), the stream patterns it may
    ``subscribe`` to and ``publish`` to (claim ``sluice``; missing lists are empty), and
    ``expires_at`` (``exp``, epoch seconds) after which open connections must end, and
    ``not_before`` (``nbf``, epoch seconds, if any).
    """

    subject: str | None
    claims: Mapping[str, Any]
    subscribe: PatternSet
    publish: PatternSet
    expires_at: float | None
    not_before: float | None = field(default=None, repr=False)

    def allows(self, action: Action, stream: str) -> bool:
        """True when the token's own patterns for ``action`` cover ``stream``."""
        return (self.subscribe if action == "subscribe" else self.publish).matches(stream)


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of :meth:`Verifier.authorize`: ``allowed``; else ``status`` 401/403 with ``code``
    and ``message`` as in :class:`AuthError`. ``principal`` is the token's (``None`` if anonymous).
    """

    allowed: bool
    status: int
    code: str | None = None
    message: str | None = None
    principal: Principal | None = None

    @property
    def expires_at(self) -> float | None:
        """When the access ends (the token's ``exp``); ``None`` for anonymous or unauthenticated access."""
        return self.principal.expires_at if self.principal is not None else None

    def check(self) -> Decision:
        """Return ``self`` if allowed, else raise the matching :class:`AuthError`."""
        if not self.allowed:
            raise AuthError(
                401 if self.status == 401 else 403, self.message or "", "missing" if self.status == 401 else "forbidden"
            )
        return self


def extract_token(
    headers: Iterable[tuple[bytes, bytes]],
    query: Mapping[str, str] | str | None,
    *,
    cookie_name: str = "sluice_token",
    query_param: str = "access_token",
    max_token_bytes: int = 8192,
) -> str | None:
    """The request's token, or ``None`` when it carries none; pure.

    Precedence: ``Authorization: Bearer`` > ``query_param`` > ``cookie_name`` cookie. Other
    ``Authorization`` schemes are ignored; empty values count as absent. ``query`` is a mapping or
    the raw query string (percent-decoded here). The cookie is read by
    :func:`~server.edge.cookies.cookie_value` over every ``Cookie`` header. Raises a 401
    :class:`AuthError` for two Bearer tokens or two query tokens, and for a token longer than
    ``max_token_bytes``.
    """
    bearer: list[bytes] = []
    cookies: list[bytes] = []
    for name, value in headers:
        lname = name.lower()
        if lname == b"authorization":
            scheme, _, rest = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and rest.strip():
                bearer.append(rest.strip())
        elif lname == b"cookie":
            cookies.append(value)
    if len(bearer) > 1:
        raise _unauthorized("more than one bearer token", "ambiguous")
    if bearer:
        return _sized(bearer[0].decode("latin-1"), max_token_bytes)
    if isinstance(query, str):
        values = [v for k, v in parse_qsl(query, keep_blank_values=True) if k == query_param]
        if len(values) > 1:
            raise _unauthorized(f"more than one {query_param} parameter", "ambiguous")
        found = values[0] if values else None
    else:
        found = query.get(query_param) if query is not None else None
    if found:
        return _sized(found, max_token_bytes)
    cookie = cookie_value((header.decode("latin-1") for header in cookies), cookie_name)
    return _sized(cookie, max_token_bytes) if cookie else None


def _sized(token: str, max_token_bytes: int) -> str:
    if len(token) > max_token_bytes:
        raise _unauthorized("token too large", "too_large")
    return token


class Verifier:
    """Verifies tokens and decides access according to one :class:`AuthConfig`.

    Construction reads every key file and raises ``ValueError`` naming the file and the problem.
    Verified tokens are kept in an LRU cache of ``cache_size`` entries, keyed by the token text;
    ``exp`` and ``nbf`` are checked against ``now`` on every call, cached or not.
    Not thread-safe (one per trio worker).
    """

    def __init__(self, config: AuthConfig) -> None:
        """Load the keys of ``config``; ``ValueError`` for unreadable or unsuitable keys."""
        self.config = config
        self.anonymous_subscribe = PatternSet(config.anonymous_subscribe)
        self.anonymous_publish = PatternSet(config.anonymous_publish)
        keys = [load_key(spec) for spec in config.keys]
        if config.jwks_file is not None:
            keys.extend(load_jwks(config.jwks_file))
        if config.enabled and not keys:
            raise ValueError("auth is enabled but no key is configured (auth.keys or auth.jwks_file)")
        self._by_kid: dict[str, VerificationKey] = {}
        for key in keys:
            if key.kid is not None:
                if key.kid in self._by_kid:
                    raise ValueError(
                        f"auth key id {key.kid!r} is used twice ({self._by_kid[key.kid].source}, {key.source})"
                    )
                self._by_kid[key.kid] = key
        self._unnamed = tuple(k for k in keys if k.kid is None)
        for alg in ALGORITHMS:
            if sum(k.alg == alg for k in self._unnamed) > MAX_CANDIDATES:
                raise ValueError(f"more than {MAX_CANDIDATES} {alg} auth keys without a kid; give them kids")
        self._cache: OrderedDict[str, Principal] = OrderedDict()

    @property
    def enabled(self) -> bool:
        """Whether tokens and rules are checked at all."""
        return self.config.enabled

    def _no_candidate(self, alg: str, kid: str | None) -> str:
        """Why no configured key can check a token with header ``alg`` and ``kid``."""
        if kid is not None:
            return "unknown key"
        if any(key.alg == alg for key in self._by_kid.values()):
            return f"the token has no kid, and every {alg} key is configured with one"
        return f"no {alg} key is configured"

    def extract(self, headers: Iterable[tuple[bytes, bytes]], query: Mapping[str, str] | str | None) -> str | None:
        """:func:`extract_token` with this configuration's cookie, parameter and size limit."""
        c = self.config
        return extract_token(
            headers, query, cookie_name=c.cookie_name, query_param=c.query_param, max_token_bytes=c.max_token_bytes
        )

    def authenticate(
        self, headers: Iterable[tuple[bytes, bytes]], query: Mapping[str, str] | str | None, now: float
    ) -> Principal | None:
        """The request's verified :class:`Principal`, ``None`` without a token (or with auth disabled);
        a 401 :class:`AuthError` for a token that is present but not valid at ``now``.
        """
        if not self.enabled:
            return None
        token = self.extract(headers, query)
        return None if token is None else self.verify(token, now)

    def verify(self, token: str, now: float) -> Principal:
        """Verify ``token`` at time ``now`` (epoch seconds); a 401 :class:`AuthError` says why not."""
        if len(token) > self.config.max_token_bytes:
            raise _unauthorized("token too large", "too_large")
        cached = self._cache.get(token)
        if cached is not None:
            self._cache.move_to_end(token)
            self._check_times(cached, now)
            return cached
        principal = self._decode(token)
        self._check_times(principal, now)
        if self.config.cache_size:
            self._cache[token] = principal
            if len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)
        return principal

    def authorize(self, principal: Principal | None, action: Action, stream: str) -> Decision:
        """May ``principal`` (``None``: no token) do ``action`` on ``stream``?

        Allowed when auth is disabled, when ``stream`` matches the anonymous patterns for
        ``action``, or when the principal's own patterns cover it. Otherwise 401 without a
        principal and 403 with one. Expiry is checked by :meth:`verify`, not here.
        """
        if not self.enabled:
            return Decision(True, 200, principal=principal)
        anonymous = self.anonymous_subscribe if action == "subscribe" else self.anonymous_publish
        if anonymous.matches(stream) or (principal is not None and principal.allows(action, stream)):
            return Decision(True, 200, principal=principal)
        if principal is None:
            return Decision(False, 401, "unauthorized", "a valid token is required")
        return Decision(False, 403, "forbidden", f"the token does not allow {action} on this stream", principal)

    def _check_times(self, principal: Principal, now: float) -> None:
        leeway = self.config.leeway_seconds
        if principal.expires_at is not None and now >= principal.expires_at + leeway:
            raise _unauthorized("token expired", "expired")
        if principal.not_before is not None and now + leeway < principal.not_before:
            raise _unauthorized("token not yet valid", "not_yet_valid")

    def _decode(self, token: str) -> Principal:
        if not _COMPACT_RE.match(token):
            raise _unauthorized("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError):
            raise _unauthorized("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise _unauthorized("token algorithm not accepted", "algorithm")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _unauthorized("malformed token")
        named = self._by_kid.get(kid) if kid is not None else None
        if named is not None:
            if named.alg != alg:
                raise _unauthorized("token algorithm does not match its key", "algorithm")
            candidates: tuple[VerificationKey, ...] = (named,)
        else:
            candidates = tuple(k for k in self._unnamed if k.alg == alg)
            if not candidates:
                raise _unauthorized(self._no_candidate(alg, kid), "key")
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=[key.alg],
                    audience=self.config.audience,
                    issuer=self.config.issuer,
                    options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "require": ["exp"]},
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.InvalidAudienceError:
                raise _unauthorized("wrong audience", "audience") from None
            except jwt.InvalidIssuerError:
                raise _unauthorized("wrong issuer", "issuer") from None
            except jwt.MissingRequiredClaimError as exc:
                raise _unauthorized(f"token lacks the {exc.claim} claim", "claims") from None
            except (jwt.PyJWTError, ValueError, TypeError):
                raise _unauthorized("invalid token") from None
            return _principal(claims)
        raise _unauthorized("bad token signature", "signature")


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _unauthorized(f"malformed {name} claim", "claims")
    return float(value)


def _principal(claims: dict[str, Any]) -> Principal:
    expires_at, not_before = _number(claims, "exp"), _number(claims, "nbf")
    _number(claims, "iat")
    subject = claims.get("sub")
    if subject is not None and not isinstance(subject, str):
        raise _unauthorized("malformed sub claim", "claims")
    subscribe, publish = _grant(claims.get("sluice", {}))
    return Principal(subject, MappingProxyType(claims), subscribe, publish, expires_at, not_before)


def _grant(grant: object) -> tuple[PatternSet, PatternSet]:
    """The ``subscribe`` and ``publish`` sets of a ``sluice`` claim; 401 when it is malformed."""
    bad = _unauthorized("malformed sluice claim", "claims")
    if not isinstance(grant, dict):
        raise bad
    sets: list[PatternSet] = []
    for action in ("subscribe", "publish"):
        patterns = grant.get(action, [])
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise bad
        try:
            sets.append(PatternSet(patterns))
        except ValueError:
            raise bad from None
    return sets[0], sets[1]
