"""Envoy ext_authz v3 Check: request -> one decision call -> pre-built response bytes.

Responses are serialized once per reason (and once per token for allows) and
handed to gRPC as bytes; the per-request decision id is spliced into a
pre-serialized ``dynamic_metadata`` field rather than re-encoding the message.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import logging
import os
import ssl
import time
import urllib.parse
from typing import Any, Awaitable, Callable, Mapping

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from .. import reasons
from ..audit import metrics
from ..audit.records import argument_member, check_members, prepare
from ..authority.budgets import retry_after
from ..decision import _accel, _request_py
from ..decision._check_py import ABNORMAL_PATH, DECISION_ID_CHARS, header_option
from ..decision._request_py import Fields
from ..decision.constraints import enforce
from ..decision.mcp import EXTENSION, Call, read_call
from ..decision.policy import Boundary, Policy, RequestDefaults
from ..decision.tokens import SENSITIVITY_RANK
from ..errors import AuditUnavailable, TokenError
from .mcp_denials import denied_call

_scan = _accel.ACTIVE.scan_check_request

log = logging.getLogger("agentauthz.extauthz")  # the name operators filter on, kept across the layout

SERVICE = "envoy.service.auth.v3.Authorization"
PREPARED_MAX = 4096

def http_status_for(reason: str) -> int:
    """401 for an unusable credential, 403 for one that does not cover the request (RFC 6750 §3.1)."""
    if reason in reasons.UNAUTHENTICATED:
        return 401
    if reason in reasons.FORBIDDEN:
        return 403
    if reason == reasons.REQUEST_INVALID:
        return 400
    if reason in (reasons.AUDIT_UNAVAILABLE, reasons.INTERNAL_ERROR, reasons.REVOCATION_STALE):
        return 503
    # MCP bodies, argument constraints, budgets (decision/mcp.py and constraints.py, authority/budgets.py).
    if reason in reasons.MCP_REFUSED:
        return 400
    if reason == reasons.RATE_LIMITED:
        return 429
    if reason in (reasons.BUDGET_TABLE_FULL, reasons.BUDGET_UNAVAILABLE):
        return 503
    return 403  # argument constraints and exhausted budgets; anything unforeseen is still a denial


def _www_authenticate(reason: str) -> str:
    if reason == reasons.TOKEN_MISSING:
        return 'Bearer realm="agentauthz"'
    if reason in reasons.UNAUTHENTICATED:
        return f'Bearer realm="agentauthz", error="invalid_token", error_description="{reason}"'
    return f'Bearer realm="agentauthz", error="insufficient_scope", error_description="{reason}"'


def denied_response(reason: str, retry_after: int = 0) -> bytes:
    """The serialized CheckResponse denying with ``reason`` (and ``Retry-After`` seconds, if any)."""
    status = http_status_for(reason)
    grpc_code = code_pb2.UNAUTHENTICATED if status == 401 else code_pb2.PERMISSION_DENIED
    headers = [header_option("content-type", "application/json")]
    if status in (401, 403):
        headers.append(header_option("www-authenticate", _www_authenticate(reason)))
    if retry_after:
        headers.append(header_option("retry-after", str(retry_after)))
    return ext_authz.CheckResponse(
        status=status_pb2.Status(code=grpc_code, message=reason),
        denied_response=ext_authz.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=headers,
            body=json.dumps({"error": reason}) + "\n"),
    ).SerializeToString()


def decision_id_frame() -> tuple[bytes, bytes]:
    """The serialized ``dynamic_metadata`` field before and after a decision id (see ``decision_ids``)."""
    placeholder = "#" * DECISION_ID_CHARS
    field = ext_authz.CheckResponse(dynamic_metadata=struct_pb2.Struct(
        fields={"decision_id": struct_pb2.Value(string_value=placeholder)})).SerializeToString()
    at = field.index(placeholder.encode())
    return field[:at], field[at + DECISION_ID_CHARS:]


def decision_ids(hot: _accel.HotPath) -> Any:
    """A new process's decision ids (``hot.DecisionIds``), echoed to Envoy as ``dynamic_metadata``."""
    # 64 random bits per process start tell workers, restarts and replicas apart (the audit log joins
    # on decision ids); the counter, each of one process's decisions.
    return hot.DecisionIds(os.urandom(8).hex(), *decision_id_frame())


