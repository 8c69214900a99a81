"""Human approval requests: one agent's task, exactly the gated grants, an expiry, and who decided.

The whole store is one small JSON file under the state directory, replaced atomically (and fsynced)
on every change before the change is acknowledged, so a restart loses no request and no decision.
Requests that no longer matter are forgotten an hour after they stop mattering (the audit log keeps
them for good). The records and their rules (state/approval_records.py) are shared with the cluster
store and re-exported here for the callers that know them as ``approvals.*``.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import durable
from ..errors import StateError
from ..state.approval_records import (  # noqa: F401
    APPROVED,
    EXPIRED,
    MAX_OPEN_PER_AGENT,
    PENDING,
    REJECTED,
    RETAIN,
    STATES,
    Approval,
    LimitReached,
    NotPending,
    _load_one,
    decided,
    forgotten,
    live_or_new,
)

VERSION = 1


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
        for a in [a for a in self._items.values() if forgotten(a, now)]:
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
        with self._lock:
            approval, new = live_or_new(self._items.values(), agent, task, intent, grants, ttl, now)
            if new:
                self._apply([approval], [], commit)
            return approval, new

    def decide(self, approval_id: str, approve: bool, subject: str, issuer: str, comment: str, ttl: int,
               commit: Callable[[Sequence[Approval]], None]) -> Approval:
        """Approve (usable for ``ttl`` seconds from now) or reject a pending request."""
        now = int(self._clock())
        with self._lock:
            current = self._items.get(approval_id)
            if current is None:
                raise KeyError(approval_id)
            done = decided(current, approve, subject, issuer, comment, ttl, now)
            self._apply([done], [], commit)
            return done

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
