"""Real supervisors: a second Sluice on a served address or store file refuses to start; a
killed one leaves nothing that blocks the next."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.client import publish, request
from tests.supervised import STOP_WITHIN, _is_worker, supervisor
from tests.test_process import _activated, healthz_pids

pytestmark = pytest.mark.slow


def lock_socket_inode(port: int) -> str:
    """The inode of the listening abstract socket ``@sluice:addr:127.0.0.1:<port>``."""
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == f"@sluice:addr:127.0.0.1:{port}":
            return fields[6]
    raise AssertionError(f"no address lock for port {port}")


def open_files(pid: int) -> set[str]:
    fds = Path(f"/proc/{pid}/fd")
    links = set()
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            links.add(os.readlink(fd))
    return links


async def gone(pid: int) -> None:
    while Path(f"/proc/{pid}").exists() and _is_worker(pid):
        await trio.sleep(0.05)


async def test_a_second_sluice_on_the_same_port_or_store_file_refuses_to_start(tmp_path: Path) -> None:
    db = tmp_path / "sluice.db"
    with trio.fail_after(60):
        async with supervisor(tmp_path, "--workers", "2") as first:
            await first.ready()
            port, pid = first.port, first.proc.pid
            workers = first.started()

            async with supervisor(tmp_path, "--port", str(port), name="same-port") as second:
                assert await second.exit_code(20) == 1
                assert second.log() == f"sluice: another Sluice (pid {pid}) already serves 127.0.0.1:{port}\n"

            async with supervisor(tmp_path, "--db", str(db), name="same-db") as third:  # on another port
                assert await third.exit_code(20) == 1
                assert third.log() == f"sluice: store file {db} is in use by another Sluice (pid {pid})\n"

            # the first keeps serving alone: six publishes, one history
            assert set(await healthz_pids(port, 30)) <= set(workers)
            ids = [await publish(port, "one", f"e{i}") for i in range(6)]
            assert len({event_id.split("-")[0] for event_id in ids}) == 1

            # the locks stay with the supervisor: no worker holds the lock file or the lock socket
            held = open_files(pid)
            inode = lock_socket_inode(port)
            assert f"{db}.lock" in held and f"socket:[{inode}]" in held
            for worker in workers:
                assert not {f"{db}.lock", f"socket:[{inode}]"} & open_files(worker)

            checked = subprocess.run(  # check-config takes no lock
                [sys.executable, "-m", "server.cli", "check-config", "--port", str(port), "--db", str(db)],
                capture_output=True,
                timeout=30,
                check=False,
            )
            assert checked.returncode == 0, checked.stderr
            os.kill(pid, signal.SIGTERM)
            assert await first.exit_code(STOP_WITHIN) == 0


async def test_after_kill_9_a_new_sluice_starts_on_the_same_port_and_store_file(tmp_path: Path) -> None:
    db = tmp_path / "sluice.db"
    with trio.fail_after(60):
        async with supervisor(tmp_path, "--workers", "2") as first:
            await first.ready()
            port = first.port
            before = await publish(port, "s", "before")
            os.kill(first.proc.pid, signal.SIGKILL)
            first.proc.wait(timeout=10)
            for worker in first.started():
                os.kill(worker, signal.SIGKILL)
            for worker in first.started():
                await gone(worker)
        assert (tmp_path / "sluice.db.lock").exists()  # left behind; it does not block
        async with supervisor(tmp_path, "--port", str(port), "--db", str(db), name="after") as after:
            await after.ready()
            assert after.port == port
            assert (await request(port, "GET", "/healthz")).status == 200
            later = await publish(port, "s", "after")
            assert later > before and later.split("-")[0] == before.split("-")[0]  # the same history
            os.kill(after.proc.pid, signal.SIGTERM)
            assert await after.exit_code(STOP_WITHIN) == 0


async def test_systemds_sockets_are_locked_too(tmp_path: Path) -> None:
    with socket.socket() as listener, trio.fail_after(40):
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        async with _activated(listener)(tmp_path) as activated:  # type: ignore[attr-defined]
            await activated.ready()
            async with supervisor(tmp_path, "--port", str(port), name="second") as second:
                assert await second.exit_code(20) == 1
                expected = f"another Sluice (pid {activated.proc.pid}) already serves 127.0.0.1:{port}"
                assert expected in second.log()
            os.kill(activated.proc.pid, signal.SIGTERM)
            assert await activated.exit_code(STOP_WITHIN) == 0


async def test_a_reload_onto_a_store_file_in_use_keeps_the_current_one(tmp_path: Path) -> None:
    config = tmp_path / "sluice.toml"
    mine, theirs, fresh = tmp_path / "mine.db", tmp_path / "theirs.db", tmp_path / "fresh.db"
    config.write_text(f'[store]\npath = "{mine}"\n')
    with trio.fail_after(60):
        async with (
            supervisor(tmp_path, "--db", str(theirs), name="theirs") as other,
            supervisor(tmp_path, "--config", str(config), db=False, name="mine") as sup,
        ):
            await other.ready()
            await sup.ready()
            config.write_text(f'[store]\npath = "{theirs}"\n')
            os.kill(sup.proc.pid, signal.SIGHUP)
            await sup.ready(await sup.notes.wait("RELOADING=1"))
            expected = f"store file {theirs} is in use by another Sluice (pid {other.proc.pid})"
            assert re.search(re.escape(expected) + "; keeping the previous configuration", sup.log())

            config.write_text(f'[store]\npath = "{fresh}"\n')  # a free file: taken, the old one let go
            marker = len(sup.notes.messages)
            os.kill(sup.proc.pid, signal.SIGHUP)
            await sup.ready(await sup.notes.wait("RELOADING=1", marker))
            assert "reload complete" in sup.log()
            async with supervisor(tmp_path, "--db", str(mine), name="takes-mine") as takes:
                await takes.ready()  # mine.db is free again
                os.kill(takes.proc.pid, signal.SIGTERM)
                assert await takes.exit_code(STOP_WITHIN) == 0
            async with supervisor(tmp_path, "--db", str(fresh), name="wants-fresh") as wants:
                assert await wants.exit_code(20) == 1
                assert f"store file {fresh} is in use by another Sluice (pid {sup.proc.pid})" in wants.log()
            for running in (sup, other):
                os.kill(running.proc.pid, signal.SIGTERM)
                assert await running.exit_code(STOP_WITHIN) == 0