def bearer_token(value: str | None) -> str | None:
    """The RFC 6750 §2.1 bearer credential in an authorization header, or None; any other scheme
    counts as none."""
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def request_fields(method: str, path: str, extensions: dict[str, str],
                   defaults: RequestDefaults) -> tuple[str, str, str, str]:
    """(tool, target, operation, sensitivity) from the route's context_extensions, else the policy's
    ``requests`` defaults: operation from the method, tool and target from ``/<tool>/<target...>``.

    A path not in its one normal form (``_check_py.ABNORMAL_PATH``) names nothing on any route, even
    one naming its tool and target, since the upstream may resolve it elsewhere: no tool and no
    sensitivity, so the decision is request_invalid (400), whatever an MCP body names as the tool.
    """
    operation = extensions.get("operation") or defaults.operations.get(method, "")
    if ABNORMAL_PATH.match(path):
        return "", "", operation, ""
    tool = extensions.get("tool")
    target = extensions.get("target")
    if tool is None or target is None:
        path_tool = path_target = ""
        if defaults.tool_from_path:
            path_tool, _, path_target = path.partition("?")[0].lstrip("/").partition("/")
        tool = tool if tool is not None else path_tool
        target = target if target is not None else path_target
    return tool, target, operation, extensions.get("sensitivity") or defaults.sensitivity


class _FaultLog:
    """Logs a fault's traceback at most once per ``interval`` seconds, with how many it left out:
    a fault every request meets must not flood the log."""

    def __init__(self, interval: float = 10.0) -> None:
        self._interval, self._next, self._skipped = interval, 0.0, 0

    def log(self, what: str, traceback: bool = True) -> None:
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return
        self._next, skipped, self._skipped = now + self._interval, self._skipped, 0
        log.log(logging.ERROR if traceback else logging.WARNING, "%s (%d more since the last one logged)",
                what, skipped, exc_info=traceback)


_FAULTS = _FaultLog()
_REFUSED_CLIENTS = _FaultLog()
UNPARSED = object()  # parse_check_request's answer when the parser raised


def refused_constraint(entry: Any, reason: str, tool: str, target: str, operation: str, sensitivity: str,
                       arguments: Mapping[str, Any] | None, ruled: Any) -> Any:
    """The first argument constraint failing for ``reason`` of a grant covering the request, else of
    the policy's ``Constrained`` answer the decision enforced (``ruled``); None if there is none."""
    if arguments is None:
        return None
    level = SENSITIVITY_RANK.get(sensitivity, 0)
    covering = (g.extras for g in entry.grants if g.covers(tool, target, operation, level))
    extras = [e for e in covering if e is not None]
    extras += getattr(ruled, "alternatives", ())
    return next((c for e in extras for c in e.arguments if c.problem(arguments) == reason), None)


def refused_argument(entry: Any, reason: str, tool: str, target: str, operation: str, sensitivity: str,
                     arguments: Mapping[str, Any] | None, ruled: Any) -> str:
    """The ``argument`` member of an argument denial's record: the constraint ``refused_constraint``
    finds and the value it refused (redacted)."""
    constraint = refused_constraint(entry, reason, tool, target, operation, sensitivity, arguments, ruled)
    if constraint is None:
        return argument_member(None, None)
    return argument_member(constraint.name, arguments.get(constraint.name))  # type: ignore[union-attr]


_PEER_REFUSED = frozenset({reasons.TOKEN_SENDER, reasons.TOKEN_BINDING})  # their records name the peer


