"""Start the servers the load test measures, each as a child process on 127.0.0.1.

``open_target(kind, workdir=...)`` starts one of

* ``"sluice"``: ``python -m server.cli serve`` (a supervisor and ``workers`` worker processes,
  SQLite store in ``workdir``, or the store ``config`` names: with ``store.backend = "redis"``
  it runs ``serve --store redis --redis-url URL``; its runtime directory is ``runtime_dir``
  when given, else one the supervisor makes);
* ``"uvicorn"``: :mod:`loadtest.baselines.uvicorn_app` (one process: its streams live in memory);
* ``"nchan"``: nginx + nchan, :mod:`loadtest.baselines.nchan` (a master and ``workers`` workers),

waits until ``GET /healthz`` answers 200, yields a :class:`Target` and stops the server on exit
(SIGTERM, then SIGKILL after :data:`STOP_GRACE` seconds, then SIGKILL for any descendant left).
The server's output goes to ``workdir/<kind>.log``. Nothing is imported from the ``server``
package: Sluice runs as a subprocess only.

``config`` is in Sluice's terms, ``{section: {key: value}}``. For Sluice every entry becomes a
``SLUICE_<SECTION>_<KEY>`` environment variable. The baselines take the keys that have an
equivalent (``store.max_events``: events kept per stream; ``sse.heartbeat``: idle seconds before
a heartbeat; for nchan also ``store.max_age``), ignore the other Sluice keys, and read their own
section (``[uvicorn]``: ``buffer``, ``heartbeat``; ``[nchan]``: ``reuseport``, ``buffer``,
``ping_interval``, ``message_timeout``, ``shared_memory``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Literal

from loadtest.baselines import nchan
from loadtest.sysinfo import process_tree, raise_nofile

Kind = Literal["sluice", "uvicorn", "nchan"]
KINDS: tuple[Kind, ...] = ("sluice", "uvicorn", "nchan")
HOST = "127.0.0.1"
START_TIMEOUT = 30.0  # seconds until /healthz must answer 200
STOP_GRACE = 40.0  # seconds between SIGTERM and SIGKILL
TRANSPORTS: dict[str, frozenset[str]] = {
    "sluice": frozenset({"sse-h1", "sse-h2", "ws-json", "ws-msgpack", "longpoll"}),
    "uvicorn": frozenset({"sse-h1"}),
    "nchan": frozenset({"sse-h1"}),
}
# Set by open_target itself; use its arguments instead.
RESERVED_SLUICE_KEYS = {("server", "host"), ("server", "port"), ("server", "workers")}
STORE_FLAGS = {("store", "backend"), ("store", "redis_url")}  # given as serve's --store and --redis-url
BASELINE_SECTIONS = {"uvicorn", "nchan"}  # options of the baselines, not Sluice configuration
REPO_ROOT = Path(__file__).resolve().parent.parent

Config = Mapping[str, Mapping[str, object]]


@dataclass(frozen=True)
class Target:
    """A running server under test."""

    kind: str
    host: str
    port: int
    pid: int  # the process started: Sluice's supervisor, uvicorn, or nginx's master
    workers: int  # processes serving connections
    log_path: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def supports_close(self) -> bool:
        """Whether ``POST /v1/streams/{s}/close`` ends subscriptions with ``sluice.end``."""
        return self.kind != "nchan"

    @property
    def supports_transports(self) -> frozenset[str]:
        return TRANSPORTS[self.kind]


class TargetError(RuntimeError):
    """The server did not start (the message carries the end of its log)."""


@contextmanager
def open_target(
    kind: str,
    *,
    workdir: Path,
    workers: int = 2,
    config: dict[str, dict[str, object]] | None = None,
    runtime_dir: Path | None = None,
) -> Iterator[Target]:
    """Run the server ``kind`` until the block exits; see the module documentation."""
    if kind not in KINDS:
        raise ValueError(f"unknown target kind {kind!r}; expected one of {', '.join(KINDS)}")
    if workers < 1:
        raise ValueError("workers must be at least 1")
    raise_nofile()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{kind}.log"
    cfg: Config = config or {}
    with log_path.open("ab") as log:
        if kind == "sluice":
            proc, target = _start_sluice(workdir, log, log_path, workers, cfg, runtime_dir=runtime_dir)
        elif kind == "uvicorn":
            proc, target = _start_uvicorn(workdir, log, log_path, cfg)
        else:
            proc, target = _start_nchan(workdir, log, log_path, workers, cfg)
    try:
        yield target
    finally:
        stop(proc)


# --- Sluice -------------------------------------------------------------------------------------


def sluice_env(config: Config) -> dict[str, str]:
    """This process's environment without SLUICE_*/systemd variables, plus ``config`` as SLUICE_*."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLUICE_", "LISTEN_", "WATCHDOG_"))
        and k not in ("NOTIFY_SOCKET", "SLUICE_CONFIG", "RUNTIME_DIRECTORY")
    }
    # The load comes from a few loopback addresses (8,000 connections each): no per-address cap.
    env["SLUICE_LIMITS_MAX_CONNECTIONS_PER_ADDRESS"] = "0"
    for section, keys in config.items():
        if section in BASELINE_SECTIONS:
            continue
        for key, value in keys.items():
            if (section, key) in STORE_FLAGS:
                continue  # a flag of the command line (store_args)
            if (section, key) in RESERVED_SLUICE_KEYS:
                raise ValueError(f"{section}.{key} is set by open_target; use its arguments")
            env[f"SLUICE_{section.upper()}_{key.upper()}"] = _text(value)
    return env


