"""Envoy's HTTP ext_authz (``http_service``) on granian: the gRPC Check's decision, another transport.

Envoy sends the original request's method and path, the headers its ``allowed_headers`` name and, on
an MCP route, the body; it reads the answer as 200 = allow (copying ``allowed_upstream_headers`` to the
upstream request and removing those ``x-envoy-auth-headers-to-remove`` names), any other status =
deny (the status, body and ``allowed_client_headers`` to the client; a 5xx is Envoy's
``status_on_error`` instead). Here the request becomes the same fields tuple the gRPC parser makes
(``decision/_request_py.Fields``), ``CheckService.check`` decides it (warm path, audit, budgets, MCP;
the handler takes check's two steps itself, ``answer_warm``'s then ``finish``, so that the common
allow costs no Python frame or coroutine of its own) and its CheckResponse bytes become the HTTP
answer, converted once per distinct response.

What HTTP ext_authz lacks, Envoy's header_mutation filter supplies before ext_authz, and only Envoy
(examples/envoy-http.yaml; README "The HTTP Check"):

- ``x-agentauthz-path``: the original ``:path`` as Envoy routed it (granian hands handlers the path
  percent-decoded, and a decision must see what the upstream is sent). Required: without it the request
  is refused request_invalid, so an Envoy without the filter fails closed.
- ``x-agentauthz-route-<key>``: a route's ``context_extensions`` (tool, target, operation, sensitivity,
  boundary, mcp), set per route after the filter removed every client copy; an unknown key or a
  repeated one is refused request_invalid.
- ``x-forwarded-client-cert`` (``forward_client_cert_details: SANITIZE_SET``): the peer certificate and
  principal the gRPC Check reads from ``source``; more than one element is refused request_invalid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from google.rpc import code_pb2

from ..config import host_port
from ..decision import _accel
from ..decision._check_py import DECISION_ID_CHARS
from ..decision._http_py import Answer
from ..decision.mcp import MAX_BODY_BYTES
from .extauthz import PREPARED_MAX, UNPARSED, CheckService, decision_id_frame, http_status_for
from .listeners import UNIX_SOCKET_MODE

log = logging.getLogger("agentauthz.http_check")

REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
# One XFCC element's key=value pairs (Envoy quotes values holding , ; = or "); the separator after each.
_XFCC_PAIR = re.compile(r'([A-Za-z]+)=("(?:[^"\\]|\\.)*"|[^;,"]*)(;|,|$)')


class HttpRequest:
    """The part of the request an MCP route's body reader takes (``decision.mcp.read_call``)."""

    __slots__ = ("method", "headers", "raw_body", "body")

    def __init__(self, method: str, headers: dict[str, str], raw_body: bytes) -> None:
        self.method, self.headers, self.raw_body, self.body = method, headers, raw_body, ""


class _Request:
    """Stands where the gRPC Check keeps the parsed message: ``_full`` reads an MCP body from ``http``."""

    __slots__ = ("http",)

    def __init__(self, http: HttpRequest) -> None:
        self.http = http


def peer_of(xfcc: str) -> tuple[str, str] | None:
    """(principal, URL-encoded PEM) from one x-forwarded-client-cert element, as Envoy's ``source``
    names them (URI SAN, else DNS SAN, else subject); None if it is not exactly one element."""
    values: dict[str, str] = {}
    at = 0
    while at < len(xfcc):
        pair = _XFCC_PAIR.match(xfcc, at)
        if pair is None or pair.group(3) == ",":
            return None
        key, value = pair.group(1).lower(), pair.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        values.setdefault(key, value)  # DNS may repeat: the first, as Envoy's source.principal
        at = pair.end()
    principal = values.get("uri") or values.get("dns") or values.get("subject") or ""
    return principal, values.get("cert", "")


def with_body_reader(method: str, fields: Any) -> Any:
    """The fields ``CheckService.check`` decides (``_request_py.Fields``) of an HTTP ext_authz request as
    the hot path's ``scan_http`` gives them (None: not a request Envoy set up as README "The HTTP Check"
    says, then request_invalid), with, on an MCP route, what ``decision.mcp.read_call`` reads its body
    from (the body read once it is, ``read_body``)."""
    if fields is None or fields[7] is None:
        return fields
    return (*fields[:7], _Request(HttpRequest(method, fields[7], b"")))


