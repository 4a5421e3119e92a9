"""The streams API's front door: authentication, rate limits and CORS, once per request.

:class:`Guard` joins the I/O-free edge policies (:mod:`server.edge.auth`, :mod:`server.edge.limits`,
:mod:`server.edge.cors`) to the neutral exchange. ``server.app`` builds one per worker with
:meth:`Guard.from_config`, which returns ``None`` when auth is off, there are no rate rules and
CORS is off: the router then checks that one attribute and nothing else happens.

Per request (:meth:`Guard.serve`), in this order:

1. CORS: an ``OPTIONS`` under ``/v1/`` is answered as a preflight (204, or a 403 JSON error).
   Every other answer of the streams API, errors included, carries the CORS response headers,
   so a browser page can read a 401 or a 429. A WebSocket upgrade whose ``Origin`` is not allowed
   is ``403`` before the upgrade (no ``Origin``: allowed).
2. ``connect`` rate rules, before any token is looked at (a flood of bad tokens costs no
   signature checks); claim keys are not known yet there, so they count per address.
3. The token (``Authorization: Bearer``, ``?access_token=``, ``sluice_token`` cookie) is
   verified against the wall clock :attr:`Guard.clock`; an invalid one is ``401``. The route's
   action (``subscribe``: SSE, long-poll, info; ``publish``: publish, close, delete) is then
   authorised: ``401`` without a token, ``403`` when the token does not cover the stream. A
   WebSocket upgrade needs a valid token unless some anonymous pattern exists; each
   ``subscribe`` / ``publish`` op is authorised on its own (:meth:`Access.refusal`).
4. The route's own rate rules (``subscribe`` for SSE and long-poll, ``publish`` for a publish
   request), keyed with the token's claims; ``publish_bytes`` is charged by the publish handler
   once the body is read (:meth:`Access.charge`). Over a limit: ``429`` with ``Retry-After``;
   a payload larger than a rule's burst can never pass: ``413``.

The handler gets an :class:`Access`: the verified principal, and ``deadline``, the trio-clock
time at which the token (plus the configured leeway) expires; open connections end there.
The deadline is computed once, as ``trio.current_time() + (exp + leeway - clock())``, so the
transports wait on trio's clock (a cancel scope deadline, no extra task) and tests that replace
:attr:`Guard.clock` and use a fake trio clock drive expiry end to end.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from server.edge.auth import Action, AuthConfig, AuthError, Principal, Verifier
from server.edge.cors import CorsConfig, CorsPolicy
from server.edge.limits import KeySource, LimitsConfig, RateLimits, Route, request_key_of, retry_after_header
from server.http.base import Exchange, HTTPError, Request, ResponseStream, WebSocket
from server.observability.stats import EdgeStats

log = logging.getLogger(__name__)

Headers = list[tuple[str, str]]
KeyOf = Callable[[KeySource], "str | None"]
_CHALLENGE = ("www-authenticate", 'Bearer realm="sluice"')


def rate_error(wait: float) -> HTTPError:
    """The answer for a refused request: ``429`` with ``Retry-After``, or ``413`` when the cost can
    never fit the rule's burst (``wait`` is infinite)."""
    if math.isinf(wait):
        return HTTPError(413, "too_large", "the request is larger than the rate limit allows at once")
    return HTTPError(429, "rate_limited", "too many requests", [("retry-after", retry_after_header(wait).decode())])


