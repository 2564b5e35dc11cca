"""Connection-level hardening of an aiohttp server: JSON error bodies for the errors aiohttp
answers itself, and a cap on open connections.

aiohttp answers some requests before any handler or middleware runs: a request line or header
over ``max_line_size``/``max_field_size`` (400), a malformed request (400), an unhandled
exception (500). Its :meth:`aiohttp.web_protocol.RequestHandler.handle_error` writes those as
``text/plain``. :func:`harden` makes a runner's server build its connections with
:class:`_Protocol`, which writes them with the service's own JSON error body instead, and which
answers a connection beyond ``max_connections`` at once with a 503 (``Retry-After``) and closes
it, so a flood of connections cannot exhaust the process's file descriptors.

Used by ``clickpulse collector`` (:mod:`clickpulse.collector.server`) and ``clickpulse api``
(:mod:`clickpulse.serving.api`).

aiohttp has no public hook for either, so this subclasses ``web.Server``/``RequestHandler``
(stable since aiohttp 3.0; pinned ``<4`` in pyproject.toml) and is covered by unit tests that fail
if aiohttp changes the protocol factory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)

#: ``(status, message) -> JSON body bytes`` of a service's error responses
ErrorBody = Callable[[int, str], bytes]


class _Protocol(RequestHandler):
    """aiohttp's connection handler with JSON error bodies and the connection cap."""

    _counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        srv: _Server = self._manager  # type: ignore[assignment]
        if srv.max_connections and srv.open_connections >= srv.max_connections:
            srv.refused_connections += 1
            body = srv.error_body(503, f"too many open connections (limit {srv.max_connections}); retry later")
            head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nRetry-After: {srv.retry_after_s}\r\n"
                    f"Connection: close\r\n\r\n").encode()
            self._manager = None  # connection_lost does nothing for a connection never opened
            tr: Any = transport
            tr.write(head + body)  # best effort: a client that already sent may see a reset
            tr.close()
            return
        srv.open_connections += 1
        self._counted = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            srv: _Server = self._manager  # type: ignore[assignment]
            srv.open_connections -= 1
        super().connection_lost(exc)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        resp = super().handle_error(request, status, exc, message)  # logs, checks nothing was sent
        srv: _Server | None = self._manager  # type: ignore[assignment]
        if srv is None:
            return resp
        if isinstance(exc, LineTooLong):  # its message quotes the request: not echoed back
            text = "request line or a header is longer than the server's limit (8190 bytes)"
        elif status == 400:
            text = "malformed HTTP request"
        elif status >= 500 or not message:
            text = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
        else:
            text = str(message).splitlines()[0][:200]
        out = web.Response(status=status, body=srv.error_body(status, text), content_type="application/json")
        out.force_close()
        return out


class _Server(web.Server):
    """``web.Server`` whose connections are :class:`_Protocol` (attributes set by :func:`harden`)."""

    error_body: ErrorBody
    max_connections: int
    retry_after_s: int
    open_connections: int
    refused_connections: int

    def __call__(self) -> RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)


def harden(runner: web.BaseRunner, error_body: ErrorBody, max_connections: int = 0,
           retry_after_s: int = 1) -> web.Server:
    """Make ``runner``'s server (after ``await runner.setup()``, before any connection) answer
    aiohttp's own errors with ``error_body(status, message)`` (JSON) and refuse connections beyond
    ``max_connections`` (0: no cap) with 503 and ``Retry-After: retry_after_s``.

    Returns the server (``open_connections``, ``refused_connections``: counts).

    Raises
    ------
    TypeError
        The runner is not set up, or its server is not aiohttp's ``web.Server``.
    """
    srv = runner.server
    if srv is None or type(srv) not in (web.Server, _Server):
        raise TypeError(f"harden() needs a set-up runner with an aiohttp web.Server, got {srv!r}")
    srv.__class__ = _Server  # the same object stays the sites' protocol factory
    srv.error_body = error_body  # type: ignore[attr-defined]
    srv.max_connections = max_connections  # type: ignore[attr-defined]
    srv.retry_after_s = retry_after_s  # type: ignore[attr-defined]
    srv.open_connections = getattr(srv, "open_connections", 0)  # type: ignore[attr-defined]
    srv.refused_connections = getattr(srv, "refused_connections", 0)  # type: ignore[attr-defined]
    return srv


def fd_headroom_warning(max_connections: int, spare: int = 64) -> str | None:
    """A warning when ``max_connections`` (+ ``spare`` descriptors for Kafka, Redis, logs) exceeds
    the process's soft ``RLIMIT_NOFILE``; ``None`` when it fits or the limit is unknown."""
    try:
        import resource
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return None
    if soft != resource.RLIM_INFINITY and max_connections + spare > soft:
        return (f"max connections {max_connections} + {spare} spare exceed the open-file limit {soft} "
                f"(ulimit -n): raise the limit or lower the setting, or connections fail with EMFILE")
    return None
