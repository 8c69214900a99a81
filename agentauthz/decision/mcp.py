"""MCP tool calls: what a JSON-RPC 2.0 message body asks for, read strictly, never guessed at.

On a route whose ``context_extensions`` carry ``mcp: "true"`` (and whose ext_authz settings send the
body, ``with_request_body``), a request is decided from what it carries:

- ``tools/call``: tool = ``params.name``, operation = ``call``, target and sensitivity from the route;
  ``params.arguments`` is what grant argument constraints are checked against;
- the transport's own messages, which call no tool: tool ``mcp``, operation ``session``
  (``SESSION_OPERATION``). They are ``initialize``, ``notifications/initialized``,
  ``notifications/cancelled``, ``ping``, ``server/discover`` (``SESSION_METHODS``), the body-less GET
  opening the event stream and DELETE ending the session, and a response object answering one of the
  server's own requests (elicitation, sampling, roots): ``{"jsonrpc", "id", "result"|"error"}``;
- any other method (``tools/list``, ``resources/read``, ``prompts/get`` ...): tool ``mcp``, operation =
  the method itself. A session therefore needs ``mcp:<target>:session`` and, to list tools,
  ``mcp:<target>:session,tools/list``.

A batch, a body that is not strict JSON (duplicate keys, NaN, integers beyond ±2^53, lone surrogates,
nesting past 64), not ``application/json``, over ``MAX_BODY_BYTES``, cut short by Envoy, a body on
anything but a POST, or a message of none of these shapes is refused with its own reason. Any other
body-less request (HEAD, OPTIONS ...) is decided like any other route.
"""

from __future__ import annotations

import re
from typing import Any

from .. import errors, reasons
from ._strict_py import json_object
from .constraints import INT_LIMIT

EXTENSION = "mcp"  # context_extensions key marking an MCP route ("true")
MAX_BODY_BYTES = 65536  # equals max_request_bytes of the MCP route in examples/envoy.yaml
SESSION_TOOL = "mcp"
SESSION_OPERATION = "session"  # the transport's own messages: one grant, mcp:<target>:session
SESSION_METHODS = frozenset({"initialize", "notifications/initialized", "notifications/cancelled", "ping",
                             "server/discover"})
SESSION_REQUESTS = frozenset({"GET", "DELETE"})  # body-less: the event stream, the session's end
CALL_OPERATION = "call"
PARTIAL_HEADER = "x-envoy-auth-partial-body"  # Envoy's mark of a body cut at max_request_bytes
MAX_DEPTH = 64
_REQUEST_KEYS = frozenset({"jsonrpc", "id", "method", "params"})
_RESPONSE_KEYS = frozenset({"jsonrpc", "id", "result", "error"})
_ERROR_KEYS = frozenset({"code", "message", "data"})
_METHOD = re.compile(r"[A-Za-z0-9_./-]{1,64}")
_TOOL = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")  # a policy tool name (MCP names are a subset)
_SURROGATE = re.compile("[\ud800-\udfff]")


class Call:
    """The decision's view of one MCP message: tool, operation, for ``tools/call`` the arguments, and
    for a request (a message the server answers) its method and ``id``, which a denial answers."""

    __slots__ = ("tool", "operation", "arguments", "method", "id")

    def __init__(self, tool: str, operation: str, arguments: dict[str, Any] | None, method: str = "",
                 id: str | int | None = None) -> None:
        self.tool, self.operation, self.arguments = tool, operation, arguments
        self.method, self.id = method, id

    def __repr__(self) -> str:
        return f"Call({self.tool!r}, {self.operation!r}, {self.arguments!r}, {self.method!r}, {self.id!r})"


SESSION = Call(SESSION_TOOL, SESSION_OPERATION, None)  # a body-less GET/DELETE, or a client's response


