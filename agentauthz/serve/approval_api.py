"""The Approvals gRPC service for humans: authenticate the approver's bearer, call the Authority.

It runs on a listener of its own with server-only TLS: grpc cannot make client certificates optional
on one listener, and the agents' mTLS listener must keep requiring them. No agent credential works
here: certificates are not asked for, agent JWT issuers cannot be approver issuers, and SPIFFE
subjects are refused.
"""

from __future__ import annotations

from typing import Any, Callable

import grpc

from .. import reasons
from ..authority.approvers import Human, HumanVerifier, approver_issuers
from ..authority.core import Authority
from ..identity.jwtsvid import bearer_token
from ..identity.spiffe import IdentityError
from ..v1 import agentauthz_pb2 as pb
from ..v1 import agentauthz_pb2_grpc as pb_grpc
from .api import approval_to_proto, call_authority

SERVICE = pb.DESCRIPTOR.services_by_name["Approvals"].full_name

_STATUS_BY_REASON = {
    reasons.REQUEST_INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    reasons.APPROVAL_UNKNOWN: grpc.StatusCode.NOT_FOUND,
    reasons.APPROVAL_DECIDED: grpc.StatusCode.FAILED_PRECONDITION,
    reasons.APPROVAL_EXPIRED: grpc.StatusCode.FAILED_PRECONDITION,
}


class ApprovalsService(pb_grpc.ApprovalsServicer):
    """ListApprovals and Approve (which also rejects), for a verified human only."""

    def __init__(self, authority: Authority) -> None:
        self._authority = authority
        c = authority.config
        self._verifier = HumanVerifier(approver_issuers(c.approvers, c.state_dir, c.development), c.leeway)

    async def _human(self, context: Any) -> Human:
        try:
            bearer = bearer_token(context.invocation_metadata())
            if bearer is None:
                raise IdentityError("send the approver's token as 'authorization: Bearer <JWT>'")
            human = self._verifier.verify_human(bearer)
        except IdentityError as exc:  # the message never echoes the token (see jwtsvid)
            self._authority.audit.record("approver_authn", decision=False, reason=reasons.APPROVER_INVALID,
                                         detail=str(exc))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{reasons.APPROVER_INVALID}: {exc}")
            raise  # abort raises; this line only satisfies type checkers
        return human

    async def _run(self, context: Any, fn: Callable[[], Any], reads_only: bool = False) -> Any:
        return await call_authority(context, self._authority, fn, _STATUS_BY_REASON, reads_only=reads_only)

    async def ListApprovals(self, request: pb.ListApprovalsRequest, context: Any) -> pb.ListApprovalsResponse:
        human = await self._human(context)
        found = await self._run(context, lambda: self._authority.list_approvals(human, request.state),
                                reads_only=True)
        now = self._authority.clock()
        return pb.ListApprovalsResponse(approvals=[approval_to_proto(a, now) for a in found])

    async def Approve(self, request: pb.ApproveRequest, context: Any) -> pb.ApprovalRequest:
        human = await self._human(context)
        decided = await self._run(context, lambda: self._authority.decide_approval(
            human, request.id, request.approve, request.comment))
        return approval_to_proto(decided, self._authority.clock())


def add_to_server(server: Any, service: ApprovalsService) -> None:
    pb_grpc.add_ApprovalsServicer_to_server(service, server)
