"""One worker process: ``python -m server.process.worker``, started by the supervisor.

The supervisor starts each worker as a fresh interpreter (so a reload runs the code now on disk)
and hands it:

* its slot's listening socket(s), inherited as ``--listen-fd FD`` (repeatable);
* one end of a socketpair, ``--status-fd FD``: the worker writes ``READY\\n`` once it accepts,
  and treats end-of-file (the supervisor is gone) like SIGTERM; the supervisor writes
  ``UNREADY\\n`` there when the host stops with ``[drain] unready_delay`` (``/readyz`` turns 503,
  everything else goes on until the SIGTERM that follows);
* the configuration as JSON in ``$SLUICE_WORKER_CONFIG`` (``{section: {key: value}}``), rebuilt
  with :func:`server.config.load_config` ignoring the environment;
* ``--peers-dir DIR``, the supervisor's runtime directory, passed on to ``server.app.serve`` as
  ``peers_dir`` (where the host's workers find each other's notice-bus sockets).

SIGTERM or SIGINT drains the worker (``server.process.drain.drain_worker``: ``/readyz`` turns
503, accepting stops, connections end paced over ``[drain] window``, leftovers are aborted at
``[drain] deadline``) and it exits with status 0. The listening socket is never shut down for
the other processes that share it. SIGHUP is ignored: reloads are the supervisor's business.

Fault injection: when ``$SLUICE_WORKER_CRASH_SLOTS`` (comma-separated slot numbers) lists this
worker's slot, the worker exits with status 70 before serving. It exists to exercise the
supervisor's crash policy (tests, staging); nothing sets it by default.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from server.config import Config, ConfigError, load_config
from server.process.drain import drain_worker
from server.process.gctune import run_freeze_policy, tune_gc
from server.process.rlimit import check_open_files
from server.process.signals import hold_signals

if TYPE_CHECKING:
    from server.app import Worker

log = logging.getLogger(__name__)

CONFIG_ENV = "SLUICE_WORKER_CONFIG"
CRASH_SLOTS_ENV = "SLUICE_WORKER_CRASH_SLOTS"
READY_MESSAGE = b"READY\n"
UNREADY_MESSAGE = b"UNREADY\n"  # supervisor to worker: answer /readyz with 503, keep serving
EXIT_INJECTED_CRASH = 70
EXIT_CONFIG = 2
ACCEPT_SETTLE = 0.1  # seconds between the last accept and the first close request of a drain
DRAIN_OVERRUN = 3.0  # seconds past the drain deadline before the worker stops waiting for the drain


def drain_timing(config: Config) -> tuple[float, float]:
    """``(window, deadline)`` in seconds, from the ``[drain]`` section."""
    return config.drain.window, config.drain.deadline


def config_to_env(config: Config) -> str:
    """The value of ``$SLUICE_WORKER_CONFIG`` that makes a worker rebuild ``config``."""
    values = {
        section: {key: value for key, value in keys.items() if value is not None}
        for section, keys in config.as_dict().items()
    }
    return json.dumps(values, separators=(",", ":"))


def config_from_env(text: str) -> Config:
    """The configuration a supervisor encoded with :func:`config_to_env`; :class:`ConfigError` if invalid."""
    try:
        values = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"${CONFIG_ENV} is not JSON: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"${CONFIG_ENV} must be a JSON object")
    return load_config(values, environ={}, config_path=None)


def injected_crash(slot: int, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``$SLUICE_WORKER_CRASH_SLOTS`` lists ``slot`` (see the module docstring)."""
    env = os.environ if environ is None else environ
    listed = {part.strip() for part in env.get(CRASH_SLOTS_ENV, "").split(",")}
    return str(slot) in listed


async def _drain(worker: Worker, config: Config) -> None:
    """Stop accepting, give the connections accepted last a moment to send their first request
    (a connection that has sent nothing when asked to close is closed at once, and its client's
    request, already on the way, would be lost), then drain."""
    window, deadline = drain_timing(config)
    with trio.move_on_after(deadline + DRAIN_OVERRUN):
        worker.ctx.draining = True  # /readyz: 503 before anything else
        worker.http.stop_accepting()  # the listening socket stays open for the slot's next worker
        await trio.sleep(ACCEPT_SETTLE)
        await drain_worker(worker, window=window, deadline=deadline)


async def _stop_on_signal(signals: Any, stop: trio.Event) -> None:
    # Keeps reading to the end: a signal left unread would be delivered again, to the default
    # handler, when the receiver closes (SIGTERM from both systemd and the supervisor, say).
    async for signum in signals:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.debug("received %s while draining", name)
        else:
            log.info("received %s: draining", name)
            stop.set()


