"""Human approval requests: one agent's task, exactly the gated grants, an expiry, and who decided.

The whole store is one small JSON file under the state directory, replaced atomically (and fsynced)
on every change before the change is acknowledged, so a restart loses no request and no decision.
Requests that no longer matter are forgotten an hour after they stop mattering (the audit log keeps
them for good).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .. import durable
from ..decision.tokens import SENSITIVITY_RANK
from ..errors import StateError

PENDING, APPROVED, REJECTED, EXPIRED = "pending", "approved", "rejected", "expired"
_GRANT = frozenset({"tool", "target", "ops", "sensitivity"})
_CONSTRAINTS = frozenset({"arguments", "budget"})  # optional members of a grant (constraints.py)
STATES = (PENDING, APPROVED, REJECTED, EXPIRED)
VERSION = 1
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


class ApprovalStore:
    """Thread-safe; every mutation is durable before it returns, and ``commit`` sees it first.

    ``commit`` (the audit record) runs before the file is replaced: if it raises, nothing changed.
    """

    def __init__(self, path: Path, items: dict[str, Approval], clock: Callable[[], float]) -> None:
        self._path, self._items, self._clock = path, items, clock
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, clock: Callable[[], float] = time.time) -> ApprovalStore:
        items: dict[str, Approval] = {}
        if path.exists():
            try:
                data = json.loads(path.read_bytes())
                if not isinstance(data, dict) or data.get("version") != VERSION:
                    raise ValueError(f"not a version {VERSION} approvals file")
                for raw in data.get("approvals", []):
                    approval = _load_one(raw)
                    items[approval.id] = approval
            except (OSError, ValueError) as exc:  # refuse to start rather than forget decisions
                raise StateError(f"{path}: approvals are unreadable: {exc}") from None
        return cls(path, items, clock)

    def _save(self) -> None:
        data = {"version": VERSION, "approvals": [dataclasses.asdict(a) for a in self._items.values()]}
        durable.replace(self._path, json.dumps(data, sort_keys=True).encode())

    def _forget_stale(self, now: float) -> None:
        for a in [a for a in self._items.values() if a.state_at(now) in (REJECTED, EXPIRED)
                  and max(a.expires_at, a.decided_at) + RETAIN < now]:
            del self._items[a.id]

    def _apply(self, changed: Sequence[Approval], dropped: Sequence[str],
               commit: Callable[[Sequence[Approval]], None]) -> None:
        commit(changed)
        previous = dict(self._items)
        for key in dropped:
            self._items.pop(key, None)
        self._items.update((a.id, a) for a in changed)
        self._forget_stale(self._clock())
        try:
            self._save()
        except OSError as exc:
            self._items = previous
            raise StateError(f"{self._path}: cannot persist approvals: {exc}") from exc

    def get(self, approval_id: str) -> Approval | None:
        with self._lock:
            return self._items.get(approval_id)

    def by_state(self, state: str) -> list[Approval]:
        """Requests in ``state`` (as of now), oldest first."""
        now = self._clock()
        with self._lock:
            return sorted((a for a in self._items.values() if a.state_at(now) == state),
                          key=lambda a: (a.created_at, a.id))

    def request(self, agent: str, task: str, intent: str, grants: list[dict[str, Any]], ttl: int,
                commit: Callable[[Sequence[Approval]], None]) -> tuple[Approval, bool]:
        """The live request for exactly these grants of this task, or a new pending one; (it, is_new)."""
        now = int(self._clock())
        key = _key(grants)
        with self._lock:
            live = [a for a in self._items.values()
                    if a.agent == agent and a.state_at(now) in (PENDING, APPROVED)]
            for a in live:  # a retried mint finds its request (or its approval) instead of making another
                if a.task == task and _key(a.grants) == key:
                    return a, False
            if sum(a.state_at(now) == PENDING for a in live) >= MAX_OPEN_PER_AGENT:
                raise LimitReached(f"{agent} already has {MAX_OPEN_PER_AGENT} requests awaiting a human")
            # Hex: an id that began with "-" would read as an option to `agentauthz approve ID`.
            approval = Approval(secrets.token_hex(16), agent, task, intent, [dict(g) for g in grants],
                                PENDING, now, now + ttl)
            self._apply([approval], [], commit)
            return approval, True

    def decide(self, approval_id: str, approve: bool, subject: str, issuer: str, comment: str, ttl: int,
               commit: Callable[[Sequence[Approval]], None]) -> Approval:
        """Approve (usable for ``ttl`` seconds from now) or reject a pending request."""
        now = int(self._clock())
        with self._lock:
            current = self._items.get(approval_id)
            if current is None:
                raise KeyError(approval_id)
            state = current.state_at(now)
            if state != PENDING:
                raise NotPending(state)
            decided = dataclasses.replace(
                current, state=APPROVED if approve else REJECTED, decided_at=now, comment=comment,
                expires_at=now + ttl if approve else current.expires_at, approver=f"{subject} ({issuer})",
                approver_subject=subject, approver_issuer=issuer)
            self._apply([decided], [], commit)
            return decided

    def drop(self, agent: str, task: str | None,
             commit: Callable[[Sequence[Approval]], None]) -> list[Approval]:
        """Forget ``agent``'s requests (of ``task`` only, if named): they never outlive what they were for."""
        with self._lock:
            gone = [a for a in self._items.values() if a.agent == agent and task in (None, a.task)]
            if gone:
                self._apply([], [a.id for a in gone], lambda _: commit(gone))
            return gone

    def drop_where(self, doomed: Callable[[Approval], bool]) -> list[Approval]:
        """Forget the requests ``doomed`` names (at start: tasks ended, agents revoked while we were down)."""
        with self._lock:
            gone = [a for a in self._items.values() if doomed(a)]
            if gone:
                self._apply([], [a.id for a in gone], lambda _: None)
            return gone


class LimitReached(Exception):
    """The agent has too many requests awaiting a decision."""


class NotPending(Exception):
    """The request was decided already, or expired; ``args[0]`` is its state."""
