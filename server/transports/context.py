"""What every transport handler is given: the store, the hub, and the transport settings."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from server.core.hub import Hub
from server.core.ports.store import Store
from server.http.base import Exchange, HTTPError
from server.transports.guard import Guard


@dataclass(frozen=True, slots=True)
class Settings:
    """Transport-level limits and timings (filled from the validated Config by ``server.app``)."""

    max_event_bytes: int = 256 * 1024
    max_body_bytes: int = 8 * 1024 * 1024
    max_batch_events: int = 1000
    retry_ms: int = 2000
    retry_jitter_ms: int = 1000
    heartbeat: float = 15.0
    poll_default_timeout: float = 25.0
    poll_max_timeout: float = 60.0
    poll_max_events: int = 1000
    ws_max_subscriptions: int = 256
    sse_gzip: bool = False  # gzip SSE for clients that accept it (the server's config turns it on)
    gzip_level: int = 6

    def retry_value(self) -> int:
        """A ``retry:`` value jittered per connection, so reconnects after a drain spread out."""
        jitter = random.randint(0, self.retry_jitter_ms) if self.retry_jitter_ms > 0 else 0
        return self.retry_ms + jitter


@dataclass(slots=True)
class Context:
    """Shared per-worker state handed to every handler."""

    store: Store
    hub: Hub
    settings: Settings = field(default_factory=Settings)
    draining: bool = False  # set while the worker drains: /readyz answers 503
    guard: Guard | None = None  # auth, rate rules, CORS for /v1/ (None: none configured)


JSON_HEADERS = [("content-type", "application/json"), ("cache-control", "no-store")]


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)  # made once: json.dumps with
# arguments builds an encoder per call, which cost more than the encoding of a publish's answer


def dumps(obj: object) -> bytes:
    """Compact UTF-8 JSON."""
    return _ENCODER.encode(obj).encode()


async def send_json(ex: Exchange, status: int, obj: object, headers: list[tuple[str, str]] | None = None) -> None:
    """Answer with a JSON body."""
    await ex.respond(status, JSON_HEADERS + (headers or []), dumps(obj))


STORE_UNAVAILABLE = "the store is unavailable: retry later (with the same Idempotency-Key for a publish)"
STORE_RETRY_AFTER = "1"  # seconds, the Retry-After of a 503 for an unavailable store


def store_unavailable() -> HTTPError:
    """The answer when the store could not carry a request out (:class:`StoreUnavailable`): 503."""
    return HTTPError(503, "store_unavailable", STORE_UNAVAILABLE, [("retry-after", STORE_RETRY_AFTER)])


def bad_request(code: str, message: str) -> HTTPError:
    """A 400 with a short machine-readable ``code``."""
    return HTTPError(400, code, message)
