"""A real Redis Sentinel group for tests: a primary and one replica (both AOF with ``appendfsync
always``) watched by three Sentinels (``redis-sentinel``) with a quorum of two and short timers,
so that a failover after the primary dies takes about 1-3 s.

Every process listens on 127.0.0.1 on a port picked as :func:`tests.haproxy.free_port` does
(Redis cannot report a port-0 bind), keeps its files in a directory of the test's, and is
stopped by its PID (:meth:`SentinelGroup.stop`, also when starting fails half-way). The waits
that follow external processes (:meth:`SentinelGroup.wait_promoted` and the start-up checks) poll
a real condition with a bound.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from tests.haproxy import free_port
from tests.redis_server import POLL_INTERVAL, RedisServer

MASTER = "main"  # the name the Sentinels monitor the primary by (store.redis_master)
SENTINELS = 3
QUORUM = 2
# No answer for this long: an instance is subjectively down. Shorter (500 ms) made a Sentinel that
# had just switched to the new primary find it down before its first PING reply, and fail over again.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
SYNC_AT_ONCE = ["--repl-diskless-sync-delay", "0"]  # a replica's full sync starts at once, not in 5 s
READY_TIMEOUT = 30.0  # seconds for the replica's link and the Sentinels' discovery at start


def cli(port: int, *args: str) -> list[str]:
    """``redis-cli -p <port> <args>``: the reply's lines (the fields of an array reply)."""
    done = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True, timeout=10, check=False
    )
    return done.stdout.decode(errors="replace").splitlines()


async def acli(port: int, *args: str) -> list[str]:
    """:func:`cli` without blocking the trio loop (the store keeps running meanwhile)."""
    done = await trio.run_process(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], capture_stdout=True, capture_stderr=True, check=False
    )
    return done.stdout.decode(errors="replace").splitlines()


def info(lines: list[str]) -> dict[str, str]:
    """An INFO reply (``key:value`` lines) as a dict."""
    return dict(line.split(":", 1) for line in lines if ":" in line and not line.startswith("#"))


def pairs(lines: list[str]) -> dict[str, str]:
    """A flat field/value array reply (``SENTINEL MASTER``) as a dict."""
    return dict(zip(lines[::2], lines[1::2], strict=False))


class SentinelGroup:
    """A primary, its replica and three Sentinels under ``directory`` (see the module doc).

    :attr:`primary` and :attr:`replica` are the servers as started: after a failover the
    replica is the primary. The store reaches the group through :attr:`addresses` and
    :data:`MASTER`.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.primary = RedisServer(directory / "primary", tcp=True, args=SYNC_AT_ONCE)
        self.replica = RedisServer(
            directory / "replica", tcp=True, args=[*SYNC_AT_ONCE, "--replicaof", "127.0.0.1", str(self.primary.port)]
        )
        self.sentinels = [RedisServer(directory / f"sentinel{i}", tcp=True) for i in range(SENTINELS)]

    @property
    def addresses(self) -> list[str]:
        """The Sentinels' ``host:port`` (``store.redis_sentinels``)."""
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    def start(self) -> None:
        """Start every process and wait until the replica is in sync and each Sentinel knows the
        replica and the two other Sentinels (so a quorum can agree and elect a leader)."""
        try:
            self.primary.start()
            self.replica.start()
            for sentinel in self.sentinels:
                sentinel.port = free_port()
                config = sentinel.directory / "sentinel.conf"
                sentinel.directory.mkdir(parents=True, exist_ok=True)
                config.write_text(
                    f"port {sentinel.port}\nbind 127.0.0.1\n"
                    f"sentinel monitor {MASTER} 127.0.0.1 {self.primary.port} {QUORUM}\n"
                    f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                    f"sentinel failover-timeout {MASTER} {FAILOVER_TIMEOUT_MS}\n"
                    f"sentinel parallel-syncs {MASTER} 1\n"
                )
                sentinel.start_sentinel(config)
            self._until(self._ready, "the replica to sync and the Sentinels to find each other")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if info(cli(self.replica.port, "INFO", "replication")).get("master_link_status") != "up":
            return False
        for sentinel in self.sentinels:
            state = pairs(cli(sentinel.port, "SENTINEL", "MASTER", MASTER))
            if state.get("num-slaves") != "1" or state.get("num-other-sentinels") != str(SENTINELS - 1):
                return False
        return True

    @staticmethod
    def _until(check: Callable[[], bool], what: str) -> None:
        give_up = time.monotonic() + READY_TIMEOUT
        while not check():
            if time.monotonic() > give_up:
                pytest.fail(f"the Sentinel group did not get ready within {READY_TIMEOUT} s: waiting for {what}")
            time.sleep(POLL_INTERVAL)

    def cut_replication(self) -> None:
        """Freeze the replica (SIGSTOP) and close the primary's link to it, so that nothing written
        from now on reaches it (a frozen replica alone would still get it: the kernel buffers the
        replication stream for it). :meth:`thaw_replica` lets it run again."""
        self.replica.signal(signal.SIGSTOP)
        killed = cli(self.primary.port, "CLIENT", "KILL", "TYPE", "replica")
        assert killed == ["1"], killed

    def thaw_replica(self) -> None:
        """SIGCONT the replica frozen by :meth:`cut_replication`."""
        self.replica.signal(signal.SIGCONT)

    def kill_primary(self) -> None:
        """SIGKILL the primary, as a crash of its host would end it (its PID is then forgotten)."""
        proc = self.primary.proc
        assert proc is not None
        proc.kill()
        proc.wait(10)
        self.primary.proc = None

    async def rejoin(self, server: RedisServer, primary: RedisServer) -> None:
        """Start ``server`` again (a primary killed before) as a replica of ``primary``, as its
        operator would after a failover (started as a primary with its old data, a Sentinel still
        settling may promote it back), and return once it is in sync (the caller bounds the wait)."""
        server.args = [*SYNC_AT_ONCE, "--replicaof", "127.0.0.1", str(primary.port)]
        await trio.to_thread.run_sync(server.start)
        while True:
            state = info(await acli(server.port, "INFO", "replication"))
            if (state.get("role"), state.get("master_port"), state.get("master_link_status")) == (
                "slave",
                str(primary.port),
                "up",
            ):
                return
            await trio.sleep(POLL_INTERVAL)  # polling an external process

    async def wait_promoted(self, server: RedisServer) -> None:
        """Return once ``server`` is a primary and every Sentinel names it, sees it up and has no
        failover in progress (the caller bounds the wait)."""
        while True:
            role = info(await acli(server.port, "INFO", "replication")).get("role")
            views = [pairs(await acli(s.port, "SENTINEL", "MASTER", MASTER)) for s in self.sentinels]
            if role == "master" and all((v.get("port"), v.get("flags")) == (str(server.port), "master") for v in views):
                return
            await trio.sleep(POLL_INTERVAL)  # polling external processes

    def stop(self) -> None:
        """Stop every process this group started, Sentinels first, by PID."""
        for server in [*self.sentinels, self.replica, self.primary]:
            server.stop()


@contextmanager
def sentinel_group(directory: Path) -> Iterator[SentinelGroup]:
    """A started :class:`SentinelGroup`, stopped on exit."""
    group = SentinelGroup(directory)
    group.start()
    try:
        yield group
    finally:
        group.stop()
