"""MCP tool calls: what a JSON-RPC 2.0 request body asks for, read strictly, never guessed at.

On a route whose ``context_extensions`` carry ``mcp: "true"`` (and whose ext_authz settings send the
body, ``with_request_body``), a request with a body is decided from it:

- ``tools/call``: tool = ``params.name``, operation = ``call``, target and sensitivity from the route;
  ``params.arguments`` is what grant argument constraints are checked against;
- any other method (``initialize``, ``ping``, ``tools/list``, notifications ...): tool ``mcp``,
  operation = the method itself, so a session needs an explicit grant such as
  ``mcp:<target>:initialize,notifications/initialized,tools/list,ping``.

A batch, a response object, a body that is not strict JSON (duplicate keys, NaN, integers beyond
±2^53, lone surrogates, nesting past 64), not ``application/json``, over ``MAX_BODY_BYTES`` or cut
short by Envoy is refused with its own reason. A body-less request (GET opening the event stream,
DELETE ending a session) is decided like any other route.
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
CALL_OPERATION = "call"
PARTIAL_HEADER = "x-envoy-auth-partial-body"  # Envoy's mark of a body cut at max_request_bytes
MAX_DEPTH = 64
_REQUEST_KEYS = frozenset({"jsonrpc", "id", "method", "params"})
_METHOD = re.compile(r"[A-Za-z0-9_./-]{1,64}")
_TOOL = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")  # a policy tool name (MCP names are a subset)
_SURROGATE = re.compile("[\ud800-\udfff]")


class Call:
    """The decision's view of one MCP request: tool, operation and, for ``tools/call``, arguments."""

    __slots__ = ("tool", "operation", "arguments")

    def __init__(self, tool: str, operation: str, arguments: dict[str, Any] | None) -> None:
        self.tool, self.operation, self.arguments = tool, operation, arguments

    def __repr__(self) -> str:
        return f"Call({self.tool!r}, {self.operation!r}, {self.arguments!r})"


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
    """The MCP request in ``http``'s body, a refusal reason, or None when there is no body."""
    raw = body_of(http)
    headers = http.headers
    if not raw:
        return reasons.MCP_BODY_INVALID if http.method == "POST" else None
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


def _call(message: dict[str, Any]) -> Call | str:
    method = message.get("method")
    if (message.keys() - _REQUEST_KEYS or message.get("jsonrpc") != "2.0"
            or type(method) is not str or not _METHOD.fullmatch(method)):
        return reasons.MCP_BODY_INVALID  # includes responses (result/error) and unknown members
    if "id" in message and type(message["id"]) not in (str, int):
        return reasons.MCP_BODY_INVALID  # JSON-RPC ids: string or number; MCP: never null
    params = message.get("params", {})
    if type(params) is not dict:
        return reasons.MCP_BODY_INVALID
    if method != "tools/call":
        return Call(SESSION_TOOL, method, None)
    name = params.get("name")
    arguments = params.get("arguments", {})
    if ("id" not in message or type(name) is not str or not _TOOL.fullmatch(name)
            or type(arguments) is not dict):
        return reasons.MCP_BODY_INVALID
    return Call(name, CALL_OPERATION, arguments)