def _strict(value: Any) -> bool:
    """I-JSON (RFC 7493): no integer a peer could read differently, no lone surrogate; bounded depth."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return False
        kind = type(item)
        if kind is int:
            if not -INT_LIMIT <= item <= INT_LIMIT:
                return False
        elif kind is str:
            if _SURROGATE.search(item):
                return False
        elif kind is dict:
            for key, child in item.items():
                if _SURROGATE.search(key):
                    return False
                stack.append((child, depth + 1))
        elif kind is list:
            stack.extend((child, depth + 1) for child in item)
    return True


def body_of(http: Any) -> bytes:
    """The request body Envoy sent: ``raw_body`` with ``pack_as_bytes``, else the UTF-8 ``body``."""
    return http.raw_body or http.body.encode("utf-8")


def read_call(http: Any) -> Call | str | None:
    """The MCP message in ``http``'s body (``SESSION`` for the transport's body-less GET and DELETE),
    a refusal reason, or None for another body-less request (decided like any route)."""
    raw = body_of(http)
    headers = http.headers
    if not raw:
        if http.method == "POST":
            return reasons.MCP_BODY_INVALID
        return SESSION if http.method in SESSION_REQUESTS else None
    if http.method != "POST":
        return reasons.MCP_BODY_INVALID  # only a POST carries a message; what would a GET's body mean?
    if headers.get(PARTIAL_HEADER) == "true":
        return reasons.MCP_BODY_TRUNCATED
    if len(raw) > MAX_BODY_BYTES:
        return reasons.MCP_BODY_TOO_LARGE
    length = headers.get("content-length")
    if length is not None and length != str(len(raw)):
        return reasons.MCP_BODY_TRUNCATED  # what the tool would read is not what we read
    media = headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json" or headers.get("content-encoding", "identity") != "identity":
        return reasons.MCP_BODY_INVALID
    if raw.lstrip(b" \t\r\n")[:1] == b"[":
        return reasons.MCP_BATCH_REFUSED
    try:
        message = json_object(raw, "MCP request")
    except errors.TokenMalformed:
        return reasons.MCP_BODY_INVALID
    if not _strict(message):
        return reasons.MCP_BODY_INVALID
    return _call(message)


def _response(message: dict[str, Any]) -> Call | str:
    """A response to one of the server's own requests: exactly an ``id`` and a ``result`` object or an
    ``error`` object; it calls no tool, so it is session traffic."""
    error = message.get("error")
    if (message.keys() - _RESPONSE_KEYS or message.get("jsonrpc") != "2.0"
            or type(message.get("id")) not in (str, int) or ("result" in message) == ("error" in message)):
        return reasons.MCP_BODY_INVALID
    if "result" in message:
        return SESSION if type(message["result"]) is dict else reasons.MCP_BODY_INVALID
    if (type(error) is not dict or error.keys() - _ERROR_KEYS or type(error.get("code")) is not int
            or type(error.get("message")) is not str):
        return reasons.MCP_BODY_INVALID
    return SESSION


def _call(message: dict[str, Any]) -> Call | str:
    if "method" not in message and ("result" in message or "error" in message):
        return _response(message)
    method = message.get("method")
    if (message.keys() - _REQUEST_KEYS or message.get("jsonrpc") != "2.0"
            or type(method) is not str or not _METHOD.fullmatch(method)):
        return reasons.MCP_BODY_INVALID  # unknown members, or a request and a response at once
    if "id" in message and type(message["id"]) not in (str, int):
        return reasons.MCP_BODY_INVALID  # JSON-RPC ids: string or number; MCP: never null
    params = message.get("params", {})
    if type(params) is not dict:
        return reasons.MCP_BODY_INVALID
    request_id = message.get("id")  # None: a notification, which nothing answers
    if method != "tools/call":
        operation = SESSION_OPERATION if method in SESSION_METHODS else method
        return Call(SESSION_TOOL, operation, None, method, request_id)
    name = params.get("name")
    arguments = params.get("arguments", {})
    if ("id" not in message or type(name) is not str or not _TOOL.fullmatch(name)
            or type(arguments) is not dict):
        return reasons.MCP_BODY_INVALID
    return Call(name, CALL_OPERATION, arguments, method, request_id)
