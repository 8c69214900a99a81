"""The HTTP listener (/healthz, /metrics, JWKS, audit key, status lists), served on the event loop.

A slow client costs a few objects, never a thread, and cannot hold on: every connection has a
deadline. A request must arrive whole within ``timeout`` seconds of the connection opening (or of
the previous answer), and be answered, its answer taken by the client, within ``timeout`` again;
otherwise the connection is closed. At most ``max_connections`` are open at once: a new one past that
closes the connection idle the longest, or is closed itself when every one is busy, so idle clients
cannot lock out a health probe. GET routes answer HEAD too; the Server header names no version.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any, Awaitable, Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ..authority.core import AUDIT_KEY_PATH, STATUS_PATH, Authority
from ..config import host_port
from ..state import statuslist
from . import listeners

log = logging.getLogger("agentauthz.http_listener")  # the name operators filter on, kept across the layout

SERVER = "agentauthz"  # the whole Server header: no aiohttp or Python version for a scanner to match
NOT_FOUND = b'{"error":"not_found"}\n'
NOT_ACCEPTABLE = b'{"error":"not_acceptable","available":["%s"]}\n' % statuslist.CONTENT_TYPE.encode()
JSON = "application/json"


def _response(status: int, body: bytes, content_type: str, **headers: str) -> web.Response:
    return web.Response(status=status, body=body,
                        headers={"Content-Type": content_type, "Cache-Control": "no-store", **headers})


class Routes:
    """What each path answers; the same statuses, bodies and content types as ever."""

    def __init__(self, authority: Authority, serving: threading.Event, registry: Any,
                 workers_failing: Callable[[], bool] = lambda: False) -> None:
        self._authority = authority
        self._serving = serving
        self._workers_failing = workers_failing  # a Check worker's audit log cannot be written
        self._registry = registry
        a = authority
        self._paths: dict[str, Callable[[], Awaitable[web.Response]]] = {
            "/healthz": self._healthz,
            "/.well-known/jwks.json": lambda: self._json(a.jwks),
            AUDIT_KEY_PATH: lambda: self._json(a.audit_key_document),
            "/metrics": self._metrics,
        }
        # Path -> trust boundary (None: the default's); negotiated on the request's headers.
        self._lists: dict[str, str | None] = {
            STATUS_PATH: None, **{f"{STATUS_PATH}/{boundary}": boundary for boundary in a.keyrings}}

    async def answer(self, request: web.BaseRequest) -> web.Response:
        # The raw path, as before: no percent-decoding, the query ignored (but a status list's time).
        path = request.raw_path.partition("?")[0]
        route = self._paths.get(path)
        if request.method not in ("GET", "HEAD"):
            return _response(405, b'{"error":"method_not_allowed"}\n', JSON, Allow="GET, HEAD")
        if path in self._lists:
            return await self._status_list(request, self._lists[path])
        if route is None:
            return _response(404, NOT_FOUND, JSON)
        return await route()

    async def _healthz(self) -> web.Response:
        ok = self._serving.is_set() and self._authority.audit.healthy and not self._workers_failing()
        return _response(200 if ok else 503, b"ok\n" if ok else b"not serving\n", "text/plain")

    async def _json(self, document: Callable[[], Any]) -> web.Response:
        return _response(200, json.dumps(document()).encode(), JSON)

    async def _metrics(self) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        # Off the loop: the loop also answers Check and the API.
        return _response(200, await asyncio.to_thread(generate_latest, self._registry), CONTENT_TYPE_LATEST)

    async def _status_list(self, request: web.BaseRequest, boundary: str | None) -> web.Response:
        # draft-ietf-oauth-status-list §8: content negotiation per RFC 9110; only the JWT is served
        # (no CWT), gzip when asked for; no history is kept, so a time query is not implemented.
        headers = {"Vary": "Accept, Accept-Encoding"}
        if "time" in request.query:
            return _response(501, b'{"error":"historical_status_not_supported"}\n', JSON, **headers)
        if not statuslist.accepts_jwt(request.headers.get("Accept")):
            return _response(406, NOT_ACCEPTABLE, JSON, **headers)
        gzipped = statuslist.accepts_gzip(request.headers.get("Accept-Encoding"))
        try:  # signing and compressing the bits: off the loop
            body = await asyncio.to_thread(self._authority.status_list.body, boundary, gzipped=gzipped)
        except Exception:  # answer, and say why in the log; never a list we could not build whole
            log.exception("cannot build the status list")
            return _response(503, b'{"error":"status_list_unavailable"}\n', JSON, **headers)
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        return _response(200, body, statuslist.CONTENT_TYPE, **headers)


class _ProtocolLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's own reports (a malformed request, a client gone) at debug, as the old listener's were:
    a client must not be able to fill the log. Failures of the routes are logged by ``_answer``."""

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        self.debug(msg, *args, exc_info=exc_info, **kwargs)


