"""A denied JSON-RPC request on an MCP route, answered so that the agent's session goes on and the
agent reads why: HTTP 200, ``application/json``, a JSON-RPC error object carrying the request's ``id``.

The official SDK's 1.x client tears the session down on any error status (``raise_for_status`` inside
its transport); 2.x keeps it, but reads an error status's body only when it is a JSON-RPC error. Both
hand a JSON-RPC error read from a 200 to the caller as the exception of that one call. The
error's ``data`` says what a plain route would have answered (``status``, ``reason``) and what would
be needed. A notification or a response to the server (no ``id`` to answer) keeps the status-coded
denial: JSON-RPC answers neither.
"""

from __future__ import annotations

import json
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from .. import reasons
from ..decision._check_py import header_option
from ..decision.mcp import CALL_OPERATION, Call

DENIED_CODE = -32003  # JSON-RPC implementation-defined server errors; the SDKs use -32000 and -32001
_CONTENT_TYPE = header_option("content-type", "application/json")
_NEW_TOKEN = {
    reasons.TOKEN_EXPIRED: "a new token: this one has expired",
    reasons.TOKEN_REVOKED: "a new task and token: this token was revoked",
    reasons.TASK_ENDED: "a new task and token: this task was ended",
    reasons.DELEGATION_REVOKED: "a new delegation: the token it came from was revoked",
    reasons.AGENT_REVOKED: "an administrator's unban: this agent's tokens were revoked",
    reasons.KEY_REVOKED: "a new token: the key that signed this one was revoked",
}
_RETRY = "a retry later: the decision could not be made safely, so it was not made"


def constraint_text(constraint: Any) -> str:
    """What a compiled argument constraint (``constraints.Argument``) asks of the argument, in words."""
    what = []
    if constraint.prefix is not None:
        what.append(f"a path under {constraint.prefix} (whole segments; no '..', '%', '\\', control "
                    "or look-alike characters)")
    if constraint.one_of is not None:
        what.append(f"one of {', '.join(sorted(constraint.one_of))}")
    if constraint.max is not None:
        what.append(f"a number at most {constraint.max:g}")
    if constraint.required:
        what.append("present")
    return f"argument {constraint.name}: {' and '.join(what) or 'any value'}"


def needed(reason: str, tool: str, target: str, operation: str, sensitivity: str, constraint: Any,
           retry_after: int) -> str:
    """What would let a request denied for ``reason`` through, in one line for the agent."""
    if constraint is not None:
        return constraint_text(constraint)
    if reason in (reasons.SCOPE_DENIED, reasons.SENSITIVITY_EXCEEDED):
        return f"a token granting {tool}:{target}:{operation}:{sensitivity} (agentauthz mint --grant)"
    if reason == reasons.POLICY_DENIED:
        return f"a policy rule allowing {tool}:{target}:{operation} at {sensitivity} for this agent"
    if reason == reasons.APPROVAL_REQUIRED:
        return "a token minted under a human's approval (agentauthz mint --approval-id)"
    if reason == reasons.BUDGET_EXHAUSTED:
        return "a new task: this grant's call budget is spent"
    if reason == reasons.BUDGET_AGENT_LIMIT:
        return "fewer tools or budget windows at once: this agent holds as many call counters as one may"
    if reason == reasons.RATE_LIMITED:
        return f"a wait of {retry_after} s: the grant's rate limit"
    if reason in (reasons.AUDIT_UNAVAILABLE, reasons.INTERNAL_ERROR, reasons.REVOCATION_STALE,
                  reasons.BUDGET_TABLE_FULL, reasons.BUDGET_UNAVAILABLE):
        return _RETRY
    if reason in reasons.UNAUTHENTICATED:
        return _NEW_TOKEN.get(reason, "a valid token for this route (agentauthz mint)")
    return ""


def denied_call(call: Call, reason: str, status: int, decision_id: str, target: str, sensitivity: str,
                constraint: Any = None, retry_after: int = 0) -> bytes:
    """The serialized CheckResponse answering ``call`` (a request: it has an ``id``) with a JSON-RPC error."""
    need = needed(reason, call.tool, target, call.operation, sensitivity, constraint, retry_after)
    what = f"{call.method} {call.tool}" if call.operation == CALL_OPERATION else call.method
    data = {"reason": reason, "status": status, "tool": call.tool, "target": target,
            "operation": call.operation, "needed": need, "decision_id": decision_id}
    if retry_after:
        data["retry_after"] = retry_after
    message = f"agentauthz denied {what}: {reason}" + (f"; needed: {need}" if need else "")
    body = json.dumps({"jsonrpc": "2.0", "id": call.id,
                       "error": {"code": DENIED_CODE, "message": message, "data": data}})
    return ext_authz.CheckResponse(
        status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message=reason),
        denied_response=ext_authz.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.OK), headers=[_CONTENT_TYPE],
            body=body + "\n"),
    ).SerializeToString()
