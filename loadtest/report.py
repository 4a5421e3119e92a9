"""Presenting a run: the summary table, the JSON file and the PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}{unit}"
    return f"{value:,}{unit}" if isinstance(value, int) else f"{value}{unit}"


BUS_FIRST = ("repairs", "received", "hints_received", "resyncs_sent")  # what says how notices came


def bus_text(grew: dict[str, int] | None, most: int = 6) -> str:
    """The ``sluice_bus_*`` counters that grew over a run's window (at most ``most``): those of a
    bus between hosts (a name with ``redis`` in it) first, then :data:`BUS_FIRST`, then the rest,
    largest first. ``received`` and ``sent`` are notices between one host's workers, ``repairs``
    streams that a reconcile pass found behind the store (events it carried to subscribers)."""
    if grew is None:
        return "/metrics not readable"

    def rank(item: tuple[str, int]) -> tuple[int, int]:
        name, value = item
        first = 0 if "redis" in name else 1 + BUS_FIRST.index(name) if name in BUS_FIRST else 1 + len(BUS_FIRST)
        return first, -value

    moved = sorted(((k, v) for k, v in grew.items() if v), key=rank)
    if not moved:
        return "none grew"
    more = f" (+{len(moved) - most} more)" if len(moved) > most else ""
    return ", ".join(f"{k} {v:,}" for k, v in moved[:most]) + more


def rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary of one run as (name, value) rows."""
    spec = result["spec"]
    v = result["verdict"]
    lat = result["latency_ms"]
    conn = result["connections"]
    out = [
        ("scenario", spec["scenario"] + (f" over {spec['base']}" if spec["scenario"] in ("storm", "deploy") else "")),
        ("target", f"{spec['endpoint']['kind']} {spec['endpoint']['host']}:{spec['endpoint']['port']}"
                   + (f" (publisher to {pub_ep['host']}:{pub_ep['port']})" if (pub_ep := spec.get("pub_endpoint"))
                      else "")),
        *((f"stack: {k}", str(v)) for k, v in (result.get("stack") or {}).items()),
        ("transport", f"{spec['transport']} ({spec['per_conn']} per connection)"),
        ("connections held / planned", f"{conn['held']:,} / {conn['planned']:,} (failed attempts {conn['failures']:,},"
                                       f" {conn['connect_seconds']} s to connect)"),
        ("events published / delivered", f"{result['published']:,} / {result['delivered']:,}"),
        ("lost / duplicated / out of order", f"{v['lost']:,} / {v['duplicated']:,} / {v['disorder']:,}"
                                             f" (resets {v['resets']}, foreign {v['foreign']})"),
    ]
    if lat.get("count"):
        out.append(("latency ms p50 / p99 / p99.9 / max",
                    f"{lat['p50']:.2f} / {lat['p99']:.2f} / {lat['p999']:.2f} / {lat['max']:.2f}"))
    if result["reconnects"]:
        r = result["resume_s"]
        out.append(("reconnects; resume s p50 / p99 / max",
                    f"{result['reconnects']:,}; {r.get('p50', 0):.2f} / {r.get('p99', 0):.2f} / {r.get('max', 0):.2f}"))
    if "server_rss_kib_per_conn" in result:
        out.append(("server RSS KiB per connection", _fmt(result["server_rss_kib_per_conn"])))
    if "server_cpu_us_per_event" in result:
        hosts = 1 + len(spec.get("server_pids") or ())
        out.append(("server CPU µs per delivered event", _fmt(result["server_cpu_us_per_event"])
                    + (f" ({hosts} hosts together)" if hosts > 1 else "")))
    for name, helper in (result.get("helpers") or {}).items():
        per_published = _fmt(helper.get("cpu_us_per_published"))
        out.append((f"{name} CPU µs per delivered event", f"{_fmt(helper['cpu_us_per_event'])} ({per_published} "
                                                           "per published)"))
    if "server_with_helpers_cpu_us_per_event" in result:
        names = " + ".join(result.get("helpers") or {})
        total = _fmt(result["server_with_helpers_cpu_us_per_event"])
        out.append((f"server + {names} CPU µs per delivered event", total))
    for host, grew in (result.get("bus") or {}).items():
        out.append((f"bus counters grown, host {host}", bus_text(grew)))
    if "load_cpu" in result:
        lc = result["load_cpu"]
        out.append(("load generator", f"{lc['cores_used']} cores over {lc['processes']} processes"
                                      f" (busiest {lc.get('busiest', 0)} of a core)"
                                      + (f", {lc['us_per_event']} µs/event" if lc.get("us_per_event") else "")
                                      + (" SATURATED" if lc.get("saturated") else "")))
    pub = result.get("publisher") or {}
    if pub:
        over = " over WebSocket" if pub.get("transport") == "ws" else ""
        out.append(("publisher", f"{pub.get('requests', 0):,} requests{over}, {pub.get('retries', 0)} retries, "
                                 f"behind plan at most {pub.get('lag_max', 0):.2f} s"
                                 + ("" if pub.get("complete") else "; STOPPED before the end of its plan")))
    for mark in result.get("marks", []):
        what = f"{mark['kind']} {mark.get('command', '')} {mark.get('exit', '')}".strip()
        out.append((f"at {mark['t']:.1f} s", what))
    if result.get("errors"):
        top = sorted(result["errors"].items(), key=lambda kv: -kv[1])[:3]
        out.append(("client errors", "; ".join(f"{n} x {k}" for k, n in top)))
    if result.get("crashes"):
        out.append(("crashed load processes", str(result["crashes"])))
    for sample in v.get("samples", [])[:3]:
        out.append(("example", sample))
    took = result.get("time") or {}
    if took:
        over = "; OVER TIME: stopped at its deadline, figures partial" if took["over_time"] else ""
        out.append(("run time", f"{took['seconds']:.1f} s of at most {took['bound']:.0f} s{over}"))
    out.append(("verdict", "OK" if result["ok"] else "FAILED" + (" (over time)" if took.get("over_time") else "")))
    return out