def store_args(config: Config, workdir: Path) -> list[str]:
    """The store's flags of ``sluice serve``: ``--store`` and ``--redis-url`` as ``config`` gives
    them, and ``--db`` in ``workdir`` for the SQLite store unless ``store.path`` is set."""
    store = config.get("store", {})
    backend = str(store.get("backend", "sqlite"))
    out = ["--store", backend] if "backend" in store else []
    if "redis_url" in store:
        out += ["--redis-url", str(store["redis_url"])]
    if backend == "sqlite" and "path" not in store:
        out += ["--db", str(workdir / "sluice.db")]
    return out


def _start_sluice(
    workdir: Path, log: IO[bytes], log_path: Path, workers: int, config: Config, *, runtime_dir: Path | None
) -> tuple[subprocess.Popen[bytes], Target]:
    env = _with_pythonpath(sluice_env(config))
    if runtime_dir is not None:  # the supervisor's runtime directory: its workers' bus and metrics
        runtime_dir.mkdir(parents=True, exist_ok=True)
        env["RUNTIME_DIRECTORY"] = str(runtime_dir)
    level = str(config.get("server", {}).get("log_level", "info")).lower()
    # The port is read from the supervisor's "listening on" line, logged at INFO.
    fixed_port = None if level in ("info", "debug") else free_port()
    argv = [sys.executable, "-m", "server.cli", "serve", "--host", HOST, "--port", str(fixed_port or 0)]
    argv += ["--workers", str(workers), *store_args(config, workdir)]
    offset = log_path.stat().st_size
    proc = _spawn(argv, log, workdir, env)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        port = fixed_port or _wait_log(proc, log_path, offset, re.compile(r"listening on [^\s]*:(\d+) "), deadline)
        if fixed_port is None:
            _wait_log(proc, log_path, offset, re.compile(r"ready: serving on [^\s]*:(\d+)"), deadline)
        _wait_healthy(proc, port, deadline, log_path)
    except BaseException:
        stop(proc)
        raise
    return proc, Target("sluice", HOST, port, proc.pid, workers, log_path)


# --- uvicorn ------------------------------------------------------------------------------------


def _start_uvicorn(
    workdir: Path, log: IO[bytes], log_path: Path, config: Config
) -> tuple[subprocess.Popen[bytes], Target]:
    own = _own_section(config, "uvicorn", {"buffer", "heartbeat"})
    buffer = own.get("buffer", config.get("store", {}).get("max_events", 10_000))
    heartbeat = own.get("heartbeat", config.get("sse", {}).get("heartbeat", 15.0))
    argv = [sys.executable, "-m", "loadtest.baselines.uvicorn_app", "--host", HOST, "--port", "0"]
    argv += ["--buffer", _text(buffer), "--heartbeat", _text(heartbeat)]
    offset = log_path.stat().st_size
    proc = _spawn(argv, log, workdir, _with_pythonpath(dict(os.environ)))
    try:
        deadline = time.monotonic() + START_TIMEOUT
        port = _wait_log(proc, log_path, offset, re.compile(r"listening on http://[^\s]*:(\d+)"), deadline)
        _wait_healthy(proc, port, deadline, log_path)
    except BaseException:
        stop(proc)
        raise
    return proc, Target("uvicorn", HOST, port, proc.pid, 1, log_path)


# --- nginx + nchan ------------------------------------------------------------------------------


