"""HTTP/2 on one connection, driven by h2 (h2c with prior knowledge, or h2 over TLS).

The reader task feeds h2 and dispatches its events; every request runs its handler in its own
task and cancel scope (RST_STREAM from the client cancels it). All output goes through the
connection's single :class:`~server.http.outbox.Outbox`.

Flushing: ``send_frame`` on a stream only hands the payload to h2 (flow-control accounting and
framing) and marks the connection dirty; the first mark of a wake-up asks the outbox writer for
one pull, and the writer calls ``data_to_send()`` once for everything every stream queued
meanwhile. A publish that reaches 50 streams of one connection therefore costs one flush and
one socket write for that connection, not 50.
"""

from __future__ import annotations

import contextlib
import logging

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.stream import StreamState

from server.http.base import Handler, HttpLimits, Request
from server.http.common import HOP_BY_HOP, encode_headers, header_dict, run_handler, split_target
from server.http.connection import Connection
from server.http.h2guard import FRAME_TOO_LARGE, HEAD_TIMEOUT, PREFACE, FrameGuard, H2Caps, ServerH2Connection
from server.http.h2stream import H2Stream
from server.http.stats import HttpStats

log = logging.getLogger(__name__)

_SENDABLE = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE})  # states that may send DATA
_HEADER_OVERHEAD = 32  # per header field, as HPACK counts a header list's size
__all__ = ["PREFACE", "H2Driver"]


