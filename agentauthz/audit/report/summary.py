"""What each agent did and tried, per task, from the audit records of a state directory's every log.

Plain data (JSON-able dicts and lists) built from the records alone; ``page`` renders it, ``charts``
draws its timelines. Every string in it came from the log, so from agents: render it escaped.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

from ... import reasons
from ..files import log_files, parse_line
from ..verify import log_dirs

# Tried what the token does not cover: a tool, target, operation, sensitivity, argument or budget.
OUT_OF_SCOPE = reasons.FORBIDDEN | reasons.CONSTRAINT_DENIED
# A token presented by another agent or from another certificate than the one it was minted over.
PEER_REFUSED = frozenset({reasons.TOKEN_SENDER, reasons.TOKEN_BINDING})
UNATTRIBUTED = "(no verified token)"  # denials whose token did not verify name no agent
# Flag thresholds: a reviewer's first look, not a verdict.
DENIAL_RATE, MIN_CHECKS, REPEATED_OUT_OF_SCOPE = 0.25, 4, 3
LIST_MAX = 200  # attempts listed per task; the counts cover all


def read_records(directory: Path, since: float | None = None,
                 until: float | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(log name, record) of every record in the window, the primary's log then each worker's."""
    for name, where in log_dirs(directory):
        name = name or "."
        for _, path in log_files(where):
            with open(path, "rb") as f:
                for raw in f:
                    rec = parse_line(raw)
                    if rec is None or rec.get("kind") == "checkpoint":
                        continue
                    ts = rec.get("ts")
                    if not isinstance(ts, (int, float)):
                        continue
                    if (since is not None and ts < since) or (until is not None and ts > until):
                        continue
                    yield name, rec


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def _grants(value: Any) -> list[dict[str, Any]]:
    return [g for g in value if isinstance(g, dict)] if isinstance(value, list) else []


class _Task:
    def __init__(self) -> None:
        self.intents: list[str] = []
        self.grants: list[dict[str, Any]] = []
        self.allowed = self.denied = 0
        self.by_reason: Counter[str] = Counter()
        self.touched: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
        self.out_of_scope: list[dict[str, Any]] = []
        self.made: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        self.approvals: dict[str, dict[str, Any]] = {}
        self.revocations: list[dict[str, Any]] = []
        self.tokens: set[str] = set()

    def intent(self, text: Any) -> None:
        if isinstance(text, str) and text and text not in self.intents:
            self.intents.append(text)

    def grant(self, grants: Any) -> None:
        for g in _grants(grants):
            if g not in self.grants:
                self.grants.append(g)

    def out(self) -> dict[str, Any]:
        touched = [{"tool": t, "target": g, "operation": o, "allowed": a, "denied": d}
                   for (t, g, o), (a, d) in sorted(self.touched.items())]
        return {"intents": self.intents, "grants": self.grants, "allowed": self.allowed,
                "denied": self.denied,
                "denied_by_reason": dict(self.by_reason.most_common()), "touched": touched,
                "out_of_scope": self.out_of_scope, "delegations_made": self.made,
                "delegations_received": self.received, "approvals": list(self.approvals.values()),
                "revocations": self.revocations, "tokens": sorted(self.tokens)}


class _Agent:
    def __init__(self) -> None:
        self.tasks: dict[str, _Task] = defaultdict(_Task)
        self.allowed = self.denied = self.out_of_scope = 0
        self.by_reason: Counter[str] = Counter()
        self.certificates: dict[str, list[float]] = {}  # x5t -> [first, last] seen
        self.peer_refusals: list[dict[str, Any]] = []
        self.events: list[tuple[float, str]] = []  # (ts, allow or a reason): the timeline's points

    def certificate(self, x5t: Any, ts: float) -> None:
        if isinstance(x5t, str) and x5t:
            seen = self.certificates.setdefault(x5t, [ts, ts])
            seen[0], seen[1] = min(seen[0], ts), max(seen[1], ts)