async def _reload_certificates(signals: Any, running: list[Worker], config: Config) -> None:
    """On SIGUSR1 (sent by the supervisor), load the configured certificate and key again into the
    live TLS context: new handshakes get the new certificate, open connections are untouched."""
    from server.http.tls import reload_certificate

    async for _ in signals:
        server = config.server
        context = running[0].http.ssl_context if running else None
        if context is None or not (server.tls_cert and server.tls_key):
            continue
        problem = None
        try:
            reload_certificate(context, server.tls_cert, server.tls_key)
        except (OSError, ssl.SSLError) as exc:
            problem = exc
        if problem is None:
            log.info("certificate reloaded from %s", server.tls_cert)
        else:
            log.error("certificate reload failed, keeping the current one: %s", problem)


async def _follow_supervisor(status: trio.socket.SocketType, stop: trio.Event, unready: Callable[[], None]) -> None:
    """Read the status socket: ``UNREADY`` calls ``unready`` (at once, in this task); end-of-file
    (the supervisor is gone) sets ``stop``."""
    buffer = b""
    while True:
        try:
            data = await status.recv(4096)
        except OSError:
            data = b""
        buffer = (buffer + data)[-len(UNREADY_MESSAGE) :]
        if UNREADY_MESSAGE in buffer:
            unready()
        if not data:
            if not stop.is_set():
                log.warning("supervisor is gone: draining")
                stop.set()
            return


async def run_worker(
    config: Config,
    listeners: list[socket.socket],
    status: socket.socket,
    *,
    peers_dir: str | None = None,
    held_signals: list[int] | None = None,
) -> None:
    """Serve ``config`` on ``listeners`` until SIGTERM/SIGINT or the supervisor hangs up, then drain.

    Writes ``READY\\n`` on ``status`` once ``server.app.serve`` accepts, having tuned the cyclic GC
    (:mod:`server.process.gctune`) for the objects start-up made. Returns after the drain.
    ``held_signals`` (see :func:`server.process.signals.hold_signals`) counts as a signal already
    received when it is not empty."""
    from server.app import serve  # here, not at the top: the supervisor imports this module too

    tstatus = trio.socket.from_stdlib_socket(status)
    stop = trio.Event()
    unready = trio.Event()  # the host is stopping: /readyz answers 503 until the drain
    with (
        trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals,
        trio.open_signal_receiver(signal.SIGUSR1) as usr1,
    ):
        if held_signals:
            log.info("received %s while starting: stopping", signal.Signals(held_signals[0]).name)
            stop.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, signals, stop)
            running: list[Worker] = []

            def turn_unready() -> None:  # no task hop: /readyz says 503 from the next request on
                unready.set()
                if running:
                    running[0].ctx.draining = True

            nursery.start_soon(_follow_supervisor, tstatus, stop, turn_unready)
            nursery.start_soon(_reload_certificates, usr1, running, config)

            async def start(serving: trio.Nursery) -> None:
                running.append(await serving.start(partial(serve, config, listeners=listeners, peers_dir=peers_dir)))
                tune_gc()  # freeze what start-up made
                serving.start_soon(run_freeze_policy)
                serving.start_soon(_turn_unready, unready, running[0])
                try:
                    await tstatus.send(READY_MESSAGE)
                except OSError:
                    stop.set()  # no supervisor to tell: wind down at once

            async with trio.open_nursery() as serving:
                serving.start_soon(start, serving)
                await stop.wait()
                if running:
                    await _drain(running[0], config)
                serving.cancel_scope.cancel()
            nursery.cancel_scope.cancel()


async def _turn_unready(unready: trio.Event, worker: Worker) -> None:
    await unready.wait()
    log.info("host stopping: /readyz answers 503 until the drain")
    worker.ctx.draining = True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server.process.worker", description="One Sluice worker.")
    parser.add_argument("--slot", type=int, required=True, help="worker slot number (for logs)")
    parser.add_argument("--listen-fd", type=int, action="append", required=True, help="inherited listening socket")
    parser.add_argument("--status-fd", type=int, required=True, help="inherited socket to report READY on")
    parser.add_argument("--peers-dir", help="the supervisor's runtime directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one worker; the exit status is 0 after a drain, 2 for a bad configuration, 1 on failure."""
    held = hold_signals(signal.SIGTERM, signal.SIGINT)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads are the supervisor's business
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a certificate reload before serving: nothing to do
    args = _parser().parse_args(argv)
    try:
        config = config_from_env(os.environ.get(CONFIG_ENV, "{}"))
    except ConfigError as exc:
        print(f"sluice worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format=f"%(asctime)s %(levelname)s worker{args.slot}[%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    check_open_files(config.limits.max_connections)
    if injected_crash(args.slot):
        log.error("exiting at start: slot %d is listed in $%s", args.slot, CRASH_SLOTS_ENV)
        return EXIT_INJECTED_CRASH
    listeners = [socket.socket(fileno=fd) for fd in args.listen_fd]
    status = socket.socket(fileno=args.status_fd)
    try:
        trio.run(partial(run_worker, config, listeners, status, peers_dir=args.peers_dir, held_signals=held))
    except KeyboardInterrupt:
        return 0
    except Exception:
        log.exception("worker failed")
        return 1
    finally:
        status.close()
        for sock in listeners:
            sock.detach()  # leave the descriptor to exit: never shut a shared listener down
    log.info("drained; exiting")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