def certificate_thumbprint(pem: str) -> str:
    """RFC 8705 ``x5t#S256`` of the URL-encoded PEM Envoy forwards as ``source.certificate``; "" if
    it is no certificate (which then matches no binding)."""
    try:
        der = ssl.PEM_cert_to_DER_cert(urllib.parse.unquote(pem))
    except ValueError:
        return ""
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


class CheckService:
    """The ext_authz servicer; ``check`` is the whole request path.

    ``verifiers`` maps each trust boundary (token audience) to its own verifier,
    the default boundary first; a route names its boundary in the ``boundary``
    context extension. The common allow is answered by ``hot.WarmAllow`` in one
    call; ``check`` takes every other request, and that one's decision.
    """

    def __init__(self, verifiers: Mapping[str, Any], audit: Any, policy: Callable[[], Policy],
                 clock: Callable[[], float] = time.time, budgets: Any = None,
                 hot: _accel.HotPath = _accel.ACTIVE, meters: memoryview | None = None,
                 denials: Any = None) -> None:
        self._verifiers = dict(verifiers)
        self._default = next(iter(self._verifiers.items()))
        self._policy = policy
        self._thumbprints: dict[str, str] = {}  # forwarded certificate -> x5t#S256
        self._audit = audit
        self._clock = clock
        self._ids = decision_ids(hot)
        self._allow_response = hot.allow_response
        self._prepared: dict[tuple[Any, ...], str] = {}  # see _prepare
        self._denied: dict[str, bytes] = {}  # reason -> bytes, filled as reasons first occur
        self._budgets = budgets  # budgets.BudgetTable shared by every worker; None: budgeted grants deny
        self._retry_denied: dict[int, bytes] = {}  # Retry-After seconds -> rate_limited response
        # Built now, so that answering a fault needs nothing that could fail with it (_failed).
        self._failed_members = check_members(reasons.INTERNAL_ERROR, "", "", "", "")
        self._internal = {r: denied_response(r) for r in (reasons.INTERNAL_ERROR, reasons.AUDIT_UNAVAILABLE)}
        # This process's counters for /metrics (a metrics.MeterTable row, shared with the primary):
        # decisions by reason (all but the allows _warm answers and counts itself), refused clients,
        # the latency of every Check.
        self._meters = meters if meters is not None else metrics.MeterTable(1).row(0)
        self.decisions = metrics.Decisions(self._meters)
        # Denials by agent for /metrics (a top_agents.DenialCounter), counted on the deny path only.
        self._denials = denials
        latency = hot.Latency(self._meters[metrics.LATENCY], metrics.LATENCY_BOUNDS_NS)
        self.warm_path = hot.WarmAllow(self._verifiers, policy, audit, self._ids, self._prepared, clock,
                                       self._deny(reasons.AUDIT_UNAVAILABLE), self.decisions,
                                       self._first_allow,
                                       self._meters[metrics.WARM_ALLOWS:metrics.WARM_ALLOWS + 1], latency)
        self._now, self._observe = latency.now, latency.observe

    @property
    def refused_clients(self) -> int:
        """mTLS callers that are not check_clients (``admitting``): answered, never decided."""
        return self._meters[metrics.REFUSED]  # type: ignore[no-any-return]

    def decision_counts(self) -> collections.Counter[str]:
        """Check decisions by reason, for /metrics."""
        return metrics.decision_counts(self._meters.tolist())

    def _deny_later(self, reason: str, seconds: float) -> bytes:
        """A denial with Retry-After (rate limits); one pre-built response per whole second."""
        after = retry_after(seconds)
        body = self._retry_denied.get(after)
        if body is None:
            if len(self._retry_denied) >= PREPARED_MAX:
                self._retry_denied.clear()
            body = self._retry_denied[after] = denied_response(reason, after)
        return body

    def _undecodable(self, decision_id: str) -> bytes:
        """Deny (and record) a request that did not parse as a CheckRequest."""
        return self._deny_unread(reasons.REQUEST_INVALID, decision_id)

    def _deny_unread(self, reason: str, decision_id: str) -> bytes:
        """Deny (and record) a Check for ``reason`` without reading the request."""
        key = (reason, None, "", "", "", "")
        prepared = self._prepared.get(key) or self._prepare(key, None)
        if not (self._audit.record_check(decision_id, "", prepared) and self._audit.healthy):
            reason = reasons.AUDIT_UNAVAILABLE
        self.decisions[reason] += 1
        return self._deny(reason) + self._ids.metadata(decision_id)

    def _deny(self, reason: str) -> bytes:
        body = self._denied.get(reason)
        if body is None:
            body = self._denied[reason] = denied_response(reason)
        return body

    def _prepare(self, key: tuple[Any, ...], entry: Any) -> str:
        """The audit members a Check shares with every other Check of this token, request and outcome."""
        reason, _, tool, target, operation, sensitivity = key
        if entry is None:
            prepared = check_members(reason, tool, target, operation, sensitivity)
        else:
            prepared = check_members(reason, tool, target, operation, sensitivity, (
                entry.sub, entry.task, entry.jti, entry.subjects[1:], entry.claims.get("intent")))
        if len(self._prepared) >= PREPARED_MAX:
            self._prepared.clear()  # bounded: request fields are the caller's to vary
        self._prepared[key] = prepared
        return prepared

    def _first_allow(self, entry: Any, tool: str, target: str, operation: str, sensitivity: str) -> str:
        """What every allow of this token for this request shares, built by the first: the record's
        members (returned, see ``_prepare``) and the response (``entry.attachment``)."""
        if entry.attachment is None:
            entry.attachment = self._allow_response(entry.sub, entry.task, entry.jti)
        key = (reasons.ALLOW, entry.jti, tool, target, operation, sensitivity)
        return self._prepared.get(key) or self._prepare(key, entry)

    def _other_boundary(self, token: str, boundary: str) -> bool:
        """Whether ``token`` verifies in another boundary: only to name the denial precisely."""
        for name, verifier in self._verifiers.items():
            if name != boundary:
                try:
                    verifier.verify(token, self._clock())
                    return True
                except TokenError:
                    pass
        return False

    def _peer_reason(self, entry: Any, principal: str, certificate: str, boundary: Boundary) -> str:
        """DESIGN §3 step 4: a peer Envoy reports must be the token's subject and hold its certificate.

        Where the boundary requires binding, a token bound to no certificate (a delegated child, or
        one minted for a JWT-SVID caller) needs at least a peer Envoy authenticated as its subject:
        otherwise anyone holding a bound token could delegate an unbound one and use it anywhere.
        """
        if principal and principal != entry.sub:
            return reasons.TOKEN_SENDER
        cnf = entry.claims.get("cnf")
        bound = cnf.get("x5t#S256") if cnf else None
        if bound is None:
            required = boundary.require_certificate_binding and not principal
            return reasons.TOKEN_CERTIFICATE_REQUIRED if required else reasons.ALLOW
        if not certificate:
            required = boundary.require_certificate_binding
            return reasons.TOKEN_CERTIFICATE_REQUIRED if required else reasons.ALLOW
        thumbprint = self._thumbprints.get(certificate)
        if thumbprint is None:
            thumbprint = certificate_thumbprint(certificate)
            if len(self._thumbprints) >= PREPARED_MAX:
                self._thumbprints.clear()
            self._thumbprints[certificate] = thumbprint
        return reasons.ALLOW if thumbprint == bound else reasons.TOKEN_BINDING

    async def check(self, fields: Fields | None, context: Any) -> bytes:
        decided = None
        if fields.__class__ is tuple:
            decided = self.answer_warm(fields)  # type: ignore[arg-type]
            if decided.__class__ is bytes:
                return decided  # type: ignore[no-any-return]
        return await self.finish(fields, decided)

    def answer_warm(self, fields: Fields) -> Any:
        """``check``'s first step, with no coroutine of its own (a transport may call it itself, as the
        HTTP Check does): the common allow's answer (bytes, its record written), or what ``finish`` takes
        to answer the rest (the warm path's decision, if it made one). A fault is answered here as
        ``check`` answers any: a recorded internal_error denial."""
        # Any exception is a recorded internal_error denial: one gRPC let escape would answer UNKNOWN,
        # which Envoy with failure_mode_allow turns into an allow. The try costs nothing until it raises.
        try:
            return self.warm_path(fields)  # it times the Checks it answers (no Python call here)
        except Exception:
            return self.warm_failed(fields)

    def warm_failed(self, fields: Fields) -> bytes:
        """The answer to a Check whose warm path (``warm_path``) raised: a recorded internal_error."""
        started = getattr(self.warm_path, "started", None)  # the Check began when the warm path did
        try:
            return self._failed(fields, None)
        finally:
            if started is not None:
                self._observe(started)

    async def finish(self, fields: Fields | None, decided: Any) -> bytes:
        """Every Check ``answer_warm`` did not answer, with its decision if it made one."""
        decision_id = started = None
        try:
            if fields.__class__ is not tuple:  # not a CheckRequest, or the parser failed (UNPARSED)
                started = self._now()
                if fields is None:
                    return self._undecodable(self._ids.next())
                raise RuntimeError("the CheckRequest parser failed")
            started = self.warm_path.started  # the Check began when the warm path did
            decision_id = self._ids.next()
            return await self._full(fields, decided, decision_id)  # type: ignore[arg-type]
        except Exception:
            return self._failed(fields, decision_id)
        finally:
            if started is not None:  # every Check the warm path did not answer, in the histogram
                self._observe(started)

    def fresh_only(self, fresh: Callable[[], bool],
                   check: Callable[[Fields | None, Any], Awaitable[bytes]]
                   ) -> Callable[[Fields | None, Any], Awaitable[bytes]]:
        """``check`` while ``fresh()`` (cluster mode: the revocation stream was read within max_staleness),
        else revocation_stale, recorded: a revocation acknowledged on another node may not be here yet."""

        async def fresh_check(fields: Fields | None, context: Any) -> bytes:
            if fresh():
                return await check(fields, context)
            return self._deny_unread(reasons.REVOCATION_STALE, self._ids.next())
        return fresh_check

    def admitting(self, clients: frozenset[str], check: Callable[[Fields | None, Any], Awaitable[bytes]]
                  ) -> Callable[[Fields | None, Any], Awaitable[bytes]]:
        """``check`` for a listener with mTLS: decided only for a client certificate whose one SPIFFE ID
        is in ``clients`` (Envoy's). Any other caller the trust bundle admits (an agent) could name any
        principal or forward another's certificate: it is answered check_client_refused, unrecorded,
        as a denial rather than a gRPC error, which Envoy's failure_mode_allow would let through."""
        allowed = frozenset(c.encode() for c in clients)
        refused = denied_response(reasons.CHECK_CLIENT_REFUSED)

        async def admitted_check(fields: Fields | None, context: Any) -> bytes:
            # The SAN list holds DNS names too; a SPIFFE ID is the one URI (X509-SVID §2).
            names = context.peer_identities() or ()
            if context.peer_identity_key() == "x509_subject_alternative_name":
                ids = [i for i in names if i.startswith(b"spiffe://")]
                if len(ids) == 1 and ids[0] in allowed:
                    return await check(fields, context)
            self._meters[metrics.REFUSED] += 1
            _REFUSED_CLIENTS.log(f"Check refused a client not in check_clients: {names!r}", traceback=False)
            return refused
        return admitted_check

    def _failed(self, fields: Any, decision_id: str | None) -> bytes:
        """The internal_error denial, recorded (audit_unavailable if it cannot be), the fault logged."""
        _FAULTS.log("a Check failed; denied internal_error")
        reason = reasons.INTERNAL_ERROR
        try:
            decision_id = decision_id or self._ids.next()
            request_id = fields[1] if fields.__class__ is tuple and fields[1].__class__ is str else ""
            if not (self._audit.record_check(decision_id, request_id, self._failed_members)
                    and self._audit.healthy):
                reason = reasons.AUDIT_UNAVAILABLE
        except Exception:  # not even recorded: still a denial, never an escape
            _FAULTS.log("recording an internal_error failed; denied audit_unavailable")
            reason = reasons.AUDIT_UNAVAILABLE
        self.decisions[reason] += 1
        try:
            return self._internal[reason] + self._ids.metadata(decision_id)  # type: ignore[arg-type]
        except Exception:
            return self._internal[reason]

    def _who(self, verifier: Any, token: str, reason: str) -> Any:
        """The verified token behind a denial for ``reason``, or None when it did not verify: so that
        the denial's record names whose token was refused. The rare path: the verifier's cache has it."""
        if reason in reasons.UNVERIFIED:
            return None
        try:
            return verifier.verify(token, self._clock())
        except TokenError:
            return None

    async def _full(self, fields: Fields, decided: Any, decision_id: str) -> bytes:
        """Every Check the warm path did not answer, with its decision if it made one."""
        authorization, request_id, method, path, extensions, principal, certificate, message = fields
        token = bearer_token(authorization)
        policy = self._policy()
        tool, target, operation, sensitivity = request_fields(method, path, extensions, policy.requests)
        call: Call | None = None
        refused = None
        if EXTENSION in extensions and token is not None:  # an MCP route: the body says what is called
            # The native scan leaves MCP routes to the pure twin, which keeps the parsed message.
            # The HTTP Check hands its request over as ``http`` (serve/http_check.py), gRPC the message.
            read = read_call(getattr(message, "http", None) or message.attributes.request.http)
            if isinstance(read, str):
                refused = read
            elif read is not None:
                call, tool, operation = read, read.tool, read.operation
        boundary = extensions.get("boundary")
        if boundary:
            verifier = self._verifiers.get(boundary)
        else:
            boundary, verifier = self._default
        who = None  # the verified token, kept when the decision denies: its record names it
        ruled = None  # the policy's Constrained answer, when enforce applied one: an argument denial names it
        if token is None:
            reason, entry = reasons.TOKEN_MISSING, None
        elif refused:
            reason, entry = refused, None
        elif verifier is None:
            reason, entry = reasons.BOUNDARY_UNKNOWN, None
        else:
            reason, entry = decided or verifier.decide(token, tool, target, operation, sensitivity,
                                                       self._clock())
            who = entry if entry is not None else self._who(verifier, token, reason)
            if entry is not None:
                binding = policy.boundary(boundary)
                # With no peer reported and no binding required, every token passes _peer_reason.
                if principal or certificate or binding.require_certificate_binding:
                    peer = self._peer_reason(entry, principal, certificate, binding)
                    if peer is not reasons.ALLOW:
                        reason, entry = peer, None
                # Argument constraints and budgets: the token's grants', and the current policy's when
                # it allows this only under constraints (decide then answers its Constrained, not ALLOW).
                if entry is not None and (entry.constrained or reason is not reasons.ALLOW):
                    ruled = None if reason is reasons.ALLOW else reason
                    reason, wait = enforce(entry, tool, target, operation, sensitivity,
                                           call.arguments if call else None, self._budgets, self._clock(),
                                           ruled)  # type: ignore[arg-type]
                    if reason != reasons.ALLOW:
                        entry = None
            elif reason == reasons.TOKEN_KEY_UNKNOWN and len(self._verifiers) > 1 \
                    and self._other_boundary(token, boundary):
                reason = reasons.TOKEN_BOUNDARY
        if not self._audit.healthy:  # before the record is made, so that it says what was answered
            reason, entry = reasons.AUDIT_UNAVAILABLE, None
        if entry is None:
            key = (reason, None if who is None else who.jti, tool, target, operation, sensitivity)
            prepared = self._prepared.get(key) or self._prepare(key, who)
            if reason in reasons.ARGUMENT_REFUSED and who is not None:
                prepared += "," + refused_argument(who, reason, tool, target, operation, sensitivity,
                                                   call.arguments if call else None, ruled)
            if reason in _PEER_REFUSED and who is not None:  # who presented another's token, for review
                prepared += "," + prepare(peer={"principal": principal or None, "x5t": certificate_thumbprint(
                    certificate) if certificate else None})
            if not self._audit.record_check(decision_id, request_id, prepared):
                reason = reasons.AUDIT_UNAVAILABLE
            if self._denials is not None:
                self._denials.count(None if who is None else who.sub, reason)
        else:
            # An allow we cannot record is not an allow (DESIGN §5): it is answered once its record
            # is in the log file, so a crashed daemon loses no allow a caller saw (audit/writer.py).
            prepared = self._first_allow(entry, tool, target, operation, sensitivity)
            try:
                if not self._audit.write_allow(decision_id, request_id, prepared):
                    durable = self._audit.record_check_durable(decision_id, request_id, prepared)
                    if durable is None:
                        raise AuditUnavailable("audit queue full")
                    await durable
            except AuditUnavailable:
                reason, entry = reasons.AUDIT_UNAVAILABLE, None
        self.decisions[reason] += 1
        if entry is None:
            if call is not None and call.id is not None:  # an MCP request: the session goes on (mcp_denials)
                return self._deny_call(call, reason, who, target, sensitivity, ruled,
                                       wait if reason == reasons.RATE_LIMITED else 0.0, decision_id)
            if reason == reasons.RATE_LIMITED:  # only enforce() says so, and it sets ``wait``
                return self._deny_later(reason, wait) + self._ids.metadata(decision_id)
            return self._deny(reason) + self._ids.metadata(decision_id)
        return entry.attachment + self._ids.metadata(decision_id)  # type: ignore[no-any-return]

    def _deny_call(self, call: Call, reason: str, who: Any, target: str, sensitivity: str, ruled: Any,
                   wait: float, decision_id: str) -> bytes:
        """A denied MCP request answered as a JSON-RPC error carrying its id, why, and what is needed."""
        constraint = None
        if reason in reasons.ARGUMENT_REFUSED and who is not None:
            constraint = refused_constraint(who, reason, call.tool, target, call.operation, sensitivity,
                                            call.arguments, ruled)
        return denied_call(call, reason, http_status_for(reason), decision_id, target, sensitivity,
                           constraint, retry_after(wait) if wait else 0) + self._ids.metadata(decision_id)


