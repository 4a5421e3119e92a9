"""``/metrics`` in the Prometheus text exposition format: collecting and rendering (pure, no I/O).

A worker's counters live in plain dataclass records bumped on the hot path (:class:`HubStats`,
the engine's ``HttpStats``, the guard's :class:`EdgeStats`, the notice bus's ``BusStats``).
:func:`collect` turns them into a :class:`Samples`: two flat maps from a sample's exposition key
(``name`` or ``name{label="value",...}``) to its value, one for counters and one for gauges. That
shape is what a worker writes to its snapshot file, what :mod:`server.observability.host` adds
up over the host's workers, and what :func:`render` prints.

Names (see ``docs/METRICS.md``): the hub's fields keep their historic names (``sluice_<field>``,
``_total`` appended to counters); every other record is exported generically from its dataclass
fields, ``<prefix><field>_total`` for counters and ``<prefix><field>`` for the fields listed as
gauges, so a field added to ``HttpStats`` later is exported without touching this module.

``prometheus_client`` is not used: its multiprocess mode writes an mmap'd value on every
increment, far too costly for per-delivery counters, and its registry would only replace the
few lines of :func:`render` (the exposition format is a handful of ``# HELP``/``# TYPE`` lines
and ``key value`` pairs), at the price of a dependency. This module imports no other layer: the
records are read through :func:`dataclasses.fields`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from server.core.hub_stats import HubStats
from server.observability.stats import EdgeStats

HUB_GAUGES = frozenset({"subscriptions", "replay_buffered"})
HTTP_GAUGES = frozenset({"connections_open"})
BUS_GAUGES = frozenset({"peers", "channels"})
STORE_SKIP = frozenset({"largest_batch"})  # a maximum: adding it up over workers means nothing
HTTP_PREFIX, BUS_PREFIX, STORE_PREFIX = "sluice_http_", "sluice_bus_", "sluice_store_"
WORKERS = "sluice_workers"
SUPERVISOR_INFO = "sluice_supervisor_info"  # pid="<supervisor pid>", value 1

HELP: dict[str, str] = {
    "sluice_published_total": "Events committed and fanned out",
    "sluice_delivered_total": "Event deliveries handed to connections",
    "sluice_replayed_total": "Events delivered from the store while catching up",
    "sluice_replayed_memory_total": "Events delivered from the in-memory replay buffer while catching up",
    "sluice_replay_buffered": "Events held in the in-memory replay buffer",
    "sluice_subscriptions": "Open subscriptions",
    "sluice_subscriptions_total": "Subscriptions opened",
    "sluice_dropped_total": "Subscriptions ended because their connection was cut for falling behind (slow consumer)",
    "sluice_subscriptions_gone_total": "Subscriptions ended because their client left before the stream ended",
    "sluice_resets_total": "Resets sent, by reason",
    "sluice_reordered_total": "Commit notices held behind a gap until the missing ones came or were read",
    "sluice_gap_reads_total": "Gaps in the commit notices read from the store once for all subscribers",
    "sluice_gaps_given_up_total": "Gaps in the commit notices the store could not fill, passed on as they were",
    "sluice_http_connections_open": "Open client connections",
    "sluice_http_connections_total": "Client connections accepted",
    "sluice_http_slow_consumers_total": "Connections or HTTP/2 streams dropped for exceeding the send buffer",
    "sluice_http_send_timeouts_total": "Connections dropped because a write made no progress in time",
    "sluice_http_protocol_errors_total": "Malformed HTTP/1.1, HTTP/2 or WebSocket input",
    "sluice_http_accept_errors_total": "accept() failures such as EMFILE",
    "sluice_http_connections_rotated_total": "Connections asked to close for reaching their maximum age",
    "sluice_http_drain_aborted_total": "Connections still open at a drain's deadline, cut",
    "sluice_http_h2_calm_total": "HTTP/2 connections ended with GOAWAY ENHANCE_YOUR_CALM",
    "sluice_http_connections_refused_total": "Connections turned away at accept by a connection cap",
    "sluice_http_plaintext_refused_total": "Plaintext connections refused on a TLS port (400, or closed for h2c)",
    "sluice_http_ws_ping_floods_total": "WebSockets closed for sending pings too fast",
    "sluice_http_peer_gone_total": "Connections whose tasks ended on an error from a client that had left",
    "sluice_edge_auth_refused_total": "Requests and WebSocket operations refused by auth or origin",
    "sluice_edge_rate_limited_total": "Requests refused by rate rules (429, or 413: never fits)",
    "sluice_edge_connections_refused_total": "Connections turned away at accept, by the cap reached",
    "sluice_bus_peers": "Other workers this worker's notice bus knows",
    "sluice_bus_channels": "Stream channels the Redis notice bus is subscribed to",
    "sluice_bus_reconnects_total": "Redis PUB/SUB connections of the notice bus lost and made again",
    "sluice_bus_unrouted_total": "Notice items sent to no other worker, as none watches their stream",
    "sluice_bus_interest_sent_total": "Interest items (changes, parts of whole sets) sent to other workers",
    "sluice_bus_interest_received_total": "Interest items received from other workers",
    "sluice_bus_interest_reads_total": "Newly watched streams read from the store once other workers knew of them",
    "sluice_bus_reconcile_reads_total": "Stream heads read from the store by reconciliation passes",
    "sluice_supervisor_info": "The supervisor process of these workers, as its pid label (always 1)",
    "sluice_store_commits_total": "Store transactions committed (requests / commits: mean group-commit size)",
    "sluice_store_requests_total": "Write requests carried by committed store transactions",
    "sluice_store_events_total": "Events appended to the store by this host",
    "sluice_store_failed_commits_total": "Store transactions rolled back as a whole",
    "sluice_store_busy_waits_total": "Times a store commit found another worker holding the write lock and waited"
    " (store.sync = normal)",
    "sluice_store_checkpoints_total": "WAL checkpoints run by the store (store.sync = normal)",
    "sluice_store_checkpoint_failures_total": "WAL checkpoints that failed (store.sync = normal)",
    WORKERS: "Live workers whose counters are in these totals",
}


@dataclass(slots=True)
class Samples:
    """Counter and gauge values by exposition key (``name`` or ``name{label="value"}``)."""

    counters: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, int] = field(default_factory=dict)

    def add(self, other: Samples, *, gauges: bool = True) -> None:
        """Add ``other``'s counters (and, with ``gauges``, its gauges) to these."""
        for into, values in ((self.counters, other.counters), *(((self.gauges, other.gauges),) if gauges else ())):
            for key, value in values.items():
                into[key] = into.get(key, 0) + value


