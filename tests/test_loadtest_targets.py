"""loadtest.targets: every server the load test measures starts, speaks SSE on the same paths, stops.

Each target runs for real (Sluice via ``python -m server.cli``, the uvicorn baseline, nginx +
nchan). The nchan test needs Debian's ``nginx`` and ``libnginx-mod-nchan`` (``scripts/test``
installs them when it runs as root); without them it fails, unless ``SLUICE_TEST_NO_NCHAN=1``
is set, which turns the failure into a skip.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loadtest.baselines import nchan
from loadtest.targets import Target, open_target, process_tree

TIMEOUT = 5.0  # seconds for any one step
CONFIG: dict[str, dict[str, dict[str, object]]] = {
    "sluice": {"drain": {"window": 0.2, "deadline": 3}, "store": {"max_events": 100}},
    "uvicorn": {"store": {"max_events": 100}},
    "nchan": {"store": {"max_events": 100}},
}


@dataclass
class SseEvent:
    id: str | None
    type: str
    data: str


@dataclass
class SseReader:
    """One SSE response read from a raw socket; understands chunked and close-delimited bodies."""

    sock: socket.socket
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False
    raw: bytes = b""  # received, not yet decoded body bytes
    text: str = ""  # decoded body not yet split into events
    ended: bool = False
    events: list[SseEvent] = field(default_factory=list)
    comments: int = 0  # comment lines (heartbeats) seen

    @classmethod
    def open(cls, target: Target, path: str, last_event_id: str | None = None) -> SseReader:
        sock = socket.create_connection((target.host, target.port), timeout=TIMEOUT)
        head = f"GET {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\nAccept: text/event-stream\r\n"
        if last_event_id is not None:
            head += f"Last-Event-ID: {last_event_id}\r\n"
        sock.sendall((head + "\r\n").encode())
        reader = cls(sock)
        data = b""
        while b"\r\n\r\n" not in data:
            data += reader.recv()
        head_bytes, reader.raw = data.split(b"\r\n\r\n", 1)
        status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
        reader.status = int(status_line.split()[1])
        reader.headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
        reader.chunked = reader.headers.get("transfer-encoding", "").lower() == "chunked"
        return reader

    def recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            self.ended = True
        return chunk

    def _decode(self) -> None:
        if not self.chunked:
            self.text += self.raw.decode()
            self.raw = b""
            return
        while b"\r\n" in self.raw:
            size_line, rest = self.raw.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            if len(rest) < size + 2:
                return
            if size == 0:
                self.ended = True
            self.text += rest[:size].decode()
            self.raw = rest[size + 2 :]

    def _parse(self) -> None:
        while "\n\n" in self.text:
            block, self.text = self.text.split("\n\n", 1)
            fields: dict[str, list[str]] = {}
            for line in block.split("\n"):
                if line.startswith(":"):
                    self.comments += 1
                elif line:
                    name, _, value = line.partition(":")
                    fields.setdefault(name, []).append(value.removeprefix(" "))
            if "data" in fields:
                event_id, event_type = fields.get("id", [None])[-1], fields.get("event", ["message"])[-1]
                self.events.append(SseEvent(event_id, event_type, "\n".join(fields["data"])))

    def wait_events(self, count: int) -> list[SseEvent]:
        """Read until ``count`` events (comments and retry: fields aside) have arrived in all."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            self._decode()
            self._parse()
            if len(self.events) >= count:
                return self.events[:count]
            assert not self.ended, f"response ended after {self.events}"
            assert time.monotonic() < deadline, f"only {self.events} within {TIMEOUT}s"
            self.raw += self.recv()

    def wait_end(self) -> None:
        """Read until the server ends the response."""
        deadline = time.monotonic() + TIMEOUT
        while not self.ended:
            assert time.monotonic() < deadline, f"the response did not end within {TIMEOUT}s"
            self.raw += self.recv()
            self._decode()
        self._parse()

    def close(self) -> None:
        self.sock.close()


