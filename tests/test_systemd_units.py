"""The files in systemd/: the service and socket units, the drop-in for a Redis-backed host, the
kernel settings, the host configuration.

The units are checked by ``systemd-analyze verify`` (which is silent about many mistakes, so its
output is searched for warnings too) and by reading the settings the server depends on.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import Config, load_config, resolve_config

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
SERVICE = SYSTEMD / "sluice.service"
SOCKET = SYSTEMD / "sluice.socket"
SYSCTL = SYSTEMD / "99-sluice.conf"
HOST_CONFIG = SYSTEMD / "sluice.toml"
REDIS_DROPIN = SYSTEMD / "redis-host.conf"
DROPIN_DIR = "sluice.service.d"  # installed as /etc/systemd/system/sluice.service.d/redis.conf
DROPIN_NAME = "redis.conf"

INSTALLED_CONFIG = "/etc/sluice/sluice.toml"
STATE_DIR = "/var/lib/sluice"
MIN_NOFILE = 1_048_576

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (scripts/test installs Debian's systemd package when run as root)",
)

# A setting systemd does not know, wherever it is reported (it still exits 0 for these).
UNKNOWN_SETTING = re.compile(r"unknown (key|section|lvalue)", re.IGNORECASE)


# ---- reading the files ----------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """``{section: [(key, value), ...]}`` in file order, keeping repeated keys (systemd.syntax(7))."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"not a setting inside a section: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_settings(path: Path, section: str) -> dict[str, list[str]]:
    """Every value assigned to each key of ``section``, in order."""
    found: dict[str, list[str]] = {}
    for key, value in parse_unit(path.read_text(encoding="utf-8")).get(section, []):
        found.setdefault(key, []).append(value)
    return found


def single(settings: dict[str, list[str]], key: str) -> str:
    values = settings.get(key)
    assert values, f"{key}= is not set"
    assert len(values) == 1, f"{key}= is set {len(values)} times: {values}"
    return values[0]


_TIME_UNITS = {
    "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3,
    "": 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
}  # fmt: skip


def timespan(text: str) -> float:
    """A systemd time span (``45s``, ``1min 30s``, ``90``, ``infinity``) in seconds."""
    if text.strip() == "infinity":
        return math.inf
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    assert parts and re.fullmatch(r"(\s*\d+(\.\d+)?\s*[a-z]*)+\s*", text), f"not a time span: {text!r}"
    total = 0.0
    for number, unit in parts:
        assert unit in _TIME_UNITS, f"unexpected time unit {unit!r} in {text!r}"
        total += float(number) * _TIME_UNITS[unit]
    return total


def sysctl_settings() -> dict[str, str]:
    settings: dict[str, str] = {}
    for raw in SYSCTL.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and line[0] not in "#;":
            key, sep, value = line.partition("=")
            assert sep, f"not a sysctl setting: {line!r}"
            assert key.strip() not in settings, f"{key.strip()} is set twice"
            settings[key.strip()] = " ".join(value.split())
    return settings


# ---- systemd-analyze ------------------------------------------------------------------------


def run_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    env = {**os.environ, "LC_ALL": "C", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""}
    return subprocess.run([SYSTEMD_ANALYZE, *args], capture_output=True, text=True, env=env, timeout=120, check=False)