def table(result: dict[str, Any]) -> str:
    """The summary table as text."""
    items = rows(result)
    width = max(len(k) for k, _ in items)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in items)


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write the whole result (timeline included)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


def plot(result: dict[str, Any], directory: Path, name: str) -> list[Path]:
    """PNG plots of a run: latency over time (when anything was delivered), and connections and
    reconnects over time, each restart, kill and storm marked. Returns the files written."""
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for suffix, fig in figures(result):
        files.append(directory / f"{name}-{suffix}.png")
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)
    return files


def figures(result: dict[str, Any]) -> list[tuple[str, Any]]:
    """The plots of :func:`plot` as matplotlib figures, each with its file name suffix: legends
    outside the data (under the axes), counts and times as plain numbers, both count axes
    starting at 0, and each action labelled inside the axes. Seconds are the report's clock (0:
    the publisher's start, as for ``--storm-at``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator, ScalarFormatter

    tl = result["timeline"]
    if not tl:
        return []
    t = [row["t"] for row in tl]
    title = f"{result['spec']['scenario']} · {result['spec']['transport']} · {result['spec']['endpoint']['kind']}"
    span = (min(t), max(t))

    def plain() -> ScalarFormatter:
        fmt = ScalarFormatter(useOffset=False)
        fmt.set_scientific(False)
        return fmt

    def marks(ax: Any) -> None:
        for mark in result.get("marks", []):
            ax.axvline(mark["t"], color="tab:red", linestyle="--", linewidth=1)
            right_half = span[1] > span[0] and (mark["t"] - span[0]) / (span[1] - span[0]) > 0.85
            ax.annotate(f"{mark['kind']} {mark['t']:g} s", (mark["t"], 0.97), xycoords=("data", "axes fraction"),
                        xytext=(-4 if right_half else 4, 0), textcoords="offset points", rotation=90, va="top",
                        ha="right" if right_half else "left", fontsize=10, color="tab:red",
                        bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})

    def frame(ax: Any) -> None:
        ax.set_xlabel("seconds since publishing started")
        ax.xaxis.set_major_formatter(plain())
        if span[1] > span[0]:
            ax.set_xlim(*span)
        ax.grid(True, alpha=0.3)

    def latency_figure(series: dict[str, list[Any]]) -> Any:
        fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
        for key, style in (("p50", "-"), ("p99", "-"), ("max", ":")):
            ax.plot(t, [y if y is not None and y > 0 else float("nan") for y in series[key]], style, label=key)
        frame(ax)
        ax.set_ylabel("publish → deliver, ms")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain())
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax.set_title(title)
        fig.legend(loc="outside lower center", ncols=3, frameon=False)  # below the axes, off the data
        marks(ax)
        return fig

    out: list[tuple[str, Any]] = []
    series = {key: [row["latency"].get(key) for row in tl] for key in ("p50", "p99", "max")}
    if any(y is not None and y > 0 for ys in series.values() for y in ys):  # none in an idle run
        out.append(("latency", latency_figure(series)))

    fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
    conns = [row["connected"] for row in tl]
    ax.plot(t, conns, label="connections up")
    frame(ax)
    ax.set_ylabel("connections")
    ax2 = ax.twinx()
    rec = [row["reconnects"] for row in tl]
    per_second = [b - a for a, b in zip([0, *rec[:-1]], rec, strict=True)]
    ax2.plot(t, per_second, color="tab:orange", label="reconnects/s")
    ax2.set_ylabel("reconnects per second")
    for axis, values in ((ax, conns), (ax2, per_second)):  # both from 0: their zeros on one line
        axis.set_ylim(0, max(1.0, max(values, default=0) * 1.08))
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        axis.yaxis.set_major_formatter(plain())
    ax.set_title(title)
    fig.legend(loc="outside lower center", ncols=2, frameon=False)  # below the axes, off the data
    marks(ax)
    out.append(("connections", fig))
    return out