def convert(raw: bytes) -> tuple[Answer, bool]:
    """CheckResponse bytes (their decision id cut out) as (status, headers, body), and whether every
    response of these bytes answers alike (``HttpAnswers`` keeps it)."""
    message = ext_authz.CheckResponse.FromString(raw)
    if message.status.code == code_pb2.OK:
        if not message.HasField("ok_response"):  # every allow names its caller: this one is no answer
            raise ValueError("a CheckResponse without ok_response is not an allow")
        ok = message.ok_response
        headers = [(o.header.key, o.header.value) for o in ok.headers]
        if ok.headers_to_remove:
            headers.append((REMOVE_HEADER, ",".join(ok.headers_to_remove)))
        return (200, headers, b""), True
    denied = message.denied_response
    status = denied.status.code or 403
    # An MCP request's denial answers 200 over gRPC so that the session goes on; over HTTP a 200 is an
    # allow, so it keeps the status a plain route answers (mcp_denials.py). Its body names its own
    # JSON-RPC id and decision: one of a kind, not kept.
    mcp = status < 400
    if mcp:
        status = http_status_for(message.status.message)
    return (status, [(o.header.key, o.header.value) for o in denied.headers], denied.body.encode()), not mcp


def answers(hot: _accel.HotPath = _accel.ACTIVE) -> Any:
    """The hot path's ``HttpAnswers`` for this daemon's decision ids (``extauthz.decision_ids``)."""
    head, tail = decision_id_frame()
    return hot.HttpAnswers(head, tail, DECISION_ID_CHARS, convert, PREPARED_MAX)


class HttpCheck:
    """The RSGI application: one HTTP ext_authz request -> ``check`` -> the HTTP answer."""

    def __init__(self, service: CheckService, fresh: Callable[[], bool] | None = None,
                 hot: _accel.HotPath = _accel.ACTIVE) -> None:
        self._check = service.check if fresh is None else service.fresh_only(fresh, service.check)
        self._fresh, self._finish = fresh, service.finish
        self._warm_path, self._warm_failed = service.warm_path, service.warm_failed
        self._answers, self._scan = answers(hot), hot.scan_http

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        if scope.proto != "http":
            return
        try:
            try:
                headers = scope.headers
                # len(headers): each name once, whether or not items() could give its value.
                fields = self._scan(scope.method, scope.path, headers.items(), len(headers), peer_of)
            except Exception:  # a fault of ours, not the caller's: Check answers it internal_error
                log.exception("reading an HTTP Check request failed")
                fields = UNPARSED
            if fields.__class__ is tuple and fields[7] is None and (self._fresh is None or self._fresh()):
                # check's own steps (answer_warm's, inline), taken here: the common allow is answered in
                # one native call, with no Python frame or coroutine but this one.
                try:
                    answer = self._warm_path(fields)
                except Exception:
                    answer = self._warm_failed(fields)
                if answer.__class__ is not bytes:
                    answer = await self._finish(fields, answer)
            else:
                if fields.__class__ is tuple and fields[7] is not None:  # an MCP route reads its body
                    fields = with_body_reader(scope.method, fields)  # (Envoy sends one only there)
                    http = fields[7].http
                    http.raw_body = await read_body(protocol, http.headers.get("content-length"))
                answer = await self._check(fields, None)  # (not fresh: check answers revocation_stale)
            status, headers, payload = self._answers(answer)
            if payload and scope.method == "HEAD":
                # Envoy asks with the request's own method, and a body in answer to a HEAD is a stream
                # error to it (503, status_on_error) instead of the denial.
                payload = b""
        except Exception:  # never an allow: Envoy takes a 5xx as an error, which status_on_error denies
            log.exception("the HTTP Check failed")
            status, headers, payload = 500, [], b""
        protocol.response_bytes(status, headers, payload)


