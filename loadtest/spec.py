"""What a run is asked to do: the scenario, its sizes, and the actions during it."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from loadtest.clients.common import Endpoint
from loadtest.targets import TRANSPORTS

SCENARIOS = ("idle", "fanout", "topics", "llm", "storm", "deploy")
MAX_CONNS_PER_PROCESS = 15_000  # below this box's hard limit of 20,000 open files per process
# Seconds a run may take beyond its connect and settle timeouts and publishing time: the pause
# before publishing, stopping the publisher, asking for results, and stopping the load processes.
OVERHEAD = 20.0


def publish_seconds(kind: str, duration: float, tokens: int, rate: float, stagger: float) -> float:
    """How long the publishing of traffic ``kind`` lasts: ``duration``, or for ``llm`` the last
    generation's start (``stagger``) plus its ``tokens`` at ``rate`` per second."""
    if kind == "llm":
        return stagger + tokens / rate if rate > 0 else stagger
    return duration


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
    # More server process trees sampled with server_pid's (a second host's supervisor): the
    # server's CPU and RSS are theirs together.
    server_pids: tuple[int, ...] = ()
    # Processes the server relies on, sampled apart, by name (``{"redis": pid}``): their CPU is
    # reported per delivered event beside the server's, and added to it.
    helpers: dict[str, int] = field(default_factory=dict)
    pub_endpoint: Endpoint | None = None  # where the publisher posts, when not to ``endpoint`` (another host)
    # Sluice hosts whose ``sluice_bus_*`` counters are read at the publishing window's marks, by name.
    bus_hosts: dict[str, Endpoint] = field(default_factory=dict)
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
        if self.pub_endpoint is not None and self.pub_endpoint.kind != self.endpoint.kind:
            raise ValueError("the publisher's server and the subscribers' must be of one kind")
        if self.pub_transport == "ws" and (self.endpoint.kind != "sluice" or self.scenario == "deploy"):
            # a WebSocket publish has no idempotency key: one lost with its socket cannot be retried
            raise ValueError("--pub-transport ws needs a Sluice server and a run without restarts (not deploy)")
        if self.subs < 1 or self.per_conn < 1:
            raise ValueError("subs and per-conn must be at least 1")
        problems = self.problems()
        if problems:
            raise ValueError("impossible run: " + "; ".join(problems))
        if self.run_id == "":
            self.run_id = os.urandom(3).hex()

    def problems(self) -> list[str]:
        """What makes this run impossible (or pointless: something it asks for could never
        happen), in the command line's terms; empty when it can run."""
        out: list[str] = []
        kind, transport, nstreams = self.kind, self.transport, self.stream_count
        positive = {"--duration": self.duration, "--rate": self.rate, "--connect-timeout": self.connect_timeout,
                    "--settle-timeout": self.settle_timeout}
        out += [f"{name} must be above 0, not {value:g}" for name, value in positive.items() if not value > 0]
        at_least = {"--tokens": (self.tokens, 1), "--batch": (self.batch, 1), "--size": (self.size, 0),
                    "--streams": (self.streams, 0), "--procs": (self.procs, 0),
                    "--pub-connections": (self.pub_connections, 0)}
        out += [f"{name} must be at least {low}, not {value}" for name, (value, low) in at_least.items()
                if value < low]
        if self.stagger < 0 or self.ramp < 0:
            out.append("--stagger and --ramp cannot be negative")
        supported = TRANSPORTS.get(self.endpoint.kind)
        if supported is not None and transport not in supported:
            out.append(f"{self.endpoint.kind} speaks only {', '.join(sorted(supported))}, not {transport}")
        if transport == "sse-h1" and self.per_conn > 1:
            out.append("--per-conn above 1 needs sse-h2, ws-json, ws-msgpack or longpoll (an SSE/HTTP/1.1 "
                       "connection carries one subscription)")
        if transport.startswith("ws-") and self.per_conn > nstreams:
            out.append(f"--per-conn {self.per_conn} over {transport} needs at least {self.per_conn} streams (a "
                       f"WebSocket subscribes to a stream once) but the run has {nstreams}; lower --per-conn"
                       + (" or use topics" if kind == "fanout" else " or raise --streams"))
        if kind == "llm" and self.endpoint.kind == "nchan":
            out.append("nchan has no close, so no llm traffic")
        if self.scenario == "storm" and not any(a.kind == "storm" for a in self.actions):
            out.append("storm needs at least one --storm-at")
        if self.scenario == "deploy" and not any(a.kind in ("restart", "kill") for a in self.actions):
            out.append("deploy needs --restarts or --kills")
        if kind == "idle" and self.actions:
            out.append("idle publishes nothing, so it has no time line for --storm-at, --restarts or --kills")
        if kind == "idle" and self.fault:
            out.append("idle publishes nothing, so there is nothing for --fault to drop or duplicate")
        if self.pub_transport == "ws" and any(a.kind in ("restart", "kill") for a in self.actions):
            out.append("--pub-transport ws cannot survive --restarts or --kills (a lost publish is not retried)")
        late = [a.at for a in self.actions if not 0 <= a.at < self.publish_seconds]
        if kind != "idle" and late:
            out.append(f"actions must fall within the {self.publish_seconds:g} s of publishing, not at "
                       + ", ".join(f"{t:g}" for t in late) + " s")
        return out

    @property
    def publish_seconds(self) -> float:
        """How long the publisher's plan lasts (idle: how long connections are held); the
        clock of ``--storm-at`` and of every time in the report starts at its beginning."""
        return publish_seconds(self.kind, self.duration, self.tokens, self.rate, self.stagger)

    @property
    def time_bound(self) -> float:
        """The hard deadline of a whole run, in seconds from its start: connecting, publishing,
        settling and stopping. Past it the run stops and reports what it has, marked over time."""
        return self.connect_timeout + self.publish_seconds + self.settle_timeout + OVERHEAD

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

    @property
    def publish_to(self) -> Endpoint:
        """Where the publisher posts: ``pub_endpoint``, else the subscribers' ``endpoint``."""
        return self.pub_endpoint or self.endpoint

    def stream_name(self, i: int) -> str:
        """The name of stream ``i`` (fresh for every run)."""
        return f"lt-{self.run_id}-{i}"
