"""Policy as code: a human-edited YAML file compiled into immutable, indexed rules.

Lookups never scan all rules: rules are indexed by exact agent ID and by
agent-pattern prefix (one probe per path depth of the asked-for ID), then by
tool, and the merged per-agent view is cached. A reload builds a new
``Policy``; the old one stays usable until the caller swaps it in.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .. import reasons
from ..errors import PolicyError
from .constraints import Constrained, tighten
from .policy_file import (
    DEFAULT_KEYS,
    GRANT_KEYS,
    MAX_TTL_LIMIT,
    OPEN_BOUNDARY,
    TOP_KEYS,
    Boundary,
    RequestDefaults,
    Rule,
    StrictLoader,
    check_keys,
    choice,
    compile_rule,
    grant_extras,
    integer,
    name_problem,
    read_boundaries,
    request_defaults,
    spiffe_problem,
    target_problem,
)
from .policy_file import DEFAULT_REQUESTS as DEFAULT_REQUESTS  # callers read the defaults here
from .tokens import DEFAULT_SENSITIVITY, MAX_DELEGATION_DEPTH, SENSITIVITY_LEVELS, SENSITIVITY_RANK, grant

DEV_POLICY = Path(__file__).parent.parent / "policies" / "dev.yaml"  # agentauthz/policies, the packaged data
VERSION = 1
CACHE_SIZE = 10_000
_SCHEME = "spiffe://"


def _prefixes(agent: str) -> list[str]:
    """The pattern-index keys that can match ``agent``: one per path depth."""
    start = agent.index("/", len(_SCHEME))
    keys = []
    while start != -1:
        keys.append(agent[:start + 1])
        start = agent.find("/", start + 1)
    return keys


@dataclass(frozen=True)
class Narrowed:
    """What ``Policy.narrow`` leaves of a Mint request."""

    granted: list[dict]
    needs_approval: list[dict]
    denied: list[dict]
    ttl: int


class Policy:
    """An immutable, indexed policy; build one with ``load``, ``from_text`` or ``from_data``."""

    __slots__ = ("source", "digest", "rule_count", "max_delegation_depth", "requests", "boundaries", "_exact",
                 "_patterns", "_views", "_cache_size", "_lock")
    source: str
    digest: str  # sha256 (hex) of the file bytes, for audit and reload logs
    rule_count: int
    max_delegation_depth: int
    requests: RequestDefaults
    boundaries: dict[str, Boundary]  # unnamed boundaries get OPEN_BOUNDARY
    _exact: dict[str, dict[str, list[Rule]]]  # agent ID -> tool -> rules
    _patterns: dict[str, dict[str, list[Rule]]]  # "spiffe://td/p/" (from ".../p/*") -> tool -> rules
    _views: dict[str, dict[str, tuple[tuple[Rule, ...], tuple[Rule, ...]]]]
    _cache_size: int
    _lock: threading.Lock

    def __init__(self, data: Any, source: str, digest: str, cache_size: int = CACHE_SIZE) -> None:
        def fail(message: str, rule: str | None = None) -> PolicyError:
            return PolicyError(message, file=source, rule=rule)

        try:
            check_keys(data, TOP_KEYS, "the top level")
            if data.get("version") != VERSION or type(data.get("version")) is not int:
                raise ValueError(f"version must be {VERSION}, not {data.get('version')!r}")
            raw_defaults = data.get("defaults", {})
            check_keys(raw_defaults, DEFAULT_KEYS, "defaults")
            defaults = {
                "max_ttl": integer(raw_defaults.get("max_ttl", 300), "defaults.max_ttl", 1, MAX_TTL_LIMIT),
                "max_sensitivity": choice(raw_defaults.get("max_sensitivity", DEFAULT_SENSITIVITY),
                                           SENSITIVITY_LEVELS, "defaults.max_sensitivity"),
                "max_delegation_depth": integer(raw_defaults.get("max_delegation_depth", 0),
                                             "defaults.max_delegation_depth", 0, MAX_DELEGATION_DEPTH),
            }
            requests = request_defaults(data.get("requests"))
            boundaries = read_boundaries(data.get("boundaries"))
            if not isinstance(data.get("rules"), list):
                raise ValueError("rules must be a list (it may be empty: then nothing is allowed)")
        except ValueError as exc:
            raise fail(str(exc)) from None
        exact: dict[str, dict[str, list[Rule]]] = {}
        patterns: dict[str, dict[str, list[Rule]]] = {}
        seen: dict[str, int] = {}
        for index, raw in enumerate(data["rules"]):
            rid = raw.get("id") if isinstance(raw, dict) else None
            where = rid if isinstance(rid, str) and rid else f"#{index + 1}"
            try:
                rule, agents = compile_rule(raw, index, defaults)
            except ValueError as exc:
                raise fail(str(exc), where) from None
            if rule.id in seen:
                raise fail(f"duplicate rule id (also rule #{seen[rule.id] + 1})", where)
            seen[rule.id] = index
            for agent in agents:
                index_, key = (patterns, agent[:-1]) if agent.endswith("/*") else (exact, agent)
                index_.setdefault(key, {}).setdefault(rule.tool, []).append(rule)
        for name, value in (("source", source), ("digest", digest), ("rule_count", len(seen)),
                            ("max_delegation_depth", defaults["max_delegation_depth"]),
                            ("requests", requests), ("boundaries", boundaries), ("_exact", exact),
                            ("_patterns", patterns), ("_views", {}), ("_cache_size", cache_size),
                            ("_lock", threading.Lock())):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Policy is immutable: load a new one instead")

    def boundary(self, name: str) -> Boundary:
        return self.boundaries.get(name, OPEN_BOUNDARY)

    def __repr__(self) -> str:
        return f"Policy({self.source!r}, rules={self.rule_count}, digest={self.digest[:12]})"

    @classmethod
    def load(cls, path: str | Path, *, cache_size: int = CACHE_SIZE) -> Policy:
        """Read and compile a policy file; raises PolicyError naming the file, rule and problem."""
        return cls.from_text(read_text(path), str(path), cache_size=cache_size)

    @classmethod
    def from_text(cls, text: str, source: str = "<string>", *, cache_size: int = CACHE_SIZE) -> Policy:
        """Compile policy text (YAML); ``source`` names it in errors."""
        try:
            digest = hashlib.sha256(text.encode()).hexdigest()
        except UnicodeEncodeError:
            raise PolicyError("policy text is not valid Unicode (a lone surrogate)", file=source) from None
        try:
            data = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or exc
            raise PolicyError(f"YAML error{at}: {problem}", file=source) from None
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            # PyYAML's constructors raise these for scalars its parser accepted: a date such as
            # 2001-13-45, an integer of more than 4300 digits, "!!bool maybe" (tests/test_fuzz_policy.py).
            raise PolicyError(f"YAML error: a value cannot be read ({type(exc).__name__}: {exc})",
                              file=source) from None
        return cls(data, source, digest, cache_size)

    @classmethod
    def from_data(cls, data: Any, source: str = "<data>", *, cache_size: int = CACHE_SIZE) -> Policy:
        """Compile an already-parsed policy document; the digest is over its canonical JSON."""
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
        return cls(data, source, hashlib.sha256(canonical.encode()).hexdigest(), cache_size)

    # -- lookups ---------------------------------------------------------------

    def _view(self, agent: str) -> dict[str, tuple[tuple[Rule, ...], tuple[Rule, ...]]]:
        """Tool -> (deny rules, allow rules) for ``agent``, from the cache or the index."""
        view = self._views.get(agent)
        if view is not None:
            return view
        merged: dict[str, dict[int, Rule]] = {}  # by rule index: a rule may sit in several buckets
        if isinstance(agent, str) and spiffe_problem(agent) is None:
            buckets = [self._exact.get(agent)] + [self._patterns.get(p) for p in _prefixes(agent)]
            for bucket in buckets:
                for tool, rules in (bucket or {}).items():
                    merged.setdefault(tool, {}).update((r.index, r) for r in rules)
        view = {}
        for tool, by_index in merged.items():
            rules = [by_index[i] for i in sorted(by_index)]
            view[tool] = (tuple(r for r in rules if r.deny), tuple(r for r in rules if not r.deny))
        if self._cache_size > 0:
            with self._lock:  # only misses take the lock; eviction iterates the dict
                if len(self._views) >= self._cache_size:
                    self._views.pop(next(iter(self._views)))
                self._views[agent] = view
        return view

    def permits(self, agent: str, tool: str, target: str, operation: str, level: int,
                approved: bool = False) -> str | Constrained | None:
        """Policy at the moment of action: None when it allows this, a ``Constrained`` when it allows it
        only under argument constraints or budgets, else ``POLICY_DENIED``, or ``APPROVAL_REQUIRED``
        when only approval-gated rules allow it and the token carries no approval (``approved``).
        Denies override allows; an unconstrained allow rule needs nothing more."""
        view = self._views.get(agent)  # the hit path inlined: a method call costs ~10% here
        entry = (self._view(agent) if view is None else view).get(tool)
        if entry is None:
            return reasons.POLICY_DENIED
        denies, allows = entry
        for r in denies:
            if (r.ops is None or operation in r.ops) and (target in r.exact or target.startswith(r.prefixes)):
                return reasons.POLICY_DENIED
        constrained = []
        gated = False
        for r in allows:
            if (level <= r.level and (r.ops is None or operation in r.ops)
                    and (target in r.exact or target.startswith(r.prefixes))):
                if r.approval and not approved:
                    gated = True
                elif r.constraints is None:
                    return None
                else:
                    constrained.append(r.constraints)
        if constrained:
            return Constrained(tuple(constrained))
        return reasons.APPROVAL_REQUIRED if gated else reasons.POLICY_DENIED

    def offered(self, agent: str, tools: Sequence[str]) -> str:
        """What the allow rules give ``agent`` for each of ``tools``, in one line: a refused mint names it."""
        view = self._view(agent)
        parts = []
        for tool in sorted(set(tools)):
            allows = view.get(tool, ((), ()))[1]
            if not allows:
                parts.append(f"nothing for {tool}")
                continue
            ops = sorted({op for r in allows for op in (r.ops if r.ops is not None else ("*",))})
            parts.append(f"{tool}: operations {', '.join(ops)}, "
                         f"sensitivity up to {SENSITIVITY_LEVELS[max(r.level for r in allows)]}")
        return "; ".join(parts)

    def narrow(self, agent: str, requested: Sequence[Mapping], ttl: int) -> Narrowed:
        """Requested grants ∩ what policy allows ``agent``; approval-gated ops split out."""
        view = self._view(agent)
        granted: list[dict] = []
        gated: list[dict] = []
        denied: list[dict] = []
        granted_ttls: list[int] = []
        gated_ttls: list[int] = []  # counted only when nothing is granted without approval
        for raw in requested:
            parsed = _requested(raw)
            if parsed is None:
                denied.append(_grant_shaped(raw))
                continue
            tool, target, ops, level, asked = parsed
            denies, allows = view.get(tool, ((), ()))
            # Ops group by level and by the constraints of the rule that gives them (its extras).
            plain: dict[tuple[int, str], tuple[list[str], dict[str, Any]]] = {}
            approval: dict[tuple[int, str], tuple[list[str], dict[str, Any]]] = {}
            lost: list[str] = []
            for op in ops:
                if any(r.has_op(op) and r.covers_pattern(target) for r in denies):
                    lost.append(op)
                    continue
                free = _best(allows, op, target, level, approval=False)
                if free:
                    plain.setdefault(_group(free), ([], free[2]))[0].append(op)
                    granted_ttls.append(free[1])
                held = _best(allows, op, target, level, approval=True)
                if held and (free is None or held[0] > free[0]):
                    approval.setdefault(_group(held), ([], held[2]))[0].append(op)
                    gated_ttls.append(held[1])
                elif not free:
                    lost.append(op)
            for out, by_level in ((granted, plain), (gated, approval)):
                out.extend(tighten(grant(tool, target, o, SENSITIVITY_LEVELS[n], **extras), asked)
                           for (n, _), (o, extras) in sorted(by_level.items()))
            if lost:
                denied.append(grant(tool, target, lost, SENSITIVITY_LEVELS[level]))
        caps = granted_ttls or gated_ttls
        return Narrowed(granted, gated, denied, min([ttl, *caps]) if caps else 0)


def read_text(path: str | Path) -> str:
    """A policy file's text, read once: the daemon compiles it and sends the same text to its workers."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise PolicyError(f"cannot read policy file: {exc.strerror or exc}", file=str(path)) from None
    try:
        return raw.decode("utf-8")  # strict: re-encoding gives back exactly ``raw`` for the digest
    except UnicodeDecodeError:
        raise PolicyError("policy file is not UTF-8", file=str(path)) from None


