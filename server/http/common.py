"""Pieces shared by the HTTP/1.1 and HTTP/2 drivers: request heads, JSON errors, the handler runner."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Protocol
from urllib.parse import parse_qsl

import trio

from server.http.base import Exchange, Handler, HTTPError, Request

log = logging.getLogger(__name__)

JSON_TYPE = ("content-type", "application/json")
# Response headers that are about one HTTP/1.1 connection and never go out on HTTP/2.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})


_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase for ``status`` (empty for unknown codes)."""
    return _REASONS.get(status, b"")


def json_error(code: str, message: str) -> bytes:
    """The body of every engine error: ``{"error": code, "message": message}``."""
    return json.dumps({"error": code, "message": message}).encode()


def split_target(target: str) -> tuple[str, dict[str, str]]:
    """Split a request target into the raw path and its query (first value per key, decoded)."""
    path, sep, qs = target.partition("?")
    if not sep or not qs:
        return path, {}
    query: dict[str, str] = {}
    for key, value in parse_qsl(qs, keep_blank_values=True):
        query.setdefault(key, value)
    return path, query


def header_dict(pairs: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Header pairs as a dict with lower-case names; repeats joined by ``", "`` (cookie: ``"; "``)."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in pairs:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        old = headers.get(name)
        if old is None:
            headers[name] = value
        else:
            headers[name] = f"{old}; {value}" if name == "cookie" else f"{old}, {value}"
    return headers


def encode_headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Handler headers as lower-case byte pairs, dropping ``content-length`` (the engine sets it)."""
    out = []
    for name, value in headers:
        lname = name.lower()
        if lname != "content-length":
            out.append((lname.encode("latin-1"), value.encode("latin-1")))
    return out


class EngineExchange(Exchange, Protocol):
    """What :func:`run_handler` needs from a protocol driver's exchange, beyond :class:`Exchange`."""

    request: Request

    @property
    def answered(self) -> bool:
        """True once a response head (or a 101) has been sent."""

    @property
    def scope(self) -> trio.CancelScope | None:
        """The handler's own cancel scope (cancelled when the client resets the request), or
        ``None`` when the connection's scope serves (HTTP/1.1: a client that goes away takes
        the whole connection, and its task, with it)."""

    async def send_error(self, status: int, code: str, message: str, headers: list[tuple[str, str]]) -> None:
        """Answer with the JSON error body."""

    def abort_response(self) -> None:
        """Tear down a response that is already under way (the handler failed mid-answer)."""

    async def complete(self) -> None:
        """The handler returned normally after answering: end an open response cleanly."""

    def handler_done(self) -> None:
        """Called last, whatever happened."""


_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)
_NO_SCOPE = contextlib.nullcontext()


def call_close_callbacks(callbacks: list[Callable[[], None]] | None) -> None:
    """Call each of an exchange's close-request callbacks once; a failing one is logged, not raised
    (one broken handler must not stop a drain walking thousands of connections)."""
    if not callbacks:
        return
    for callback in callbacks:
        try:
            callback()
        except Exception:
            log.exception("close-request callback %r failed", callback)


async def run_handler(handler: Handler, ex: EngineExchange) -> None:
    """Run ``handler`` for ``ex`` inside the exchange's cancel scope and apply the error rules.

    ``HTTPError`` before answering becomes its JSON error; any other exception before answering
    is logged and becomes a 500; a handler that returns without answering gets a 500; a failure
    after answering tears the response down.
    """
    scope = ex.scope
    try:
        with _NO_SCOPE if scope is None else scope:
            try:
                await handler(ex)
            except HTTPError as exc:
                if ex.answered:
                    log.info("HTTPError %d after the response started: %s", exc.status, exc.message)
                    ex.abort_response()
                else:
                    await ex.send_error(exc.status, exc.code, exc.message, exc.headers)
            except _GONE:
                ex.abort_response()
            except Exception:
                log.exception("handler failed: %s %s", ex.request.method, ex.request.path)
                if ex.answered:
                    ex.abort_response()
                else:
                    await ex.send_error(500, "internal", "internal server error", [])
            else:
                if ex.answered:
                    await ex.complete()
                else:
                    log.error("handler returned without answering: %s %s", ex.request.method, ex.request.path)
                    await ex.send_error(500, "internal", "the handler did not answer", [])
    except _GONE:
        ex.abort_response()
    finally:
        ex.handler_done()
