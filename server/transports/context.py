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


def dumps(obj: object) -> bytes:
    """Compact UTF-8 JSON."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


async def send_json(ex: Exchange, status: int, obj: object, headers: list[tuple[str, str]] | None = None) -> None:
    """Answer with a JSON body."""
    await ex.respond(status, JSON_HEADERS + (headers or []), dumps(obj))


def bad_request(code: str, message: str) -> HTTPError:
    """A 400 with a short machine-readable ``code``."""
    return HTTPError(400, code, message)
