"""Approval requests as records, and the rules every approval store applies to them (file or cluster).

The single-node store (authority/approvals.py) and the cluster store (cluster/approvals.py) both
decide with these functions, so a request, a decision, the per-agent limit and forgetting mean the
same whichever store holds them.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..decision.tokens import SENSITIVITY_RANK

PENDING, APPROVED, REJECTED, EXPIRED = "pending", "approved", "rejected", "expired"
_GRANT = frozenset({"tool", "target", "ops", "sensitivity"})
_CONSTRAINTS = frozenset({"arguments", "budget"})  # optional members of a grant (constraints.py)
STATES = (PENDING, APPROVED, REJECTED, EXPIRED)
RETAIN = 3600  # how long a decided or expired request stays visible to the agent and humans
MAX_OPEN_PER_AGENT = 32  # an agent cannot bury the humans under requests


@dataclass(frozen=True)
class Approval:
    """One request; ``state`` is as decided, ``state_at`` also says when it has expired."""

    id: str
    agent: str
    task: str
    intent: str
    grants: list[dict[str, Any]]
    state: str
    created_at: int
    expires_at: int  # pending: a human must decide by then; approved: usable until then
    approver: str = ""  # "subject (issuer)"
    approver_subject: str = ""
    approver_issuer: str = ""
    decided_at: int = 0
    comment: str = ""

    def state_at(self, now: float) -> str:
        return EXPIRED if self.state in (PENDING, APPROVED) and now >= self.expires_at else self.state

    def covers(self, requested: Mapping[str, Any]) -> bool:
        """Whether one approved grant holds all of ``requested`` (tool, target, ops, sensitivity)."""
        return any(_within(requested, g) for g in self.grants)


class LimitReached(Exception):
    """The agent has too many requests awaiting a decision."""


class NotPending(Exception):
    """The request was decided already, or expired; ``args[0]`` is its state."""


def _within(inner: Mapping[str, Any], outer: Mapping[str, Any]) -> bool:
    target, pattern = inner["target"], outer["target"]
    # Argument constraints and budgets must be the very ones the human saw: "tighter" is not worth
    # the risk of getting wrong here, and a retried Mint reproduces them exactly.
    return (inner["tool"] == outer["tool"] and set(inner["ops"]) <= set(outer["ops"])
            and all(inner.get(k) == outer.get(k) for k in _CONSTRAINTS)
            and SENSITIVITY_RANK[inner["sensitivity"]] <= SENSITIVITY_RANK[outer["sensitivity"]]
            and (target == pattern or (pattern.endswith("*") and target.startswith(pattern[:-1]))))


def _key(grants: Iterable[Mapping[str, Any]]) -> str:
    return json.dumps(sorted(json.dumps(dict(g), sort_keys=True) for g in grants))


_FIELDS = {f.name: f.type for f in dataclasses.fields(Approval)}


def _load_one(raw: Any) -> Approval:
    """A stored request, validated field by field (a store refuses what it cannot trust); ValueError."""
    if not isinstance(raw, dict) or set(raw) != set(_FIELDS):
        raise ValueError("a request has missing or unknown fields")
    kinds = {"int": int, "str": str, "list[dict[str, Any]]": list}
    for name, kind in _FIELDS.items():
        if type(raw[name]) is not kinds[str(kind)]:
            raise ValueError(f"request field {name} has the wrong type")
    if raw["state"] not in (PENDING, APPROVED, REJECTED):
        raise ValueError(f"request state {raw['state']!r} is unknown")
    if not all(isinstance(g, dict) and _GRANT <= set(g) <= _GRANT | _CONSTRAINTS
               and g["sensitivity"] in SENSITIVITY_RANK for g in raw["grants"]):
        raise ValueError("request grants are malformed")
    return Approval(**raw)


def forget_at(a: Approval) -> int:
    """When ``a`` stops mattering and is forgotten: by then it is rejected or expired, whatever its state."""
    return max(a.expires_at, a.decided_at) + RETAIN


def forgotten(a: Approval, now: float) -> bool:
    return a.state_at(now) in (REJECTED, EXPIRED) and forget_at(a) < now


def live_or_new(items: Iterable[Approval], agent: str, task: str, intent: str, grants: list[dict[str, Any]],
                ttl: int, now: int) -> tuple[Approval, bool]:
    """The live request for exactly these grants of this task, or a new pending one; (it, is_new).

    Raises LimitReached when the agent already has ``MAX_OPEN_PER_AGENT`` requests awaiting a human.
    """
    key = _key(grants)
    live = [a for a in items if a.agent == agent and a.state_at(now) in (PENDING, APPROVED)]
    for a in live:  # a retried mint finds its request (or its approval) instead of making another
        if a.task == task and _key(a.grants) == key:
            return a, False
    if sum(a.state_at(now) == PENDING for a in live) >= MAX_OPEN_PER_AGENT:
        raise LimitReached(f"{agent} already has {MAX_OPEN_PER_AGENT} requests awaiting a human")
    # Hex: an id that began with "-" would read as an option to `agentauthz approve ID`.
    return Approval(secrets.token_hex(16), agent, task, intent, [dict(g) for g in grants],
                    PENDING, now, now + ttl), True


def decided(current: Approval, approve: bool, subject: str, issuer: str, comment: str, ttl: int,
            now: int) -> Approval:
    """``current`` approved (usable for ``ttl`` seconds from now) or rejected; NotPending if not pending."""
    state = current.state_at(now)
    if state != PENDING:
        raise NotPending(state)
    return dataclasses.replace(
        current, state=APPROVED if approve else REJECTED, decided_at=now, comment=comment,
        expires_at=now + ttl if approve else current.expires_at, approver=f"{subject} ({issuer})",
        approver_subject=subject, approver_issuer=issuer)