def real_executable() -> str:
    """The ``sluice`` script of the environment running the tests, or ``/bin/true``."""
    script = Path(sys.executable).with_name("sluice")
    return str(script) if os.access(script, os.X_OK) else "/bin/true"


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The shipped units, copied, with the Redis drop-in where systemd looks for it next to the
    service; only the ExecStart= program is replaced by one that exists here (``verify`` checks
    that it is executable), its arguments are kept."""
    shutil.copy(SOCKET, tmp_path / SOCKET.name)
    (tmp_path / DROPIN_DIR).mkdir()
    shutil.copy(REDIS_DROPIN, tmp_path / DROPIN_DIR / DROPIN_NAME)
    lines = SERVICE.read_text(encoding="utf-8").splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith("ExecStart=")]
    assert len(starts) == 1, "one ExecStart= line expected"
    program = shlex.split(lines[starts[0]].removeprefix("ExecStart="))[0]
    lines[starts[0]] = lines[starts[0]].replace(program, real_executable(), 1)
    (tmp_path / SERVICE.name).write_text("".join(lines), encoding="utf-8")
    return tmp_path


def verify_problems(*units: Path) -> tuple[int, list[str]]:
    """``systemd-analyze verify``'s exit status and what it said about our units (it says nothing
    about a clean unit), plus any unknown setting it reported."""
    result = run_analyze("verify", "--man=no", *map(str, units))
    lines = (result.stdout + result.stderr).splitlines()
    return result.returncode, [line for line in lines if "sluice" in line or UNKNOWN_SETTING.search(line)]


@needs_systemd_analyze
def test_the_verified_units_are_the_shipped_text(unit_dir: Path) -> None:
    shipped = SERVICE.read_text(encoding="utf-8").splitlines()
    verified = (unit_dir / SERVICE.name).read_text(encoding="utf-8").splitlines()
    differ = [(a, b) for a, b in zip(shipped, verified, strict=True) if a != b]
    assert len(differ) == 1 and differ[0][0].startswith("ExecStart="), differ
    assert shlex.split(differ[0][0])[1:] == shlex.split(differ[0][1])[1:]
    assert (unit_dir / SOCKET.name).read_bytes() == SOCKET.read_bytes()
    assert (unit_dir / DROPIN_DIR / DROPIN_NAME).read_bytes() == REDIS_DROPIN.read_bytes()


@needs_systemd_analyze
def test_systemd_analyze_verify_is_clean(unit_dir: Path) -> None:
    status, problems = verify_problems(unit_dir / SERVICE.name, unit_dir / SOCKET.name)
    assert status == 0 and problems == [], "\n".join(problems)


@needs_systemd_analyze
def test_verify_problems_catches_unknown_keys_and_bad_values(unit_dir: Path) -> None:
    """The check above would notice a typo: systemd only warns about it and exits 0."""
    service = unit_dir / SERVICE.name
    text = service.read_text(encoding="utf-8")
    service.write_text(text.replace("[Service]\n", "[Service]\nKillMod=mixed\nTimeoutStopSec=soon\n"), "utf-8")
    _, problems = verify_problems(service)
    assert any("KillMod" in line for line in problems), problems
    assert any("soon" in line for line in problems), problems


@needs_systemd_analyze
def test_verify_reads_the_redis_drop_in(unit_dir: Path) -> None:
    """The clean verdict above covers the drop-in: verify reports a mistake made in it."""
    dropin = unit_dir / DROPIN_DIR / DROPIN_NAME
    text = dropin.read_text(encoding="utf-8")
    dropin.write_text(text.replace("[Service]\n", "[Service]\nStateDirectry=\nWorkingDirectory=run\n"), "utf-8")
    _, problems = verify_problems(unit_dir / SERVICE.name)
    assert any("StateDirectry" in line and DROPIN_NAME in line for line in problems), problems
    assert any("WorkingDirectory" in line and DROPIN_NAME in line for line in problems), problems


# ---- what the server relies on ---------------------------------------------------------------


def service() -> dict[str, list[str]]:
    return unit_settings(SERVICE, "Service")


def test_service_is_notify_with_reload_by_sighup_and_a_watchdog() -> None:
    s = service()
    assert single(s, "Type") == "notify"
    assert single(s, "NotifyAccess") == "main"
    argv = shlex.split(single(s, "ExecStart"))
    assert argv[0].startswith("/") and Path(argv[0]).name == "sluice"
    assert argv[1:] == ["serve", "--config", INSTALLED_CONFIG]
    assert single(s, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert single(s, "KillMode") == "mixed"
    assert single(s, "Restart") == "on-failure"
    assert 0 < timespan(single(s, "RestartSec")) < 60
    assert 0 < timespan(single(s, "WatchdogSec")) < math.inf
    assert 0 < timespan(single(s, "TimeoutStartSec")) < math.inf


def test_stop_timeout_outlasts_the_drain() -> None:
    """systemd's SIGKILL must come after the supervisor's own hard deadline and its margin."""
    try:  # the supervisor's own margin past the drain deadline, where it defines one
        supervisor = importlib.import_module("server.process.supervisor")
    except ImportError:
        supervisor = None
    margin = getattr(supervisor, "STOP_MARGIN", 0.0) + getattr(supervisor, "KILL_WAIT", 0.0)
    stop = timespan(single(service(), "TimeoutStopSec"))
    default = Config().drain
    host = load_config(config_path=str(HOST_CONFIG), environ={}).drain
    assert default.window < default.deadline
    assert stop > default.deadline + margin
    assert stop > host.deadline + margin


def test_the_redis_host_stop_timeout_outlasts_the_unready_delay_and_the_drain() -> None:
    """The drop-in's stop waits ``drain.unready_delay`` before the drain: systemd's SIGKILL must
    come after both and the supervisor's margin."""
    supervisor = importlib.import_module("server.process.supervisor")
    margin = supervisor.STOP_MARGIN + supervisor.KILL_WAIT
    drain = load_config(config_path=str(HOST_CONFIG), environ=dropin_environment()).drain
    stop = timespan(single(dropin("Service"), "TimeoutStopSec"))
    assert drain.unready_delay > 0
    assert stop > drain.unready_delay + drain.deadline + margin


