"""The harness's command line and run bounds: impossible runs refused before anything connects,
a hard deadline on every run, one clock for actions, reports and plots, the server found from
its own ``/metrics``, readable plots, and a harness that says what to install when it cannot run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from loadtest import report
from loadtest.clients.common import Endpoint
from loadtest.run import Run
from loadtest.serverpid import supervisor_pid
from loadtest.spec import Action, RunSpec
from loadtest.targets import Target, open_target
from tests.supervised import supervisor

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "loadtest.cli"]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A loopback socket that listens and never accepts: a server that is there and says nothing."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        sock.setblocking(False)
        yield sock


def nothing_connected(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


# --- 1. impossible runs are refused up front ----------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["fanout", "--transport", "ws-json", "--per-conn", "4", "--subs", "40"], "needs at least 4 streams"),
        (
            ["topics", "--transport", "ws-msgpack", "--per-conn", "5", "--subs", "20", "--streams", "2"],
            "needs at least 5 streams",
        ),
        (["fanout", "--per-conn", "3"], "SSE/HTTP/1.1 connection carries one subscription"),
        (["fanout", "--kind", "uvicorn", "--transport", "ws-json"], "uvicorn speaks only sse-h1"),
        (["llm", "--kind", "nchan"], "nchan has no close"),
        (["storm"], "storm needs at least one --storm-at"),
        (["deploy"], "deploy needs --restarts or --kills"),
        (["fanout", "--duration", "10", "--storm-at", "12"], "within the 10 s of publishing"),
        (
            ["storm", "--base", "llm", "--tokens", "10", "--rate", "10", "--stagger", "1", "--storm-at", "5"],
            "within the 2 s of publishing",
        ),
        (["idle", "--storm-at", "1"], "idle publishes nothing"),
        (["idle", "--fault", "drop:1"], "idle publishes nothing"),
        (["fanout", "--duration", "0"], "--duration must be above 0"),
        (["fanout", "--rate", "-1"], "--rate must be above 0"),
        (["fanout", "--batch", "0"], "--batch must be at least 1"),
        (["fanout", "--pub-transport", "ws", "--restarts", "1"], "--pub-transport ws cannot survive"),
        (["deploy", "--kind", "uvicorn", "--restarts", "1"], "need --server-pid"),
    ],
)
def test_an_impossible_run_is_refused_before_anything_connects(
    listener: socket.socket, args: list[str], says: str
) -> None:
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    done = subprocess.run(
        [*CLI, "run", *args, "--url", url, "--quiet"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert says in done.stderr
    assert "Traceback" not in done.stderr
    assert nothing_connected(listener)


def test_server_pid_goes_with_url_only() -> None:
    done = subprocess.run(
        [*CLI, "run", "fanout", "--start", "sluice", "--server-pid", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "--server-pid goes with --url" in done.stderr


# --- 1. every run inside its time bound ---------------------------------------------------------


@pytest.mark.slow
def test_a_run_that_cannot_finish_stops_at_its_deadline_and_says_so(listener: socket.socket) -> None:
    spec = RunSpec(
        scenario="fanout",
        endpoint=Endpoint("127.0.0.1", listener.getsockname()[1]),
        subs=2,
        rate=5,
        duration=1,
        connect_timeout=2,
        settle_timeout=1,
    )
    r = Run(spec, progress=False).execute()
    assert r["time"]["over_time"] is True
    assert r["time"]["bound"] == spec.time_bound == 2 + 1 + 1 + 20
    assert r["time"]["seconds"] <= spec.time_bound
    assert not r["ok"]
    assert "OVER TIME" in report.table(r)


# --- 4. one clock ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sluice(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with open_target("sluice", workdir=tmp_path_factory.mktemp("sluice"), workers=1) as target:
        yield target


@pytest.mark.slow
def test_a_storm_is_reported_and_plotted_at_the_second_it_was_asked_for(sluice: Target, tmp_path: Path) -> None:
    spec = RunSpec(
        scenario="storm",
        endpoint=Endpoint(sluice.host, sluice.port),
        server_pid=sluice.pid,
        subs=10,
        rate=20,
        duration=2.5,
        connect_timeout=30,
        settle_timeout=20,
        actions=[Action(1.5, "storm")],
    )
    r = Run(spec, progress=False).execute()
    assert r["ok"], r["verdict"]
    [mark] = r["marks"]
    assert mark["at"] == 1.5
    assert mark["t"] == pytest.approx(1.5, abs=0.3)  # the publisher's clock, not the run's start
    first_publish = next(row["t"] for row in r["timeline"] if row["phase"] == "publish")
    assert 0 < first_publish <= 1.1
    assert all(row["t"] < 0 for row in r["timeline"] if row["phase"] == "connect")
    assert "at 1.5 s" in report.table(r)
    [_, (_, fig)] = report.figures(r)
    [line] = [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() == "--"]
    assert line.get_xdata()[0] == mark["t"]


# --- 3. the server says which process it is ----------------------------------------------------


async def test_sluice_names_its_supervisor_and_the_harness_measures_it(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with supervisor(tmp_path, "--workers", "2") as running:
            await running.ready()
            endpoint = Endpoint("127.0.0.1", running.port)
            pid, note = await trio.to_thread.run_sync(supervisor_pid, endpoint)
            assert pid == running.proc.pid, note
            out = tmp_path / "idle.json"
            cmd = [
                *CLI,
                "run",
                "idle",
                "--url",
                f"http://127.0.0.1:{running.port}",
                "--subs",
                "3",
                "--duration",
                "0.5",
                "--connect-timeout",
                "20",
                "--settle-timeout",
                "5",
                "--json",
                str(out),
            ]
            done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False, cwd=REPO)
            assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
            assert f"server pid {running.proc.pid}, from the server's /metrics" in done.stderr.decode()
            result = json.loads(out.read_text())
            assert result["spec"]["server_pid"] == running.proc.pid
            assert result["timeline"][0]["server_procs"] == 3  # the supervisor and its two workers
            # --server-pid still decides
            cmd[cmd.index("--json") :] = ["--json", str(out), "--server-pid", str(os.getpid())]
            done = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False, cwd=REPO)
            assert done.returncode == 0, done.stderr.decode()
            assert json.loads(out.read_text())["spec"]["server_pid"] == os.getpid()


def test_metrics_name_the_supervisor_only_when_there_is_one(tmp_path: Path) -> None:
    from server.observability.host import HostMetrics
    from server.observability.metrics import Samples

    lines = HostMetrics(str(tmp_path), Samples).render().decode().splitlines()
    assert [ln for ln in lines if ln.startswith("sluice_supervisor_info")] == [
        f'sluice_supervisor_info{{pid="{os.getppid()}"}} 1'
    ]
    assert "# TYPE sluice_supervisor_info gauge" in lines
    assert b"sluice_supervisor_info" not in HostMetrics(None, Samples).render()


# --- 5. plots ----------------------------------------------------------------------------------


def quiet_run() -> dict[str, Any]:
    rows = [
        {
            "t": t - 3.0,
            "phase": "connect" if t < 3 else "publish",
            "connected": min(300, 100 * t),
            "reconnects": 0,
            "latency": {"p50": 1.5, "p99": 4.0 + t % 3, "max": 300.0 + t} if t >= 3 else {},
        }
        for t in range(30)
    ]
    return {
        "timeline": rows,
        "marks": [{"t": 8.0, "at": 8.0, "kind": "storm"}],
        "spec": {"scenario": "storm", "transport": "sse-h1", "endpoint": {"kind": "sluice"}},
    }


def test_plots_keep_legends_off_the_data_and_axes_readable(tmp_path: Path) -> None:
    from matplotlib.ticker import ScalarFormatter

    figs = dict(report.figures(quiet_run()))
    for fig in figs.values():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        box = ax.get_window_extent(renderer)
        [legend] = fig.legends
        assert not legend.get_window_extent(renderer).overlaps(box)  # outside the data area
        [label] = [t for t in ax.texts if t.get_text().startswith("storm")]
        assert label.get_fontsize() >= 9
        extent = label.get_window_extent(renderer)
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1
        for axis in fig.axes:
            for tick in [*axis.get_yticklabels(), *axis.get_xticklabels()]:
                assert "10^" not in tick.get_text() and "\u00d7" not in tick.get_text(), tick.get_text()
    conns = figs["connections"]
    ax, ax2 = conns.axes
    assert ax.get_ylim()[0] == 0 and ax2.get_ylim()[0] == 0  # zeros on one line
    assert ax2.get_ylim()[1] >= 1  # no reconnects: a sane axis, not -0.04..0.04
    for axis in (ax, ax2):
        fmt = axis.yaxis.get_major_formatter()
        assert isinstance(fmt, ScalarFormatter) and not fmt.get_useOffset()
    assert {t.get_text() for t in figs["latency"].axes[0].get_yticklabels() if t.get_text()} >= {"10", "100"}
    paths = report.plot(quiet_run(), tmp_path, "q")
    assert [p.name for p in paths] == ["q-latency.png", "q-connections.png"]


def test_an_idle_run_without_a_single_latency_is_plotted_without_the_latency_figure(tmp_path: Path) -> None:
    idle = quiet_run()
    for row in idle["timeline"]:
        row["latency"] = {}  # nothing was published: matplotlib refuses a log axis with no data
    idle["marks"] = []
    paths = report.plot(idle, tmp_path, "i")
    assert [p.name for p in paths] == ["i-connections.png"]


# --- 2. the harness runs from a fresh clone ----------------------------------------------------


def test_missing_dependencies_name_the_command_that_installs_them() -> None:
    code = "import sys; sys.modules['trio_websocket'] = None; from loadtest.cli import main; main(sys.argv[1:])"
    done = subprocess.run(
        [sys.executable, "-c", code, "run", "idle", "--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "trio-websocket missing" in done.stderr
    assert "scripts/loadtest" in done.stderr and "pip install -e" in done.stderr and "[loadtest]" in done.stderr


def fake_checkout(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A checkout with the real scripts and a venv whose python only logs what it is asked."""
    root, venv, log = tmp_path / "repo", tmp_path / "venv", tmp_path / "calls.log"
    (root / "scripts").mkdir(parents=True)
    for name in ("bootstrap.sh", "loadtest", "serve", "test"):
        shutil.copy(REPO / "scripts" / name, root / "scripts" / name)
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (venv / "bin").mkdir(parents=True)
    for name, body in (
        ("python", f'echo "python $*" >> {log}'),
        ("sluice-loadtest", 'echo "harness $*"'),
        ("sluice", 'echo "sluice $*"'),
    ):
        path = venv / "bin" / name
        path.write_text(textwrap.dedent(f"#!/bin/sh\n{body}\n"))
        path.chmod(0o755)
    return root, venv, log