def request(target: Target, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(target.host, target.port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "text/plain"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def publish(target: Target, stream: str, data: str) -> None:
    status, body = request(target, "POST", f"/v1/streams/{stream}", data.encode())
    if target.kind == "nchan":  # 202: stored, nobody listening; 201: delivered to a subscriber
        assert status in (201, 202), (status, body)
    else:
        assert status == 201, (status, body)
        assert json.loads(body)["id"]


def alive(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + TIMEOUT
    while True:
        left = [p for p in pids if os.path.exists(f"/proc/{p}")]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def require_nchan() -> None:
    try:
        nchan.find_nginx()
        nchan.find_module()
    except nchan.NchanUnavailable as exc:
        if os.environ.get("SLUICE_TEST_NO_NCHAN") == "1":
            pytest.skip(f"SLUICE_TEST_NO_NCHAN=1: {exc}")
        pytest.fail(f"{exc} (or set SLUICE_TEST_NO_NCHAN=1 to skip this test)")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sluice", "uvicorn", "nchan"])
def test_target_serves_sse_and_stops(kind: str, tmp_path: Path) -> None:
    if kind == "nchan":
        require_nchan()
    with open_target(kind, workdir=tmp_path, workers=2, config=CONFIG[kind]) as target:
        assert target.kind == kind
        assert target.base_url == f"http://127.0.0.1:{target.port}"
        assert "sse-h1" in target.supports_transports
        assert target.supports_close == (kind != "nchan")
        tree = process_tree(target.pid)
        assert len(tree) == (1 if kind == "uvicorn" else 3), tree  # the master/supervisor and 2 workers
        assert request(target, "GET", "/healthz")[0] == 200

        for i in range(3):
            publish(target, "room:1", f"event {i}")
        reader = SseReader.open(target, "/v1/streams/room:1?from=start")
        assert reader.status == 200
        assert reader.headers["content-type"].startswith("text/event-stream")
        events = reader.wait_events(3)
        assert [e.data for e in events] == ["event 0", "event 1", "event 2"]
        assert all(e.id and e.type == "message" for e in events)

        publish(target, "room:1", "line one\nline two")  # live, possibly through another worker
        assert reader.wait_events(4)[3].data == "line one\nline two"

        resumed = SseReader.open(target, "/v1/streams/room:1", last_event_id=events[1].id)
        assert [e.data for e in resumed.wait_events(2)] == ["event 2", "line one\nline two"]
        resumed.close()

        if target.supports_close:
            assert request(target, "POST", "/v1/streams/room:1/close")[0] == 204
            reader.wait_end()
            assert reader.events[-1].type == "sluice.end"
            replay = SseReader.open(target, "/v1/streams/room:1?from=start")
            replay.wait_end()
            assert [e.type for e in replay.events] == ["message"] * 4 + ["sluice.end"]
            replay.close()
        reader.close()

    assert alive(tree) == []


@pytest.mark.slow
def test_uvicorn_baseline_details(tmp_path: Path) -> None:
    """from=now skips the backlog, Last-Event-ID wins over the query, a closed stream refuses publishes."""
    with open_target("uvicorn", workdir=tmp_path, config={"uvicorn": {"heartbeat": 0.2}}) as target:
        for i in range(3):
            publish(target, "s", f"e{i}")
        live = SseReader.open(target, "/v1/streams/s")  # default: from=now
        assert live.headers["cache-control"] == "no-store"
        time.sleep(0.5)  # heartbeat comments first
        publish(target, "s", "e3")
        (event,) = live.wait_events(1)
        assert (event.id, event.data) == ("4", "e3")
        assert live.comments >= 1
        resumed = SseReader.open(target, "/v1/streams/s?last_event_id=3&from=start", last_event_id="2")
        assert [(e.id, e.data) for e in resumed.wait_events(2)] == [("3", "e2"), ("4", "e3")]
        assert request(target, "POST", "/v1/streams/s?type=note", b"x")[0] == 201
        assert resumed.wait_events(3)[2].type == "note"
        assert request(target, "POST", "/v1/streams/s/close")[0] == 204
        assert request(target, "POST", "/v1/streams/s", b"late")[0] == 409
        live.wait_end()
        resumed.wait_end()
        assert live.events[-1].type == resumed.events[-1].type == "sluice.end"
        assert request(target, "GET", "/v1/streams/bad%2Fname")[0] in (400, 404)
        live.close()
        resumed.close()
