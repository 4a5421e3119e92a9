"""What a run measures when it is more than one server process tree: Sluice on the Redis store.

``open_stack(kind, workdir=...)`` starts

* any kind of :mod:`loadtest.targets` (``sluice``, ``uvicorn``, ``nchan``) as it does;
* ``"sluice-redis"`` (:data:`REDIS`): a ``redis-server`` of its own (:mod:`loadtest.redisd`:
  ``appendonly yes``, ``appendfsync always`` by default) and one Sluice host on it,
  ``sluice serve --store redis --redis-url redis://127.0.0.1:PORT/0 --workers N``;
* ``"sluice-redis-2hosts"`` (:data:`CROSS`): one ``redis-server`` and two Sluice hosts on it,
  each a supervisor with its own port, runtime directory (``RUNTIME_DIRECTORY``: its workers'
  notice bus and metrics) and workers. The publisher posts to host A, the subscribers connect to
  host B: every event crosses from one host to the other through Redis, and host B learns of it
  only by what carries notices between hosts (today, each worker's periodic reconcile,
  ``bus.reconcile_interval``).

and yields a :class:`Stack`, which says where the subscribers and the publisher go, which
process trees are the server (both hosts' supervisors: Sluice's CPU is theirs together), which
are helpers measured apart (``redis``), and which hosts' ``/metrics`` tell what the notice bus
did. Everything is stopped on exit, each process by its PID: the Sluice hosts first, then Redis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.clients.common import Endpoint
from loadtest.redisd import open_redis
from loadtest.spec import RunSpec
from loadtest.targets import KINDS, open_target

REDIS = "sluice-redis"
CROSS = "sluice-redis-2hosts"
STACKS = (REDIS, CROSS)
ALL_KINDS: tuple[str, ...] = (*KINDS, *STACKS)
PUBLISHER_HOST, SUBSCRIBER_HOST = "A", "B"  # the cross-host stack's hosts, as the bus counters name them

Config = dict[str, dict[str, object]]


def server_kind(kind: str) -> str:
    """What the stack's servers speak (the endpoint kind): ``sluice`` for the Redis stacks."""
    return "sluice" if kind in STACKS else kind


@dataclass(frozen=True)
class Stack:
    """Servers started for a run, and how the run should see them."""

    kind: str
    endpoint: Endpoint  # where the subscribers connect
    pid: int  # the root of that server's process tree (the target of {pid}, {child})
    workers: int  # worker processes per host
    pub_endpoint: Endpoint | None = None  # where the publisher posts, when elsewhere
    other_pids: tuple[int, ...] = ()  # more server trees (the publisher's host)
    helpers: dict[str, int] = field(default_factory=dict)  # measured apart: {"redis": pid}
    bus_hosts: dict[str, Endpoint] = field(default_factory=dict)  # hosts whose sluice_bus_* counters are read
    notes: dict[str, str] = field(default_factory=dict)  # what the result should say about the stack

    @property
    def hosts(self) -> int:
        """How many servers (Sluice hosts) take part."""
        return 1 + len(self.other_pids)

    def apply(self, spec: RunSpec) -> RunSpec:
        """``spec`` aimed at this stack: its endpoints, server trees, helpers and bus hosts."""
        return dataclasses.replace(spec, endpoint=dataclasses.replace(self.endpoint, token=spec.endpoint.token),
                                   server_pid=self.pid, server_pids=self.other_pids, helpers=dict(self.helpers),
                                   pub_endpoint=dataclasses.replace(self.pub_endpoint, token=spec.endpoint.token)
                                   if self.pub_endpoint else None, bus_hosts=dict(self.bus_hosts))


@contextmanager
def open_stack(kind: str, *, workdir: Path, workers: int = 2, config: Config | None = None,
               token: str | None = None, appendfsync: str = "always") -> Iterator[Stack]:
    """Run the servers of ``kind`` until the block exits; see the module documentation."""
    if kind not in ALL_KINDS:
        raise ValueError(f"unknown target kind {kind!r}; expected one of {', '.join(ALL_KINDS)}")
    if kind not in STACKS:
        with open_target(kind, workdir=workdir, workers=workers, config=config) as target:
            yield Stack(kind, Endpoint(target.host, target.port, target.kind, token=token), target.pid,
                        target.workers)
        return
    names = [PUBLISHER_HOST, SUBSCRIBER_HOST] if kind == CROSS else [PUBLISHER_HOST]
    with open_redis(workdir / "redis", appendfsync=appendfsync) as redis, ExitStack() as hosts:
        own = dict((config or {}).get("store", {}))
        own.update(backend="redis", redis_url=redis.url)
        merged = {**(config or {}), "store": own}
        targets = {}
        for name in names:
            home = workdir / f"host-{name.lower()}"
            targets[name] = hosts.enter_context(open_target("sluice", workdir=home, workers=workers, config=merged,
                                                            runtime_dir=home / "run"))
        eps = {name: Endpoint(t.host, t.port, "sluice", token=token) for name, t in targets.items()}
        sub = targets[names[-1]]
        notes = {"redis": f"redis-server {redis.url}, appendfsync {redis.appendfsync}",
                 "hosts": ", ".join(f"{n} :{t.port} (pid {t.pid}, workers {t.workers})" for n, t in targets.items())}
        yield Stack(kind, eps[names[-1]], sub.pid, workers,
                    pub_endpoint=eps[PUBLISHER_HOST] if kind == CROSS else None,
                    other_pids=tuple(t.pid for n, t in targets.items() if n != names[-1]),
                    helpers={"redis": redis.pid}, bus_hosts=eps, notes=notes)
