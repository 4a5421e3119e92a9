"""Whole-host ``/metrics`` for shared-nothing workers: snapshot files in the runtime directory.

Workers share no memory, only the supervisor's runtime directory (``peers_dir``). Each worker
(:class:`HostMetrics`) writes its samples (:mod:`server.observability.metrics`) to
``<peers_dir>/metrics/<pid>-<token>.json`` every :data:`SNAPSHOT_INTERVAL` seconds, before
answering each ``/metrics`` request, and when it stops; a write is a temporary file plus
``os.replace``, so a reader sees a whole snapshot or the previous one. The worker answering
``/metrics`` adds its live counters to the other files.

* **Counters never go backwards across a worker's exit.** A dead worker's last snapshot stays in
  the totals. Since a worker writes its snapshot before it answers, every value it ever reported
  is at most what its file holds, so whichever worker answers next sees at least as much (a
  scrape within :data:`SCRAPE_REUSE` of the last write reports that snapshot, not live values, so
  a flood of scrapes costs at most ten writes a second).
  Dead workers' files are *folded* (:meth:`HostMetrics.fold`) into ``retired.json`` by whichever
  live worker takes ``fold.lock`` first (``flock``, non-blocking: a busy lock skips the turn),
  so the directory holds about one file per live worker however many reloads happen.
  ``retired.json`` also lists the names it folded last (:data:`FOLDED_KEEP`): a fold writes it
  *before* removing those files, and a reader reads the workers' files *before* it, skipping the
  listed names; so a reader racing a fold counts each worker once, and a fold interrupted
  between the two steps is finished (files removed, not added again) by the next one.
* **Gauges count live workers only**: a file's gauges are added when its pid exists
  (``os.kill(pid, 0)``; ``EPERM`` counts as alive) and it was written in the last
  :data:`STALE_AFTER` seconds; the age check also keeps a reused pid from holding a dead worker's
  gauges up. The supervisor knows its workers better, but workers do not talk to it, and a
  signal-0 probe needs no protocol. ``sluice_workers`` counts this worker plus those files.
* **Bounded**: a snapshot is one small JSON object (a few hundred samples at most); at most
  :data:`MAX_FILES` files of at most :data:`MAX_SNAPSHOT_BYTES` are read per request or fold.
  The reads and writes are synchronous, on the trio thread, like :mod:`server.bus.local_dir`:
  the runtime directory is a memory file system under systemd (``/run``), the files are tiny and
  few, and it happens once a second and once per scrape; a thread hop would cost more than the
  read. Nothing here ever waits on a lock another process holds.
* Without ``peers_dir`` (one in-process worker), only this worker's counters are rendered.
* **Which server this is**: a worker given ``peers_dir`` runs under a supervisor (the supervisor
  passes its runtime directory to the workers it starts, as their parent), so it renders
  ``sluice_supervisor_info{pid="<its parent's pid>"} 1``: the process whose tree is the whole
  server, for tools on the host (the load-test harness) that must not guess it from process names.
* A runtime directory kept across restarts (``RuntimeDirectoryPreserve=``) keeps the retired
  counters too: the totals then continue from the last run instead of starting from zero.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

import trio

from server.observability.metrics import SUPERVISOR_INFO, WORKERS, Samples, key, render

log = logging.getLogger(__name__)

SNAPSHOT_INTERVAL = 1.0  # seconds between a worker's snapshot writes (and folds)
SCRAPE_REUSE = 0.1  # seconds a scrape reuses this worker's last snapshot instead of writing a new one
STALE_AFTER = 10.0  # seconds after which a snapshot's gauges no longer count (its counters always do)
MAX_FILES = 256  # snapshot files read per render or fold
MAX_SNAPSHOT_BYTES = 256 * 1024  # a larger file is ignored
FOLDED_KEEP = 1024  # names of folded files remembered in retired.json
SUBDIR, SUFFIX = "metrics", ".json"
RETIRED, LOCK = "retired.json", "fold.lock"


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists (a zombie does, until reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def metrics_dir(peers_dir: str | None) -> str | None:
    """Where the host's snapshots live, for a worker given ``peers_dir`` (``None``: nowhere)."""
    return None if peers_dir is None else os.path.join(peers_dir, SUBDIR)


