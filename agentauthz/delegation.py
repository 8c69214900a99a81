"""Delegation: which child grants fit inside a parent token's, and what policy gives the child agent.

A child grant fits a parent grant when it names the same tool, a target pattern
the parent's matches entirely ("*" ⊇ "p*" ⊇ "pq*" ⊇ "pq"), a subset of its
operations and at most its sensitivity. The covering parent grant's
``arguments`` and ``budget`` travel to the child unchanged, so a child is never
less constrained than its parent. Then the policy must give the child agent
every grant on its own: each agent boundary is a separate trust decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .policy import Policy
from .tokens import DEFAULT_SENSITIVITY, SENSITIVITY_RANK, grant

CARRIED = ("arguments", "budget")  # constraints a child inherits verbatim from its parent grant
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
            and all(k not in child or child[k] == parent.get(k) for k in CARRIED))


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

    denied: list[dict[str, Any]]  # not given to the child at all (or only less sensitive)
    needs_approval: list[dict[str, Any]]  # given only under a human approval
    ttl: int  # the child's lifetime cap from the rules that give it the grants


def _ops_at(granted: Iterable[Mapping[str, Any]], level: int) -> set[str]:
    return {op for g in granted if SENSITIVITY_RANK[g["sensitivity"]] >= level for op in g["ops"]}


def for_child(policy: Policy, agent: str, grants: Sequence[Mapping[str, Any]], ttl: int) -> ChildPolicy:
    """Ask ``policy`` for each grant as if ``agent`` minted it; nothing may be narrowed away silently."""
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
    return ChildPolicy(denied, gated, min(caps))


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
