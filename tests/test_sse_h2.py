"""SSE over HTTP/2: many streams on one connection, resume, TLS with ALPN, and curl as a client."""

from __future__ import annotations

import json
import ssl
import subprocess
from pathlib import Path

import trio
import trustme

from tests.client import Running, publish, start_sluice, wait_live
from tests.h2client import open_h2


async def test_fifty_streams_on_one_connection(sluice: Running) -> None:
    with trio.fail_after(20):
        c = await open_h2(sluice.port)
        sids = {await c.get(f"/v1/streams/mux:{i}"): f"mux:{i}" for i in range(60)}
        for name in sids.values():
            await wait_live(sluice.ctx, name)
        await c.until(lambda: all(st.status == 200 for st in c.streams.values()))
        want = {name: await publish(sluice.port, name, f"to {name}") for name in sids.values()}
        await c.until(lambda: all(len(c.streams[s].events) == 1 for s in sids))
        for sid, name in sids.items():
            (ev,) = c.streams[sid].events
            assert (ev.id, ev.data) == (want[name], f"to {name}")
            assert c.streams[sid].headers["content-type"] == "text/event-stream"
        # a reset of one stream leaves the others alone
        victim = next(iter(sids))
        c.cancel(victim)
        await c.flush()
        name = sids[next(s for s in sids if s != victim)]
        nid = await publish(sluice.port, name, "after reset")
        await c.until(lambda: any(ev.id == nid for st in c.streams.values() for ev in st.events))


async def test_resume_over_h2_and_publish_on_same_connection(sluice: Running) -> None:
    with trio.fail_after(20):
        ids = [await publish(sluice.port, "h2r", f"e{i}") for i in range(6)]
        c = await open_h2(sluice.port)
        sid = await c.get("/v1/streams/h2r", {"last-event-id": ids[2]})
        await c.until(lambda: len(c.streams[sid].events) == 3)
        assert [e.id for e in c.streams[sid].events] == ids[3:]
        await wait_live(sluice.ctx, "h2r")
        pid = await c.post("/v1/streams/h2r", b"via h2")
        await c.until(lambda: c.streams[pid].ended and len(c.streams[sid].events) == 4)
        assert c.streams[pid].status == 201
        new_id = json.loads(c.streams[pid].body)["id"]
        assert c.streams[sid].events[-1].id == new_id


async def test_tls_alpn_h2(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    s = await start_sluice(
        nursery, tmp_path, server={"tls_cert": str(tmp_path / "server.pem"), "tls_key": str(tmp_path / "server.pem")}
    )
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    client_ctx.set_alpn_protocols(["h2", "http/1.1"])
    with trio.fail_after(20):
        c = await open_h2(s.port, client_ctx)
        sid = await c.get("/v1/streams/tls?from=start")
        await c.until(lambda: c.streams[sid].status == 200)
        await wait_live(s.ctx, "tls")
        pid = await c.post("/v1/streams/tls", b"secret")
        await c.until(lambda: len(c.streams[sid].events) == 1 and c.streams[pid].ended)
        assert c.streams[sid].events[0].data == "secret"


async def _curl(*args: str, timeout: float = 10) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        ["curl", "-sS", "--max-time", str(timeout), *args], capture_stdout=True, capture_stderr=True, check=False
    )


async def test_curl_h1_and_h2c_read_to_end(sluice: Running) -> None:
    with trio.fail_after(30):
        ids = [await publish(sluice.port, "curl", f"line {i}") for i in range(3)]
        await _curl("-X", "POST", f"{sluice.base}/v1/streams/curl/close")
        for flags in (["-N", "--http1.1"], ["-N", "--http2-prior-knowledge"]):
            out = await _curl(*flags, "-D", "-", f"{sluice.base}/v1/streams/curl?from=start")
            assert out.returncode == 0, out.stderr
            text = out.stdout.decode()
            assert ("HTTP/2 200" in text) == ("--http2-prior-knowledge" in flags)
            for i, eid in enumerate(ids):
                assert f"id: {eid}\ndata: line {i}\n\n" in text
            assert text.rstrip().endswith("event: sluice.end\ndata: {}")


async def test_curl_streams_live_events(sluice: Running) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            result: list[subprocess.CompletedProcess[bytes]] = []

            async def reader() -> None:
                result.append(await _curl("-N", "--http2-prior-knowledge", f"{sluice.base}/v1/streams/live"))

            n.start_soon(reader)
            await wait_live(sluice.ctx, "live")
            eid = await publish(sluice.port, "live", "hot")
            await publish(sluice.port, "live", "x")
            await trio.run_process(
                ["curl", "-sS", "-X", "POST", f"{sluice.base}/v1/streams/live/close"], capture_stdout=True
            )
        assert f"id: {eid}\ndata: hot\n\n" in result[0].stdout.decode()