class _Request(web.BaseRequest):
    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        # Every response passes here before its headers are written, aiohttp's own error answers too;
        # aiohttp only adds its versioned Server header when none is set.
        response.headers["Server"] = SERVER


class _Connection:
    __slots__ = ("busy", "since", "timer")

    def __init__(self, since: float) -> None:
        self.busy = False
        self.since = since  # when it last became idle
        self.timer: asyncio.TimerHandle | None = None


class _Server(web.Server):
    """aiohttp's server with a deadline on every connection and a bound on how many are open."""

    def __init__(self, routes: Routes, timeout: float, max_connections: int) -> None:
        super().__init__(self._handle, request_factory=self._request, handler_cancellation=True,
                         keepalive_timeout=timeout, access_log=None,
                         logger=_ProtocolLog(logging.getLogger("aiohttp.server"), {}))
        self._routes = routes
        self._timeout = timeout
        self._max = max_connections
        self._open: dict[RequestHandler, _Connection] = {}

    def _request(self, message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> _Request:
        return _Request(message, payload, protocol, writer, task, self._loop)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._open) >= self._max:
            idle = [(c.since, h) for h, c in self._open.items() if not c.busy]
            if not idle:
                handler.force_close()  # every connection is answering: no room for this one now
                return
            _, oldest = min(idle, key=lambda pair: pair[0])
            self._close(oldest)
        self._open[handler] = connection = _Connection(self._loop.time())
        self._arm(handler, connection)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._forget(handler)
        super().connection_lost(handler, exc)

    def _arm(self, handler: RequestHandler, connection: _Connection) -> None:
        """The next request must have arrived within the timeout."""
        connection.timer = self._loop.call_later(self._timeout, self._expire, handler)

    def _expire(self, handler: RequestHandler) -> None:
        connection = self._open.get(handler)
        if connection is not None and not connection.busy:
            self._close(handler)

    def _close(self, handler: RequestHandler) -> None:
        self._forget(handler)
        handler.force_close()

    def _forget(self, handler: RequestHandler) -> None:
        connection = self._open.pop(handler, None)
        if connection is not None and connection.timer is not None:
            connection.timer.cancel()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        connection = self._open.get(request.protocol)
        if connection is None:  # closed meanwhile (evicted or expired): answer nothing
            raise asyncio.CancelledError
        if connection.timer is not None:
            connection.timer.cancel()
        connection.busy = True
        try:
            # Answered and written within the timeout: a client that does not read is let go too.
            return await asyncio.wait_for(self._answer(request), self._timeout)
        except asyncio.TimeoutError:
            log.debug("http: %s %s not taken within %.0f s: closing", request.method, request.path,
                      self._timeout)
            self._close(request.protocol)
            raise asyncio.CancelledError from None
        finally:
            if request.protocol in self._open:
                connection.busy = False
                connection.since = self._loop.time()
                self._arm(request.protocol, connection)

    async def _answer(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            response = await self._routes.answer(request)
        except Exception:  # a bug, not the client's doing: say so in the log, answer without details
            log.exception("http: %s %s failed", request.method, request.path)
            response = _response(500, b'{"error":"internal_error"}\n', JSON)
        await response.prepare(request)
        await response.write_eof()
        return response


class HttpListener:
    """The listener on ``host:port``: start and stop it on the daemon's event loop."""

    def __init__(self, address: str, routes: Routes, *, timeout: float, max_connections: int) -> None:
        self._address, (self._host, self._port) = address, host_port(address)
        self._routes = routes
        self._timeout = timeout
        self._max = max_connections
        self._runner: web.ServerRunner | None = None

    async def start(self) -> None:
        self._runner = web.ServerRunner(_Server(self._routes, self._timeout, self._max),
                                        handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self._host, self._port).start()
        except OSError as exc:
            raise listeners.taken("http_listen", self._address, exc) from None

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
