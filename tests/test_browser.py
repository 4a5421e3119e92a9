"""A real browser against a real ``sluice serve``: headless Debian Chromium loads pages from other
origins (small servers in this test) and uses Sluice the way a web app does.

- ``EventSource``, cross-origin (CORS), through a rolling restart and a crash of every worker:
  every event exactly once, in order. The page subscribes with ``?from=start``; on a reconnect
  the browser itself sends ``Last-Event-ID``, so a server that ignored it would replay from the
  start (duplicates).
- ``WebSocket`` with subprotocol ``sluice.json.v1`` from an allowed origin subscribes and
  publishes; from an origin outside ``cors.ws_allowed_origins`` the upgrade is refused.

Each page reports what it saw to its own origin after every change (``n`` counts the reports;
the test keeps the newest per origin). ``scripts/test`` installs Chromium when run as root.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from tests.client import publish, request
from tests.supervised import Supervised, supervisor

pytestmark = pytest.mark.slow

STREAM = "browser:tokens"
CHROMIUM_FLAGS = [  # no network beyond loopback here: nothing in the background, no QUIC
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

REPORT = """const log = {n: 0, origin: location.origin, got: [], resets: [], acks: [], opens: 0, closes: [],
             errors: 0, protocol: null};
function report() {
  log.n += 1;
  fetch("/report", {method: "POST", body: JSON.stringify(log)});
}
"""

SSE_PAGE = """<!doctype html><meta charset="utf-8"><title>sse</title><script>%(report)s
const es = new EventSource("http://%(sluice)s/v1/streams/%(stream)s?from=start");
es.onopen = () => { log.opens += 1; report(); };
es.onmessage = (e) => { log.got.push([e.lastEventId, e.data]); report(); };
es.addEventListener("sluice.reset", (e) => { log.resets.push(e.data); report(); });
</script>"""

WS_PAGE = """<!doctype html><meta charset="utf-8"><title>ws</title><script>%(report)s
const ws = new WebSocket("ws://%(sluice)s/v1/ws", "sluice.json.v1");
ws.onopen = () => {
  log.opens += 1;
  log.protocol = ws.protocol;
  ws.send(JSON.stringify({op: "subscribe", stream: "%(stream)s", from: "start"}));
  ws.send(JSON.stringify({op: "publish", stream: "%(stream)s", data: "from the browser", ref: 1}));
  report();
};
ws.onmessage = (e) => {
  const m = JSON.parse(e.data);
  if (m.op === "event") log.got.push([m.id, m.data]);
  else if (m.op === "published") log.acks.push([m.ref, m.id]);
  else if (m.op === "reset") log.resets.push(m);
  report();
};
ws.onerror = () => { log.errors += 1; report(); };
ws.onclose = (e) => { log.closes.push(e.code); report(); };
</script>"""

Report = dict[str, Any]


class Pages:
    """The pages' origins: every listener serves ``html`` at ``/`` and takes ``POST /report``."""

    def __init__(self) -> None:
        self.html = b""
        self.reports: dict[str, Report] = {}
        self.changed = trio.Event()

    def show(self, template: str, sluice_port: int) -> None:
        """Serve ``template`` filled in for the Sluice at ``sluice_port``."""
        fill = {"report": REPORT, "sluice": f"127.0.0.1:{sluice_port}", "stream": STREAM}
        self.html = (template % fill).encode()

    async def handle(self, stream: trio.SocketStream) -> None:
        """Answer one connection's requests; a connection idle for 30 s is closed, and a browser
        that goes away mid-request (when the test ends it) is let go."""
        async with stream:
            with trio.move_on_after(30), suppress(trio.BrokenResourceError, h11.RemoteProtocolError):
                await self._serve(stream, h11.Connection(h11.SERVER))

    async def _serve(self, stream: trio.SocketStream, conn: h11.Connection) -> None:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if not isinstance(event, h11.Request):
                return
            body = b""
            while not isinstance(ev := conn.next_event(), h11.EndOfMessage):
                if ev is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(ev, h11.Data):
                    body += ev.data
            if event.target == b"/report":
                self._take(json.loads(body))
                status, payload, kind = 204, b"", b"text/plain"
            else:
                status, payload, kind = 200, self.html, b"text/html; charset=utf-8"
            headers = [(b"content-type", kind), (b"content-length", str(len(payload)).encode())]
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
            await stream.send_all(conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()))
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    def _take(self, report: Report) -> None:
        """Keep the newest report of each origin (reports may arrive out of order)."""
        if report["n"] > self.reports.get(report["origin"], {"n": 0})["n"]:
            self.reports[report["origin"]] = report
            self.changed.set()
            self.changed = trio.Event()

    async def wait_for(self, origin: str, done: Callable[[Report], bool]) -> Report:
        """The first report of ``origin`` for which ``done`` is true."""
        while (report := self.reports.get(origin)) is None or not done(report):
            await self.changed.wait()
        return report