class H2Driver:
    """Serves HTTP/2 streams on one connection until the connection ends.

    :meth:`run` returns when the connection should be closed gracefully (after a GOAWAY either
    way, or a protocol error); a peer that vanishes makes it abort the connection instead.
    """

    __slots__ = (
        "_blocked",
        "_calm",
        "_caps",
        "_dirty",
        "_draining",
        "_guard",
        "_initial",
        "_peer_closed",
        "_recv_scope",
        "_unflushed",
        "conn",
        "h2",
        "handler",
        "limits",
        "nursery",
        "outbox",
        "scheme",
        "stats",
        "streams",
    )

    def __init__(
        self,
        conn: Connection,
        nursery: trio.Nursery,
        handler: Handler,
        limits: HttpLimits,
        stats: HttpStats,
        *,
        scheme: str,
        initial: bytes,
    ) -> None:
        self.conn = conn
        self.outbox = conn.outbox
        self.nursery = nursery
        self.handler = handler
        self.limits = limits
        self.stats = stats
        self.scheme = scheme
        self._initial = initial
        self.streams: dict[int, H2Stream] = {}
        self._blocked: dict[H2Stream, None] = {}  # streams with pending data, in arrival order
        self._dirty = False
        self._unflushed = 0  # DATA bytes handed to h2 since the last pull
        self._draining = False  # no new streams; GOAWAY once the last one is done
        self._peer_closed = False  # the peer sent GOAWAY
        self._recv_scope: trio.CancelScope | None = None
        header_list = limits.max_header_bytes + _HEADER_OVERHEAD * limits.max_headers
        # A header block past twice the advertised list size is hostile (as for the decoder below).
        self._guard = FrameGuard(limits, 2 * header_list, trio.current_time())
        self._caps = H2Caps(conn.hooks)
        self._calm: str | None = None  # why the peer gets GOAWAY ENHANCE_YOUR_CALM
        self.h2 = h = ServerH2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        h.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.h2_max_concurrent_streams,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: limits.h2_max_inbound_frame,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: header_list,
            },
        )
        h.max_inbound_frame_size = limits.h2_max_inbound_frame
        # Past twice the advertised list size the peer is hostile: h2 then ends the connection.
        h.decoder.max_header_list_size = 2 * header_list

    # -- the reader ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it ends."""
        conn = self.conn
        conn.protocol = "h2"
        conn.on_close_request(self._close_requested)
        close_pending = conn.close_requested  # asked before the driver ran: serve what already came
        h = self.h2
        h.initiate_connection()
        self.outbox.set_pull(self._pull)
        data = self._initial
        self._initial = b""
        try:
            while True:
                if data and not self._receive(data):
                    return
                if close_pending:
                    close_pending = False
                    self._close_requested()
                self.flush_now()
                if self._peer_closed:
                    return
                if self._draining and not self.streams:
                    h.close_connection(error_code=ErrorCodes.NO_ERROR)
                    self.flush_now()
                    return
                deadline = trio.current_time() + self.limits.idle_timeout if not self.streams else float("inf")
                data = b""  # a cancelled read leaves nothing to feed again
                with trio.CancelScope(deadline=min(deadline, self._guard.head_deadline)) as scope:
                    self._recv_scope = scope
                    data = await conn.receive()
                    if not data:
                        conn.abort("client went away")
                        await trio.lowlevel.checkpoint()
                self._recv_scope = None
                if scope.cancelled_caught and trio.current_time() >= self._guard.head_deadline:
                    self.stats.header_timeouts += 1  # a slow preface or header block (see h2guard)
                    self._enhance_your_calm(HEAD_TIMEOUT)
                    return
                self._draining |= scope.cancelled_caught  # idle for idle_timeout, or a drain with no stream left
        finally:
            for stream in list(self.streams.values()):
                stream.on_dead()

    def _receive(self, data: bytes) -> bool:
        """Feed ``data`` to h2 and dispatch its events; False if the connection must end (GOAWAY
        queued and flushed): a protocol error, or a bound of :mod:`server.http.h2guard` hit."""
        h = self.h2
        guard = self._guard
        refused = guard.feed(data, trio.current_time())
        if refused is not None:
            calm = refused != FRAME_TOO_LARGE  # else a header block too large (CONTINUATION flood)
            self.stats.h2_calm += calm
            self._goaway(ErrorCodes.ENHANCE_YOUR_CALM if calm else ErrorCodes.FRAME_SIZE_ERROR)
            self._protocol_error(refused)
            return False
        caps = self._caps
        if not caps.resets_allowed(trio.current_time(), guard.take_resets()):
            self._enhance_your_calm("too many RST_STREAM frames")
            return False
        sent = h.resets_sent
        try:
            events = h.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            if exc.error_code == ErrorCodes.ENHANCE_YOUR_CALM:
                self.stats.h2_calm += 1  # e.g. an HPACK bomb (a header list past the decoder's bound)
            self._protocol_error(str(exc))  # h2 queued GOAWAY with the error code
            return False
        for event in events:
            self._dispatch(event)
            if self._calm is not None:
                break
        if self._calm is None and not caps.resets_allowed(trio.current_time(), h.resets_sent - sent):
            self._calm = "too many streams reset by the server for the client's doing"
        if self._calm is not None:
            self._enhance_your_calm(self._calm)
            return False
        return True

    def _goaway(self, code: ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection(error_code=code)

    def _enhance_your_calm(self, reason: str) -> None:
        """GOAWAY with ENHANCE_YOUR_CALM; the caller returns and the connection closes after a flush."""
        self.stats.h2_calm += 1
        log.info("HTTP/2 GOAWAY ENHANCE_YOUR_CALM for %s: %s", self.conn.client, reason)
        self._goaway(ErrorCodes.ENHANCE_YOUR_CALM)
        self.flush_now()

    def _protocol_error(self, message: str) -> None:
        self.stats.protocol_errors += 1
        log.info("HTTP/2 protocol error from %s: %s", self.conn.client, message)
        self.flush_now()

    @property
    def draining(self) -> bool:
        """True once the connection refuses new streams (a close request, or idle)."""
        return self._draining

    def _close_requested(self) -> None:
        """Drain: refuse new streams (REFUSED_STREAM, which clients retry elsewhere), tell the
        streams in flight (``Exchange.on_close_request``) and let them finish, then GOAWAY and
        close. (h2 can send nothing after a GOAWAY, so the GOAWAY comes last.)"""
        if self._draining:
            return
        self._draining = True
        for stream in list(self.streams.values()):
            stream.wind_down()
        self._poke_reader()

    def _poke_reader(self) -> None:
        """The last stream is gone: a draining connection stops reading now, an idle one arms
        ``idle_timeout`` on the read in progress (it was waiting with no deadline)."""
        scope = self._recv_scope
        if scope is None or self.streams:
            return
        if self._draining:
            scope.cancel()
        else:
            scope.deadline = min(scope.deadline, trio.current_time() + self.limits.idle_timeout)

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.on_data(event.data, event.flow_controlled_length)
            else:
                self.ack(event.stream_id, event.flow_controlled_length)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.on_end()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                self._blocked.pop(stream, None)
                stream.on_dead()
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                self._resume_all()
            else:
                stream = self.streams.get(event.stream_id)
                if stream is not None and stream.pending:
                    self._resume(stream)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._guard.settled = True  # the client preface is complete
            self._resume_all()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._peer_closed = True  # h2 sends nothing after a GOAWAY: every stream is over
            for stream in list(self.streams.values()):
                stream.on_dead()

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        if not self._caps.stream_allowed(trio.current_time()):
            self._calm = "too many streams opened"
            return
        h2s = self.h2.streams.get(sid)
        if h2s is None or h2s.closed:
            return  # reset in the same read as its HEADERS (rapid reset): h2 already closed it
        if self._draining or len(self.streams) >= self.limits.h2_max_concurrent_streams:
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        pseudo: dict[bytes, bytes] = {}
        regular: list[tuple[bytes, bytes]] = []
        size = 0
        for name, value in event.headers or ():
            size += len(name) + len(value) + 4
            if name.startswith(b":"):
                pseudo[name] = value
            else:
                regular.append((name, value))
        headers = header_dict(regular)
        authority = pseudo.get(b":authority")
        if authority is not None and "host" not in headers:
            headers["host"] = authority.decode("latin-1")
        path, query = split_target(pseudo.get(b":path", b"/").decode("latin-1"))
        request = Request(
            method=pseudo.get(b":method", b"GET").decode("latin-1"),
            path=path,
            query=query,
            headers=headers,
            client=self.conn.client,
            scheme=self.scheme,
            http_version="2",
        )
        stream = H2Stream(self, sid, request, h2s)
        self.streams[sid] = stream
        if event.stream_ended is not None:
            stream.body_done = True
        if len(regular) > self.limits.max_headers or size > self.limits.max_header_bytes:
            self.stats.protocol_errors += 1
            self.nursery.start_soon(self._refuse_headers, stream)
            return
        self.nursery.start_soon(self._serve, stream)

    async def _serve(self, stream: H2Stream) -> None:
        """Run the handler, unless the stream was reset before this task started (rapid reset:
        HEADERS then RST_STREAM at once), in which case the handler is never called."""
        if stream.dead:
            stream.handler_done()
            return
        await run_handler(self.handler, stream)

    async def _refuse_headers(self, stream: H2Stream) -> None:
        try:
            with stream.scope:
                await stream.send_error(431, "headers_too_large", "request headers exceed the limit", [])
        finally:
            stream.handler_done()

    # -- send side (called from handlers, synchronously) ---------------------------------------

    def mark_dirty(self) -> None:
        """Schedule one flush of h2's output for this wake-up (idempotent until it happens)."""
        if not self._dirty:
            self._dirty = True
            self.outbox.request_pull()

    def _pull(self) -> bytes:
        self._dirty = False
        self._unflushed = 0
        return self.h2.data_to_send()

    def flush_now(self) -> None:
        """Move h2's output to the outbox now (the reader does this after each batch of input)."""
        data = self._pull()
        if data:
            self.outbox.write(data)

    def send_headers(
        self, stream: H2Stream, status: int, headers: list[tuple[str, str]], length: int | None, *, end_stream: bool
    ) -> None:
        """Send the response head for ``stream``."""
        raw = [(b":status", b"%d" % status)]
        raw.extend(pair for pair in encode_headers(headers) if pair[0] not in HOP_BY_HOP)
        if length is not None and status != 204:  # RFC 9110 8.6: never on a 204
            raw.append((b"content-length", b"%d" % length))
        try:
            self.h2.send_headers(stream.sid, raw, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            log.info("cannot send the response head on stream %d: %s", stream.sid, exc)
            self.reset(stream, internal=True)
            return
        self.mark_dirty()

    def send_data(self, stream: H2Stream, data: bytes | memoryview) -> bool:
        """Queue ``data`` on ``stream`` within the peer's window; the rest waits in ``pending``."""
        if stream.dead or stream.ended:
            return False
        size = len(data)
        if not size:
            return True
        if stream.pending:
            stream.pending.append(data)
            stream.pending_bytes += size
            if stream.pending_bytes > self.limits.send_buffer:
                self.reset(stream, slow=True)
                return False
            return True
        if not self.outbox.room(self._unflushed + size):
            return False
        h = self.h2
        hs = stream.h2s
        if (
            size <= h.outbound_flow_control_window
            and size <= hs.outbound_flow_control_window
            and size <= h.max_outbound_frame_size
            and hs.state_machine.state in _SENDABLE
            and h.state_machine.state is ConnectionState.SERVER_OPEN
        ):
            # What h2's send_data does for a plain DATA frame in these states, without its per-call
            # frame objects and state-machine walk: charge both windows, frame the shared payload.
            h.outbound_flow_control_window -= size
            hs.outbound_flow_control_window -= size
            out = h._data_to_send
            out += (size << 48 | stream.sid).to_bytes(9, "big")  # length, type DATA, no flags, id
            out += data
            self._unflushed += size
            if not self._dirty:
                self._dirty = True
                self.outbox.request_pull()
            return True
        try:
            window = h.local_flow_control_window(stream.sid)
            if size <= window and size <= h.max_outbound_frame_size:
                h.send_data(stream.sid, data)
                self._unflushed += size
                self.mark_dirty()
                return True
        except h2.exceptions.ProtocolError:
            stream.on_dead()
            return False
        stream.pending.append(data)
        stream.pending_bytes += size
        self._resume(stream)
        if stream.pending_bytes > self.limits.send_buffer:
            self.reset(stream, slow=True)
            return False
        return True

    def end_stream(self, stream: H2Stream) -> None:
        """Send END_STREAM for ``stream`` (its pending data has all gone out)."""
        if stream.ended or stream.dead:
            return
        stream.ended = True
        try:
            self.h2.end_stream(stream.sid)
        except h2.exceptions.ProtocolError:
            stream.on_dead()
            return
        self.mark_dirty()

    def _resume(self, stream: H2Stream) -> None:
        """Send as much of ``stream``'s pending data as the windows admit."""
        h = self.h2
        pending = stream.pending
        sent = 0
        try:
            max_frame = h.max_outbound_frame_size
            while pending:
                window = h.local_flow_control_window(stream.sid)
                if window <= 0:
                    break
                chunk = pending[0]
                take = min(len(chunk), window, max_frame)
                if take == len(chunk):
                    h.send_data(stream.sid, chunk)
                    pending.popleft()
                else:
                    view = memoryview(chunk)
                    h.send_data(stream.sid, view[:take])
                    pending[0] = view[take:]
                stream.pending_bytes -= take
                sent += take
        except h2.exceptions.ProtocolError:
            self._blocked.pop(stream, None)
            stream.on_dead()
            return
        if pending:
            self._blocked[stream] = None
        else:
            self._blocked.pop(stream, None)
            if stream.end_after_pending:
                self.end_stream(stream)
        if sent:
            self._unflushed += sent
            self.mark_dirty()
            stream.wake()

    def _resume_all(self) -> None:
        for stream in list(self._blocked):
            self._resume(stream)
            if self.h2.outbound_flow_control_window <= 0:
                break

    def reset(self, stream: H2Stream, *, slow: bool = False, internal: bool = False) -> None:
        """Reset ``stream`` (CANCEL for a slow consumer, INTERNAL_ERROR for a failed handler)."""
        if stream.dead:
            return
        if slow:
            stream.slow = True
            self.stats.slow_consumers += 1
            log.info("resetting HTTP/2 stream %d of %s: slow consumer", stream.sid, self.conn.client)
        self._blocked.pop(stream, None)
        code = ErrorCodes.INTERNAL_ERROR if internal else ErrorCodes.CANCEL
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream.sid, code)
        stream.on_dead()
        self.mark_dirty()

    def ack(self, sid: int, size: int) -> None:
        """Hand ``size`` bytes of flow-control credit back to the peer."""
        if size:
            try:
                self.h2.acknowledge_received_data(size, sid)
            except (h2.exceptions.ProtocolError, ValueError):
                return
            self.mark_dirty()

    def stream_done(self, stream: H2Stream, unacked: int) -> None:
        """The handler of ``stream`` is over: settle its credit, reset if unfinished, forget it."""
        if unacked:
            self.ack(stream.sid, unacked)
        if not stream.dead and (not stream.ended or not stream.body_done):
            # an unfinished response, or a request body nobody will read: stop the peer
            code = ErrorCodes.NO_ERROR if stream.ended else ErrorCodes.INTERNAL_ERROR
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.reset_stream(stream.sid, code)
            self.mark_dirty()
        self._blocked.pop(stream, None)
        self.streams.pop(stream.sid, None)
        stream.request.body_reader = None  # the stream is over; and no cycle outlives it
        self._poke_reader()
