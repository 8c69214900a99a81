"""Policy as code: a human-edited YAML file compiled into immutable, indexed rules.

Lookups never scan all rules: rules are indexed by exact agent ID and by
agent-pattern prefix (one probe per path depth of the asked-for ID), then by
tool, and the merged per-agent view is cached. A reload builds a new
``Policy``; the old one stays usable until the caller swaps it in.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from . import reasons
from .constraints import canonical_arguments, canonical_budget, tighten
from .errors import PolicyError
from .identity import IdentityError, parse_spiffe_id
from .tokens import DEFAULT_SENSITIVITY, MAX_DELEGATION_DEPTH, SENSITIVITY_LEVELS, SENSITIVITY_RANK, grant

DEV_POLICY = Path(__file__).with_name("policies") / "dev.yaml"
VERSION = 1
CACHE_SIZE = 10_000
MAX_TTL_LIMIT = 86_400  # task tokens are short-lived; a day is already far too long

_TOP_KEYS = frozenset({"version", "defaults", "requests", "boundaries", "rules"})
_BOUNDARY_KEYS = frozenset({"max_ttl", "require_certificate_binding"})
_REQUEST_KEYS = frozenset({"operations", "tool_from_path", "sensitivity"})
_DEFAULT_KEYS = frozenset({"max_ttl", "max_delegation_depth", "max_sensitivity"})
_REQUIRED = ("id", "agents", "tool", "targets", "operations")
_ALLOW_ONLY = frozenset({"max_sensitivity", "max_ttl", "approval", "arguments", "budget"})
_RULE_KEYS = frozenset(_REQUIRED) | _ALLOW_ONLY | {"effect", "description"}
_GRANT_KEYS = frozenset({"tool", "target", "ops", "sensitivity", "arguments", "budget"})
_NAME = re.compile(r"[A-Za-z0-9_.:/-]+")  # rule ids, tools, operations: no '*', no spaces
_SCHEME = "spiffe://"


def spiffe_problem(text: Any, pattern: bool = False) -> str | None:
    """Why ``text`` is not an agent's SPIFFE ID (or, with ``pattern``, an agent pattern); None if it is."""
    if not isinstance(text, str):
        return "must be a string"
    base = text[:-2] if pattern and text.endswith("/*") else text
    if "*" in base:
        return "'*' is allowed only as the whole last path segment" if pattern else "may not contain '*'"
    try:
        spiffe_id = parse_spiffe_id(base)
    except IdentityError as exc:
        return str(exc)
    if not spiffe_id.path and base == text:
        return "must have a path after the trust domain"
    return None


def _prefixes(agent: str) -> list[str]:
    """The pattern-index keys that can match ``agent``: one per path depth."""
    start = agent.index("/", len(_SCHEME))
    keys = []
    while start != -1:
        keys.append(agent[:start + 1])
        start = agent.find("/", start + 1)
    return keys


def _target_problem(target: Any) -> str | None:
    if not isinstance(target, str) or not target:
        return "must be a non-empty string"
    return "may have '*' only at the end ('exact', 'prefix*' or '*')" if "*" in target[:-1] else None


def _name_problem(name: Any) -> str | None:
    ok = isinstance(name, str) and _NAME.fullmatch(name)
    return None if ok else "must be a name of A-Z a-z 0-9 _ . : / -"