class Access:
    """What one authorised request (or WebSocket) may do from now on.

    ``principal`` is the verified token (``None``: anonymous or auth disabled); ``deadline`` the
    trio-clock time at which the connection must end (``math.inf``: never). :data:`OPEN` is the
    access of every request when no :class:`Guard` is configured.
    """

    __slots__ = ("_guard", "_key_of", "deadline", "principal")

    def __init__(
        self,
        guard: Guard | None = None,
        principal: Principal | None = None,
        deadline: float = math.inf,
        key_of: KeyOf | None = None,
    ) -> None:
        self._guard = guard
        self.principal = principal
        self.deadline = deadline
        self._key_of = key_of

    def refusal(self, action: Action, stream: str) -> tuple[str, str] | None:
        """``None`` when ``action`` on ``stream`` is allowed, else ``(code, message)``
        (``unauthorized`` / ``forbidden``), for per-operation checks on a WebSocket."""
        guard = self._guard
        if guard is None or guard.verifier is None:
            return None
        decision = guard.verifier.authorize(self.principal, action, stream)
        if decision.allowed:
            return None
        guard.stats.refused(decision.status, "missing" if decision.status == 401 else "forbidden")
        return decision.code or "forbidden", decision.message or "not allowed"

    def wait(self, route: Route, stream: str | None, cost: float = 1.0) -> float:
        """Spend ``cost`` on the rate rules of ``route`` for ``stream``: ``0.0`` if allowed, else
        the seconds to wait (``math.inf``: ``cost`` exceeds a rule's burst)."""
        guard = self._guard
        if guard is None or guard.limits is None or self._key_of is None:
            return 0.0
        wait = guard.limits.check(route, stream, self._key_of, trio.current_time(), cost)
        if wait:
            guard.stats.limited(413 if math.isinf(wait) else 429, route)
        return wait

    def charge(self, route: Route, stream: str | None, cost: float = 1.0, *, paid: Route | None = None) -> None:
        """:meth:`wait`, raising the ``429`` (or ``413``) :class:`HTTPError` when refused. ``paid``
        names a route this request was already charged one token on (``publish`` before its
        ``publish_bytes``): a refusal gives that token back, so the refused request costs nothing."""
        wait = self.wait(route, stream, cost)
        if wait:
            if paid is not None:
                self.refund(paid, stream)
            raise rate_error(wait)

    def refund(self, route: Route, stream: str | None, cost: float = 1.0) -> None:
        """Give back ``cost`` that an allowed :meth:`wait` on ``route`` spent."""
        guard = self._guard
        if guard is not None and guard.limits is not None and self._key_of is not None:
            guard.limits.refund(route, stream, self._key_of, cost)


OPEN = Access()
"""The access of a request when nothing is guarded: everything allowed, no deadline."""


@dataclass(frozen=True, slots=True)
class Target:
    """A routed request, as the guard sees it.

    ``call`` runs the transport; ``action`` is what it does to ``stream`` (``None``: no stream
    yet, the WebSocket upgrade); ``rate`` the rate-limit route charged before it runs, if any.
    """

    call: Callable[[Exchange, Access], Awaitable[None]]
    action: Action | None
    stream: str | None
    rate: Route | None = None
    websocket: bool = False


