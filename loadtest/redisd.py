"""A ``redis-server`` of the harness's own, for the targets that run Sluice on the Redis store.

``open_redis(directory)`` starts Debian's ``redis-server`` (package ``redis-server``;
``scripts/install-baselines`` installs it) on a free port of 127.0.0.1 with everything it
writes (AOF, log) in ``directory``: ``appendonly yes``, ``appendfsync always`` unless asked
otherwise, no RDB snapshots. It waits until the server answers ``PING`` (at most
:data:`START_TIMEOUT` seconds), yields a :class:`RedisProcess` and, on exit, stops it by its PID
(SIGTERM, SIGKILL after :data:`STOP_GRACE` seconds). Nothing else uses it: the data of a run is
gone with its directory. By hand::

    python -m loadtest.redisd --dir /tmp/redis [--appendfsync everysec]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loadtest.targets import HOST, free_port, stop

APPENDFSYNC = ("always", "everysec", "no")
PATHS = (Path("/usr/bin/redis-server"), Path("/usr/sbin/redis-server"), Path("/usr/local/bin/redis-server"))
INSTALL_HINT = "install Debian's redis-server package (scripts/install-baselines does)"
START_TIMEOUT = 15.0  # seconds until PING must answer PONG
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
PROBE_TIMEOUT = 1.0  # seconds for one PING
LOG_NAME = "redis.log"


class RedisUnavailable(RuntimeError):
    """``redis-server`` is not installed, or did not start (the message says why)."""


@dataclass(frozen=True)
class RedisProcess:
    """A running ``redis-server``."""

    pid: int
    port: int
    directory: Path
    appendfsync: str

    @property
    def url(self) -> str:
        """The store's ``redis_url`` for this server."""
        return f"redis://{HOST}:{self.port}/0"


def find_redis_server() -> Path:
    """The ``redis-server`` binary; :class:`RedisUnavailable` if there is none."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    for path in PATHS:
        if os.access(path, os.X_OK):
            return path
    raise RedisUnavailable(f"redis-server not found; {INSTALL_HINT}")


def argv(binary: Path, port: int, directory: Path, appendfsync: str) -> list[str]:
    """The command line of a server on ``port`` writing into ``directory``."""
    return [str(binary), "--port", str(port), "--bind", HOST, "--dir", str(directory),
            "--logfile", str(directory / LOG_NAME), "--daemonize", "no", "--save", "",
            "--appendonly", "yes", "--appendfsync", appendfsync]


def ping(port: int, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the server on ``port`` answers ``PING`` with ``+PONG``."""
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")
    return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(unreadable: {exc})"


def _start(binary: Path, directory: Path, appendfsync: str) -> tuple[subprocess.Popen[bytes], int]:
    log = directory / LOG_NAME
    for attempt in range(3):  # the port is chosen before redis-server binds it: retry if it was taken
        port = free_port()
        offset = log.stat().st_size if log.exists() else 0
        with log.open("ab") as err:
            proc = subprocess.Popen(argv(binary, port, directory, appendfsync), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err, cwd=directory)
        deadline = time.monotonic() + START_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if ping(port):
                return proc, port
            time.sleep(0.05)
        stop(proc, STOP_GRACE)
        said = log.read_bytes()[offset:].decode(errors="replace") if log.exists() else ""
        if attempt < 2 and "Address already in use" in said:
            continue
        what = f"exited with status {proc.returncode}" if proc.returncode else f"no PONG in {START_TIMEOUT:.0f} s"
        raise RedisUnavailable(f"redis-server {what}:\n{_tail(log)}")
    raise AssertionError("unreachable")


@contextmanager
def open_redis(directory: Path, *, appendfsync: str = "always") -> Iterator[RedisProcess]:
    """Run a ``redis-server`` until the block exits; see the module documentation."""
    if appendfsync not in APPENDFSYNC:
        raise ValueError(f"appendfsync is one of {', '.join(APPENDFSYNC)}, not {appendfsync!r}")
    binary = find_redis_server()
    directory.mkdir(parents=True, exist_ok=True)
    proc, port = _start(binary, directory, appendfsync)
    try:
        yield RedisProcess(proc.pid, port, directory, appendfsync)
    finally:
        stop(proc, STOP_GRACE)


def main(args: Sequence[str] | None = None) -> None:
    """Run a server until interrupted, printing its URL and PID."""
    p = argparse.ArgumentParser(prog="python -m loadtest.redisd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, required=True, help="where its AOF and log go")
    p.add_argument("--appendfsync", choices=APPENDFSYNC, default="always")
    ns = p.parse_args(args)
    try:
        with open_redis(ns.dir, appendfsync=ns.appendfsync) as redis:
            print(f"redis-server pid {redis.pid} at {redis.url}", flush=True)
            signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop it on SIGTERM too
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    except RedisUnavailable as exc:
        print(f"loadtest.redisd: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
