"""A real ``redis-server`` for tests: AOF on with ``appendfsync always``, no RDB snapshots, its
data in a directory of the test's, listening on a Unix socket there or on a loopback TCP port;
or a Sentinel (``redis-sentinel``).

It is started with ``subprocess`` and is ready once ``redis-cli PING`` answers (under a
deadline); it is stopped by its PID (SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT`).
``redis-server`` and ``redis-cli`` come with Debian's ``redis-server`` package, ``redis-sentinel``
with ``redis-sentinel`` (``scripts/test`` installs both when run as root); a missing one fails
the test that needs it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.haproxy import free_port

START_TIMEOUT = 10.0  # seconds for redis-server to answer PING
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
POLL_INTERVAL = 0.02  # seconds between readiness probes (waiting for an external process)


class RedisServer:
    """One ``redis-server`` process with its data in ``directory``; :meth:`start` it again after
    :meth:`stop` and it reloads its AOF from there (``aof=False``: no persistence at all).
    ``args`` are added to its command line (``--replicaof 127.0.0.1 <port>``, for one)."""

    def __init__(self, directory: Path, *, tcp: bool = False, aof: bool = True, args: Sequence[str] = ()) -> None:
        self.directory = directory
        self.aof = aof
        self.args = list(args)
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port() if tcp else 0
        self.socket = directory / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.sentinel_config: Path | None = None

    @property
    def url(self) -> str:
        """The store's ``redis_url`` for this server."""
        return f"redis://127.0.0.1:{self.port}/0" if self.port else f"unix://{self.socket}"

    def _cli(self) -> list[str]:
        where = ["-h", "127.0.0.1", "-p", str(self.port)] if self.port else ["-s", str(self.socket)]
        return ["redis-cli", *where]

    def start(self) -> None:
        """Start the server and wait (up to :data:`START_TIMEOUT`) until it answers PING."""
        binary = "redis-server" if self.sentinel_config is None else "redis-sentinel"
        if shutil.which(binary) is None:
            pytest.fail(f"{binary} is not installed (Debian package {binary}; scripts/test installs it as root)")
        where = ["--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")]
        if self.sentinel_config is not None:
            args = [binary, str(self.sentinel_config), *where]
        else:
            aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
            args = [binary, "--save", "", *aof, *where]
            args += ["--port", str(self.port), "--bind", "127.0.0.1", *self.args]
        if not self.port:
            args += ["--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        give_up = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"redis-server exited with {self.proc.returncode}: {log}")
            probe = subprocess.run([*self._cli(), "PING"], capture_output=True, timeout=START_TIMEOUT, check=False)
            if probe.stdout.strip() == b"PONG":
                return
            if time.monotonic() > give_up:
                self.stop()
                pytest.fail(f"redis-server did not answer PING within {START_TIMEOUT} s")
            time.sleep(POLL_INTERVAL)

    def start_sentinel(self, config: Path) -> None:
        """Start a Sentinel (``redis-sentinel <config>``, which is ``redis-server`` in Sentinel mode;
        the file names its port and the primary it monitors, and Sentinel rewrites it) and wait
        until it answers PING."""
        self.sentinel_config = config
        self.start()

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the server process (SIGSTOP / SIGCONT freeze and thaw it)."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        """SIGTERM the server by its PID (it writes out its AOF and exits), SIGKILL it if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One ``redis-server`` on a Unix socket for the whole session; tests keep apart by key prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