class Guard:
    """Authentication, rate limits and CORS of one worker (see the module docstring).

    ``verifier``, ``limits`` and ``cors`` are each ``None`` when that policy is off. ``clock``
    is the wall clock (epoch seconds) tokens are checked against; replaceable (tests).
    """

    def __init__(
        self,
        verifier: Verifier | None = None,
        limits: RateLimits | None = None,
        cors: CorsPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Compose the given policies; ``None`` turns one off."""
        self.verifier = verifier
        self.limits = limits
        self.cors = cors
        self.clock = clock
        self._leeway = verifier.config.leeway_seconds if verifier is not None else 0.0
        self._anonymous = verifier is not None and bool(verifier.anonymous_subscribe or verifier.anonymous_publish)
        self.stats = EdgeStats()  # refusals, for /metrics

    @classmethod
    def from_config(cls, auth: AuthConfig, limits: LimitsConfig, cors: CorsConfig) -> Guard | None:
        """The guard for these sections, or ``None`` when none of them asks for anything.

        CORS is on when ``allow_origins`` is non-empty or ``ws_allowed_origins`` is set; raises
        ``ValueError`` for unusable auth keys.
        """
        verifier = Verifier(auth) if auth.enabled else None
        rates = limits.rate_limits() if limits.rules else None
        policy = CorsPolicy(cors) if cors.allow_origins or cors.ws_allowed_origins is not None else None
        if verifier is None and rates is None and policy is None:
            return None
        return cls(verifier, rates, policy)

    async def serve(self, ex: Exchange, resolve: Callable[[], Target]) -> None:
        """Answer one request under ``/v1/``: routing (``resolve``), the checks, then the transport."""
        req = ex.request
        cors = self._cors_headers(req) if self.cors is not None else None
        try:
            if cors is not None and req.method == "OPTIONS":
                await self._preflight(ex)
                return
            target = resolve()
            access = self.admit(req, target)
            if cors and not target.websocket:
                ex = _CorsExchange(ex, cors)
            await target.call(ex, access)
        except HTTPError as exc:
            if cors:
                exc.headers = [*exc.headers, *cors]
            raise

    def admit(self, req: Request, target: Target) -> Access:
        """Run the checks for ``target``; the :class:`Access` it gets, or the refusing :class:`HTTPError`."""
        headers = req.headers
        if target.websocket and self.cors is not None:
            origin = headers.get("origin")
            if not self.cors.websocket_origin_ok(None if origin is None else origin.encode("latin-1")):
                self.stats.refused(403, "origin")
                raise HTTPError(403, "forbidden", "origin not allowed")
        limits = self.limits
        address = req.client[0]
        if limits is not None:
            wait = limits.check("connect", None, request_key_of(address, headers, req.query), trio.current_time())
            if wait:
                self.stats.limited(413 if math.isinf(wait) else 429, "connect")
                raise rate_error(wait)
        principal = self._authenticate(req, target)
        key_of = None
        if limits is not None:
            key_of = request_key_of(address, headers, req.query, principal.claims if principal is not None else None)
            if target.rate is not None:
                wait = limits.check(target.rate, target.stream, key_of, trio.current_time())
                if wait:
                    self.stats.limited(413 if math.isinf(wait) else 429, target.rate)
                    raise rate_error(wait)
        deadline = math.inf
        if principal is not None and principal.expires_at is not None:
            deadline = trio.current_time() + (principal.expires_at + self._leeway - self.clock())
        return Access(self, principal, deadline, key_of)

    def _authenticate(self, req: Request, target: Target) -> Principal | None:
        verifier = self.verifier
        if verifier is None:
            return None
        carriers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in _carriers(req.headers)]
        try:
            principal = verifier.authenticate(carriers, req.query, self.clock())
            if target.action is not None and target.stream is not None:
                verifier.authorize(principal, target.action, target.stream).check()
        except AuthError as exc:
            self.stats.refused(exc.status, exc.reason)
            raise _refused(req, exc) from None
        if principal is None and target.action is None and not self._anonymous:
            self.stats.refused(401, "missing")
            raise _refused(req, AuthError(401, "a valid token is required", "missing"))
        return principal

    def _cors_headers(self, req: Request) -> Headers:
        assert self.cors is not None
        origin = req.headers.get("origin")
        if origin is None:
            return []
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.cors.response_headers(_b(origin))]

    async def _preflight(self, ex: Exchange) -> None:
        assert self.cors is not None
        h = ex.request.headers
        status, headers = self.cors.preflight(
            _b(h.get("origin")), _b(h.get("access-control-request-method")), _b(h.get("access-control-request-headers"))
        )
        if status != 204:
            self.stats.refused(403, "preflight")
            raise HTTPError(403, "forbidden", "cross-origin request not allowed")
        await ex.respond(204, [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers])


def _refused(req: Request, exc: AuthError) -> HTTPError:
    """The HTTP answer for a refused token (logged by reason only: the token never is)."""
    log.debug("refused %s %s: %d %s", req.method, req.path, exc.status, exc.reason)
    return HTTPError(exc.status, exc.code, exc.message, [_CHALLENGE] if exc.status == 401 else [])


def _b(value: str | None) -> bytes | None:
    return None if value is None else value.encode("latin-1")


def _carriers(headers: dict[str, str]) -> list[tuple[str, str]]:
    """The headers a token may come in (the engine joined repeats: two Bearer tokens stay invalid)."""
    return [(name, headers[name]) for name in ("authorization", "cookie") if name in headers]


class _CorsExchange:
    """An exchange whose responses carry extra (CORS) headers; everything else is delegated."""

    __slots__ = ("_extra", "_inner", "request")

    def __init__(self, inner: Exchange, extra: Headers) -> None:
        self._inner = inner
        self._extra = extra
        self.request = inner.request

    async def respond(self, status: int, headers: Headers, body: bytes = b"") -> None:
        await self._inner.respond(status, [*headers, *self._extra], body)

    async def open_stream(self, status: int, headers: Headers) -> ResponseStream:
        return await self._inner.open_stream(status, [*headers, *self._extra])

    @property
    def websocket_requested(self) -> bool:
        return self._inner.websocket_requested

    def offered_subprotocols(self) -> list[str]:
        return self._inner.offered_subprotocols()

    async def accept_websocket(self, subprotocol: str | None) -> WebSocket:
        return await self._inner.accept_websocket(subprotocol)

    def on_close_request(self, callback: Callable[[], None]) -> None:
        self._inner.on_close_request(callback)