class Summary:
    """Folds records, in any order of logs, into per-agent, per-task findings."""

    def __init__(self) -> None:
        self.agents: dict[str, _Agent] = defaultdict(_Agent)
        self.owners: dict[str, tuple[str, str]] = {}  # token id -> (agent, task)
        self.first: float | None = None
        self.last: float | None = None
        self.records = 0
        self.logs: set[str] = set()

    def add(self, log: str, rec: dict[str, Any]) -> None:
        ts = float(rec["ts"])
        self.first = ts if self.first is None else min(self.first, ts)
        self.last = ts if self.last is None else max(self.last, ts)
        self.records += 1
        self.logs.add(log)
        handler = getattr(self, f"_{rec.get('kind')}", None)
        if handler is not None:
            handler(rec, ts)

    def _task(self, agent: Any, task: Any) -> _Task:
        return self.agents[_text(agent) or UNATTRIBUTED].tasks[_text(task)]

    def _mint(self, rec: dict[str, Any], ts: float) -> None:
        t = self._task(rec.get("agent"), rec.get("task"))
        t.intent(rec.get("intent"))
        if rec.get("decision") and isinstance(rec.get("token_id"), str):
            t.grant(rec.get("grants"))
            t.tokens.add(rec["token_id"])
            self.owners[rec["token_id"]] = (_text(rec.get("agent")), _text(rec.get("task")))
            cnf = rec.get("cnf")
            if isinstance(cnf, dict):
                self.agents[_text(rec.get("agent"))].certificate(cnf.get("x5t#S256"), ts)

    def _delegate(self, rec: dict[str, Any], ts: float) -> None:
        if not rec.get("decision"):
            return
        parent, child, task = _text(rec.get("agent")), _text(rec.get("to")), rec.get("task")
        grants, token_id = _grants(rec.get("grants")), _text(rec.get("token_id"))
        made = {"time": ts, "to": child, "grants": grants, "token_id": token_id}
        self._task(parent, task).made.append(made)
        received = self._task(child, task)
        received.received.append({"time": ts, "from": parent, "grants": grants, "token_id": token_id})
        received.intent(rec.get("intent"))
        received.grant(grants)
        received.tokens.add(token_id)
        self.owners[token_id] = (child, _text(task))

    def _check(self, rec: dict[str, Any], ts: float) -> None:
        agent = _text(rec.get("agent")) or UNATTRIBUTED
        reason, a = _text(rec.get("reason")), self.agents[agent]
        t = a.tasks[_text(rec.get("task"))]
        t.intent(rec.get("intent"))
        where = (_text(rec.get("tool")), _text(rec.get("target")), _text(rec.get("operation")))
        a.events.append((ts, reason))
        if rec.get("decision") is True:
            a.allowed, t.allowed = a.allowed + 1, t.allowed + 1
            t.touched[where][0] += 1
            return
        a.denied, t.denied = a.denied + 1, t.denied + 1
        a.by_reason[reason] += 1
        t.by_reason[reason] += 1
        t.touched[where][1] += 1
        if reason in OUT_OF_SCOPE:
            a.out_of_scope += 1
            if len(t.out_of_scope) < LIST_MAX:
                t.out_of_scope.append({"time": ts, "tool": where[0], "target": where[1],
                                       "operation": where[2],
                                       "sensitivity": _text(rec.get("sensitivity")), "reason": reason,
                                       "argument": rec.get("argument")})
        peer = rec.get("peer")
        if reason in PEER_REFUSED and isinstance(peer, dict):
            if reason == reasons.TOKEN_BINDING:  # the same identity over another certificate
                a.certificate(peer.get("x5t"), ts)
            if len(a.peer_refusals) < LIST_MAX:
                a.peer_refusals.append({"time": ts, "reason": reason,
                                        "principal": _text(peer.get("principal")),
                                        "x5t": _text(peer.get("x5t")), "tool": where[0], "target": where[1]})

    def _approval_request(self, rec: dict[str, Any], ts: float) -> None:
        t = self._task(rec.get("agent"), rec.get("task"))
        t.approvals[_text(rec.get("approval_id"))] = {
            "id": _text(rec.get("approval_id")), "asked": ts, "grants": _grants(rec.get("grants")),
            "state": "pending", "approver": "", "decided": None, "comment": ""}

    def _approval_decide(self, rec: dict[str, Any], ts: float) -> None:
        if not isinstance(rec.get("state"), str) or not rec.get("agent"):
            return  # a refused decision (unknown request, not an approver): nothing was decided
        t = self._task(rec.get("agent"), rec.get("task"))
        found = t.approvals.setdefault(_text(rec.get("approval_id")), {
            "id": _text(rec.get("approval_id")), "asked": None, "grants": _grants(rec.get("grants"))})
        found.update(state=rec["state"], approver=_text(rec.get("approver")), decided=ts,
                     comment=_text(rec.get("comment")))

    def _revoke(self, rec: dict[str, Any], ts: float) -> None:
        if not rec.get("decision"):
            return
        scope, by = _text(rec.get("scope")), _text(rec.get("agent"))
        if scope == "token":
            agent, task = self.owners.get(_text(rec.get("token_id")), (by, ""))
        elif scope == "task":
            agent, task = _text(rec.get("owner")) or by, _text(rec.get("task"))
        else:
            return  # a key's revocation is nobody's task
        self._task(agent, task).revocations.append({"time": ts, "scope": scope, "by": by,
                                                    "token_id": _text(rec.get("token_id"))})

    def _ban(self, rec: dict[str, Any], ts: float) -> None:
        if rec.get("decision"):
            self._task(rec.get("target_agent"), "").revocations.append(
                {"time": ts, "scope": "agent (ban)", "by": _text(rec.get("agent")), "token_id": ""})

    def result(self) -> dict[str, Any]:
        agents: list[dict[str, Any]] = []
        for name, a in self.agents.items():
            checks = a.allowed + a.denied
            tasks = {task: t.out() for task, t in sorted(a.tasks.items())}
            agents.append({"agent": name, "checks": checks, "allowed": a.allowed, "denied": a.denied,
                           "denial_rate": round(a.denied / checks, 3) if checks else 0.0,
                           "out_of_scope": a.out_of_scope,
                           "denied_by_reason": dict(a.by_reason.most_common()),
                           "certificates": [{"x5t": k, "first": v[0], "last": v[1]}
                                            for k, v in sorted(a.certificates.items(), key=lambda kv: kv[1])],
                           "peer_refusals": a.peer_refusals, "flags": flags(name, a), "tasks": tasks,
                           "events": sorted(a.events)})
        agents.sort(key=lambda x: (not x["flags"], -x["denied"], x["agent"]))
        return {"first": self.first, "last": self.last, "records": self.records, "logs": sorted(self.logs),
                "checks": sum(x["checks"] for x in agents), "allowed": sum(x["allowed"] for x in agents),
                "denied": sum(x["denied"] for x in agents), "agents": agents,
                "flagged": [x["agent"] for x in agents if x["flags"]]}


def flags(name: str, a: _Agent) -> list[str]:
    """Why a reviewer should look at this agent first; empty if nothing stands out."""
    if name == UNATTRIBUTED:
        return []
    found, checks = [], a.allowed + a.denied
    if checks >= MIN_CHECKS and a.denied / checks >= DENIAL_RATE:
        found.append(f"denial rate {a.denied / checks:.0%} ({a.denied} of {checks} calls)")
    if a.out_of_scope >= REPEATED_OUT_OF_SCOPE:
        found.append(f"{a.out_of_scope} out-of-scope attempts")
    spans = sorted(a.certificates.values())
    # Certificates rotate: one still used after the next appeared means two holders, not a rotation.
    if any(later[0] <= earlier[1] for earlier, later in zip(spans, spans[1:], strict=False)):
        found.append(f"one identity used from {len(spans)} certificates at once")
    if a.peer_refusals:
        found.append(f"its token presented from another certificate or agent ({len(a.peer_refusals)})")
    return found


def summarize(directory: Path, since: float | None = None, until: float | None = None) -> dict[str, Any]:
    """The per-agent summary of every log in ``directory`` (the primary's and its workers')."""
    s = Summary()
    for log, rec in read_records(directory, since, until):
        s.add(log, rec)
    return s.result()