def _requested(raw: Any) -> tuple[str, str, list[str], int, dict[str, Any]] | None:
    """A requested grant as (tool, target, ops, level, constraints), or None when malformed (denied whole)."""
    if not isinstance(raw, Mapping) or raw.keys() - GRANT_KEYS:
        return None
    tool, target, ops = raw.get("tool"), raw.get("target"), raw.get("ops")
    sensitivity = raw.get("sensitivity", DEFAULT_SENSITIVITY)
    if (not isinstance(tool, str) or not tool or not tool.isprintable() or not isinstance(target, str)
            or target_problem(target)
            or not isinstance(ops, (list, tuple, set, frozenset)) or not ops
            or any(name_problem(op) for op in ops)
            or not isinstance(sensitivity, str) or sensitivity not in SENSITIVITY_RANK):
        return None
    try:
        asked = grant_extras(raw)  # a request may add constraints; they only tighten (constraints.tighten)
    except ValueError:
        return None
    return tool, target, sorted(set(ops)), SENSITIVITY_RANK[sensitivity], asked


def _grant_shaped(raw: Any) -> dict[str, Any]:
    """A malformed request as a grant-shaped dict (all strings), so callers can report it."""
    raw = raw if isinstance(raw, Mapping) else {"tool": repr(raw)}
    ops = raw.get("ops", [])
    if not isinstance(ops, (list, tuple, set, frozenset)):
        ops = [ops] if isinstance(ops, str) else []
    return {"tool": str(raw.get("tool", "")), "target": str(raw.get("target", "")),
            "ops": [str(op) for op in ops], "sensitivity": str(raw.get("sensitivity", DEFAULT_SENSITIVITY))}


def _best(allows: Sequence[Rule], op: str, target: str, level: int,
          approval: bool) -> tuple[int, int, dict[str, Any]] | None:
    """(level, ttl, constraints) of the allow rule granting ``op`` on all of ``target`` at the highest
    level, then longest TTL, then without constraints (any allow rule would do: the least constrained
    is what policy allows); the first such rule on a tie."""
    best = None
    for r in allows:
        if r.approval == approval and r.has_op(op) and r.covers_pattern(target):
            rank = (min(level, r.level), r.ttl, not r.extras)
            if best is None or rank > best[0]:
                best = (rank, r.extras)
    return None if best is None else (best[0][0], best[0][1], best[1])


def _group(best: tuple[int, int, dict[str, Any]]) -> tuple[int, str]:
    return best[0], json.dumps(best[2], sort_keys=True)


def check_file(path: str | Path) -> dict[str, Any]:
    """Validate a policy file for ``agentauthz policy check``; raises PolicyError when refused."""
    policy = Policy.load(path)
    return {"file": str(path), "rules": policy.rule_count, "digest": policy.digest, "ok": True}
