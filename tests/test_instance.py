"""The instance locks: one Sluice per address and per store file, never a stale lock."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from server.config import Config, ConfigError, StoreConfig
from server.process.instance import (
    LOCK_BACKLOG,
    InstanceConflict,
    InstanceLocks,
    check_port_free,
    holder_pid,
)


def sqlite_config(path: Path) -> Config:
    return Config(store=StoreConfig(backend="sqlite", path=str(path)))


@pytest.fixture
def port() -> Iterator[int]:
    """A port number no other test uses at the moment (held by a bound, not listening, socket)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@pytest.fixture
def locks() -> Iterator[list[InstanceLocks]]:
    made: list[InstanceLocks] = []
    yield made
    for lock in made:
        lock.close()


def new(locks: list[InstanceLocks]) -> InstanceLocks:
    locks.append(InstanceLocks())
    return locks[-1]


def test_a_second_address_lock_names_the_holder_until_it_is_released(port: int, locks: list[InstanceLocks]) -> None:
    first, second = new(locks), new(locks)
    first.lock_address("127.0.0.1", port)
    first.lock_address("127.0.0.1", port)  # held here already: nothing to do
    assert first.addresses == [f"127.0.0.1:{port}"]
    with pytest.raises(InstanceConflict) as caught:
        second.lock_address("127.0.0.1", port)
    assert str(caught.value) == f"another Sluice (pid {os.getpid()}) already serves 127.0.0.1:{port}"
    second.lock_address("127.0.0.2", port)  # another address, another lock
    second.lock_address("::1", port)
    assert second.addresses == [f"127.0.0.2:{port}", f"[::1]:{port}"]
    first.close()
    second.lock_address("127.0.0.1", port)


def test_port_zero_and_unresolvable_hosts_take_no_address_lock(locks: list[InstanceLocks]) -> None:
    lock = new(locks)
    lock.lock_address("127.0.0.1", 0)
    lock.lock_address("no-such-host.invalid", 8080)
    assert lock.addresses == []


async def test_probes_are_answered_so_the_lock_queue_never_fills(port: int, locks: list[InstanceLocks]) -> None:
    holder = new(locks)
    holder.lock_address("127.0.0.1", port)
    name = f"sluice:addr:127.0.0.1:{port}".encode()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder.answer_probes)
            for _ in range(3 * LOCK_BACKLOG):
                assert await trio.to_thread.run_sync(holder_pid, name) == os.getpid()
            nursery.cancel_scope.cancel()


def test_a_second_store_lock_names_the_file_and_the_holder(tmp_path: Path, locks: list[InstanceLocks]) -> None:
    db = tmp_path / "var" / "sluice.db"
    first, second = new(locks), new(locks)
    first.lock_store(sqlite_config(db))
    first.lock_store(sqlite_config(db))  # held here already
    assert (tmp_path / "var" / "sluice.db.lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(InstanceConflict) as caught:
        second.lock_store(sqlite_config(db))
    assert str(caught.value) == f"store file {db} is in use by another Sluice (pid {os.getpid()})"
    (tmp_path / "link.db").symlink_to(db)  # the same file by another name: the same lock
    with pytest.raises(InstanceConflict):
        second.lock_store(sqlite_config(tmp_path / "link.db"))
    second.lock_store(sqlite_config(tmp_path / "other.db"))
    first.close()
    second.lock_store(sqlite_config(db))
    assert len(second.stores) == 2
    second.release_stores_except(sqlite_config(db))
    assert second.stores == [os.path.realpath(db) + ".lock"]


def test_the_memory_store_takes_no_lock_and_an_unusable_path_is_a_config_error(
    tmp_path: Path, locks: list[InstanceLocks]
) -> None:
    lock = new(locks)
    lock.lock_store(Config(store=StoreConfig(backend="memory", path=str(tmp_path / "m.db"))))
    assert lock.stores == [] and not (tmp_path / "m.db.lock").exists()
    with pytest.raises(ConfigError) as caught:
        lock.lock_store(sqlite_config(Path("/dev/null/not-a-directory/sluice.db")))
    assert caught.value.key == "store.path"


def test_check_port_free_refuses_a_port_listened_on_at_an_overlapping_address() -> None:
    with socket.socket() as plain:
        plain.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        plain.bind(("127.0.0.1", 0))
        plain.listen(8)
        taken = plain.getsockname()[1]
        for host in ("127.0.0.1", "0.0.0.0"):
            with pytest.raises(InstanceConflict, match=f"another process already listens on {host}:{taken}"):
                check_port_free(host, taken)
    check_port_free("127.0.0.1", taken)  # closed: free again
    with socket.socket() as wildcard:  # SO_REUSEPORT would let a real listener join it: refused too
        wildcard.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        wildcard.bind(("0.0.0.0", 0))
        wildcard.listen(8)
        with pytest.raises(InstanceConflict):
            check_port_free("127.0.0.1", wildcard.getsockname()[1])
    check_port_free("127.0.0.1", 0)


# Takes both locks, says so, and waits to be killed.
HOLD = (
    "import sys; from pathlib import Path; from server.config import Config, StoreConfig; "
    "from server.process.instance import InstanceLocks; locks = InstanceLocks(); "
    "locks.lock_store(Config(store=StoreConfig(backend='sqlite', path=sys.argv[1]))); "
    "locks.lock_address('127.0.0.1', int(sys.argv[2])); print('held', flush=True); sys.stdin.read()"
)


async def test_locks_of_another_process_name_it_and_die_with_it(
    tmp_path: Path, port: int, locks: list[InstanceLocks]
) -> None:
    db = tmp_path / "sluice.db"
    with trio.fail_after(30):
        proc = await trio.lowlevel.open_process([sys.executable, "-c", HOLD, str(db), str(port)], stdin=-1, stdout=-1)
        try:
            assert proc.stdout is not None
            said = b""
            while not said.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(100)
                assert chunk, said
                said += chunk
            assert said == b"held\n"
            lock = new(locks)
            with pytest.raises(InstanceConflict, match=f"in use by another Sluice \\(pid {proc.pid}\\)"):
                lock.lock_store(sqlite_config(db))
            with pytest.raises(InstanceConflict, match=f"another Sluice \\(pid {proc.pid}\\) already serves"):
                lock.lock_address("127.0.0.1", port)
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        assert (tmp_path / "sluice.db.lock").read_text() == f"{proc.pid}\n"  # the file stays behind
        lock.lock_store(sqlite_config(db))  # ... and does not block: only the lock counts
        lock.lock_address("127.0.0.1", port)
        assert (tmp_path / "sluice.db.lock").read_text() == f"{os.getpid()}\n"
