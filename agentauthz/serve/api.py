"""The agentauthz.v1 gRPC API: authenticate the caller, call the Authority, map errors to status."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable

import grpc

from .. import reasons
from ..authority.approvals import Approval
from ..authority.core import Authority
from ..authority.outcomes import NOT_PERMITTED, Refused
from ..decision.constraints import budgets_of
from ..decision.tokens import DEFAULT_SENSITIVITY
from ..errors import AgentAuthzError, AuditUnavailable, CapacityExhausted, ClusterUnavailable
from ..identity.jwtsvid import JwtSvid, Verifier, bearer_token
from ..identity.spiffe import IdentityError, Svid
from ..v1 import agentauthz_pb2 as pb
from ..v1 import agentauthz_pb2_grpc as pb_grpc
from .tls_front import Peers

log = logging.getLogger("agentauthz.api")  # the name operators filter on, kept across the layout

_STATUS_BY_REASON = {
    NOT_PERMITTED: grpc.StatusCode.PERMISSION_DENIED,
    reasons.REQUEST_INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    reasons.TOKEN_AUDIENCE: grpc.StatusCode.INVALID_ARGUMENT,
    reasons.TASK_ENDED: grpc.StatusCode.FAILED_PRECONDITION,
    reasons.APPROVAL_UNKNOWN: grpc.StatusCode.NOT_FOUND,
    reasons.APPROVAL_PENDING: grpc.StatusCode.FAILED_PRECONDITION,  # ask again once a human has decided
    reasons.APPROVAL_LIMIT: grpc.StatusCode.RESOURCE_EXHAUSTED,
    reasons.AGENT_BANNED: grpc.StatusCode.PERMISSION_DENIED,
    reasons.AGENT_NOT_BANNED: grpc.StatusCode.FAILED_PRECONDITION,
}


def grant_to_dict(g: pb.Grant) -> dict[str, Any]:
    out = {"tool": g.tool, "target": g.target, "ops": sorted(set(g.operations)),
           "sensitivity": g.sensitivity or DEFAULT_SENSITIVITY}
    out.update(_constraints_to_dict(g))
    return out


def grant_to_proto(g: dict[str, Any]) -> pb.Grant:
    return pb.Grant(tool=g["tool"], target=g["target"], operations=g["ops"],
                    sensitivity=g.get("sensitivity", DEFAULT_SENSITIVITY),
                    arguments=[pb.ArgumentConstraint(**c) for c in g.get("arguments", ())],
                    **_budgets_to_proto(g))


def _budgets_to_proto(g: dict[str, Any]) -> dict[str, Any]:
    """A grant's budget (one mapping, or a list over distinct windows) as Grant's budget and others."""
    if "budget" not in g:
        return {}
    first, *others = budgets_of(g["budget"])
    return {"budget": pb.Budget(**first), "other_budgets": [pb.Budget(**b) for b in others]}


def _constraints_to_dict(g: pb.Grant) -> dict[str, Any]:
    """Arguments and budget in the canonical form of constraints.py; policy refuses invalid ones.

    Proto3 defaults (empty prefix, zero limits, required false) mean "not set" and are left out;
    an all-zero budget is no budget.
    """
    out: dict[str, Any] = {}
    if g.arguments:
        out["arguments"] = [{"name": c.name, **({"prefix": c.prefix} if c.prefix else {}),
                             **({"one_of": list(c.one_of)} if c.one_of else {}),
                             **({"max": c.max} if c.HasField("max") else {}),
                             **({"required": True} if c.required else {})} for c in g.arguments]
    budgets = [budget for budget in map(_budget_to_dict, (g.budget, *g.other_budgets)) if budget]
    if budgets:
        out["budget"] = budgets[0] if len(budgets) == 1 else budgets
    return out


def _budget_to_dict(b: pb.Budget) -> dict[str, Any]:
    return {k: v for k, v in (("max_calls", b.max_calls), ("window", b.window),
                              ("rate_per_second", b.rate_per_second), ("burst", b.burst)) if v}


def approval_to_proto(a: Approval, now: float) -> pb.ApprovalRequest:
    return pb.ApprovalRequest(id=a.id, agent=a.agent, task=a.task, intent=a.intent,
                              grants=[grant_to_proto(g) for g in a.grants], expires_at=a.expires_at,
                              state=a.state_at(now), approver=a.approver, decided_at=a.decided_at,
                              comment=a.comment)


async def call_authority(context: Any, authority: Authority, fn: Callable[[], Any],
                         status_by_reason: dict[str, Any], *, reads_only: bool = False) -> Any:
    """Run a blocking Authority call (it fsyncs) off the event loop; map refusals to status codes.

    Unless it ``reads_only`` (records nothing), answered only once the audit records it made are
    fsynced: a token, a revocation or an approval a caller was told of is in the log whenever the
    daemon dies (one fsync, shared by every call and Check record the writer has by then).
    """
    def durably() -> Any:
        result = fn()
        if not reads_only and not authority.audit.flush():
            raise AuditUnavailable("the audit log did not record this operation")
        return result

    try:
        return await asyncio.to_thread(durably)
    except Refused as exc:
        code = status_by_reason.get(exc.reason, grpc.StatusCode.PERMISSION_DENIED)
        await context.abort(code, f"{exc.reason}: {exc}")
    except (AuditUnavailable, CapacityExhausted, ClusterUnavailable) as exc:
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc.reason}: {exc}")
    except AgentAuthzError as exc:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{exc.reason}: {exc}")


class ApiService(pb_grpc.AgentAuthzServicer):
    """Every method starts by proving who is calling: the mTLS peer's X.509-SVID, or its JWT-SVID bearer."""

    def __init__(self, authority: Authority, peers: Peers) -> None:
        self._authority = authority
        # The daemon's TLS front (tls_front.py) judged each connection's certificate chain; its verdict
        # is kept under the address this server sees for the connection.
        self._peers = peers
        c = authority.config
        self._jwt = Verifier(c.jwt_issuers, c.issuer, c.trust_domain, c.leeway)

    async def _peer(self, context: Any) -> Svid | JwtSvid:
        transport = None
        try:
            svid = self._peers.identity(context.peer())
            transport = svid.spiffe_id
            bearer = bearer_token(context.invocation_metadata())
            if bearer is None:
                return svid
            caller = self._jwt.verify(bearer)
        except IdentityError as exc:
            self._authority.audit.record("authn", decision=False, reason=reasons.IDENTITY_INVALID,
                                         detail=str(exc), transport=transport)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{reasons.IDENTITY_INVALID}: {exc}")
            raise  # abort raises; this line only satisfies type checkers
        # The certificate only carried the call (e.g. an agent runtime acting for the agent): say so.
        self._authority.audit.record("authn", decision=True, agent=caller.spiffe_id, issuer=caller.issuer,
                                     transport=transport)
        return caller

    async def _caller(self, context: Any) -> str:
        return (await self._peer(context)).spiffe_id

    async def _run(self, context: Any, fn: Callable[[], Any], reads_only: bool = False) -> Any:
        return await call_authority(context, self._authority, fn, _STATUS_BY_REASON, reads_only=reads_only)

    async def Mint(self, request: pb.MintRequest, context: Any) -> pb.MintResponse:
        peer = await self._peer(context)
        grants = [grant_to_dict(g) for g in request.grants]
        if not grants:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_invalid: no grants requested")
        # Sender binding (RFC 8705 §3.1): the token names the certificate it was minted over,
        # and never outlives it. A JWT-SVID proved the identity, not the certificate: no cnf, but the
        # token still never outlives the identity document that bought it.
        cnf = {"x5t#S256": peer.x5t_s256} if isinstance(peer, Svid) else None
        minted = await self._run(context, lambda: self._authority.mint(
            peer.spiffe_id, request.task, grants, intent=request.intent, ttl=request.ttl_seconds,
            audience=request.audience, cnf=cnf,
            not_after=int(peer.not_after.timestamp()), approval_id=request.approval_id))
        now = self._authority.clock()
        return pb.MintResponse(
            token=minted.token, token_id=minted.token_id, expires_at=minted.expires_at,
            grants=[grant_to_proto(g) for g in minted.grants], task=minted.task, agent=minted.agent,
            key_id=minted.key_id, denied=[grant_to_proto(g) for g in minted.denied],
            needs_approval=[grant_to_proto(g) for g in minted.needs_approval],
            pending=approval_to_proto(minted.pending, now) if minted.pending else None,
            approver=minted.approval.approver if minted.approval else "")

    async def GetApproval(self, request: pb.GetApprovalRequest, context: Any) -> pb.ApprovalRequest:
        caller = await self._caller(context)
        found = await self._run(context, lambda: self._authority.get_approval(caller, request.id),
                                reads_only=True)
        return approval_to_proto(found, self._authority.clock())

    async def Delegate(self, request: pb.DelegateRequest, context: Any) -> pb.MintResponse:
        # The caller must be the parent token's subject: holding the token is not enough.
        caller = await self._caller(context)
        grants = [grant_to_dict(g) for g in request.grants]
        if not grants:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_invalid: no grants requested")
        minted = await self._run(context, lambda: self._authority.delegate(
            caller, request.parent_token, request.to, grants, ttl=request.ttl_seconds, intent=request.intent))
        return pb.MintResponse(
            token=minted.token, token_id=minted.token_id, expires_at=minted.expires_at,
            grants=[grant_to_proto(g) for g in minted.grants], task=minted.task, agent=minted.agent,
            key_id=minted.key_id, approver=minted.approval.approver if minted.approval else "")

    async def Revoke(self, request: pb.RevokeRequest, context: Any) -> pb.RevokeResponse:
        caller = await self._caller(context)
        which = request.WhichOneof("target")
        a = self._authority
        actions = {
            "token_id": lambda: a.revoke_token(caller, request.token_id),
            "task": lambda: a.end_task(caller, request.task),
            "agent": lambda: a.revoke_agent(caller, request.agent),
            "key_id": lambda: a.revoke_key(caller, request.key_id),
        }
        if which is None or not getattr(request, which):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_invalid: name what to revoke")
        return pb.RevokeResponse(revoked_at=await self._run(context, actions[which]))

    async def Unban(self, request: pb.UnbanRequest, context: Any) -> pb.UnbanResponse:
        caller = await self._caller(context)
        at = await self._run(context, lambda: self._authority.unban_agent(caller, request.agent))
        return pb.UnbanResponse(unbanned_at=at)

    async def EndTask(self, request: pb.EndTaskRequest, context: Any) -> pb.RevokeResponse:
        caller = await self._caller(context)
        cutoff = await self._run(context, lambda: self._authority.end_task(caller, request.task))
        return pb.RevokeResponse(revoked_at=cutoff)

    async def GetKeys(self, request: pb.GetKeysRequest, context: Any) -> pb.GetKeysResponse:
        await self._caller(context)
        a = self._authority
        return pb.GetKeysResponse(jwks_json=json.dumps(a.jwks(), sort_keys=True),
                                  audit_key_jwk=json.dumps(a.audit_key_document(), sort_keys=True))

    async def RotateKeys(self, request: pb.RotateKeysRequest, context: Any) -> pb.RotateKeysResponse:
        caller = await self._caller(context)
        kid = await self._run(context, lambda: self._authority.rotate_keys(caller))
        return pb.RotateKeysResponse(current_key_id=kid)
