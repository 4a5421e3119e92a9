"""HTTP/1.1 request parsing for the native engine: llhttp (through ``httptools``) plus the checks
the engine adds where llhttp is lenient.

:class:`H1Parser` holds one connection's unparsed input and parses it on demand, a slice of at
most ``FEED_SIZE`` bytes at a time, into :class:`Message` records: a flood of tiny pipelined
requests in one read never becomes more than a slice's worth of parsed heads. llhttp itself runs
strict (no lenient flags): obs-fold, bare LF, a Content-Length beside Transfer-Encoding, repeated
Content-Lengths, bad chunk sizes and extensions, invalid header names and NUL/CR/controls in
values are all errors. On top of that the engine refuses what llhttp lets through: a version
other than HTTP/1.0 or 1.1, an HTTP/1.1 request without ``Host``, a ``Transfer-Encoding`` that
is not ``chunked`` alone (``chunked`` not last: 400; another coding before it: 501), and heads
over ``max_header_bytes`` or ``max_headers`` (431). Every refusal is final: the parser stops and
the connection closes after the answer, so the input can never be read out of step.

An error inside a request body belongs to that request (its handler's ``read_body`` raises the
400); an error in a head comes after the requests parsed before it, which are served first.

The llhttp object is created lazily and dropped (:meth:`H1Parser.rest`) while nothing is half
parsed: an idle streaming response keeps no parser, only the bytes pipelined behind it.
"""

from __future__ import annotations

import httptools

from server.http.base import HttpLimits

FEED_SIZE = 4096  # bytes handed to llhttp per step
_BODY_FRAMING = (b"content-length", b"transfer-encoding")
_IDLE, _HEAD, _BODY = 0, 1, 2


class Message:
    """One request as parsed: its head, then its body as it arrives.

    ``complete`` once the whole body is in; ``error`` (a message for a 400) if the body was
    malformed; ``upgrade`` if llhttp stopped after this request for a protocol switch."""

    __slots__ = (
        "body",
        "body_size",
        "complete",
        "error",
        "expect_continue",
        "headers",
        "http11",
        "keep_alive",
        "method",
        "target",
        "upgrade",
    )

    def __init__(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], http11: bool) -> None:
        self.method = method
        self.target = target
        self.headers = headers  # names lower-case, values without surrounding blanks
        self.http11 = http11
        self.keep_alive = http11
        self.expect_continue = False
        self.upgrade = False
        self.body: list[bytes] = []
        self.body_size = 0
        self.complete = False
        self.error: str | None = None


class _Refuse(Exception):
    """Raised inside a parser callback to stop parsing with an answer."""