def parse_check_request(raw: bytes) -> Fields | None:
    """The fields of the CheckRequest in ``raw`` (see ``_request_py``), or None when it is none (a
    header value that is not UTF-8, say): the native scan, else the protobuf runtime.

    A deserializer that raises makes gRPC answer UNKNOWN and log a traceback: one per call, from
    any client of this unauthenticated listener. None is answered as a recorded request_invalid,
    UNPARSED (the parser itself failed) as a recorded internal_error: this never raises.
    """
    try:
        fields = _scan(raw)
        if fields is None and _scan is not _request_py.scan:  # the native scan deferred
            fields = _request_py.scan(raw)
    except Exception:  # a fault of ours, not the caller's: Check answers it internal_error
        _FAULTS.log("the CheckRequest parser failed")
        return UNPARSED  # type: ignore[return-value]
    return fields


def add_to_server(server: Any, service: CheckService, clients: frozenset[str] | None = None,
                  fresh: Callable[[], bool] | None = None) -> None:
    """Register Check with raw-bytes responses (no re-serialization per call); with ``clients`` (an
    mTLS listener), answered for those client identities only (``CheckService.admitting``); with
    ``fresh`` (cluster mode), decided only while it holds (``CheckService.fresh_only``)."""
    check = service.check if fresh is None else service.fresh_only(fresh, service.check)
    handler = grpc.unary_unary_rpc_method_handler(
        check if clients is None else service.admitting(clients, check),
        request_deserializer=parse_check_request, response_serializer=None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Check": handler}),))