class _Rule:
    """One compiled rule; target matching mirrors ``Grant.covers`` in the hot path."""

    __slots__ = ("id", "index", "deny", "tool", "targets", "exact", "prefixes", "ops", "level",
                 "ttl", "approval", "extras")

    def __init__(self, rule_id: str, index: int, deny: bool, tool: str, targets: tuple[str, ...],
                 ops: frozenset[str] | None, level: int, ttl: int, approval: bool) -> None:
        self.id, self.index, self.deny, self.tool, self.targets = rule_id, index, deny, tool, targets
        self.exact = frozenset(t for t in targets if not t.endswith("*"))
        self.prefixes = tuple(t[:-1] for t in targets if t.endswith("*"))
        self.ops = ops  # None: every operation
        self.level, self.ttl, self.approval = level, ttl, approval
        self.extras: dict[str, Any] = {}  # canonical "arguments"/"budget" copied into what it grants

    def has_op(self, op: str) -> bool:
        return self.ops is None or op in self.ops

    def covers_pattern(self, pattern: str) -> bool:
        """Whether one of the rule's targets matches everything ``pattern`` matches."""
        return pattern in self.exact or pattern.startswith(self.prefixes)


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The safe loader, refusing duplicate mapping keys (YAML would keep the last one silently)."""


def _mapping_no_duplicates(loader: Any, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, (str, int, float)):  # other keys are refused later as unknown
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                        key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_no_duplicates)


def _int(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:  # bool is an int: refuse it
        raise ValueError(f"{what} must be an integer from {low} to {high}, not {value!r}")
    return value


def _choice(value: Any, options: Sequence[str], what: str) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, options))}, not {value!r}")
    return value


def _keys(obj: Any, allowed: frozenset[str], what: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{what} must be a mapping, not {type(obj).__name__}")
    unknown = ", ".join(sorted(map(str, obj.keys() - allowed)))
    if unknown:
        raise ValueError(f"unknown key(s) in {what}: {unknown} (allowed: {', '.join(sorted(allowed))})")


def _name(value: Any, what: str) -> str:
    if _name_problem(value):
        raise ValueError(f"{what} {_name_problem(value)}, not {value!r}")
    return value


def _strings(value: Any, what: str, problem: Callable[[Any], str | None]) -> list[str]:
    """A non-empty list of distinct strings, each passing ``problem``."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} must be a non-empty list")
    seen: set[str] = set()
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"{what}[{i}] must be a string, not {item!r}")
        if item in seen:
            raise ValueError(f"{what}[{i}] {item!r} is listed twice")
        seen.add(item)
        if problem(item):
            raise ValueError(f"{what}[{i}] {item!r} {problem(item)}")
    return value


def _compile_rule(raw: Any, index: int, defaults: dict[str, Any]) -> tuple[_Rule, list[str]]:
    """Validate one rule; returns it with its agent patterns. Raises ValueError."""
    _keys(raw, _RULE_KEYS, "rule")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"missing required key(s): {', '.join(missing)}")
    rule_id = _name(raw["id"], "id")
    deny = _choice(raw.get("effect", "allow"), ("allow", "deny"), "effect") == "deny"
    if deny and raw.keys() & _ALLOW_ONLY:
        raise ValueError(f"{', '.join(sorted(raw.keys() & _ALLOW_ONLY))}: only meaningful on allow rules")
    if not isinstance(raw.get("description", ""), str):
        raise ValueError("description must be a string")
    agents = _strings(raw["agents"], "agents", lambda a: spiffe_problem(a, pattern=True))
    tool = _name(raw["tool"], "tool")
    targets = _strings(raw["targets"], "targets", _target_problem)
    ops = _strings(raw["operations"], "operations", lambda op: None if op == "*" else _name_problem(op))
    if "*" in ops and len(ops) > 1:
        raise ValueError("operations: '*' (every operation) must stand alone")
    approval = _choice(raw.get("approval", "none"), ("required", "none"), "approval") == "required"
    level = _choice(raw.get("max_sensitivity", defaults["max_sensitivity"]), SENSITIVITY_LEVELS,
                    "max_sensitivity")
    ttl = _int(raw.get("max_ttl", defaults["max_ttl"]), "max_ttl", 1, MAX_TTL_LIMIT)
    rule = _Rule(rule_id, index, deny, tool, tuple(targets), None if ops == ["*"] else frozenset(ops),
                 SENSITIVITY_RANK[level], ttl, approval)
    rule.extras = _extras(raw)
    return rule, agents