def _start_nchan(
    workdir: Path, log: IO[bytes], log_path: Path, workers: int, config: Config
) -> tuple[subprocess.Popen[bytes], Target]:
    own = _own_section(config, "nchan", {"reuseport", "buffer", "ping_interval", "message_timeout", "shared_memory"})
    store, sse = config.get("store", {}), config.get("sse", {})
    max_age = float(str(store.get("max_age", 0)))
    options = nchan.NchanOptions(
        host=HOST,
        workers=workers,
        reuseport=_flag(own.get("reuseport", False)),
        buffer=int(str(own.get("buffer", store.get("max_events", 10_000)))),
        ping_interval=_whole_seconds(own.get("ping_interval", sse.get("heartbeat", 15))),
        message_timeout=int(str(own.get("message_timeout", round(max_age) if max_age > 0 else 3600))),
        shared_memory=str(own.get("shared_memory", "256m")),
        rlimit_nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[1] if os.geteuid() != 0 else 20_000,
    )
    directory = workdir / "nchan"
    for attempt in range(3):  # the port is chosen before nginx binds it: retry if it was taken
        options = replace(options, port=free_port())
        offset = log_path.stat().st_size
        proc = nchan.start(directory, options, log)
        try:
            _wait_healthy(proc, options.port, time.monotonic() + START_TIMEOUT, log_path, directory / "error.log")
        except TargetError as exc:
            stop(proc)
            if attempt < 2 and "Address already in use" in log_path.read_text(errors="replace")[offset:]:
                continue
            raise TargetError(f"nchan: {exc}") from None
        except BaseException:
            stop(proc)
            raise
        return proc, Target("nchan", HOST, options.port, proc.pid, workers, log_path)
    raise AssertionError("unreachable")


# --- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _start_time(pid: int) -> str | None:
    """The start time of ``pid`` from /proc (tells a process from a later one with its pid)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def stop(proc: subprocess.Popen[bytes], grace: float = STOP_GRACE) -> None:
    """SIGTERM ``proc``, SIGKILL it after ``grace`` seconds, then SIGKILL whatever it left behind."""
    family = {p: _start_time(p) for p in process_tree(proc.pid)[1:]} if proc.poll() is None else {}
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 5
    for pid, started in family.items():
        while started is not None and _start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)


def _spawn(argv: list[str], log: IO[bytes], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)


def _wait_log(
    proc: subprocess.Popen[bytes], log_path: Path, offset: int, pattern: re.Pattern[str], deadline: float
) -> int:
    """Wait for ``pattern`` in the log written since ``offset``; its first group as an int."""
    while True:
        with log_path.open("rb") as f:
            f.seek(offset)
            match = pattern.search(f.read().decode(errors="replace"))
        if match:
            return int(match.group(1))
        _check_alive(proc, deadline, log_path)
        time.sleep(0.05)


def _wait_healthy(
    proc: subprocess.Popen[bytes], port: int, deadline: float, log_path: Path, *more_logs: Path
) -> None:
    while True:
        with (
            contextlib.suppress(OSError, http.client.HTTPException),
            contextlib.closing(http.client.HTTPConnection(HOST, port, timeout=2)) as conn,
        ):
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        _check_alive(proc, deadline, log_path, *more_logs)
        time.sleep(0.05)


def _check_alive(proc: subprocess.Popen[bytes], deadline: float, *logs: Path) -> None:
    code = proc.poll()
    if code is None and time.monotonic() < deadline:
        return
    what = f"exited with status {code}" if code is not None else f"not ready after {START_TIMEOUT:.0f}s"
    tails = "\n".join(f"--- {log} ---\n{_tail(log)}" for log in logs)
    raise TargetError(f"server {what}: {proc.args!r}\n{tails}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(unreadable: {exc})"


def _with_pythonpath(env: dict[str, str]) -> dict[str, str]:
    """Let the child import this checkout's packages whatever its working directory."""
    parts = [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    return env


def _own_section(config: Config, name: str, allowed: set[str]) -> Mapping[str, object]:
    own = config.get(name, {})
    unknown = set(own) - allowed
    if unknown:
        raise ValueError(f"unknown [{name}] key(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(allowed))}")
    return own


def _whole_seconds(value: object) -> int:
    """nginx takes whole seconds: round, but keep a positive interval positive."""
    seconds = float(str(value))
    return max(1, round(seconds)) if seconds > 0 else 0


def _flag(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _text(value: object) -> str:
    """A config value as its SLUICE_* environment text: lists of strings comma-separated, lists
    of tables as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        if all(isinstance(v, str) for v in value):
            return ",".join(str(v) for v in value)
        return json.dumps(list(value))
    return str(value)
