"""The coredis side of the Redis store: the client (a URL, or the primary that Sentinels name),
the deadline every call runs under, the errors callers see, and how the store's script is loaded
and its calls pipelined. Used by :mod:`server.store.redis`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import Any

import coredis
import trio
from coredis.connection import TCPLocation
from coredis.exceptions import NoScriptError, RedisError
from coredis.retry import NoRetryPolicy

from server.core.groups import lone_error_unwrapped
from server.core.ports.store import StoreUnavailable
from server.store.redis_ops import SCRIPT, Call

Redis = coredis.Redis[bytes]
"""The client type: replies undecoded (bytes)."""


class RedisUnavailable(StoreUnavailable):
    """The request was not carried out, or its outcome is unknown: Redis was unreachable or did
    not answer within ``store.redis_timeout``, refused the command, or the store is closed."""


class ReplicationFailed(RedisUnavailable):
    """The write was applied on the primary, but fewer than ``store.redis_wait_replicas`` replicas
    acknowledged it within the timeout: a failover now could lose it. The listener was told."""


@contextmanager
def deadline(what: str, at: float, timeout: float) -> Iterator[None]:
    """Cancel the block at ``at`` (trio time) and turn that, or any Redis or connection failure
    inside, into :class:`RedisUnavailable` naming ``what``."""
    try:
        with lone_error_unwrapped(), trio.CancelScope(deadline=at) as scope:
            yield
    except (RedisError, OSError, TimeoutError) as exc:
        raise RedisUnavailable(f"redis store: {what} failed: {exc}") from exc
    if scope.cancelled_caught:
        raise RedisUnavailable(f"redis store: {what}: no answer within {timeout} s (store.redis_timeout)")


async def settled(request: Any) -> Any:
    """A pipelined command's reply, or the error Redis answered it with."""
    try:
        return await request
    except RedisError as exc:
        return exc


def fewer_acks(a: Any, b: Any) -> Any:
    """The smaller of two WAIT replies (an error counts as none)."""
    if isinstance(a, Exception) or isinstance(b, Exception):
        return a if isinstance(a, Exception) else b
    return min(int(a), int(b))


async def load_script(client: Redis, sha: str) -> None:
    """Load the store's script into Redis's script cache; :class:`RedisUnavailable` unless Redis
    hashes it to ``sha``."""
    loaded = await client.script_load(SCRIPT)
    if (loaded.decode() if isinstance(loaded, bytes) else loaded) != sha:
        raise RedisUnavailable("redis store: Redis hashed the store's script differently")


async def run_pipeline(client: Redis, sha: str, calls: Sequence[Call], wait: int = 0, wait_ms: int = 0) -> list[Any]:
    """Send ``calls`` of the script ``sha`` in one pipeline (``WAIT wait wait_ms`` after them when
    ``wait``); return each call's reply or error in order, then the WAIT's reply when asked for.
    Calls Redis answered with NOSCRIPT did not run: the script is loaded and they are sent again
    (after the others ran)."""
    if not calls:
        return []
    async with client.pipeline(transaction=False, raise_on_error=False) as pipe:
        requests = [pipe.evalsha(sha, keys, args) for keys, args in calls]
        waited = pipe.wait(wait, wait_ms) if wait else None
    replies = [await settled(r) for r in requests]
    acked = None if waited is None else await settled(waited)
    missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        await load_script(client, sha)
        again = await run_pipeline(client, sha, [calls[i] for i in missing], wait, wait_ms)
        for i, reply in zip(missing, again, strict=False):
            replies[i] = reply
        if wait:
            acked = fewer_acks(acked, again[-1])
    return [*replies, acked] if wait else replies


@asynccontextmanager
async def open_client(
    url: str | None, sentinels: Sequence[str], master: str | None, timeout: float, max_connections: int
) -> AsyncIterator[Redis]:
    """A running coredis client for ``url``, or for the primary of ``master`` that ``sentinels``
    (``host:port`` each) name. Commands are never retried by the client: a script call retried
    after a lost answer could apply twice."""
    options: dict[str, Any] = {"stream_timeout": timeout, "connect_timeout": timeout}
    async with AsyncExitStack() as stack:
        client: Redis
        if sentinels:
            if master is None:
                raise ValueError("redis sentinels need the name of the primary (store.redis_master)")
            sentinel = coredis.Sentinel([_location(s) for s in sentinels], retry_policy=NoRetryPolicy(), **options)
            await stack.enter_async_context(sentinel)
            client = sentinel.primary_for(master, max_connections=max_connections, timeout=timeout)
        elif url is not None:
            client = coredis.Redis.from_url(
                url, retry_policy=NoRetryPolicy(), max_connections=max_connections, pool_timeout=timeout, **options
            )
        else:
            raise ValueError("the redis store needs a URL or sentinels")
        yield await stack.enter_async_context(client)


def _location(text: str) -> TCPLocation:
    host, _, port = text.rpartition(":")
    return TCPLocation(host.strip("[]"), int(port))
