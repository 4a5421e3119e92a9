"""A real `sluice serve` supervisor for tests, observed the way systemd does (``NOTIFY_SOCKET``).

``READY=1`` says when it serves and its ``STATUS=`` carries the port. Every process started (the
supervisor and each worker pid it logged) is killed by pid when the context exits.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

DRAIN = ["--set", "drain.window=0.2", "--set", "drain.deadline=3"]
STOP_WITHIN = 3 + 5 + 2  # drain deadline + the supervisor's margin + slack, seconds


class Notifications:
    """The receiving end of ``$NOTIFY_SOCKET``: every datagram the supervisor sent, in order."""

    def __init__(self) -> None:
        self.name = f"@sluice-test-{uuid.uuid4().hex}"
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.messages: list[str] = []

    async def bind(self) -> None:
        await self.sock.bind(b"\0" + self.name[1:].encode())

    async def wait(self, line: str, after: int = 0) -> int:
        """The index of the first message at or past ``after`` with a line starting with ``line``."""
        index = after
        while True:
            while index < len(self.messages):
                if any(part.startswith(line) for part in self.messages[index].split("\n")):
                    return index
                index += 1
            self.messages.append((await self.sock.recv(65536)).decode())

    def count(self, line: str) -> int:
        return sum(1 for m in self.messages if line in m.split("\n"))


@dataclass
class Supervised:
    """A running ``sluice serve``."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    notes: Notifications
    port: int = 0
    extra_pids: set[int] = field(default_factory=set)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def started(self, slot: int | None = None) -> list[int]:
        """Worker pids in start order (of ``slot``, or of all slots)."""
        which = r"\d+" if slot is None else str(slot)
        return [int(pid) for pid in re.findall(rf"slot {which}: started worker pid (\d+)", self.log())]

    async def ready(self, after: int = 0) -> int:
        """Wait for ``READY=1``; learn the port from its ``STATUS=``."""
        index = await self.notes.wait("READY=1", after)
        match = re.search(r"STATUS=serving on \S+:(\d+)", self.notes.messages[index])
        assert match, self.notes.messages[index]
        self.port = int(match.group(1))
        return index

    async def exit_code(self, timeout: float) -> int:
        with trio.fail_after(timeout):
            while (code := self.proc.poll()) is None:
                await trio.sleep(0.05)
        return code


def _is_worker(pid: int) -> bool:
    try:
        return b"server.process.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@asynccontextmanager
async def supervisor(
    tmp_path: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    prefix: Sequence[str] = (),
    pass_fds: Sequence[int] = (),
    name: str = "sluice",
    db: bool = True,
) -> AsyncIterator[Supervised]:
    """Start ``sluice serve --port 0 ...args`` (after ``prefix``, a wrapper command, if any)."""
    notes = Notifications()
    await notes.bind()
    log_path = tmp_path / f"{name}.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICE_", "LISTEN_", "WATCHDOG_"))}
    environ.update({"NOTIFY_SOCKET": notes.name, **(env or {})})
    argv = [*prefix, sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", "0"]
    argv += [*(["--db", str(tmp_path / f"{name}.db")] if db else []), *DRAIN, *args]
    with open(log_path, "wb") as log, notes.sock:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, env=environ, pass_fds=pass_fds)
        running = Supervised(proc, log_path, notes)
        try:
            yield running
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            for pid in {*running.started(), *running.extra_pids}:
                if _is_worker(pid):
                    os.kill(pid, signal.SIGKILL)
            print(f"--- {name} log ---\n{running.log()}")  # shown when the test fails