@asynccontextmanager
async def open_pages(count: int) -> AsyncIterator[tuple[Pages, list[str]]]:
    """``count`` origins (one listener each) serving the same :class:`Pages`."""
    pages = Pages()
    async with trio.open_nursery() as nursery:
        origins = []
        for _ in range(count):
            listeners = await nursery.start(partial(trio.serve_tcp, pages.handle, 0, host="127.0.0.1"))
            origins.append(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")
        yield pages, origins
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_browser(profile: Path, url: str) -> AsyncIterator[None]:
    """Headless Chromium showing ``url`` (one page: headless takes one); ended with everything it
    started."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "the browser tests need Debian's chromium (scripts/test installs it as root)"
    argv = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url]
    quiet = subprocess.DEVNULL
    browser = subprocess.Popen(argv, stdout=quiet, stderr=quiet, start_new_session=True)
    try:
        yield
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=10)
        finally:
            with suppress(ProcessLookupError):  # its helper processes, if any are left
                os.killpg(browser.pid, signal.SIGKILL)


async def publish_through(port: int, data: str) -> str:
    """Publish, retrying while no worker listens (between a crash and its replacement)."""
    while True:
        try:
            return await publish(port, STREAM, data)
        except OSError:
            await trio.sleep(0.05)


async def kill_every_worker(sup: Supervised, slots: int) -> None:
    """SIGKILL each slot's current worker (not one still draining after a reload) and wait until
    as many replacements report ``READY``."""
    current = [sup.started(slot)[-1] for slot in range(slots)]
    marker = len(sup.notes.messages)
    for pid in current:
        os.kill(pid, signal.SIGKILL)
    for _ in current:
        marker = await sup.notes.wait("STATUS=serving on", marker) + 1


def seen(events: int, opens: int) -> Callable[[Report], bool]:
    return lambda r: len(r["got"]) >= events and r["opens"] >= opens


async def test_a_browser_eventsource_resumes_across_a_deploy_and_a_crash_exactly_once(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with open_pages(1) as (pages, [origin]):
            args = ["--workers", "2", "--set", "sse.retry_ms=200", "--set", "sse.retry_jitter_ms=100"]
            async with supervisor(tmp_path, *args, env={"SLUICE_CORS_ALLOW_ORIGINS": origin}) as sup:
                await sup.ready()
                pages.show(SSE_PAGE, sup.port)
                published = [(await publish(sup.port, STREAM, f"token {i}"), f"token {i}") for i in range(3)]
                async with open_browser(tmp_path / "profile", f"{origin}/"):
                    await pages.wait_for(origin, seen(3, opens=1))  # the history, replayed from the start

                    os.kill(sup.proc.pid, signal.SIGHUP)  # a deploy: every worker drains and is replaced
                    reloading = await sup.notes.wait("RELOADING=1")
                    published += [(await publish_through(sup.port, f"token {i}"), f"token {i}") for i in range(3, 6)]
                    await sup.ready(reloading)
                    await pages.wait_for(origin, seen(6, opens=2))

                    await kill_every_worker(sup, 2)  # a crash: the connection just ends
                    published += [(await publish_through(sup.port, f"token {i}"), f"token {i}") for i in range(6, 9)]
                    report = await pages.wait_for(origin, seen(9, opens=3))

    assert [tuple(pair) for pair in report["got"]] == published
    assert report["resets"] == []


async def test_a_browser_websocket_subscribes_and_publishes_and_a_foreign_origin_is_refused(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with open_pages(2) as (pages, [allowed, foreign]):
            env = {"SLUICE_CORS_WS_ALLOWED_ORIGINS": allowed}
            async with supervisor(tmp_path, "--workers", "1", env=env) as sup:
                await sup.ready()
                pages.show(WS_PAGE, sup.port)
                first = await publish(sup.port, STREAM, "from the test")
                async with open_browser(tmp_path / "allowed", f"{allowed}/"):
                    report = await pages.wait_for(allowed, lambda r: len(r["got"]) >= 2 and r["acks"])
                async with open_browser(tmp_path / "foreign", f"{foreign}/"):
                    refused = await pages.wait_for(foreign, lambda r: r["closes"])
                # /metrics may show the refusal a moment after the page saw it: poll until it does
                refusal = 'sluice_edge_auth_refused_total{status="403",reason="origin"} '
                while refusal not in (metrics := (await request(sup.port, "GET", "/metrics")).body.decode()):
                    await trio.sleep(0.05)

    [[ref, second]] = report["acks"]
    assert report["protocol"] == "sluice.json.v1"
    assert ref == 1
    assert [tuple(pair) for pair in report["got"]] == [(first, "from the test"), (second, "from the browser")]
    assert report["closes"] == report["resets"] == []
    assert (refused["opens"], refused["errors"], refused["closes"]) == (0, 1, [1006])  # no upgrade at all
    assert f"{refusal}1\n" in metrics  # one refusal: the foreign page's upgrade