def _extras(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A rule's or a requested grant's constraints in canonical form (constraints.py); raises ValueError."""
    out: dict[str, Any] = {}
    if "arguments" in raw:
        out["arguments"] = canonical_arguments(raw["arguments"])
    if "budget" in raw:
        out["budget"] = canonical_budget(raw["budget"])
    return out


@dataclass(frozen=True)
class RequestDefaults:
    """How Check reads a request whose Envoy route sets no ``context_extensions``."""

    operations: Mapping[str, str]  # HTTP method -> operation
    tool_from_path: bool  # "/<tool>/<target...>"
    sensitivity: str


DEFAULT_REQUESTS = RequestDefaults(
    operations={"GET": "read", "HEAD": "read", "POST": "write", "PUT": "write", "PATCH": "write",
                "DELETE": "delete"},
    tool_from_path=True, sensitivity=DEFAULT_SENSITIVITY)


def _request_defaults(raw: Any) -> RequestDefaults:
    if raw is None:
        return DEFAULT_REQUESTS
    _keys(raw, _REQUEST_KEYS, "requests")
    operations = raw.get("operations", DEFAULT_REQUESTS.operations)
    if not isinstance(operations, dict) or not all(
            isinstance(m, str) and m.isupper() and _name_problem(op) is None for m, op in operations.items()):
        raise ValueError("requests.operations must map upper-case HTTP methods to operation names")
    tool_from_path = raw.get("tool_from_path", True)
    if not isinstance(tool_from_path, bool):
        raise ValueError("requests.tool_from_path must be true or false")
    sensitivity = _choice(raw.get("sensitivity", DEFAULT_SENSITIVITY), SENSITIVITY_LEVELS,
                          "requests.sensitivity")
    return RequestDefaults(dict(operations), tool_from_path, sensitivity)


@dataclass(frozen=True)
class Boundary:
    """Per trust boundary (a token audience; an Envoy route's ``boundary``) limits."""

    max_ttl: int = MAX_TTL_LIMIT
    # A token minted over mTLS names its certificate (cnf); at Check, Envoy forwards the peer
    # certificate only on mTLS listeners. True: a bound token without a certificate is refused.
    require_certificate_binding: bool = False


OPEN_BOUNDARY = Boundary()


def _boundaries(raw: Any) -> dict[str, Boundary]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError("boundaries must map boundary names to their settings")
    out = {}
    for name, settings in raw.items():
        problem = _name_problem(name) if isinstance(name, str) else "must be a string"
        if problem:
            raise ValueError(f"boundary name {name!r} {problem}")
        settings = {} if settings is None else settings
        _keys(settings, _BOUNDARY_KEYS, f"boundaries.{name}")
        binding = settings.get("require_certificate_binding", False)
        if not isinstance(binding, bool):
            raise ValueError(f"boundaries.{name}.require_certificate_binding must be true or false")
        out[name] = Boundary(_int(settings.get("max_ttl", MAX_TTL_LIMIT), f"boundaries.{name}.max_ttl", 1,
                                  MAX_TTL_LIMIT), binding)
    return out


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
    _exact: dict[str, dict[str, list[_Rule]]]  # agent ID -> tool -> rules
    _patterns: dict[str, dict[str, list[_Rule]]]  # "spiffe://td/p/" (from ".../p/*") -> tool -> rules
    _views: dict[str, dict[str, tuple[tuple[_Rule, ...], tuple[_Rule, ...]]]]
    _cache_size: int
    _lock: threading.Lock

    def __init__(self, data: Any, source: str, digest: str, cache_size: int = CACHE_SIZE) -> None:
        def fail(message: str, rule: str | None = None) -> PolicyError:
            return PolicyError(message, file=source, rule=rule)

        try:
            _keys(data, _TOP_KEYS, "the top level")
            if data.get("version") != VERSION or type(data.get("version")) is not int:
                raise ValueError(f"version must be {VERSION}, not {data.get('version')!r}")
            raw_defaults = data.get("defaults", {})
            _keys(raw_defaults, _DEFAULT_KEYS, "defaults")
            defaults = {
                "max_ttl": _int(raw_defaults.get("max_ttl", 300), "defaults.max_ttl", 1, MAX_TTL_LIMIT),
                "max_sensitivity": _choice(raw_defaults.get("max_sensitivity", DEFAULT_SENSITIVITY),
                                           SENSITIVITY_LEVELS, "defaults.max_sensitivity"),
                "max_delegation_depth": _int(raw_defaults.get("max_delegation_depth", 0),
                                             "defaults.max_delegation_depth", 0, MAX_DELEGATION_DEPTH),
            }
            requests = _request_defaults(data.get("requests"))
            boundaries = _boundaries(data.get("boundaries"))
            if not isinstance(data.get("rules"), list):
                raise ValueError("rules must be a list (it may be empty: then nothing is allowed)")
        except ValueError as exc:
            raise fail(str(exc)) from None
        exact: dict[str, dict[str, list[_Rule]]] = {}
        patterns: dict[str, dict[str, list[_Rule]]] = {}
        seen: dict[str, int] = {}
        for index, raw in enumerate(data["rules"]):
            rid = raw.get("id") if isinstance(raw, dict) else None
            where = rid if isinstance(rid, str) and rid else f"#{index + 1}"
            try:
                rule, agents = _compile_rule(raw, index, defaults)
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
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise PolicyError(f"cannot read policy file: {exc.strerror or exc}", file=str(path)) from None
        try:
            text = raw.decode("utf-8")  # strict: re-encoding gives back exactly ``raw`` for the digest
        except UnicodeDecodeError:
            raise PolicyError("policy file is not UTF-8", file=str(path)) from None
        return cls.from_text(text, str(path), cache_size=cache_size)

    @classmethod
    def from_text(cls, text: str, source: str = "<string>", *, cache_size: int = CACHE_SIZE) -> Policy:
        """Compile policy text (YAML); ``source`` names it in errors."""
        try:
            digest = hashlib.sha256(text.encode()).hexdigest()
        except UnicodeEncodeError:
            raise PolicyError("policy text is not valid Unicode (a lone surrogate)", file=source) from None
        try:
            data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
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

    def _view(self, agent: str) -> dict[str, tuple[tuple[_Rule, ...], tuple[_Rule, ...]]]:
        """Tool -> (deny rules, allow rules) for ``agent``, from the cache or the index."""
        view = self._views.get(agent)
        if view is not None:
            return view
        merged: dict[str, dict[int, _Rule]] = {}  # by rule index: a rule may sit in several buckets
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

    def permits(self, agent: str, tool: str, target: str, operation: str, level: int) -> str | None:
        """None when policy allows this now, else ``POLICY_DENIED``; denies override allows."""
        view = self._views.get(agent)  # the hit path inlined: a method call costs ~10% here
        entry = (self._view(agent) if view is None else view).get(tool)
        if entry is None:
            return reasons.POLICY_DENIED
        denies, allows = entry
        for r in denies:
            if (r.ops is None or operation in r.ops) and (target in r.exact or target.startswith(r.prefixes)):
                return reasons.POLICY_DENIED
        for r in allows:
            if (level <= r.level and (r.ops is None or operation in r.ops)
                    and (target in r.exact or target.startswith(r.prefixes))):
                return None  # approval-required rules count: approval is checked at mint
        return reasons.POLICY_DENIED

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


def _requested(raw: Any) -> tuple[str, str, list[str], int, dict[str, Any]] | None:
    """A requested grant as (tool, target, ops, level, constraints), or None when malformed (denied whole)."""
    if not isinstance(raw, Mapping) or raw.keys() - _GRANT_KEYS:
        return None
    tool, target, ops = raw.get("tool"), raw.get("target"), raw.get("ops")
    sensitivity = raw.get("sensitivity", DEFAULT_SENSITIVITY)
    if (not isinstance(tool, str) or not tool or not isinstance(target, str) or _target_problem(target)
            or not isinstance(ops, (list, tuple, set, frozenset)) or not ops
            or any(_name_problem(op) for op in ops)
            or not isinstance(sensitivity, str) or sensitivity not in SENSITIVITY_RANK):
        return None
    try:
        asked = _extras(raw)  # a request may add constraints; they only tighten (constraints.tighten)
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


def _best(allows: Sequence[_Rule], op: str, target: str, level: int,
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