def test_file_descriptor_limit_and_kernel_ceiling() -> None:
    nofile = single(service(), "LimitNOFILE").split(":")
    assert all(int(value) >= MIN_NOFILE for value in nofile)
    assert int(sysctl_settings()["fs.nr_open"]) >= max(int(value) for value in nofile)
    assert int(sysctl_settings()["fs.file-max"]) > MIN_NOFILE


def test_directories_and_user() -> None:
    s = service()
    assert single(s, "DynamicUser") == "yes"
    assert single(s, "StateDirectory") == "sluice"
    assert single(s, "RuntimeDirectory") == "sluice"
    assert single(s, "WorkingDirectory") == STATE_DIR
    assert "User" not in s and "Group" not in s


SANDBOX = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "UMask": "0077",
}


@pytest.mark.parametrize(("key", "expected"), SANDBOX.items())
def test_sandboxing(key: str, expected: str) -> None:
    assert single(service(), key) == expected


def test_network_and_system_call_filters() -> None:
    s = service()
    assert set(single(s, "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    filters = s["SystemCallFilter"]
    assert filters[0] == "@system-service"
    assert all(f.startswith("~") for f in filters[1:]), "later lines may only take system calls away"


def test_socket_unit_gives_reuseport_sockets_to_the_service() -> None:
    s = unit_settings(SOCKET, "Socket")
    listens = s["ListenStream"]
    assert len(set(listens)) == 1, "one address, repeated once per worker slot"
    assert single(s, "ReusePort") == "yes"
    assert single(s, "Service") == SERVICE.name
    backlog = int(single(s, "Backlog"))
    assert backlog <= int(sysctl_settings()["net.core.somaxconn"]), "the kernel would cap the backlog"
    host = load_config(config_path=str(HOST_CONFIG), environ={})
    assert listens[0].rpartition(":")[2] == str(host.server.port)


REQUIRED_SYSCTLS = {
    "fs.file-max",
    "fs.nr_open",
    "net.core.somaxconn",
    "net.core.netdev_max_backlog",
    "net.ipv4.tcp_max_syn_backlog",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_migrate_req",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_tw_reuse",
    "net.ipv4.tcp_mem",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def test_sysctl_settings_are_present_and_explained() -> None:
    settings = sysctl_settings()
    assert settings.keys() >= REQUIRED_SYSCTLS
    assert settings["net.ipv4.tcp_migrate_req"] == "1"
    for key in ("net.ipv4.tcp_mem", "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"):
        low, default, high = map(int, settings[key].split())
        assert low <= default <= high, key
    low_port, high_port = map(int, settings["net.ipv4.ip_local_port_range"].split())
    assert 1024 <= low_port < high_port <= 65535
    lines = SYSCTL.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[a-z0-9_.-]+ = \S.*", line), f"line {i + 1}: {line!r}"
            assert i > 0 and lines[i - 1].startswith("#"), f"line {i + 1} has no comment above it: {line!r}"


def test_host_config_loads_and_matches_the_units() -> None:
    config = load_config(config_path=str(HOST_CONFIG), environ={})
    assert config.server.host == "0.0.0.0"
    assert config.server.port == 8080
    assert config.server.workers == 0
    assert not config.server.tls_enabled
    assert config.store.backend == "sqlite"
    assert Path(config.store.path).parent == Path(STATE_DIR)
    assert config.drain.window < config.drain.deadline


# ---- the drop-in for a Redis-backed host ------------------------------------------------------


def dropin(section: str) -> dict[str, list[str]]:
    return unit_settings(REDIS_DROPIN, section)


def dropin_environment(text: str | None = None) -> dict[str, str]:
    """The variables the drop-in's ``Environment=`` lines set (``text``: another version of it)."""
    settings = parse_unit(REDIS_DROPIN.read_text(encoding="utf-8") if text is None else text)
    env: dict[str, str] = {}
    for key, value in settings.get("Service", []):
        if key == "Environment":
            for word in shlex.split(value):
                name, sep, val = word.partition("=")
                assert sep, f"not NAME=VALUE: {word!r}"
                env[name] = val
    return env


def test_redis_drop_in_waits_for_the_network_not_for_a_local_redis() -> None:
    unit = dropin("Unit")
    assert "network-online.target" in single(unit, "Wants").split()
    assert "network-online.target" in single(unit, "After").split()
    named = " ".join(value for values in unit.values() for value in values)
    assert "redis" not in named, "Redis is on other hosts: the drop-in must not depend on a local unit"


def test_redis_drop_in_sets_a_valid_redis_configuration_over_the_host_file() -> None:
    env = dropin_environment()
    assert all(name.startswith("SLUICE_") for name in env), env
    resolved = resolve_config(config_path=str(HOST_CONFIG), environ=env)
    assert resolved.warnings == (), resolved.warnings  # every variable names a real key
    store = resolved.config.store
    assert store.backend == "redis"
    assert len(store.redis_sentinels) == 3 and all(s.endswith(":26379") for s in store.redis_sentinels)
    assert store.redis_master is not None and store.redis_url is None
    assert {resolved.sources[f"store.{key}"] for key in ("backend", "redis_sentinels", "redis_master")} == {
        "SLUICE_STORE_BACKEND",
        "SLUICE_STORE_REDIS_SENTINELS",
        "SLUICE_STORE_REDIS_MASTER",
    }


def test_redis_drop_in_url_variant_loads_too() -> None:
    """Its comment's alternative: SLUICE_STORE_REDIS_URL from an environment file, the Sentinel
    lines removed."""
    text = REDIS_DROPIN.read_text(encoding="utf-8")
    assert "#EnvironmentFile=/etc/sluice/redis.env" in text and "SLUICE_STORE_REDIS_URL=" in text
    env = {k: v for k, v in dropin_environment().items() if "SENTINELS" not in k and "MASTER" not in k}
    env["SLUICE_STORE_REDIS_URL"] = "redis://:secret@10.0.0.21:6379/0"
    config = load_config(config_path=str(HOST_CONFIG), environ=env)
    assert (config.store.backend, config.store.redis_url) == ("redis", "redis://:secret@10.0.0.21:6379/0")


def test_redis_drop_in_drops_the_state_directory_and_works_in_the_runtime_directory() -> None:
    s = dropin("Service")
    assert single(s, "StateDirectory") == "", "an empty StateDirectory= resets the service's list"
    runtime = single(service(), "RuntimeDirectory")
    assert single(s, "WorkingDirectory") == f"/run/{runtime}"
    assert single(service(), "WorkingDirectory") == STATE_DIR  # what the drop-in replaces
