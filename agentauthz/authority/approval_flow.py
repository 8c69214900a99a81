"""Human approval, the Authority's side (DESIGN §4): pending requests, a human's decision, minting under it.

A mixin of ``Authority``: it reads the Authority's approval store, config, clock and revocation
index, and audits through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .. import reasons
from ..audit.records import redact_tokens
from ..config import Config
from ..decision import tokens
from ..decision.tokens import task_key
from . import approvals
from .approvals import Approval, ApprovalStore
from .approvers import Human
from .outcomes import Minted, Refused


class ApprovalFlow:
    approvals: ApprovalStore
    config: Config
    clock: Callable[[], float]
    index: Any  # the RevocationIndex: ended tasks, revoked agents
    if TYPE_CHECKING:
        def _audit(self, kind: str, **fields: Any) -> None: ...

    def _request_approval(self, agent: str, task: str, intent: str, narrowed: Any) -> Minted:
        """No token: the pending request (new, or the one this agent already has for these grants)."""
        def commit(changed: Sequence[Approval]) -> None:
            a = changed[0]
            self._audit("approval_request", agent=agent, task=task, intent=intent, approval_id=a.id,
                        grants=a.grants, expires_at=a.expires_at)
        try:
            # approvals.json keeps the intent, and humans read it: an agent's token pasted in stays out.
            pending, _ = self.approvals.request(agent, task, redact_tokens(intent), narrowed.needs_approval,
                                                self.config.approval_request_ttl, commit)
        except approvals.LimitReached as exc:
            self._audit("mint", decision=False, reason=reasons.APPROVAL_LIMIT, agent=agent, task=task)
            raise Refused(reasons.APPROVAL_LIMIT, str(exc)) from None
        self._audit("mint", decision=False, reason=reasons.APPROVAL_REQUIRED, agent=agent, task=task,
                    intent=intent, approval_id=pending.id, needs_approval=narrowed.needs_approval)
        return Minted("", "", 0, [], task, agent, "", narrowed.denied, narrowed.needs_approval,
                      pending=pending)

    def _usable_approval(self, agent: str, task: str, approval_id: str, gated: Sequence[Mapping[str, Any]],
                         requested: Sequence[Mapping[str, Any]]) -> Approval:
        """The approval ``agent`` may mint ``gated`` under for ``task`` now, or Refused saying why not."""
        found = self.approvals.get(approval_id) if len(approval_id) <= 128 else None
        state = found.state_at(self.clock()) if found else ""
        problem = None
        # Another agent's request is "unknown", not "forbidden": the caller learns nothing about it.
        if found is None or found.agent != agent or self._approval_dropped(found):
            problem = reasons.APPROVAL_UNKNOWN, "no such approval request for this agent"
        elif found.task != task:
            problem = reasons.APPROVAL_MISMATCH, f"the approval is for task {found.task!r}, not {task!r}"
        elif state == approvals.PENDING:
            problem = reasons.APPROVAL_PENDING, "no human has decided on the request yet"
        elif state == approvals.REJECTED:
            problem = reasons.APPROVAL_REJECTED, f"rejected by {found.approver}"
        elif state == approvals.EXPIRED:
            problem = reasons.APPROVAL_EXPIRED, "the approval has expired"
        elif not all(found.covers(g) for g in gated):
            problem = reasons.APPROVAL_MISMATCH, "the request asks for grants the human did not approve"
        if problem is not None:
            self._audit("mint", decision=False, reason=problem[0], agent=agent, task=task,
                        approval_id=approval_id[:128], requested=list(requested))
            raise Refused(*problem)
        assert found is not None
        return found

    def _approval_dropped(self, a: Approval) -> bool:
        """Whether ``a``'s task has ended or its agent was revoked after it was made."""
        return (task_key(a.agent, a.task) in self.index.tasks
                or a.created_at <= self.index.agents.get(a.agent, -1))

    def _drop_approvals(self, agent: str, task: str | None) -> None:
        self.approvals.drop(agent, task, lambda gone: self._audit(
            "approval_drop", agent=agent, task=task, approval_ids=[a.id for a in gone]))

    def get_approval(self, caller: str, approval_id: str) -> Approval:
        """One of ``caller``'s own requests (another agent's is as unknown as a made-up id)."""
        found = self.approvals.get(approval_id)
        if found is None or found.agent != caller or self._approval_dropped(found):
            raise Refused(reasons.APPROVAL_UNKNOWN, "no such approval request for this agent")
        return found

    def list_approvals(self, human: Human, state: str = "") -> list[Approval]:
        """Requests in ``state`` (default: those awaiting a human), for an authenticated approver."""
        state = state or approvals.PENDING
        if state not in approvals.STATES:
            raise Refused(reasons.REQUEST_INVALID, f"state must be one of {', '.join(approvals.STATES)}")
        return [a for a in self.approvals.by_state(state) if not self._approval_dropped(a)]

    def decide_approval(self, human: Human, approval_id: str, approve: bool, comment: str = "") -> Approval:
        """Approve or reject a pending request; durable and audited before it returns."""
        if len(comment) > tokens.MAX_INTENT_CHARS:
            raise Refused(reasons.REQUEST_INVALID, "comment is too long")
        who = {"approver": human.name, "approver_subject": human.subject, "approver_issuer": human.issuer}
        found = self.approvals.get(approval_id)
        if found is None or self._approval_dropped(found):
            self._audit("approval_decide", decision=False, reason=reasons.APPROVAL_UNKNOWN,
                        approval_id=approval_id[:128], **who)
            raise Refused(reasons.APPROVAL_UNKNOWN, "no such approval request")

        def commit(changed: Sequence[Approval]) -> None:
            a = changed[0]
            self._audit("approval_decide", decision=approve, state=a.state, approval_id=a.id, agent=a.agent,
                        task=a.task, grants=a.grants, expires_at=a.expires_at, comment=comment, **who)
        try:
            return self.approvals.decide(approval_id, approve, human.subject, human.issuer,
                                         redact_tokens(comment), self.config.approval_ttl, commit)
        except KeyError:  # dropped (its task ended) since we looked
            raise Refused(reasons.APPROVAL_UNKNOWN, "no such approval request") from None
        except approvals.NotPending as exc:
            state = exc.args[0]
            reason = reasons.APPROVAL_EXPIRED if state == approvals.EXPIRED else reasons.APPROVAL_DECIDED
            self._audit("approval_decide", decision=False, reason=reason, approval_id=approval_id, **who)
            raise Refused(reason, f"the request is {state}, no longer pending") from None
