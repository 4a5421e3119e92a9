"""The worker pool's parts without processes: crash policy, slot sockets, config hand-over."""

from __future__ import annotations

import gc
import os
import re
import signal
import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from server.config import Config, ConfigError, load_config
from server.process.backoff import CrashPolicy, SlotBackoff
from server.process.gctune import THRESHOLDS
from server.process.signals import hold_signals
from server.process.slots import describe_exit, resolve_workers
from server.process.sockets import SocketActivationError, activated_sockets, bind_slot_sockets, describe, spread
from server.process.worker import (
    READY_MESSAGE,
    config_from_env,
    config_to_env,
    drain_timing,
    injected_crash,
    run_worker,
)
from tests.client import request


def test_backoff_doubles_to_the_cap_and_resets_after_a_stable_run() -> None:
    backoff = SlotBackoff(CrashPolicy(initial=0.1, maximum=0.5, max_crashes=100, window=60))
    delays = [backoff.record_crash(now=i * 10.0, uptime=1.0) for i in range(5)]
    assert delays == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert backoff.record_crash(now=60.0, uptime=60.0) == 0.1  # it stayed up 60 s: start over
    assert backoff.record_crash(now=61.0, uptime=1.0) == 0.2


def test_a_slot_that_keeps_crashing_is_given_up() -> None:
    backoff = SlotBackoff(CrashPolicy(max_crashes=5, window=60.0))
    assert all(backoff.record_crash(now=float(i), uptime=0.1) is not None for i in range(5))
    assert backoff.record_crash(now=5.0, uptime=0.1) is None  # the 6th crash within 60 s
    fresh = SlotBackoff(CrashPolicy(max_crashes=5, window=60.0))
    for i in range(20):  # crashes spread out: old ones leave the window, never given up
        assert fresh.record_crash(now=i * 13.0, uptime=0.1) is not None
    assert fresh.recent_crashes <= 5
    backoff.reset()
    assert backoff.recent_crashes == 0
    assert backoff.record_crash(now=6.0, uptime=0.1) == 0.1


@pytest.fixture
def slot_sockets() -> Iterator[list[socket.socket]]:
    socks = bind_slot_sockets("127.0.0.1", 0, 3)
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def test_slot_sockets_share_the_port_picked_by_the_first(slot_sockets: list[socket.socket]) -> None:
    ports = {sock.getsockname()[1] for sock in slot_sockets}
    assert len(ports) == 1 and ports != {0}
    assert len({sock.fileno() for sock in slot_sockets}) == 3
    for sock in slot_sockets:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    assert describe(slot_sockets[0]) == f"127.0.0.1:{ports.pop()}"


def test_binding_a_taken_port_fails_and_closes_what_it_made(slot_sockets: list[socket.socket]) -> None:
    with socket.socket() as plain:  # no SO_REUSEPORT: nobody else may bind its port
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        with pytest.raises(OSError):
            bind_slot_sockets("127.0.0.1", plain.getsockname()[1], 2)


def test_spread_round_robin(slot_sockets: list[socket.socket]) -> None:
    a, b, c = slot_sockets
    assert spread([a], 3) == [[a], [a], [a]]
    assert spread([a, b], 3) == [[a], [b], [a]]
    assert spread([a, b, c], 2) == [[a, c], [b]]
    with pytest.raises(ValueError):
        spread([], 2)


def test_activation_variables_for_another_process_are_ignored() -> None:
    assert activated_sockets({}) == []
    assert activated_sockets({"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid() + 1)}) == []
    with pytest.raises(SocketActivationError, match="LISTEN_PID"):
        activated_sockets({"LISTEN_FDS": "1", "LISTEN_PID": "me"})
    with pytest.raises(SocketActivationError, match="LISTEN_FDS"):
        activated_sockets({"LISTEN_FDS": "two", "LISTEN_PID": str(os.getpid())})


def test_describe_exit() -> None:
    assert describe_exit(0) == "exited with status 0"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(None) == "is still running"


def test_workers_zero_means_one_per_cpu_and_one_for_memory() -> None:
    assert resolve_workers(load_config({"server": {"workers": 3}}, environ={})) == 3
    assert resolve_workers(load_config({"server": {"workers": 0}, "store": {"backend": "memory"}}, environ={})) == 1
    assert resolve_workers(load_config(environ={})) == len(os.sched_getaffinity(0))
    with pytest.raises(ConfigError, match=re.escape('server.workers: must be 1 with store.backend = "memory"')):
        load_config({"server": {"workers": 2}, "store": {"backend": "memory"}}, environ={})


def test_config_survives_the_trip_to_the_worker() -> None:
    config = load_config(
        {"server": {"port": 0, "workers": 2, "log_level": "debug"}, "sse": {"retry_ms": 1234}}, environ={}
    )
    assert config_from_env(config_to_env(config)) == config
    assert config_from_env(config_to_env(Config())) == Config()
    with pytest.raises(ConfigError):
        config_from_env("not json")
    with pytest.raises(ConfigError, match=re.escape("server.port")):
        config_from_env('{"server": {"port": -1}}')


def test_drain_timing_and_crash_hook() -> None:
    window, deadline = drain_timing(Config())
    assert 0 <= window < deadline
    assert injected_crash(1, {"SLUICE_WORKER_CRASH_SLOTS": "0, 1"})
    assert not injected_crash(2, {"SLUICE_WORKER_CRASH_SLOTS": "0,1"})
    assert not injected_crash(0, {})


async def test_worker_reports_ready_and_drains_when_the_supervisor_hangs_up(tmp_path: Path) -> None:
    config = load_config({"store": {"path": str(tmp_path / "w.db")}, "drain": {"window": 0.1}}, environ={})
    [listener] = bind_slot_sockets("127.0.0.1", 0, 1)
    ours, theirs = socket.socketpair()
    thresholds = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(run_worker, config, [listener], theirs))
                status = trio.socket.from_stdlib_socket(ours)
                assert await status.recv(64) == READY_MESSAGE
                assert gc.get_threshold() == THRESHOLDS  # the worker tuned the GC before it was ready
                port = listener.getsockname()[1]
                assert (await request(port, "GET", "/healthz")).json() == {"status": "ok", "pid": os.getpid()}
                ours.close()  # the supervisor is gone: the worker drains and returns
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1  # never shut down
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        listener.close()
        theirs.close()
        ours.close()


async def test_a_signal_before_the_worker_started_stops_it(tmp_path: Path) -> None:
    config = load_config({"store": {"path": str(tmp_path / "w.db")}}, environ={})
    [listener] = bind_slot_sockets("127.0.0.1", 0, 1)
    ours, theirs = socket.socketpair()
    try:
        with trio.fail_after(10):
            await run_worker(config, [listener], theirs, held_signals=[signal.SIGTERM])
    finally:
        for sock in (listener, ours, theirs):
            sock.close()


def test_held_signals_are_recorded_not_fatal() -> None:
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        held = hold_signals(signal.SIGUSR1)
        signal.raise_signal(signal.SIGUSR1)
        assert held == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
