"""The supervisor: owns the listening sockets and N shared-nothing worker processes.

``sluice serve`` runs :func:`run_supervisor`, also for one worker. The supervisor:

* refuses to start on an address or store file another live Sluice uses
  (:mod:`server.process.instance`), then binds one SO_REUSEPORT listening socket per worker slot
  (or takes systemd's sockets) and never accepts on them itself: it holds no client connection;
* starts one worker process per slot (``python -m server.process.worker``, a fresh interpreter)
  that inherits its slot's socket, and tells systemd ``READY=1`` once every slot's worker has
  reported READY;
* replaces a worker that exits unexpectedly after a backoff (:mod:`server.process.backoff`) and
  gives up on a slot that keeps crashing (reported in the log and ``STATUS=``);
* on SIGHUP reloads the TLS certificate in place in every worker, then re-reads the configuration
  and replaces the workers one slot at a time (a rolling restart: the new worker is READY before
  the old one is asked to drain); with ``server.sighup = "certificate"`` only the former;
* on SIGUSR1 reloads the TLS certificate in place, nothing else;
* on SIGTERM/SIGINT drains every worker in parallel, kills what is left after the drain
  deadline plus :data:`STOP_MARGIN`, and returns 0; with ``[drain] unready_delay`` the workers
  first answer ``/readyz`` with 503 for that long while still accepting and serving, so a load
  balancer's health checks take the host out before anything closes;
* sends ``WATCHDOG=1`` every half watchdog interval when systemd asks for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import trio

from server.config import Config, ConfigError
from server.config_check import check_tls
from server.process import sdnotify
from server.process.backoff import DEFAULT_POLICY, CrashPolicy, SlotBackoff
from server.process.instance import InstanceConflict, InstanceLocks, claim
from server.process.signals import hold_signals
from server.process.slots import Slot, WorkerProcess, describe_exit, resolve_workers
from server.process.sockets import ACTIVATION_VARS, SocketActivationError, bind_slot_sockets, describe
from server.process.worker import (
    CONFIG_ENV,
    READY_MESSAGE,
    UNREADY_MESSAGE,
    config_from_env,
    config_to_env,
    drain_timing,
)

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0  # seconds a new worker has to report READY before it is killed
STOP_MARGIN = 5.0  # seconds past the drain deadline before a draining worker is killed
KILL_WAIT = 5.0  # seconds to wait for a killed worker to be reaped
EXIT_FAILED = 1
# Variables meant for the supervisor alone: a worker must not answer systemd or claim its sockets.
PRIVATE_VARS = (*ACTIVATION_VARS, sdnotify.NOTIFY_SOCKET, sdnotify.WATCHDOG_USEC, sdnotify.WATCHDOG_PID)

ConfigSource = Callable[[], Config]
"""Re-reads the configuration (file, environment, command line) for a reload; raises ConfigError."""


class Supervisor:
    """The supervisor of one ``sluice serve``; see the module docstring. Use :meth:`run` once."""

    def __init__(
        self,
        config: Config,
        config_source: ConfigSource,
        *,
        sockets: list[list[socket.socket]],
        owned: bool,
        environ: Mapping[str, str] | None = None,
        policy: CrashPolicy = DEFAULT_POLICY,
        held_signals: list[int] | None = None,
        locks: InstanceLocks | None = None,
    ) -> None:
        self.config = config
        self._locks = InstanceLocks() if locks is None else locks  # released when run() returns
        self._held = [] if held_signals is None else held_signals
        self.config_source = config_source
        self.environ: dict[str, str] = dict(os.environ if environ is None else environ)
        self.slots = [Slot(i, list(socks), owned, SlotBackoff(policy)) for i, socks in enumerate(sockets)]
        first = sockets[0][0]
        self.host = str(first.getsockname()[0])
        self.port = int(first.getsockname()[1])
        self.address = describe(first)
        self.exit_code = 0
        self._runtime_dir, self._own_runtime_dir = self._make_runtime_dir()
        self._workers: set[WorkerProcess] = set()
        self._stopping = False
        self._stop = trio.Event()
        self._started = trio.Event()
        self._reload_wanted = trio.Event()
        self._change = trio.Event()
        self._hurry = trio.CancelScope()  # the wait for draining workers at shutdown
        self._nursery: trio.Nursery | None = None  # the watchers
        self._control: trio.Nursery | None = None  # start-up, reloads, restarts

    # ---- lifecycle ------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (then 0) or until every slot has failed (then 1)."""
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    # beside the watchers, to the end: pings, and signals (never left pending, as
                    # trio would deliver those again to the default handlers on exit)
                    nursery.start_soon(sdnotify.serve_watchdog, self.environ)
                    nursery.start_soon(self._receive_signals, signals)
                    nursery.start_soon(self._locks.answer_probes)
                    async with trio.open_nursery() as control:
                        self._control = control
                        control.start_soon(self._reloader)
                        control.start_soon(self._startup)
                        await self._stop.wait()
                        self._stopping = True
                        control.cancel_scope.cancel()
                    await self._shutdown()
                    nursery.cancel_scope.cancel()
            finally:
                self._cleanup()
        return self.exit_code

    async def _receive_signals(self, signals: Any) -> None:
        for signum in self._held:  # arrived before the receiver was open
            self._on_signal(signum)
        async for signum in signals:
            self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stop.is_set():
            if signum == signal.SIGINT:  # a second Ctrl-C: do not wait for the drains
                log.warning("received SIGINT while stopping: killing the workers now")
                self._hurry.cancel()
        elif signum == signal.SIGHUP:
            self._reload_certificates()  # new handshakes get the new pair at once, on every worker
            if self.config.server.sighup == "restart":
                log.info("received SIGHUP: reload queued")
                self._reload_wanted.set()
        elif signum == signal.SIGUSR1:
            self._reload_certificates()
        else:
            log.info("received %s: stopping", name)
            self._stop.set()

    async def _startup(self) -> None:
        log.info("listening on %s with %d worker slot(s)", self.address, len(self.slots))
        for slot in self.slots:
            async with slot.lock:
                await self._start_current(slot, self.config)
        await self._wait_until(lambda: self._all_ready() or self._stop.is_set())
        if self._stop.is_set():
            return
        status = self._status()
        log.info("ready: %s", status)
        self._notify(f"READY=1\nSTATUS={status}")
        self._started.set()

    async def _shutdown(self) -> None:
        _, deadline = drain_timing(self.config)
        delay = self.config.drain.unready_delay
        workers = list(self._workers)
        for w in workers:
            w.retiring = True
        with self._hurry:  # a second SIGINT cancels it: the workers are killed at once
            self._hurry.deadline = trio.current_time() + delay + deadline + STOP_MARGIN
            if delay > 0:
                for w in workers:
                    with contextlib.suppress(OSError):
                        await w.status.send(UNREADY_MESSAGE)
                self._notify(f"STOPPING=1\nSTATUS=stopping: /readyz answers 503, draining in {delay:g}s")
                log.info("stopping: /readyz answers 503 for %gs before the workers drain", delay)
                with trio.move_on_after(delay):  # workers the signal reached too (Ctrl-C) are gone sooner
                    await self._wait_until(lambda: all(w.exited.is_set() for w in workers))
            self._notify("STOPPING=1\nSTATUS=stopping: draining workers")
            for w in workers:
                self._signal(w, signal.SIGTERM)
            for w in workers:
                await w.exited.wait()
        await self._kill_leftovers(workers)
        log.info("stopped")

    async def _kill_leftovers(self, workers: Iterable[WorkerProcess]) -> None:
        left = [w for w in workers if not w.exited.is_set()]
        for w in left:
            log.warning("slot %d: worker pid %d did not exit in time: killing it", w.slot, w.pid)
            self._signal(w, signal.SIGKILL)
        with trio.move_on_after(KILL_WAIT):
            for w in left:
                await w.exited.wait()

    def _cleanup(self) -> None:
        for w in list(self._workers):
            if w.process.returncode is None:
                with contextlib.suppress(OSError):
                    w.process.kill()
        closed: set[int] = set()
        for slot in self.slots:
            for sock in slot.sockets:
                if id(sock) not in closed:
                    closed.add(id(sock))
                    sock.close()
        if self._own_runtime_dir:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
        self._locks.close()

    def _make_runtime_dir(self) -> tuple[str, bool]:
        given = self.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        if given:
            return given, False
        return tempfile.mkdtemp(prefix="sluice-"), True

    # ---- workers --------------------------------------------------------------------------

    def _worker_env(self, config: Config) -> dict[str, str]:
        env = {k: v for k, v in self.environ.items() if k not in PRIVATE_VARS}
        env[CONFIG_ENV] = config_to_env(config)
        return env

    async def _spawn(self, slot: Slot, config: Config) -> WorkerProcess:
        """Start a worker on ``slot``'s sockets (not yet the slot's current worker)."""
        assert self._nursery is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            fds = [sock.fileno() for sock in slot.sockets]
            argv = [sys.executable, "-m", "server.process.worker", "--slot", str(slot.index)]
            argv += [f"--listen-fd={fd}" for fd in fds]
            argv += ["--status-fd", str(theirs.fileno()), "--peers-dir", self._runtime_dir]
            process = await trio.lowlevel.open_process(
                argv, pass_fds=(*fds, theirs.fileno()), env=self._worker_env(config)
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        w = WorkerProcess(slot.index, process, trio.socket.from_stdlib_socket(ours), trio.current_time())
        self._workers.add(w)
        self._nursery.start_soon(self._watch, w)
        log.info("slot %d: started worker pid %d", slot.index, w.pid)
        return w

    async def _start_current(self, slot: Slot, config: Config) -> None:
        """Start the slot's worker (caller holds ``slot.lock``); a failure to start counts as a crash."""
        try:
            slot.current = await self._spawn(slot, config)
        except OSError as exc:
            self._crashed(slot, uptime=0.0, what=f"cannot start a worker ({exc})")

    async def _watch(self, w: WorkerProcess) -> None:
        """Follow one worker: READY (or killed after START_TIMEOUT), then its exit."""
        try:
            with trio.move_on_after(START_TIMEOUT) as timer:
                buffer = b""
                while READY_MESSAGE not in buffer:
                    try:
                        data = await w.status.recv(4096)
                    except OSError:
                        data = b""
                    if not data:
                        break
                    buffer += data
                else:
                    w.ready.set()
                    w.settled.set()
                    self._on_ready(w)
            if timer.cancelled_caught and w.process.returncode is None:
                log.error("slot %d: worker pid %d not ready after %.0fs: killing it", w.slot, w.pid, START_TIMEOUT)
                self._signal(w, signal.SIGKILL)
            await w.process.wait()
        finally:
            w.status.close()
            w.exited.set()
            w.settled.set()
            self._workers.discard(w)
        self._on_exit(w)
        self._changed()

    def _on_ready(self, w: WorkerProcess) -> None:
        slot = self.slots[w.slot]
        log.info("slot %d: worker pid %d ready (%.2fs)", w.slot, w.pid, trio.current_time() - w.started_at)
        if slot.current is w and self._started.is_set() and not self._stopping:
            self._notify(f"STATUS={self._status()}")
        self._changed()

    def _on_exit(self, w: WorkerProcess) -> None:
        slot = self.slots[w.slot]
        what = describe_exit(w.process.returncode)
        if w.retiring or self._stopping:
            log.info("slot %d: worker pid %d %s", w.slot, w.pid, what)
            return
        if slot.current is not w:
            log.error("slot %d: new worker pid %d %s before it was ready", w.slot, w.pid, what)
            return
        slot.current = None
        self._crashed(slot, uptime=trio.current_time() - w.started_at, what=f"worker pid {w.pid} {what}")

    def _crashed(self, slot: Slot, *, uptime: float, what: str) -> None:
        delay = slot.backoff.record_crash(trio.current_time(), uptime)
        if delay is None:
            self._give_up(slot, what)
            return
        log.error("slot %d: %s after %.1fs; restarting it in %.1fs", slot.index, what, uptime, delay)
        assert self._control is not None
        self._control.start_soon(self._restart_later, slot, delay)

    async def _restart_later(self, slot: Slot, delay: float) -> None:
        await trio.sleep(delay)
        async with slot.lock:
            if slot.current is None and not slot.failed and not self._stopping:
                await self._start_current(slot, self.config)

    def _give_up(self, slot: Slot, what: str) -> None:
        slot.failed = True
        policy = slot.backoff.policy
        message = (
            f"slot {slot.index} failed: {what}; more than {policy.max_crashes} crashes within "
            f"{policy.window:g}s, not restarting it until the next reload"
        )
        log.error("%s", message)
        if slot.owned:  # nobody accepts there: stop the kernel from queueing connections on it
            for sock in slot.sockets:
                sock.close()
            slot.sockets = []
        self._notify(f"STATUS={message}; {self._status()}")
        if all(s.failed for s in self.slots):
            log.error("every worker slot has failed: exiting")
            self.exit_code = EXIT_FAILED
            self._stop.set()
        self._changed()

    def _signal(self, w: WorkerProcess, signum: int) -> None:
        if w.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                w.process.send_signal(signum)

    # ---- reload ---------------------------------------------------------------------------

    def _reload_certificates(self) -> None:
        """SIGUSR1 (and the start of SIGHUP): every worker loads the certificate and key again, in
        place (no restart, no connection closed); a pair that does not load is refused here, once,
        for all of them. Nothing to do without TLS."""
        if not self.config.server.tls_enabled:
            return
        problem = None
        try:
            check_tls(self.config)
        except ConfigError as exc:
            problem = exc
        if problem is not None:
            log.error("certificate reload: %s; the workers keep the current one", problem)
            return
        workers = [slot.current for slot in self.slots if slot.current is not None]
        log.info("certificate reload: telling %d worker(s)", len(workers))
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGUSR1)

    async def _reloader(self) -> None:
        await self._started.wait()
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted = trio.Event()  # a SIGHUP from now on queues one more reload
            await self._reload()

    async def _reload(self) -> None:
        self._notify(f"RELOADING=1\nMONOTONIC_USEC={sdnotify.monotonic_usec()}\nSTATUS=reloading")
        config = self.config
        problem: Exception | None = None
        try:
            config = self._settle(self.config_source())
            check_tls(config)
        except ConfigError as exc:
            problem = exc
        if problem is None:
            try:  # a new store file is ours alone, as the first one
                self._locks.lock_store(config)
            except InstanceConflict as exc:
                config, problem = self.config, exc
            except ConfigError:
                pass  # an unusable path: the new worker reports it, and the reload stops there
        if problem is not None:
            log.error("reload: %s; keeping the previous configuration", problem)
        else:
            logging.getLogger().setLevel(config.server.log_level.upper())
        if config.store.backend == "memory":
            log.warning("reload: the memory store's history does not survive the worker's replacement")
        log.info("reload: replacing %d worker(s) one at a time", len(self.slots))
        failed: list[int] = []
        stopped = False
        for slot in self.slots:
            self._notify(f"STATUS=reloading: slot {slot.index + 1}/{len(self.slots)}")
            was_failed = slot.failed
            if await self._replace(slot, config):
                continue
            failed.append(slot.index)
            if not was_failed:  # a serving slot could not be replaced: the new setup is suspect
                log.error("reload stopped at slot %d; the remaining slots keep their workers", slot.index)
                stopped = True
                break
        if not stopped:
            self.config = config
            self._locks.release_stores_except(config)  # no worker uses an earlier file any more
            log.info("reload complete")
        status = self._status()
        if failed:
            status += f"; reload failed at slot {', '.join(map(str, failed))}"
        self._notify(f"READY=1\nSTATUS={status}")

    def _settle(self, new: Config) -> Config:
        """``new`` with what a reload cannot change (address, worker count) kept as it is, checked
        again as a whole (e.g. the memory store with several workers); raises ConfigError."""
        old = self.config.server
        changed = [
            key for key, now in (("host", new.server.host), ("port", new.server.port)) if now != getattr(old, key)
        ]
        if resolve_workers(new) != len(self.slots):
            changed.append("workers")
        if changed:
            names = ", ".join(f"server.{key}" for key in changed)
            log.warning("reload: %s changed; that takes a restart, keeping the current value(s)", names)
        server = dataclasses.replace(new.server, host=old.host, port=old.port, workers=old.workers)
        return config_from_env(config_to_env(dataclasses.replace(new, server=server)))

    async def _replace(self, slot: Slot, config: Config) -> bool:
        """Start a new worker on ``slot``; once READY make it current and drain the old one."""
        async with slot.lock:
            if self._stopping:
                return False
            if slot.failed and not slot.sockets:
                slot.sockets = self._rebind(slot)
                if not slot.sockets:
                    return False
            new = await self._try_spawn(slot, config)
            if new is None:
                return False
            with trio.move_on_after(START_TIMEOUT + KILL_WAIT):
                await new.settled.wait()
            if not new.ready.is_set() or new.exited.is_set():
                new.retiring = True
                self._notify(f"STATUS=reload: the new worker for slot {slot.index} failed; kept the old one")
                await self._stop_worker(new, grace=0.0)
                if slot.failed and slot.owned:  # still nobody to accept there
                    for sock in slot.sockets:
                        sock.close()
                    slot.sockets = []
                return False
            old, slot.current = slot.current, new
            slot.failed = False
            slot.backoff.reset()
            self._changed()
        if old is not None:
            _, deadline = drain_timing(self.config)
            await self._stop_worker(old, grace=deadline + STOP_MARGIN)
        return True

    def _rebind(self, slot: Slot) -> list[socket.socket]:
        """A fresh socket for a slot given up earlier (its old one was closed); ``[]`` on failure."""
        problem: OSError | None = None
        try:
            return bind_slot_sockets(self.host, self.port, 1)
        except OSError as exc:
            problem = exc
        log.error("slot %d: cannot listen on %s again: %s", slot.index, self.address, problem)
        return []

    async def _try_spawn(self, slot: Slot, config: Config) -> WorkerProcess | None:
        problem: OSError | None = None
        try:
            return await self._spawn(slot, config)
        except OSError as exc:
            problem = exc
        log.error("slot %d: cannot start a worker: %s", slot.index, problem)
        return None

    async def _stop_worker(self, w: WorkerProcess, *, grace: float) -> None:
        """SIGTERM ``w`` (a drain) and wait up to ``grace`` seconds, then SIGKILL it."""
        w.retiring = True
        if grace > 0:
            self._signal(w, signal.SIGTERM)
            with trio.move_on_after(grace):
                await w.exited.wait()
        await self._kill_leftovers([w])

    # ---- state ----------------------------------------------------------------------------

    def _changed(self) -> None:
        self._change.set()
        self._change = trio.Event()

    async def _wait_until(self, done: Callable[[], bool]) -> None:
        while not done():
            await self._change.wait()

    def _all_ready(self) -> bool:
        live = [s for s in self.slots if not s.failed]
        return bool(live) and all(s.current is not None and s.current.ready.is_set() for s in live)

    def _status(self) -> str:
        ready = sum(1 for s in self.slots if s.current is not None and s.current.ready.is_set())
        text = f"serving on {self.address}: {ready}/{len(self.slots)} workers ready"
        failed = [str(s.index) for s in self.slots if s.failed]
        if failed:
            text += f"; failed slot(s): {', '.join(failed)}"
        return text

    def _notify(self, state: str) -> None:
        sdnotify.notify(state, environ=self.environ)


def run_supervisor(config: Config, config_source: ConfigSource) -> int:
    """Run ``sluice serve``: the supervisor and its workers, until SIGTERM/SIGINT.

    ``config_source`` re-reads the configuration on SIGHUP. Returns the exit status: 0 after a
    signal, 1 when every worker slot failed or systemd's sockets are unusable. Raises
    :class:`ConfigError` for a configuration that cannot be served (address, TLS files)."""
    held = hold_signals(signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    slots = resolve_workers(config)
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, workers=slots))
    check_tls(config)
    locks = InstanceLocks()
    try:
        sockets, owned = claim(config, slots, locks, os.environ)
    except SocketActivationError as exc:
        print(f"sluice: socket activation: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except InstanceConflict as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return EXIT_FAILED
    supervisor = Supervisor(config, config_source, sockets=sockets, owned=owned, held_signals=held, locks=locks)
    return trio.run(supervisor.run)
