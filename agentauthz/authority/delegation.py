"""Delegation: which child grants fit inside a parent token's, and what policy gives the child agent.

A child grant fits a parent grant when it names the same tool, a target pattern
the parent's matches entirely ("*" ⊇ "p*" ⊇ "pq*" ⊇ "pq"), a subset of its
operations and at most its sensitivity. Then the policy must give the child agent
every grant on its own: each agent boundary is a separate trust decision. The
child's grant is the intersection of both: the covering parent grant's
``arguments`` and ``budget`` combined with those of the rule that gives the child
agent the grant (``constraints.tighten``: every argument constraint of both, the
tighter of each budget limit within one window, and every budget of another
window kept as it is), so a child is never less constrained than its parent nor
than its own agent, and its calls spend each of its delegator's budgets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from .. import reasons
from ..config import Config
from ..decision import tokens
from ..decision.constraints import budgets_of, tighten
from ..decision.policy import Policy, spiffe_problem
from ..decision.tokens import DEFAULT_SENSITIVITY, SENSITIVITY_RANK, grant
from . import approvals
from .approvals import Approval, ApprovalStore
from .outcomes import NEEDS_APPROVAL, Minted, Refused

CARRIED = ("arguments", "budget")  # constraints a child inherits from its parent grant (and may add to)
BASE = ("tool", "target", "ops", "sensitivity")
_KEYS = frozenset(BASE + CARRIED)


def pattern_within(child: Any, parent: str) -> bool:
    """Whether every target ``child`` matches is also matched by ``parent`` (as ``Grant.covers`` matches)."""
    if not isinstance(child, str) or not child or "*" in child[:-1]:
        return False
    if not parent.endswith("*"):
        return child == parent  # an exact target admits only itself: never "p*", which matches "pq"
    # "x*" matches the targets starting with x, exact "x" only x: both lie inside "p*" iff x starts with p.
    stem = child[:-1] if child.endswith("*") else child
    return stem.startswith(parent[:-1])


def normalize(raw: Any) -> dict[str, Any] | None:
    """A requested child grant in token form (ops sorted, sensitivity explicit); None when malformed."""
    if not isinstance(raw, Mapping) or raw.keys() - _KEYS:
        return None
    tool, target, ops = raw.get("tool"), raw.get("target"), raw.get("ops")
    sensitivity = raw.get("sensitivity") or DEFAULT_SENSITIVITY
    if (not isinstance(tool, str) or not tool or not isinstance(target, str)
            or not isinstance(ops, (list, tuple)) or not ops
            or not all(isinstance(op, str) and op for op in ops)
            or not isinstance(sensitivity, str) or sensitivity not in SENSITIVITY_RANK):
        return None
    out = grant(tool, target, ops, sensitivity)
    # An empty constraint field (proto default) names nothing; the parent's is inherited either way.
    out.update({k: raw[k] for k in CARRIED if raw.get(k)})
    return out


def fits(child: Mapping[str, Any], parent: Mapping[str, Any]) -> bool:
    """Whether ``child`` (normalized) lies inside ``parent`` (a grant of a verified token)."""
    return (child["tool"] == parent["tool"] and pattern_within(child["target"], parent["target"])
            and set(child["ops"]) <= set(parent["ops"])
            and SENSITIVITY_RANK[child["sensitivity"]] <= SENSITIVITY_RANK[parent["sensitivity"]]
            # Constraints the request names must be the parent's own: inherited, never rewritten.
            and all(k not in child or _named(k, child[k], parent.get(k)) for k in CARRIED))


def _named(key: str, asked: Any, held: Any) -> bool:
    """Whether a constraint a child request names is the parent grant's own. Of a parent's budgets over
    several windows the request may name some (a client that knows one budget per grant names the
    first); the child inherits every one of them all the same (``within_parent``)."""
    if key == "budget" and held is not None and isinstance(asked, (Mapping, list)):
        return all(b in budgets_of(held) for b in budgets_of(asked))
    return bool(asked == held)


def within_parent(requested: Iterable[Any], parent_grants: Sequence[Mapping[str, Any]]
                  ) -> tuple[list[dict[str, Any]], list[Any]]:
    """(child grants, each with its covering parent grant's constraints; requested grants that fit none)."""
    children: list[dict[str, Any]] = []
    outside: list[Any] = []
    for raw in requested:
        child = normalize(raw)
        parent = next((p for p in parent_grants if fits(child, p)), None) if child else None
        if child is None or parent is None:
            outside.append(raw)
            continue
        base = {k: child[k] for k in BASE}
        children.append({**base, **{k: parent[k] for k in CARRIED if k in parent}})
    return children, outside


@dataclass(frozen=True)
class ChildPolicy:
    """What the policy says about giving a child agent its delegated grants."""

    granted: list[dict[str, Any]]  # the child's grants: the parent's ∩ the child agent's, constraints too
    denied: list[dict[str, Any]]  # not given to the child at all (or only less sensitive)
    needs_approval: list[dict[str, Any]]  # given only under a human approval
    ttl: int  # the child's lifetime cap from the rules that give it the grants


def _ops_at(granted: Iterable[Mapping[str, Any]], level: int) -> set[str]:
    return {op for g in granted if SENSITIVITY_RANK[g["sensitivity"]] >= level for op in g["ops"]}


def _carried(parent: Mapping[str, Any]) -> dict[str, Any]:
    return {k: parent[k] for k in CARRIED if k in parent}


def for_child(policy: Policy, agent: str, grants: Sequence[Mapping[str, Any]], ttl: int) -> ChildPolicy:
    """Ask ``policy`` for each grant as if ``agent`` minted it; nothing may be narrowed away silently."""
    granted: list[dict[str, Any]] = []
    denied: list[dict[str, Any]] = []
    gated: list[dict[str, Any]] = []
    caps = [ttl]
    for g in grants:
        # One grant at a time, so what narrow() returns belongs to this grant alone.
        base = {k: g[k] for k in BASE}
        narrowed = policy.narrow(agent, [base], ttl)
        level = SENSITIVITY_RANK[g["sensitivity"]]
        free, held = _ops_at(narrowed.granted, level), _ops_at(narrowed.needs_approval, level)
        lost = [op for op in g["ops"] if op not in free and op not in held]
        waiting = [op for op in g["ops"] if op not in free and op in held]
        if lost:
            denied.append(grant(g["tool"], g["target"], lost, g["sensitivity"]))
        if waiting:
            gated.append(grant(g["tool"], g["target"], waiting, g["sensitivity"]))
            # The gated rules' own TTL caps count too, not only the ungated ones narrow() used.
            caps.append(policy.narrow(agent, gated[-1:], ttl).ttl or ttl)
        if narrowed.ttl:
            caps.append(narrowed.ttl)
        # narrow() groups the ops by the rule that gives them, each group with that rule's constraints:
        # the child gets each group at the asked sensitivity, with the parent grant's constraints added.
        for given, ops in ((narrowed.granted, free), (narrowed.needs_approval, set(waiting))):
            for part in given:
                mine = [op for op in part["ops"] if op in ops]
                if mine and SENSITIVITY_RANK[part["sensitivity"]] >= level:
                    granted.append(tighten({**part, "ops": mine, "sensitivity": g["sensitivity"]},
                                           _carried(g)))
    return ChildPolicy(granted, denied, gated, min(caps))


def describe(grants: Iterable[Any]) -> str:
    """Grants as ``TOOL:TARGET:OPS:SENSITIVITY`` for a one-line refusal."""
    out = []
    for g in grants:
        if isinstance(g, Mapping) and isinstance(g.get("ops"), (list, tuple)):
            out.append(f"{g.get('tool')}:{g.get('target')}:{','.join(map(str, g['ops']))}:"
                       f"{g.get('sensitivity') or DEFAULT_SENSITIVITY}")
        else:
            out.append(repr(g))
    return ", ".join(out)


class DelegationFlow:
    """``Authority.delegate``: a mixin reading the Authority's verifiers, policy, config and approvals."""

    verifiers: dict[str, Any]
    policy: Policy
    config: Config
    approvals: ApprovalStore
    clock: Callable[[], float]
    if TYPE_CHECKING:
        def _audit(self, kind: str, **fields: Any) -> None: ...

        def _refuse_banned(self, kind: str, *agents: str, **fields: Any) -> None: ...

        def _issue(self, agent: str, task: str, audience: str, grants: list[dict[str, Any]], *, now: int,
                   ttl: int, intent: str, owner: str, cnf: Mapping[str, Any] | None = None,
                   act: Mapping[str, Any] | None = None,
                   extra: Mapping[str, Any] | None = None) -> tuple[str, str, int, str]: ...

    def delegate(self, caller: str, parent_token: str, to: str, grants: Sequence[Mapping[str, Any]], *,
                 ttl: int = 0, intent: str = "") -> Minted:
        """A child token for agent ``to``, inside ``caller``'s own live ``parent_token`` (DESIGN §4).

        Same task and audience as the parent. ``act`` names the caller and its token's status slot
        outermost, then the parent's own chain, so revoking any ancestor token, ending the root's
        task or revoking any agent on the chain denies the child at its next Check. No ``cnf``: the
        child's certificate is unknown here, so the child is bound by its ``sub``.
        """
        now = self.clock()
        requested = list(grants)
        # A banned agent delegates nothing, and nothing is delegated to one (the parent's chain too: _issue).
        self._refuse_banned("delegate", caller, to, agent=caller, to=to, requested=requested)
        reason, parent = self._live_token(parent_token, now)
        if parent is None:
            raise self._refuse_delegation(reason, f"the parent token is not usable: {reason}", caller, to,
                                          None, requested)

        def refuse(reason: str, message: str) -> Refused:
            return self._refuse_delegation(reason, message, caller, to, parent.jti, requested)

        if parent.sub != caller:
            raise refuse(reasons.DELEGATION_NOT_HOLDER, "only the agent a token names (sub) may delegate it")
        problem = spiffe_problem(to) or ("it is the caller itself" if to == caller else None)
        if problem:
            raise refuse(reasons.REQUEST_INVALID, f"to must be another agent's SPIFFE ID: {problem}")
        if not 0 < len(requested) <= tokens.MAX_GRANTS or ttl < 0 or len(intent) > tokens.MAX_INTENT_CHARS:
            raise refuse(reasons.REQUEST_INVALID, f"name 1 to {tokens.MAX_GRANTS} grants, a ttl >= 0 and a "
                         "short intent")
        depth = len(parent.subjects)  # actors on the child's chain: the caller, then the parent's own
        limit = min(self.policy.max_delegation_depth, tokens.MAX_DELEGATION_DEPTH)
        if depth > limit:
            raise refuse(reasons.DELEGATION_DEPTH, f"{depth} delegations exceed the policy's limit {limit}")
        children, outside = within_parent(requested, parent.claims["grants"])
        if outside:
            raise refuse(reasons.DELEGATION_EXCEEDS_PARENT,
                         f"not inside the parent token's grants: {describe(outside)}")
        verdict = for_child(self.policy, to, children, ttl or self.config.max_token_lifetime)
        children = verdict.granted
        if verdict.denied:
            raise refuse(reasons.DELEGATION_POLICY_DENIED,
                         f"policy does not give {to}: {describe(verdict.denied)}")
        approval = self._delegable_approval(parent, verdict.needs_approval, now) \
            if verdict.needs_approval else None
        if verdict.needs_approval and approval is None:
            raise refuse(NEEDS_APPROVAL, f"policy gives {to} only under a human approval of this task "
                         f"covering {describe(verdict.needs_approval)}; the parent carries none")
        if len(children) > tokens.MAX_GRANTS:  # the rules split the grants: the verifier would refuse it
            raise refuse(reasons.REQUEST_INVALID, f"the child would carry {len(children)} grants, more than "
                         f"{tokens.MAX_GRANTS}: name fewer")
        audience = parent.claims["aud"]
        issued = int(now)
        ttl = min(verdict.ttl, self.config.max_token_lifetime, self.policy.boundary(audience).max_ttl,
                  parent.exp - issued)  # the child never outlives its parent (nor its status slot)
        if ttl <= 0:
            raise refuse(reasons.TOKEN_EXPIRED, "the parent token expires now: nothing is left to delegate")
        act = {"sub": caller, "idx": parent.slots[0]}
        if "act" in parent.claims:
            act["act"] = parent.claims["act"]
        intent = intent or parent.claims.get("intent", "")
        # The delegator owns the child's id: it may revoke the child by id (its own token covers the rest).
        token, token_id, exp, kid = self._issue(
            to, parent.task, audience, children, now=issued, ttl=ttl, intent=intent, owner=caller, act=act,
            extra=None if approval is None else {"approval": approval[0]})
        if len(token) > self.config.max_token_bytes:  # the verifier would refuse it: say so now
            raise refuse(reasons.REQUEST_INVALID, "the child token would exceed max_token_bytes")
        self._audit("delegate", decision=True, reason=reasons.ALLOW, agent=caller, to=to, task=parent.task,
                    intent=intent, token_id=token_id, parent_token_id=parent.jti,
                    chain=[caller, *parent.subjects[1:]], grants=children, expires_at=exp, key_id=kid,
                    audience=audience, **({} if approval is None else {"approval_id": approval[1].id}))
        return Minted(token, token_id, exp, children, parent.task, to, kid,
                      approval=None if approval is None else approval[1])

    def _live_token(self, token: str, now: float) -> tuple[str, Any]:
        """``verify_live`` by the token's own boundary: each verifier knows only its boundary's keys."""
        first = None
        for verifier in self.verifiers.values():
            reason, entry = verifier.verify_live(token, now)
            if entry is not None or reason not in (reasons.TOKEN_KEY_UNKNOWN, reasons.TOKEN_AUDIENCE):
                return reason, entry
            first = first or reason
        return first or reasons.TOKEN_MALFORMED, None

    def _delegable_approval(self, parent: Any, gated: list[dict[str, Any]],
                            now: float) -> tuple[dict[str, Any], Approval] | None:
        """The parent's approval claim, when the human's approval it names still holds for this task
        and covers every ``gated`` grant: an approval of something else never stretches to the child."""
        claim = parent.claims.get("approval")
        record = self.approvals.get(claim["id"]) if isinstance(claim, dict) and isinstance(
            claim.get("id"), str) else None
        if (record is None or record.state_at(now) != approvals.APPROVED or record.task != parent.task
                or record.agent != parent.subjects[-1] or not all(record.covers(g) for g in gated)):
            return None
        return dict(claim), record

    def _refuse_delegation(self, reason: str, message: str, caller: str, to: str, parent_id: str | None,
                           requested: list[Any]) -> Refused:
        self._audit("delegate", decision=False, reason=reason, agent=caller, to=to,
                    parent_token_id=parent_id, requested=requested, detail=message)
        return Refused(reason, message)