def installs(log: Path) -> list[str]:
    calls = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return [c.rsplit("-e ", 1)[1] for c in calls if " -e " in c]


def test_scripts_loadtest_installs_the_extra_once_and_shares_the_venv(tmp_path: Path) -> None:
    root, venv, log = fake_checkout(tmp_path)
    env = {**os.environ, "SLUICE_VENV": str(venv)}

    def script(name: str, *args: str) -> str:
        done = subprocess.run(
            [str(root / "scripts" / name), *args], capture_output=True, text=True, env=env, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert script("serve", "--help") == "sluice serve --help\n"
    assert installs(log) == [str(root)]
    assert script("loadtest", "run", "idle", "--help") == "harness run idle --help\n"
    assert installs(log) == [f"{root}[loadtest]"]  # serve's install lacks the extra
    script("loadtest", "bench")
    script("serve")
    assert installs(log) == []  # each is current: nothing installed again
    os.utime(root / "pyproject.toml", (2**31, 2**31))  # pyproject.toml changed
    script("loadtest")
    assert installs(log) == [f"{root}[loadtest]"]
    # after a test install (its extra includes loadtest), neither serve nor loadtest installs again
    for stamp in venv.glob(".sluice-installed*"):
        stamp.unlink()
    (venv / ".sluice-installed-test").touch()
    os.utime(root / "pyproject.toml", (0, 0))
    script("loadtest")
    script("serve")
    assert installs(log) == []
