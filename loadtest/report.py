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


def rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary of one run as (name, value) rows."""
    spec = result["spec"]
    v = result["verdict"]
    lat = result["latency_ms"]
    conn = result["connections"]
    out = [
        ("scenario", spec["scenario"] + (f" over {spec['base']}" if spec["scenario"] in ("storm", "deploy") else "")),
        ("target", f"{spec['endpoint']['kind']} {spec['endpoint']['host']}:{spec['endpoint']['port']}"),
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
        out.append(("server CPU µs per delivered event", _fmt(result["server_cpu_us_per_event"])))
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
    out.append(("verdict", "OK" if result["ok"] else "FAILED"))
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
    """PNG plots of a run: latency over time, and connections and reconnects over time, each
    restart, kill and storm marked. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    tl = result["timeline"]
    if not tl:
        return []
    t = [row["t"] for row in tl]
    files: list[Path] = []

    def marks(ax: Any) -> None:
        for mark in result.get("marks", []):
            ax.axvline(mark["t"], color="tab:red", linestyle="--", linewidth=1)
            ax.annotate(mark["kind"], (mark["t"], 1), xycoords=("data", "axes fraction"), rotation=90,
                        va="top", ha="right", fontsize=8, color="tab:red")

    title = f"{result['spec']['scenario']} · {result['spec']['transport']} · {result['spec']['endpoint']['kind']}"
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for key, style in (("p50", "-"), ("p99", "-"), ("max", ":")):
        ys = [row["latency"].get(key) for row in tl]
        ax.plot(t, [y if y is not None else float("nan") for y in ys], style, label=key)
    ax.set_xlabel("seconds")
    ax.set_ylabel("publish → deliver, ms")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(loc="upper left")
    marks(ax)
    fig.tight_layout()
    files.append(directory / f"{name}-latency.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(t, [row["connected"] for row in tl], label="connections up")
    ax.set_xlabel("seconds")
    ax.set_ylabel("connections")
    ax2 = ax.twinx()
    rec = [row["reconnects"] for row in tl]
    ax2.plot(t, [b - a for a, b in zip([0, *rec[:-1]], rec, strict=True)], color="tab:orange", label="reconnects/s")
    ax2.set_ylabel("reconnects per second")
    ax.set_title(title)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [str(ln.get_label()) for ln in lines], loc="lower left")
    marks(ax)
    fig.tight_layout()
    files.append(directory / f"{name}-connections.png")
    fig.savefig(files[-1], dpi=100)
    plt.close(fig)
    return files