class H1Parser:
    """One connection's request input: bytes in (:meth:`add`), :class:`Message` records out.

    Promises: requests come out in order and whole heads only; once :attr:`error` is set (a
    ``(status, code, message)`` for the request after those already queued) or an upgrade
    request was parsed, nothing more is parsed; memory is bounded by the input held plus one
    slice's worth of parsed records."""

    __slots__ = (
        "_events",
        "_guess",
        "_head_bytes",
        "_headers",
        "_last",
        "_limits",
        "_msg",
        "_parser",
        "_pending",
        "_quiet",
        "_state",
        "_synthetic",
        "_url",
        "eof",
        "error",
        "queue",
        "upgraded",
    )

    def __init__(self, limits: HttpLimits, data: bytes = b"") -> None:
        self._limits = limits
        self._parser: httptools.HttpRequestParser | None = None
        self._pending = bytearray(data)  # input not yet handed to llhttp
        self._state = _IDLE
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0  # bytes of the head being parsed (an upper bound)
        self._guess = 0
        self._msg: Message | None = None  # the message whose body is being parsed
        self._last: Message | None = None  # the message whose head was parsed last
        self._events = 0  # body and chunk callbacks so far
        self._quiet = 0  # body-state bytes parsed since the last body or chunk callback
        self._synthetic = False  # parsing a made-up head that only frames the body after an upgrade
        self.queue: list[Message] = []  # parsed heads not yet taken by the driver (a slice's worth at most)
        self.error: tuple[int, str, str] | None = None
        self.upgraded = False  # parsing stopped after an upgrade request; the rest is raw input
        self.eof = False

    # -- input ----------------------------------------------------------------------------------

    def add(self, data: bytes) -> None:
        """Hold input for parsing (``b""``: the peer closed its side)."""
        if data:
            self._pending += data
        else:
            self.eof = True

    @property
    def started(self) -> bool:
        """True if any part of a next request is here (held, half parsed or queued)."""
        return bool(self._pending) or self._state != _IDLE or bool(self.queue)

    @property
    def stopped(self) -> bool:
        """True once nothing more will be parsed (an error, or an upgrade)."""
        return self.error is not None or self.upgraded

    def next_head(self) -> Message | None:
        """The next request whose head is complete, parsing held input as needed; ``None`` if
        more input is needed or parsing has stopped (see :attr:`error`)."""
        while not self.queue and self._pending and not self.stopped:
            self._step()
        return self.queue.pop(0) if self.queue else None

    def pull_body(self, msg: Message) -> None:
        """Parse held input until ``msg`` is complete or failed, or the input is used up."""
        while not msg.complete and msg.error is None and self._pending and not self.stopped:
            self._step()

    def trailing(self) -> bytes:
        """The raw input after an upgrade request (for the new protocol); hands it over."""
        data = bytes(self._pending)
        self._pending.clear()
        return data

    def resume(self) -> None:
        """Parse HTTP again after an upgrade request that was not switched (a normal answer)."""
        self.upgraded = False
        self._parser = None
        self._state = _IDLE

    def close(self) -> None:
        """Forget the llhttp object (it refers back to this parser) and what was parsed."""
        self._parser = None
        self._msg = self._last = None
        self.queue.clear()

    def rest(self) -> None:
        """Drop the llhttp object if nothing is half parsed (it is made again when needed)."""
        if self._state == _IDLE and not self._synthetic:
            self._parser = None
            self._last = None
            self._url = b""
            self._headers = []
            if not self._pending:
                self._pending = bytearray()  # a consumed bytearray keeps its whole buffer
            if not self.queue:
                self.queue = []

    # -- parsing --------------------------------------------------------------------------------

    def _step(self) -> None:
        data = bytes(self._pending[:FEED_SIZE])
        del self._pending[:FEED_SIZE]
        parser = self._parser
        if parser is None:
            parser = self._parser = httptools.HttpRequestParser(self)
        if self._state == _HEAD:
            self._head_bytes += len(data)
            self._guess = 0
        else:  # a head that starts in this slice: all of it, if it is the slice's first message
            self._guess = len(data) if self._state == _IDLE else 0
        events = self._events
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data[int(exc.args[0]) :])
            return
        except _Refuse:
            return
        except httptools.HttpParserError as exc:
            if self.error is None:  # not refused by a callback already
                self._fail(400, "bad_request", str(exc) or "malformed request")
            return
        limit = self._limits.max_header_bytes
        if self._state == _HEAD and self._head_bytes > limit:
            self._fail(431, "headers_too_large", f"request head exceeds {limit} bytes")
        elif self._state == _BODY:  # bounds chunk extensions and trailers, which carry no body
            self._quiet = self._quiet + len(data) if events == self._events else 0
            if self._quiet > limit + FEED_SIZE:
                self._fail(400, "bad_request", "chunk framing or trailer section too large")

    def _fail(self, status: int, code: str, message: str) -> None:
        msg = self._msg
        if self._state == _BODY and msg is not None:
            msg.error = message  # the request's own body is malformed: its handler says 400
            self.error = (400, code, message)
        else:
            self.error = (status, code, message)
        self._pending.clear()
        self._parser = None

    def _upgraded(self, rest: bytes) -> None:
        """llhttp stopped after a request asking to switch protocols; ``rest`` follows it."""
        msg = self._last
        self._pending[:0] = rest
        self._parser = None
        self._state = _IDLE
        if msg is None:
            return
        framing = [(n, v) for n, v in msg.headers if n in _BODY_FRAMING]
        if any(n == b"transfer-encoding" or v != b"0" for n, v in framing):
            # llhttp skips the body of an upgrade request; it is parsed as the body of a made-up
            # head with the same framing, and parsing goes on after it
            head = b"".join(b"%b: %b\r\n" % pair for pair in framing)
            self._pending[:0] = b"PUT / HTTP/1.1\r\n" + head + b"\r\n"
            self._synthetic = True
            msg.complete = False
            self._msg = msg
            self._state = _BODY
            return
        msg.upgrade = True
        self.upgraded = True

    # -- llhttp callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        """llhttp: a request starts."""
        if self._synthetic:
            return
        self._state = _HEAD
        self._url = b""
        self._headers = []
        self._head_bytes = self._guess
        self._guess = 0

    def on_url(self, url: bytes) -> None:
        """llhttp: (part of) the request target."""
        if not self._synthetic:
            self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        """llhttp: one header field (or a trailer field, which is ignored)."""
        if self._state != _HEAD or self._synthetic:
            return
        self._headers.append((name.lower(), value.rstrip(b" \t")))
        if len(self._headers) > self._limits.max_headers:
            self._refuse(431, "headers_too_large", f"more than {self._limits.max_headers} header fields")

    def _refuse(self, status: int, code: str, message: str) -> None:
        self._fail(status, code, message)
        raise _Refuse

    def on_headers_complete(self) -> None:
        """llhttp: the head is complete; check what llhttp lets through, queue the request."""
        if self._synthetic:
            self._synthetic = False
            self._state = _BODY
            return
        parser = self._parser
        assert parser is not None
        limits = self._limits
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            self._refuse(400, "bad_request", f"unsupported HTTP version {version}")
        method = parser.get_method()
        target = self._url
        headers = self._headers
        size = len(method) + len(target) + 12
        for name, value in headers:
            size += len(name) + len(value) + 4
        if size > limits.max_header_bytes:
            self._refuse(431, "headers_too_large", f"request head exceeds {limits.max_header_bytes} bytes")
        http11 = version == "1.1"
        msg = Message(method, target, headers, http11)
        host = False
        for name, value in headers:
            if name == b"host":
                host = True
            elif name == b"transfer-encoding":
                codings = [c.strip() for c in value.lower().split(b",")]
                if codings[-1] != b"chunked" or b"chunked" in codings[:-1]:
                    self._refuse(400, "bad_request", "Transfer-Encoding must end with chunked")
                if len(codings) > 1:
                    self._refuse(501, "bad_request", "Only Transfer-Encoding: chunked is supported")
            elif name == b"connection":
                if b"close" in (t.strip() for t in value.lower().split(b",")):
                    msg.keep_alive = False
            elif name == b"expect" and http11:
                msg.expect_continue = value.lower() == b"100-continue"
        if http11 and not host:
            self._refuse(400, "bad_request", "Missing mandatory Host: header")
        self._state = _BODY
        self._msg = self._last = msg
        self._quiet = 0
        self.queue.append(msg)

    def on_body(self, data: bytes) -> None:
        """llhttp: body bytes of the current request."""
        self._events += 1
        msg = self._msg
        if msg is not None:
            msg.body.append(data)
            msg.body_size += len(data)

    def on_chunk_header(self) -> None:
        """llhttp: a chunk's size line was read."""
        self._events += 1

    def on_message_complete(self) -> None:
        """llhttp: the current request is complete."""
        msg = self._msg
        if msg is not None:
            msg.complete = True
        self._msg = None
        self._state = _IDLE
