"""The send side of one connection: a bounded byte queue with exactly one writer.

Everything that answers a client (responses, SSE frames, WebSocket frames, HTTP/2 frames) goes
through one :class:`Outbox` per connection. :meth:`Outbox.write` is synchronous and cheap: on a
plain TCP socket with nothing queued it first tries a direct non-blocking ``send`` on the stdlib
socket, so a fan-out loop over thousands of connections hands each kernel its bytes without a
task switch. Only what the kernel does not take is queued, and only then is the connection's
writer task (started lazily on first need) woken to wait for writability.

The queue is bounded by ``HttpLimits.send_buffer``: past it the connection is a slow consumer and
is killed (counted in :class:`~server.http.connection.HttpStats`). A queued write that makes no
progress for ``HttpLimits.send_timeout`` kills the connection too.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import trio

from server.http.base import HttpLimits
from server.http.stats import HttpStats

log = logging.getLogger(__name__)

TLS_CHUNK = 64 * 1024  # bytes handed to one SSLStream.send_all call

# Why a connection was killed by its outbox (passed to the ``on_dead`` callback).
SLOW_CONSUMER = "slow consumer"
SEND_TIMEOUT = "send timeout"
SEND_ERROR = "send error"


class Outbox:
    """A bytearray-backed bounded send queue for one connection, drained by one writer task.

    Promises: bytes from :meth:`write` reach the socket in call order; at most
    ``limits.send_buffer`` bytes are held at any time (a write that would exceed it kills the
    connection and returns ``False``); once dead, every write returns ``False`` and every waiter
    gets ``trio.BrokenResourceError``.
    """

    __slots__ = (
        "_buf",
        "_dead",
        "_inflight",
        "_limits",
        "_nursery",
        "_on_dead",
        "_parked",
        "_pull",
        "_pull_pending",
        "_reason",
        "_sock",
        "_stats",
        "_stream",
        "_waiters",
        "_writer",
        "_writer_started",
    )

    def __init__(
        self,
        sock: socket.socket | None,
        limits: HttpLimits,
        stats: HttpStats,
        on_dead: Callable[[str], None],
    ) -> None:
        self._buf = bytearray()
        self._sock = sock  # plain TCP: the stdlib socket, used for direct non-blocking sends
        self._stream: trio.abc.SendStream | None = None  # TLS: the stream the writer sends on
        self._limits = limits
        self._stats = stats
        self._on_dead: Callable[[str], None] | None = on_dead
        self._dead = False
        self._reason = ""  # why the connection was killed (SLOW_CONSUMER, SEND_TIMEOUT, ...)
        self._inflight = 0  # TLS: bytes taken off the queue and inside send_all
        self._nursery: trio.Nursery | None = None
        self._writer: trio.lowlevel.Task | None = None
        self._writer_started = False
        self._parked = False
        self._pull: Callable[[], bytes] | None = None
        self._pull_pending = False
        self._waiters: trio.lowlevel.ParkingLot | None = None

    # -- setup ---------------------------------------------------------------------------------

    def attach(self, nursery: trio.Nursery) -> None:
        """Use ``nursery`` (the connection's) to start the writer task when it is first needed."""
        self._nursery = nursery

    def use_stream(self, stream: trio.abc.SendStream) -> None:
        """Send through ``stream`` (TLS) from now on; disables the direct-send fast path."""
        self._stream = stream
        self._sock = None

    def set_pull(self, pull: Callable[[], bytes]) -> None:
        """Register a source the writer drains once per wake-up after :meth:`request_pull`."""
        self._pull = pull

    # -- the hot path --------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """False once the connection has been killed or closed."""
        return not self._dead

    @property
    def buffered(self) -> int:
        """Bytes accepted by :meth:`write` and not yet handed to the kernel."""
        return len(self._buf) + self._inflight

    @property
    def fell_behind(self) -> bool:
        """True once the connection was killed for falling behind: its queue passed
        ``send_buffer`` (slow consumer) or a write made no progress for ``send_timeout``."""
        return self._reason in (SLOW_CONSUMER, SEND_TIMEOUT)

    def write(self, data: bytes | bytearray | memoryview) -> bool:
        """Hand ``data`` to the connection without blocking; ``False`` if the connection is dead.

        Tries a direct ``send`` when nothing is queued on a plain socket; queues the remainder
        and wakes the writer. A queue past ``send_buffer`` kills the connection (slow consumer).
        """
        if self._dead:
            return False
        buf = self._buf
        sock = self._sock
        if sock is not None and not buf:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.kill(SEND_ERROR)
                return False
            if sent == len(data):
                return True
            buf += memoryview(data)[sent:]
        else:
            buf += data
        if len(buf) + self._inflight > self._limits.send_buffer:
            self.kill(SLOW_CONSUMER)
            return False
        self._wake()
        return True

    def request_pull(self) -> None:
        """Ask the writer to call the pull source once, at its next wake-up."""
        if not self._pull_pending and not self._dead:
            self._pull_pending = True
            self._wake()

    def room(self, extra: int) -> bool:
        """True if ``extra`` more bytes would fit; otherwise kill the connection as a slow consumer."""
        if self._dead:
            return False
        if len(self._buf) + self._inflight + extra > self._limits.send_buffer:
            self.kill(SLOW_CONSUMER)
            return False
        return True

    # -- teardown ------------------------------------------------------------------------------

    def kill(self, reason: str) -> None:
        """Mark the connection dead, drop what is queued and tell the owner (``on_dead``)."""
        if self._dead:
            return
        self._dead = True
        self._reason = reason
        if reason == SLOW_CONSUMER:
            self._stats.slow_consumers += 1
            log.info("closing slow consumer: %d bytes queued", len(self._buf) + self._inflight)
        elif reason == SEND_TIMEOUT:
            self._stats.send_timeouts += 1
            log.info("closing connection: a write made no progress in %.1fs", self._limits.send_timeout)
        self._buf.clear()
        self._pull = None
        self._wake()
        if self._waiters is not None:
            self._waiters.unpark_all()
        on_dead, self._on_dead = self._on_dead, None
        if on_dead is not None:
            on_dead(reason)

    def close(self) -> None:
        """Mark the outbox finished without calling ``on_dead`` (the owner is closing anyway)."""
        self._on_dead = None
        self.kill("closed")

    # -- waiting -------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Wait until at most ``send_low_water`` bytes are queued.

        Raises ``trio.BrokenResourceError`` if the connection is or becomes dead."""
        await self._wait_until(self._limits.send_low_water)

    async def flush(self) -> None:
        """Wait until everything queued (and any pending pull) has been handed to the kernel.

        Raises ``trio.BrokenResourceError`` if the connection is or becomes dead."""
        await self._wait_until(0)

    async def _wait_until(self, level: int) -> None:
        if self._dead:
            raise trio.BrokenResourceError("connection closed")
        if self.buffered <= level and not (level == 0 and self._pull_pending):
            await trio.lowlevel.checkpoint()
            if self._dead:
                raise trio.BrokenResourceError("connection closed")
            return
        if self._waiters is None:
            self._waiters = trio.lowlevel.ParkingLot()
        while not self._dead and (self.buffered > level or (level == 0 and self._pull_pending)):
            await self._waiters.park()
        if self._dead:
            raise trio.BrokenResourceError("connection closed")

    # -- the writer task -----------------------------------------------------------------------

    def _wake(self) -> None:
        if self._parked:
            self._parked = False
            assert self._writer is not None
            trio.lowlevel.reschedule(self._writer)
        elif not self._writer_started and self._nursery is not None and not self._dead:
            self._writer_started = True
            self._nursery.start_soon(self._run)

    def _abort_park(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._parked = False
        return trio.lowlevel.Abort.SUCCEEDED

    def _progress(self) -> None:
        if self._waiters is not None and self.buffered <= self._limits.send_low_water:
            self._waiters.unpark_all()

    async def _run(self) -> None:
        self._writer = trio.lowlevel.current_task()
        try:
            while not self._dead:
                if self._pull_pending:
                    self._pull_pending = False
                    pull = self._pull
                    if pull is not None:
                        data = pull()
                        if data and not self.write(data):
                            return
                if not self._buf:
                    self._progress()
                    if self._pull_pending or self._dead:
                        continue
                    self._parked = True
                    await trio.lowlevel.wait_task_rescheduled(self._abort_park)
                    continue
                if self._stream is not None:
                    await self._send_tls(self._stream)
                else:
                    await self._send_plain()
        finally:
            self._parked = False

    async def _send_plain(self) -> None:
        sock = self._sock
        assert sock is not None
        buf = self._buf
        try:
            sent = sock.send(buf)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.kill(SEND_ERROR)
            return
        if sent:
            del buf[:sent]
            self._progress()
            await trio.lowlevel.checkpoint_if_cancelled()
            return
        with trio.move_on_after(self._limits.send_timeout) as scope:
            await trio.lowlevel.wait_writable(sock)
        if scope.cancelled_caught:
            self.kill(SEND_TIMEOUT)

    async def _send_tls(self, stream: trio.abc.SendStream) -> None:
        buf = self._buf
        with memoryview(buf) as view:
            chunk = bytes(view[:TLS_CHUNK])
        del buf[: len(chunk)]
        self._inflight = len(chunk)
        try:
            with trio.move_on_after(self._limits.send_timeout) as scope:
                await stream.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.kill(SEND_ERROR)
            return
        finally:
            self._inflight = 0
        if scope.cancelled_caught:
            self.kill(SEND_TIMEOUT)
            return
        self._progress()