def _pid_of(name: str) -> int | None:
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _values(raw: object) -> dict[str, int]:
    """The well-formed ``{key: non-negative int}`` entries of a decoded map."""
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if isinstance(k, str) and type(v) is int and v >= 0}


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` if missing, too large or not an object."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SNAPSHOT_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_SNAPSHOT_BYTES:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def write_json(path: str, value: dict[str, Any]) -> None:
    """Replace ``path`` atomically with ``value`` (a temporary file, then ``os.replace``)."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, separators=(",", ":"))
    os.replace(tmp, path)


class HostMetrics:
    """This worker's share of the host's ``/metrics`` (see the module docstring).

    ``collect`` returns the worker's live samples; ``directory`` is the shared snapshot
    directory (``None``: render this worker alone). ``alive`` and ``clock`` (wall time) are
    replaceable for tests.
    """

    def __init__(
        self,
        directory: str | None,
        collect: Callable[[], Samples],
        *,
        alive: Callable[[int], bool] = pid_alive,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.collect = collect
        self.alive = alive
        self.clock = clock
        self.pid = os.getpid()
        # a peers_dir comes from the supervisor, which started this worker: its parent
        self.supervisor: int | None = os.getppid() if directory is not None else None
        self.name = f"{self.pid}-{secrets.token_hex(4)}{SUFFIX}"  # unique even for workers sharing a process
        self._last: tuple[float, Samples] | None = None  # (time.monotonic(), samples) of the last write
        if directory is not None:
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            except OSError as exc:
                log.warning("metrics: cannot create %s, reporting this worker only: %s", directory, exc)
                self.directory = None

    # ---- writing ----------------------------------------------------------------------------

    def write(self, samples: Samples | None = None) -> Samples:
        """Write this worker's snapshot (``samples``, or freshly collected ones); return them.
        A failed write is logged and skipped (the previous snapshot stays)."""
        samples = self.collect() if samples is None else samples
        self._last = (time.monotonic(), samples)
        if self.directory is not None:
            snapshot: dict[str, Any] = {"pid": self.pid, "written": self.clock()}
            snapshot |= {"counters": samples.counters, "gauges": samples.gauges}
            try:
                write_json(os.path.join(self.directory, self.name), snapshot)
            except OSError as exc:
                log.warning("metrics: cannot write the snapshot in %s: %s", self.directory, exc)
        return samples

    async def run(self, interval: float = SNAPSHOT_INTERVAL) -> None:
        """Write and fold every ``interval`` seconds; write a last snapshot when cancelled."""
        if self.directory is None:
            return
        try:
            while True:
                self.write()
                self.fold()
                await trio.sleep(interval)
        finally:
            self.write()

    # ---- reading ----------------------------------------------------------------------------

    def _listing(self) -> list[str]:
        """Other workers' snapshot names (at most :data:`MAX_FILES`)."""
        assert self.directory is not None
        names: list[str] = []
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    name = entry.name
                    if name.endswith(SUFFIX) and name != self.name and _pid_of(name) is not None:
                        names.append(name)
                        if len(names) >= MAX_FILES:
                            log.warning("metrics: more than %d snapshots in %s", MAX_FILES, self.directory)
                            break
        except OSError as exc:
            log.warning("metrics: cannot list %s: %s", self.directory, exc)
        return names

    def totals(self) -> Samples:
        """The host's samples: this worker's live ones (written to its snapshot first, unless it
        was written in the last :data:`SCRAPE_REUSE` seconds: then those), plus the others'
        snapshots and the retired counters; ``sluice_workers`` added."""
        out = Samples()
        last = self._last
        fresh = last is not None and time.monotonic() - last[0] < SCRAPE_REUSE
        out.add(last[1] if fresh and last is not None else self.write())  # a flood of scrapes: 10 writes/s
        workers = 1
        if self.directory is not None:
            peers = [(name, read_json(os.path.join(self.directory, name))) for name in self._listing()]
            retired = read_json(os.path.join(self.directory, RETIRED)) or {}  # after the files: see docstring
            folded = set(retired.get("folded") or ())
            out.add(Samples(_values(retired.get("counters"))), gauges=False)
            now = self.clock()
            for name, snap in peers:
                if snap is None or name in folded:
                    continue
                pid = _pid_of(name)
                written = snap.get("written")
                live = (
                    pid is not None
                    and isinstance(written, int | float)
                    and now - written <= STALE_AFTER
                    and self.alive(pid)
                )
                out.add(Samples(_values(snap.get("counters")), _values(snap.get("gauges"))), gauges=live)
                workers += live
        out.gauges[WORKERS] = workers
        return out

    def render(self) -> bytes:
        """``/metrics``: the host's totals in the text format, and the supervisor's pid as an
        info gauge when this worker has one."""
        samples = self.totals()
        if self.supervisor is not None:
            samples.gauges[key(SUPERVISOR_INFO, {"pid": self.supervisor})] = 1
        return render(samples)

    # ---- folding ----------------------------------------------------------------------------

    def fold(self) -> int:
        """Move the counters of dead workers' snapshots into ``retired.json`` and remove their
        files; the number folded (0 when there is none, or another worker holds the lock)."""
        if self.directory is None:
            return 0
        dead = [name for name in self._listing() if not self.alive(_pid_of(name) or 0)]
        if not dead:
            return 0
        try:
            lock = os.open(os.path.join(self.directory, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            log.warning("metrics: cannot open the fold lock in %s: %s", self.directory, exc)
            return 0
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return 0  # another worker is folding
            return self._fold_locked(dead)
        finally:
            os.close(lock)  # releases the lock

    def _fold_locked(self, dead: list[str]) -> int:
        assert self.directory is not None
        path = os.path.join(self.directory, RETIRED)
        retired = read_json(path) or {}
        folded = [n for n in retired.get("folded") or () if isinstance(n, str)]
        done = set(folded)
        counters = Samples(_values(retired.get("counters")))
        todo: list[str] = []
        for name in dead:
            if name in done:  # counted already: an earlier fold stopped before removing it
                self._remove(name)
                continue
            snap = read_json(os.path.join(self.directory, name))
            if snap is None and os.path.exists(os.path.join(self.directory, name)):
                log.warning("metrics: dropping unreadable snapshot %s", name)
            elif snap is None:
                continue  # folded and removed by another worker since the listing
            else:
                counters.add(Samples(_values(snap.get("counters"))), gauges=False)
            todo.append(name)
        if not todo:
            return 0
        retired = {"counters": counters.counters, "folded": [*folded, *todo][-FOLDED_KEEP:]}
        try:
            write_json(path, retired)
        except OSError as exc:
            log.warning("metrics: cannot write %s: %s", path, exc)
            return 0
        for name in todo:
            self._remove(name)
        return len(todo)

    def _remove(self, name: str) -> None:
        assert self.directory is not None
        for leftover in (name, f".{name}.tmp"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.directory, leftover))
