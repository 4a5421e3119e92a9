"""What a run is asked to do: the scenario, its sizes, and the actions during it."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from loadtest.clients.common import Endpoint

SCENARIOS = ("idle", "fanout", "topics", "llm", "storm", "deploy")
MAX_CONNS_PER_PROCESS = 15_000  # below this box's hard limit of 20,000 open files per process


@dataclass(frozen=True)
class Action:
    """Something done to the server or the clients during a run, at ``at`` seconds after the
    publisher starts: ``storm`` (every client drops and reconnects at once) or a shell command
    (``{pid}`` is the server's PID, ``{child}`` one of its child processes, chosen at random)."""

    at: float
    kind: str  # "storm" | "restart" | "kill" | "command"
    command: str = ""


@dataclass
class RunSpec:
    """One run of the harness."""

    scenario: str
    endpoint: Endpoint
    base: str = "fanout"  # what storm and deploy run underneath: fanout, topics or llm
    transport: str = "sse-h1"
    subs: int = 100  # subscriptions
    per_conn: int = 1  # subscriptions per connection (HTTP/2 streams, WebSocket subscriptions)
    streams: int = 0  # 0: one for fanout/idle, one per subscription for topics/llm
    rate: float = 10.0  # events per second, all streams together (llm: per generation)
    duration: float = 10.0  # seconds of publishing (idle: of holding)
    size: int = 0  # bytes of event data (at least the ~24 the harness needs)
    tokens: int = 100  # llm: events per generation
    stagger: float = 5.0  # llm: generations start spread over this many seconds
    batch: int = 1  # most events one publish request may carry when the publisher is behind
    pub_connections: int = 0  # 0: one per 250 streams, at least one, at most 32
    pub_transport: str = "http"  # how the publisher appends: "http" (POST) or "ws" (sluice.json.v1)
    procs: int = 0  # subscriber processes; 0: enough for the fd limit, at least the core count
    ramp: float = 0.0  # connections per second per process at the start; 0: as fast as they go
    connect_timeout: float = 120.0
    settle_timeout: float = 60.0  # after the publisher is done, how long deliveries may take
    server_pid: int | None = None
    actions: list[Action] = field(default_factory=list)
    fault: tuple[str, int] | None = None  # ("drop"|"dup", seq) injected by the publisher on stream 0
    limits: dict[str, float] = field(default_factory=dict)
    label: str = ""
    run_id: str = ""

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}; one of {', '.join(SCENARIOS)}")
        if self.scenario in ("storm", "deploy") and self.base not in ("fanout", "topics", "llm"):
            raise ValueError(f"storm and deploy run over fanout, topics or llm, not {self.base!r}")
        if self.pub_transport not in ("http", "ws"):
            raise ValueError(f"the publisher's transport is http or ws, not {self.pub_transport!r}")
        if self.pub_transport == "ws" and (self.endpoint.kind != "sluice" or self.scenario == "deploy"):
            # a WebSocket publish has no idempotency key: one lost with its socket cannot be retried
            raise ValueError("--pub-transport ws needs a Sluice server and a run without restarts (not deploy)")
        if self.subs < 1 or self.per_conn < 1:
            raise ValueError("subs and per-conn must be at least 1")
        if self.run_id == "":
            self.run_id = os.urandom(3).hex()

    @property
    def kind(self) -> str:
        """The traffic pattern: the scenario itself, or the base of storm and deploy."""
        return self.base if self.scenario in ("storm", "deploy") else self.scenario

    @property
    def stream_count(self) -> int:
        """How many streams the run uses."""
        if self.streams:
            return self.streams
        return self.subs if self.kind in ("topics", "llm") else 1

    @property
    def conn_count(self) -> int:
        """How many connections carry the subscriptions."""
        return math.ceil(self.subs / self.per_conn)

    def process_count(self) -> int:
        """How many subscriber processes to run."""
        if self.procs:
            return self.procs
        need = math.ceil(self.conn_count / MAX_CONNS_PER_PROCESS)
        floor = 1 if self.subs < 1000 else min(2, os.cpu_count() or 1)
        return max(need, floor)

    def stream_name(self, i: int) -> str:
        """The name of stream ``i`` (fresh for every run)."""
        return f"lt-{self.run_id}-{i}"
