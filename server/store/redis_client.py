"""The coredis side of the Redis store: the client (a URL, or the primary that Sentinels name),
the deadline every call runs under, and the errors callers see. Used by :mod:`server.store.redis`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import Any

import coredis
import trio
from coredis.connection import TCPLocation
from coredis.exceptions import RedisError
from coredis.retry import NoRetryPolicy

from server.core.groups import lone_error_unwrapped
from server.core.ports.store import StoreUnavailable

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