async def read_body(protocol: Any, length: str | None) -> bytes:
    """The request body, read no further than one byte past what an MCP route accepts."""
    if length == "0":
        return b""
    if length is not None and length.isdigit() and int(length) <= MAX_BODY_BYTES:
        return await protocol()  # type: ignore[no-any-return]
    chunks, size = [], 0
    async for chunk in protocol:
        # granian yields b"" for "no more": at a body's end, and forever, never ending the iteration,
        # for an HTTP/2 stream the client reset or closed first; looping on it spins a core per stream.
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            break
    return b"".join(chunks)[:MAX_BODY_BYTES + 1]


@contextlib.contextmanager
def native_threads_batch() -> Iterator[None]:
    """Threads that start inside the block and are not Python's (granian's Rust I/O runtime) become
    SCHED_BATCH, and the threads they start later inherit it; Python's threads and this one keep theirs.

    granian's I/O threads wake for every request that arrives, and can do nothing with it until the
    event loop thread lets go of the GIL. As SCHED_OTHER threads they preempt the loop thread on a
    core they share, only to block on the GIL and switch back: two context switches a request, 40 of a
    cold Check's 165 µs of CPU (64 HTTP/1.1 connections, one core). A SCHED_BATCH thread never
    preempts on waking: it runs when the loop thread waits for work and takes every request that came
    meanwhile in one go (13 µs a request; 6.1k -> 7.8k cold Checks/s). On a core of its own it runs at
    once, as before. A daemon started under another policy (chrt) is left as it is, and where the
    policy cannot be set it serves without it: this is throughput, not correctness.
    """
    try:
        before = set(os.listdir("/proc/self/task")) if os.sched_getscheduler(0) == os.SCHED_OTHER else None
    except (AttributeError, OSError) as exc:  # not Linux
        log.info("http check: its threads keep the default scheduling policy (%s)", exc)
        before = None
    yield
    if before is None:
        return
    python = {t.native_id for t in threading.enumerate()}
    for tid in set(os.listdir("/proc/self/task")) - before:
        if int(tid) not in python:
            try:
                os.sched_setscheduler(int(tid), os.SCHED_BATCH, os.sched_param(0))
            except ProcessLookupError:
                pass  # it exited
            except OSError as exc:  # a sandbox that forbids it
                log.info("http check: its threads keep the default scheduling policy (%s)", exc)
                return


class HttpCheckServer:
    """granian, embedded in this process's event loop, serving ``HttpCheck`` on ``listen``
    (HOST:PORT, bound with SO_REUSEPORT as every Check worker does, or unix:PATH)."""

    def __init__(self, listen: str, app: HttpCheck) -> None:
        from granian.constants import HTTPModes, Interfaces
        from granian.server.embed import Server
        where: dict[str, Any]
        if listen.startswith("unix:"):
            where = {"uds": Path(listen[5:])}
        else:
            host, port = host_port(listen)
            where = {"address": host, "port": port}
        self.listen, self._where = listen, where
        self._server = Server(app, interface=Interfaces.RSGI, http=HTTPModes.auto, websockets=False,
                              runtime_threads=1, backlog=1024, log_enabled=False, **where)
        # Whoever can connect is believed about the route and certificate headers. embed.Server takes
        # no uds_permissions; its base class reads it when it binds.
        self._server.uds_permissions = UNIX_SOCKET_MODE
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 10.0) -> None:
        """Serve, and return once the listener accepts connections (granian's worker binds after
        ``serve`` has begun); OSError if it does not."""
        # granian starts its I/O threads before it listens: all of them inside the block.
        with native_threads_batch():
            self._task = asyncio.create_task(self._server.serve())
            deadline = asyncio.get_running_loop().time() + timeout
            while not await self._accepting():
                if self._task.done():
                    self._task.result()
                    raise OSError("granian stopped before it listened")
                if asyncio.get_running_loop().time() > deadline:
                    raise OSError(f"not listening after {timeout:.0f} s")
                await asyncio.sleep(0.005)

    async def _accepting(self) -> bool:
        try:
            if "uds" in self._where:
                _, writer = await asyncio.open_unix_connection(str(self._where["uds"]))
            else:
                host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self._where["address"],
                                                                                 self._where["address"])
                _, writer = await asyncio.open_connection(host, self._where["port"])
        except OSError:
            return False
        writer.close()
        return True

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._server.signal_handler_interrupt()
            await self._task
