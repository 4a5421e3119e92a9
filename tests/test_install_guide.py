"""docs/INSTALL.md, section 11 ("Many hosts"), checked by running what it documents.

The documented haproxy.cfg passes ``haproxy -c`` as written and agrees with the Sluice settings
the guide explains it against; the documented redis.conf, replica line and sentinel.conf, the
drop-in ``systemd/redis-host.conf`` and the ``[proxy]`` fragment run together for real: a Redis
primary, a replica and three Sentinels (loopback ports instead of the guide's addresses), two
Sluice supervisors configured by the drop-in's environment, and HAProxy in front of them with the
documented configuration. Only addresses, ports, paths and the connection total are replaced,
and each replaced text must be in the guide, so a changed or removed block fails here.

Every ``section.key`` and ``SLUICE_*`` variable the whole guide names must exist.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from server.config import CONFIG_ENV, KEYS, OTHER_ENV_VARS, load_config
from tests.client import open_sse, publish, request
from tests.haproxy import HAPROXY, free_port
from tests.supervised import Supervised, supervisor

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "docs" / "INSTALL.md"
HOST_CONFIG = ROOT / "systemd" / "sluice.toml"
REDIS_DROPIN = ROOT / "systemd" / "redis-host.conf"
SECTION = "## 11. Many hosts"

START_TIMEOUT = 15.0  # seconds for a redis-server or Sentinel to answer PING
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
POLL = 0.1  # seconds between probes of an external process

FENCE = re.compile(r"^(?P<indent> *)```(?P<info>\S*)\n(?P<body>.*?)^(?P=indent)```$", re.MULTILINE | re.DOTALL)
HAPROXY_TIME = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "": 1e-3}


# ---- reading the guide -----------------------------------------------------------------------


def guide() -> str:
    return INSTALL.read_text(encoding="utf-8")


def section() -> str:
    """Section 11, up to the next top-level section or the end of the file."""
    text = guide()
    start = text.find(f"\n{SECTION}\n")
    assert start >= 0, f"docs/INSTALL.md has no section {SECTION!r}"
    end = text.find("\n## ", start + len(SECTION) + 2)
    return text[start : end if end >= 0 else len(text)]


@dataclass(frozen=True)
class Block:
    intro: str  # the paragraph just before the fence
    info: str  # the fence's info string
    text: str  # the content, without the list item's indentation


def blocks(text: str) -> list[Block]:
    found = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip()
        intro = re.split(r"\n\s*\n", before)[-1] if before else ""
        indent = len(m.group("indent"))
        lines = [line[indent:] if line[:indent].strip() == "" else line for line in m.group("body").splitlines()]
        found.append(Block(intro, m.group("info"), "\n".join(lines) + "\n"))
    return found


def block(marker: str, info: str = "") -> str:
    """The one code block of section 11 whose introducing paragraph names ``marker``."""
    matches = [b.text for b in blocks(section()) if marker in b.intro and b.info == info]
    assert len(matches) == 1, (
        f"expected one ```{info} block introduced by {marker!r} in {SECTION}, found {len(matches)}"
    )
    return matches[0]


def haproxy_cfg() -> str:
    return block("/etc/haproxy/haproxy.cfg", "haproxy")


def redis_conf() -> str:
    return block("/etc/redis/redis.conf")


def replica_conf() -> str:
    return block("on the two replicas")


def sentinel_conf() -> str:
    return block("/etc/redis/sentinel.conf")


def proxy_toml() -> str:
    return block("/etc/sluice/sluice.toml", "toml")


def directives(conf: str) -> list[list[str]]:
    """A redis.conf or sentinel.conf as its directives (comment and blank lines skipped)."""
    return [shlex.split(line) for line in conf.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def haproxy_sections(cfg: str) -> dict[str, list[list[str]]]:
    """``{"global": [...], "defaults": [...], "backend sluice": [...]}``: each section's lines as
    words, comments dropped."""
    sections: dict[str, list[list[str]]] = {}
    current: list[list[str]] = []
    for raw in cfg.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = sections.setdefault(line.strip(), [])
        else:
            current.append(line.split())
    return sections


def haproxy_seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)([a-z]*)", text)
    assert m and m.group(2) in HAPROXY_TIME, f"not a HAProxy time: {text!r}"
    return int(m.group(1)) * HAPROXY_TIME[m.group(2)]


def setting(lines: list[list[str]], *words: str) -> list[str]:
    """The rest of the one line starting with ``words``."""
    found = [line[len(words) :] for line in lines if line[: len(words)] == list(words)]
    assert len(found) == 1, f"expected one {' '.join(words)!r} line, found {found}"
    return found[0]


def dropin_environment() -> dict[str, str]:
    env: dict[str, str] = {}
    for raw in REDIS_DROPIN.read_text(encoding="utf-8").splitlines():
        if raw.startswith("Environment="):
            for word in shlex.split(raw.removeprefix("Environment=")):
                name, _, value = word.partition("=")
                env[name] = value
    return env


def replaced(text: str, old: str, new: str) -> str:
    """``text`` with ``old`` replaced; ``old`` must be there (the guide still says it)."""
    assert old in text, f"the guide no longer contains {old!r}"
    return text.replace(old, new)


# ---- the text -----------------------------------------------------------------------------------


def test_the_guide_names_only_real_keys_and_variables() -> None:
    text = guide()
    keys = {(m.group(1), m.group(2)) for m in re.finditer(r"`([a-z]+)\.([a-z0-9_]+)", text) if m.group(1) in KEYS}
    assert ("proxy", "trusted") in keys and ("store", "redis_wait_replicas") in keys
    unknown = sorted(f"{s}.{k}" for s, k in keys if k not in KEYS[s])
    assert unknown == [], f"docs/INSTALL.md names keys that do not exist: {unknown}"
    env_vars = {spec.env_var for specs in KEYS.values() for spec in specs.values()} | OTHER_ENV_VARS | {CONFIG_ENV}
    named = set(re.findall(r"\bSLUICE_[A-Z0-9_]*[A-Z0-9]", text))
    assert "SLUICE_STORE_BACKEND" in named
    assert sorted(named - env_vars) == [], "docs/INSTALL.md names variables that do not exist"


def test_documented_haproxy_cfg_passes_haproxy_check(tmp_path: Path) -> None:
    if not os.access(HAPROXY, os.X_OK):
        pytest.fail(f"{HAPROXY} is not installed (Debian package haproxy; scripts/test installs it as root)")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_cfg(), encoding="utf-8")
    result = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Configuration file is valid" in output
    assert "[WARNING]" not in output and "[ALERT]" not in output, output


def test_documented_haproxy_cfg_is_what_the_guide_explains() -> None:
    s = haproxy_sections(haproxy_cfg())
    defaults, backend = s["defaults"], s["backend sluice"]
    assert setting(defaults, "mode") == ["tcp"]
    assert setting(backend, "balance") == ["roundrobin"]
    assert setting(backend, "option", "httpchk") == ["GET", "/readyz"]
    assert setting(backend, "http-check", "expect") == ["status", "200"]
    assert setting(defaults, "option", "redispatch") == ["1"] and int(setting(defaults, "retries")[0]) >= 1
    server = setting(backend, "default-server")
    assert {"send-proxy-v2", "check", "check-send-proxy"} <= set(server)
    inter = haproxy_seconds(server[server.index("inter") + 1])
    fall, rise = int(server[server.index("fall") + 1]), int(server[server.index("rise") + 1])
    assert (fall * inter, rise * inter) == (6.0, 4.0), "the guide says about 6 s out and about 4 s back"
    assert "on-marked-down" not in haproxy_cfg(), "established connections must survive a host marked down"
    host = load_config(config_path=str(HOST_CONFIG), environ={})
    servers = [line for line in backend if line[0] == "server"]
    assert len(servers) == 3 and all(line[2].endswith(f":{host.server.port}") for line in servers)

    # the idle timeout outlasts every silence Sluice allows on a connection
    timeouts = {line[1]: haproxy_seconds(line[2]) for line in defaults if line[0] == "timeout"}
    quiet = [host.sse.heartbeat, host.http.ws_ping_interval, host.longpoll.max_timeout, host.http.idle_timeout]
    assert timeouts["tunnel"] >= 2 * max(quiet), (timeouts, quiet)
    assert timeouts["client"] >= timeouts["tunnel"] and timeouts["server"] >= timeouts["tunnel"]
    assert timeouts["check"] > host.store.redis_timeout, "a slow Redis must give a 503, not a check timeout"


def test_documented_sluice_side_matches_the_redis_side(tmp_path: Path) -> None:
    """The [proxy] fragment loads over the host file; the drop-in's Sentinels and primary name are
    the ones sentinel.conf sets up; the replicas copy from the primary the Sentinels monitor."""
    merged = tmp_path / "sluice.toml"
    merged.write_text(HOST_CONFIG.read_text(encoding="utf-8") + "\n" + proxy_toml(), encoding="utf-8")
    config = load_config(config_path=str(merged), environ=dropin_environment())
    assert config.proxy.trusted == ("10.0.0.2/32",) and "10.0.0.2, port 80" in section()
    assert config.store.backend == "redis"
    monitor = [d for d in directives(sentinel_conf()) if d[:2] == ["sentinel", "monitor"]]
    assert len(monitor) == 1
    _, _, name, ip, port, quorum = monitor[0]
    assert config.store.redis_master == name and int(quorum) == 2
    sentinel_port = next(d[1] for d in directives(sentinel_conf()) if d[0] == "port")
    assert config.store.redis_sentinels == tuple(f"10.0.0.2{i}:{sentinel_port}" for i in (1, 2, 3))
    assert [d for d in directives(replica_conf())] == [["replicaof", ip, port]]
    assert [d[1] for d in directives(redis_conf()) if d[0] == "bind"] == [ip]


def test_documented_redis_conf_holds_the_settings_the_guide_explains() -> None:
    conf = {d[0]: d[1:] for d in directives(redis_conf())}
    assert conf["appendonly"] == ["yes"] and conf["appendfsync"] == ["always"]
    assert conf["maxmemory-policy"] == ["noeviction"] and conf["no-appendfsync-on-rewrite"] == ["no"]
    assert conf["dir"] == ["/var/lib/redis"]
    assert all("#" not in line for line in redis_conf().splitlines() + sentinel_conf().splitlines()), (
        "Redis reads a '#' after a directive as one more argument"
    )


# ---- the whole picture, running ------------------------------------------------------------------


class Node:
    """One redis-server or Sentinel, started by PID from a config file in its own directory."""

    def __init__(self, directory: Path, conf: str, *args: str) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.conf = directory / "node.conf"
        self.conf.write_text(conf, encoding="utf-8")
        self.port = free_port()
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed (Debian package redis-server; scripts/test installs it as root)")
        log = self.directory / "redis.log"
        argv = ["redis-server", str(self.conf), *self.args, "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--dir", str(self.directory), "--logfile", str(log), "--daemonize", "no"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        give_up = time.monotonic() + START_TIMEOUT
        while self.cli("PING") != "PONG":
            if self.proc.poll() is not None or time.monotonic() > give_up:
                self.stop()
                pytest.fail(f"{argv} did not start: {log.read_text(errors='replace')[-2000:] if log.exists() else ''}")
            time.sleep(POLL)

    def cli(self, *command: str) -> str:
        result = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *command],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        return result.stdout.strip()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


@dataclass
class Balancer:
    proc: subprocess.Popen[bytes]
    port: int
    admin: Path
    log: Path

    def command(self, line: str) -> str:
        """One command on the runtime API socket (what ``socat stdio unix-connect:...`` sends)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.admin))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self) -> dict[str, str]:
        """Each server's status (``UP``, ``DOWN``, ``DRAIN``...) from ``show stat``."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == "sluice" and row["svname"] not in ("FRONTEND", "BACKEND")
        }


def run_haproxy(tmp_path: Path, hosts: list[int]) -> Balancer:
    """The documented haproxy.cfg with loopback ports; ``-n`` caps the connection total below the
    documented 200000, whose descriptors a test machine may not allow."""
    port, admin, log = free_port(), tmp_path / "admin.sock", tmp_path / "haproxy.log"
    cfg = replaced(haproxy_cfg(), "bind :80", f"bind 127.0.0.1:{port}")
    for i, host in enumerate(hosts, start=1):
        cfg = replaced(cfg, f"10.0.0.1{i}:8080", f"127.0.0.1:{host}")
    cfg = replaced(cfg, "/run/haproxy/admin.sock", str(admin))
    cfg = replaced(cfg, "log /dev/log", "log stderr")
    if not _can_drop_privileges():
        cfg = "\n".join(line for line in cfg.splitlines() if line.split()[:1] not in (["chroot"], ["user"], ["group"]))
    path = tmp_path / "haproxy.cfg"
    path.write_text(cfg, encoding="utf-8")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [HAPROXY, "-db", "-n", "4096", "-f", str(path)], stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    give_up = time.monotonic() + START_TIMEOUT
    while not admin.exists() or not _accepts(port):
        if proc.poll() is not None or time.monotonic() > give_up:
            proc.kill()
            pytest.fail(f"haproxy did not start: {log.read_text(errors='replace')}")
        time.sleep(POLL)
    return Balancer(proc, port, admin, log)


def _can_drop_privileges() -> bool:
    try:
        pwd.getpwnam("haproxy")
        grp.getgrnam("haproxy")
    except KeyError:
        return False
    return os.geteuid() == 0 and Path("/var/lib/haproxy").is_dir()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


async def until(what: str, check: Callable[[], object], timeout: float) -> None:
    """Wait until ``check()`` is true (it may be async), polling."""
    with trio.move_on_after(timeout):
        while True:
            result = check()
            if hasattr(result, "__await__"):
                result = await result  # type: ignore[misc]
            if result:
                return
            await trio.sleep(POLL)
    pytest.fail(f"not within {timeout} s: {what}")


def host_of(pid: int, hosts: dict[str, Supervised]) -> str:
    owners = [name for name, s in hosts.items() if pid in s.started()]
    assert len(owners) == 1, (pid, {name: s.started() for name, s in hosts.items()})
    return owners[0]


async def answering_hosts(balancer: Balancer, hosts: dict[str, Supervised], count: int) -> list[str]:
    """Which host answered each of ``count`` fresh connections through the balancer."""
    names = []
    for _ in range(count):
        resp = await request(balancer.port, "GET", "/healthz")
        assert resp.status == 200, resp.body
        names.append(host_of(int(resp.json()["pid"]), hosts))
    return names


async def refused_through_balancer(balancer: Balancer) -> bool:
    """True when the balancer closes a new connection without an answer (no host left)."""
    try:
        await request(balancer.port, "GET", "/readyz")
    except Exception:  # a closed connection shows as one error or another
        return True
    return False


@pytest.fixture
def stopped_at_exit() -> Iterator[list[Node | Balancer]]:
    """Everything started by the test, stopped by PID at the end, in reverse order."""
    started: list[Node | Balancer] = []
    try:
        yield started
    finally:
        for thing in reversed(started):
            if isinstance(thing, Node):
                thing.stop()
            elif thing.proc.poll() is None:
                thing.proc.send_signal(signal.SIGTERM)
                try:
                    thing.proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    thing.proc.kill()
                    thing.proc.wait(STOP_TIMEOUT)


@pytest.mark.slow
async def test_the_documented_deployment_runs(tmp_path: Path, stopped_at_exit: list[Node | Balancer]) -> None:
    with trio.fail_after(180):
        # Redis: the documented redis.conf on the primary, plus the replica line on the replica
        primary = Node(tmp_path / "redis1", redis_conf())
        replica = Node(
            tmp_path / "redis2", redis_conf() + replica_conf(), "--replicaof", "127.0.0.1", str(primary.port)
        )
        stopped_at_exit.append(primary)
        primary.start()
        for key, value in (
            ("appendonly", "yes"),
            ("appendfsync", "always"),
            ("maxmemory-policy", "noeviction"),
            ("no-appendfsync-on-rewrite", "no"),
            ("min-replicas-to-write", "1"),
        ):
            assert primary.cli("CONFIG", "GET", key).splitlines() == [key, value]
        assert (tmp_path / "redis1" / "appendonlydir").is_dir()

        # three Sentinels with the documented sentinel.conf
        monitor = replaced(sentinel_conf(), "10.0.0.21 6379", f"127.0.0.1 {primary.port}")
        sentinels = [Node(tmp_path / f"sentinel{i}", monitor, "--sentinel") for i in (1, 2, 3)]
        for sentinel in sentinels:
            stopped_at_exit.append(sentinel)
            sentinel.start()
        await until(
            "the Sentinels can authorise a failover",
            lambda: sentinels[0].cli("SENTINEL", "CKQUORUM", "sluice").startswith("OK 3 usable Sentinels"),
            30,
        )

        # two Sluice hosts: the drop-in's environment (Sentinel ports here) over the host file + [proxy]
        env = dropin_environment()
        env["SLUICE_STORE_REDIS_SENTINELS"] = ",".join(f"127.0.0.1:{s.port}" for s in sentinels)
        config = tmp_path / "sluice.toml"
        toml = replaced(proxy_toml(), '"10.0.0.2/32"', '"127.0.0.1/32"')
        config.write_text(HOST_CONFIG.read_text(encoding="utf-8") + "\n" + toml, encoding="utf-8")
        flags = ["--config", str(config), "--workers", "2"]
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
        async with (
            supervisor(
                tmp_path / "a", *flags, db=False, name="a", env={**env, "RUNTIME_DIRECTORY": str(tmp_path / "a")}
            ) as a,
            supervisor(
                tmp_path / "b", *flags, db=False, name="b", env={**env, "RUNTIME_DIRECTORY": str(tmp_path / "b")}
            ) as b,
        ):
            await a.ready()
            await b.ready()
            hosts = {"sluice1": a, "sluice2": b}
            balancer = run_haproxy(tmp_path, [a.port, b.port, free_port()])  # sluice3: a host that is down
            stopped_at_exit.append(balancer)
            await until(
                "checks with PROXY headers pass on both hosts",
                lambda: balancer.states() == {"sluice1": "UP", "sluice2": "UP", "sluice3": "DOWN"},
                20,
            )
            assert "sluice1" in balancer.command("show servers state sluice")
            assert sorted(set(await answering_hosts(balancer, hosts, 4))) == ["sluice1", "sluice2"]

            # min-replicas-to-write: no replica yet, so publishes are refused while /readyz stays 200
            refused = await request(balancer.port, "POST", "/v1/streams/room", b"early", {"content-type": "text/plain"})
            assert (refused.status, refused.json()["error"]) == (503, "store_unavailable"), refused.body
            assert (await request(balancer.port, "GET", "/readyz")).status == 200
            stopped_at_exit.append(replica)
            replica.start()
            ids: list[str] = []

            async def published(data: str) -> bool:
                resp = await request(
                    balancer.port, "POST", "/v1/streams/room", data.encode(), {"content-type": "text/plain"}
                )
                if resp.status == 201:
                    ids.append(str(resp.json()["id"]))
                return resp.status == 201

            await until("the replica takes the writes", lambda: published("one"), 20)

            # published through one host, resumed exactly through the others
            ids.append(await publish(balancer.port, "room", "two"))
            for _ in range(3):
                async with open_sse(balancer.port, "/v1/streams/room", {"last-event-id": ids[0]}) as resumed:
                    assert resumed.status == 200
                    [event] = await resumed.take(1)
                    assert (event.id, event.data) == (ids[1], "two")

            # taking a host out in the balancer: new connections go to the other one only
            balancer.command("set server sluice/sluice2 state drain")
            assert set(await answering_hosts(balancer, hosts, 4)) == {"sluice1"}
            balancer.command("set server sluice/sluice2 state ready")
            await until("sluice2 is back", lambda: balancer.states()["sluice2"] == "UP", 10)

            async with open_sse(balancer.port, "/v1/streams/room", {"last-event-id": ids[1]}) as sse:
                assert sse.status == 200
                # Redis gone (kill -9 of the primary and the replica: no failover possible)
                primary.stop(signal.SIGKILL)
                replica.stop(signal.SIGKILL)
                await until(
                    "every host is out of the balancer (/readyz 503 store_unavailable)",
                    lambda: balancer.states()["sluice1"] == balancer.states()["sluice2"] == "DOWN",
                    30,
                )
                assert await refused_through_balancer(balancer)
                primary.start()  # from its AOF: every acknowledged publish is there
                replica.start()
                await until(
                    "both hosts are back",
                    lambda: balancer.states()["sluice1"] == balancer.states()["sluice2"] == "UP",
                    30,
                )
                await until("publishes are taken again", lambda: published("three"), 30)
                # the open subscription survived the outage and continues exactly
                [event] = await sse.take(1)
                assert (event.id, event.data) == (ids[2], "three")

            history = await request(balancer.port, "GET", "/v1/streams/room/poll?from=start&timeout=0")
            assert history.status == 200
            events = history.json()["events"]
            assert [(e["id"], e["data"]) for e in events] == list(zip(ids, ["one", "two", "three"], strict=True))