def key(name: str, labels: Mapping[str, object] | None = None) -> str:
    """The exposition key of ``name`` with ``labels`` (values escaped as the text format wants)."""
    if not labels:
        return name
    inner = ",".join(f'{label}="{_escape(str(value))}"' for label, value in labels.items())
    return f"{name}{{{inner}}}"


def family(sample_key: str) -> str:
    """The metric name of an exposition key (the part before the labels)."""
    return sample_key.split("{", 1)[0]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _counter(name: str) -> str:
    return name if name.endswith("_total") else f"{name}_total"


def add_record(
    samples: Samples,
    record: object,
    prefix: str,
    gauges: frozenset[str],
    *,
    label: str = "key",
    skip: frozenset[str] = frozenset(),
) -> None:
    """Add a stats dataclass's fields: ``int`` fields as counters (or gauges, if listed), and
    ``dict[str, int]`` fields as counters with one ``label`` per key. Other fields, and those
    named in ``skip``, are left out."""
    if not dataclasses.is_dataclass(record) or isinstance(record, type):
        raise TypeError(f"not a dataclass instance: {record!r}")
    for f in dataclasses.fields(record):
        if f.name in skip:
            continue
        value = getattr(record, f.name)
        name = f"{prefix}{f.name}"
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            if f.name in gauges:
                samples.gauges[name] = value
            else:
                samples.counters[_counter(name)] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, int):
                    samples.counters[key(_counter(name), {label: k})] = v


def add_edge(samples: Samples, edge: EdgeStats) -> None:
    """Add the guard's refusals (keyed by ``(status, reason)`` and ``(status, route)``)."""
    for (status, reason), n in edge.auth_refused.items():
        samples.counters[key("sluice_edge_auth_refused_total", {"status": status, "reason": reason})] = n
    for (status, route), n in edge.rate_limited.items():
        samples.counters[key("sluice_edge_rate_limited_total", {"status": status, "route": route})] = n


def add_connection_refusals(samples: Samples, refused: Mapping[str, int]) -> None:
    """Add the connection caps' refusals by reason (``total``, ``per_address``), every reason
    present even at 0 so a dashboard sees the series before the first refusal."""
    for reason, n in refused.items():
        samples.counters[key("sluice_edge_connections_refused_total", {"reason": reason})] = n


def collect(
    hub: HubStats,
    http: object | None = None,
    edge: EdgeStats | None = None,
    bus: object | None = None,
    store: object | None = None,
) -> Samples:
    """One worker's samples from its records (``http``: ``HttpStats``; ``bus``: ``BusStats``;
    ``store``: the store's stats record, e.g. ``SqliteStats``)."""
    samples = Samples()
    add_record(samples, hub, "sluice_", HUB_GAUGES, label="reason")
    if http is not None:
        add_record(samples, http, HTTP_PREFIX, HTTP_GAUGES)
    if edge is not None:
        add_edge(samples, edge)
    if bus is not None:
        add_record(samples, bus, BUS_PREFIX, BUS_GAUGES)
    if store is not None:
        add_record(samples, store, STORE_PREFIX, frozenset(), skip=STORE_SKIP)
    return samples


def render(samples: Samples) -> bytes:
    """The text exposition of ``samples``: families in first-seen order (counters, then gauges),
    each with ``# HELP`` and ``# TYPE``, samples sorted within a family."""
    grouped: dict[str, tuple[str, list[tuple[str, int]]]] = {}
    for kind, values in (("counter", samples.counters), ("gauge", samples.gauges)):
        for sample_key, value in values.items():
            name = family(sample_key)
            entry = grouped.setdefault(name, (kind, []))
            if entry[0] == kind:  # a name can be one kind only; a clash (a peer's odd file) loses
                entry[1].append((sample_key, value))
    lines: list[str] = []
    for name, (kind, entries) in grouped.items():
        lines += [f"# HELP {name} {HELP.get(name, name.removeprefix('sluice_').replace('_', ' '))}"]
        lines += [f"# TYPE {name} {kind}"]
        lines += [f"{sample_key} {value}" for sample_key, value in sorted(entries)]
    return ("\n".join(lines) + "\n").encode()
