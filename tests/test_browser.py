"""A real browser's EventSource against a real ``sluice serve``: cross-origin (CORS), through a
rolling restart and a crash of every worker, it gets every event exactly once and in order.

Headless Debian Chromium loads a page from a second origin (a small server in this test). The
page subscribes with ``new EventSource(...?from=start)``; on every reconnect the browser itself
sends ``Last-Event-ID`` (so a server that ignored it would replay from the start: duplicates).
The page reports its whole transcript to its own origin after every event; the test keeps the
longest report. ``scripts/test`` installs Chromium (``chromium``) when it can.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from contextlib import suppress
from functools import partial
from pathlib import Path

import h11
import pytest
import trio

from tests.client import publish
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

PAGE = """<!doctype html><meta charset="utf-8"><title>sluice</title><script>
const got = [], resets = [];
let opens = 0;
function report() {
  fetch("/report", {method: "POST", body: JSON.stringify({got, resets, opens})});
}
const es = new EventSource("%(sluice)s/v1/streams/%(stream)s?from=start");
es.onopen = () => { opens += 1; report(); };
es.onmessage = (e) => { got.push([e.lastEventId, e.data]); report(); };
es.addEventListener("sluice.reset", (e) => { resets.push(e.data); report(); });
</script>"""


class Page:
    """The page's origin: serves ``PAGE`` at ``/`` and keeps the longest ``/report`` body."""

    def __init__(self) -> None:
        self.html = b""
        self.report: dict[str, list[object] | int] = {"got": [], "resets": [], "opens": 0}
        self.changed = trio.Event()

    async def handle(self, stream: trio.SocketStream) -> None:
        """Answer one connection's requests; a connection idle for 30 s is closed."""
        async with stream:
            with trio.move_on_after(30):
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

    def point_at(self, sluice_port: int) -> None:
        """Serve the page subscribing to the Sluice at ``sluice_port``."""
        self.html = (PAGE % {"sluice": f"http://127.0.0.1:{sluice_port}", "stream": STREAM}).encode()

    def _take(self, report: dict[str, list[object] | int]) -> None:
        longer = len(report["got"]) > len(self.report["got"])  # type: ignore[arg-type]
        if longer or report["opens"] > self.report["opens"]:  # type: ignore[operator]
            self.report = report
            self.changed.set()
            self.changed = trio.Event()

    async def wait_for(self, events: int, opens: int) -> None:
        """Until the page has reported ``events`` events and ``opens`` opened connections."""
        while len(self.report["got"]) < events or self.report["opens"] < opens:  # type: ignore[arg-type,operator]
            await self.changed.wait()


async def publish_through(port: int, data: str) -> str:
    """Publish, retrying while no worker listens (between a crash and its replacement)."""
    while True:
        try:
            return await publish(port, STREAM, data)
        except OSError:
            await trio.sleep(0.05)


async def kill_every_worker(sup: Supervised) -> None:
    """SIGKILL the live workers and wait until as many replacements report ``READY``."""
    live = [pid for pid in sup.started() if Path(f"/proc/{pid}").exists()]
    marker = len(sup.notes.messages)
    for pid in live:
        os.kill(pid, signal.SIGKILL)
    for _ in live:
        marker = await sup.notes.wait("STATUS=serving on", marker) + 1


async def test_a_browser_eventsource_resumes_across_a_deploy_and_a_crash_exactly_once(tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "the browser test needs Debian's chromium (scripts/test installs it as root)"
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            page = Page()
            listeners = await nursery.start(partial(trio.serve_tcp, page.handle, 0, host="127.0.0.1"))
            origin = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
            args = ["--workers", "2", "--set", "sse.retry_ms=200", "--set", "sse.retry_jitter_ms=100"]
            async with supervisor(tmp_path, *args, env={"SLUICE_CORS_ALLOW_ORIGINS": origin}) as sup:
                await sup.ready()
                page.point_at(sup.port)
                published = [(await publish(sup.port, STREAM, f"token {i}"), f"token {i}") for i in range(3)]
                argv = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"{origin}/"]
                quiet = subprocess.DEVNULL
                browser = subprocess.Popen(argv, stdout=quiet, stderr=quiet, start_new_session=True)
                try:
                    await page.wait_for(3, opens=1)  # the history, replayed from the start

                    os.kill(sup.proc.pid, signal.SIGHUP)  # a deploy: every worker drains and is replaced
                    reloading = await sup.notes.wait("RELOADING=1")
                    published += [(await publish_through(sup.port, f"token {i}"), f"token {i}") for i in range(3, 6)]
                    await sup.ready(reloading)
                    await page.wait_for(6, opens=2)

                    await kill_every_worker(sup)  # a crash: the connection just ends
                    published += [(await publish_through(sup.port, f"token {i}"), f"token {i}") for i in range(6, 9)]
                    await page.wait_for(9, opens=3)
                finally:
                    browser.terminate()
                    try:
                        browser.wait(timeout=10)
                    finally:
                        with suppress(ProcessLookupError):  # its helper processes, if any are left
                            os.killpg(browser.pid, signal.SIGKILL)
            nursery.cancel_scope.cancel()

    report = page.report
    assert [tuple(pair) for pair in report["got"]] == published  # type: ignore[union-attr]
    assert report["resets"] == []
    assert report["opens"] >= 3
