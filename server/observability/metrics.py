"""``/metrics`` in the Prometheus text exposition format (this worker's counters)."""

from __future__ import annotations

from server.observability.stats import HubStats

_HELP = {
    "published": ("counter", "Events committed and fanned out"),
    "delivered": ("counter", "Event deliveries handed to connections"),
    "replayed": ("counter", "Events delivered from the store while catching up"),
    "subscriptions": ("gauge", "Open subscriptions"),
    "subscriptions_total": ("counter", "Subscriptions opened"),
    "dropped": ("counter", "Subscriptions ended because their connection could take no more"),
}


def render_metrics(stats: HubStats) -> bytes:
    """Render the hub's counters; names are prefixed ``sluice_``."""
    lines: list[str] = []
    for name, (kind, text) in _HELP.items():
        metric = f"sluice_{name}" + ("_total" if kind == "counter" and not name.endswith("_total") else "")
        lines += [f"# HELP {metric} {text}", f"# TYPE {metric} {kind}", f"{metric} {getattr(stats, name)}"]
    lines += ["# HELP sluice_resets_total Resets sent, by reason", "# TYPE sluice_resets_total counter"]
    lines += [f'sluice_resets_total{{reason="{r}"}} {n}' for r, n in sorted(stats.resets.items())]
    return ("\n".join(lines) + "\n").encode()
