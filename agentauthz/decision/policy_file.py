"""What a policy file may say: strict YAML, the check each field must pass, and the compiled rule.

``policy.Policy`` builds on these; every ValueError here names the field, and the caller the file and rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import yaml

from ..identity.spiffe import IdentityError, parse_spiffe_id
from .constraints import Extras, canonical_arguments, canonical_budget, compile_arguments, compile_budget
from .tokens import DEFAULT_SENSITIVITY, SENSITIVITY_LEVELS, SENSITIVITY_RANK

MAX_TTL_LIMIT = 86_400  # task tokens are short-lived; a day is already far too long

TOP_KEYS = frozenset({"version", "defaults", "requests", "boundaries", "rules"})
BOUNDARY_KEYS = frozenset({"max_ttl", "require_certificate_binding"})
REQUEST_KEYS = frozenset({"operations", "tool_from_path", "sensitivity"})
DEFAULT_KEYS = frozenset({"max_ttl", "max_delegation_depth", "max_sensitivity"})
REQUIRED = ("id", "agents", "tool", "targets", "operations")
ALLOW_ONLY = frozenset({"max_sensitivity", "max_ttl", "approval", "arguments", "budget"})
RULE_KEYS = frozenset(REQUIRED) | ALLOW_ONLY | {"effect", "description"}
GRANT_KEYS = frozenset({"tool", "target", "ops", "sensitivity", "arguments", "budget"})
NAME = re.compile(r"[A-Za-z0-9_.:/-]+")  # rule ids, tools, operations: no '*', no spaces


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


def target_problem(target: Any) -> str | None:
    if not isinstance(target, str) or not target:
        return "must be a non-empty string"
    if not target.isprintable():  # a human approves what a terminal shows: no cursor moves, no bidi
        return "may not contain control or format characters"
    return "may have '*' only at the end ('exact', 'prefix*' or '*')" if "*" in target[:-1] else None


def name_problem(name: Any) -> str | None:
    ok = isinstance(name, str) and NAME.fullmatch(name)
    return None if ok else "must be a name of A-Z a-z 0-9 _ . : / -"


class Rule:
    """One compiled rule; target matching mirrors ``Grant.covers`` in the hot path."""

    __slots__ = ("id", "index", "deny", "tool", "targets", "exact", "prefixes", "ops", "level",
                 "ttl", "approval", "extras", "constraints")

    def __init__(self, rule_id: str, index: int, deny: bool, tool: str, targets: tuple[str, ...],
                 ops: frozenset[str] | None, level: int, ttl: int, approval: bool) -> None:
        self.id, self.index, self.deny, self.tool, self.targets = rule_id, index, deny, tool, targets
        self.exact = frozenset(t for t in targets if not t.endswith("*"))
        self.prefixes = tuple(t[:-1] for t in targets if t.endswith("*"))
        self.ops = ops  # None: every operation
        self.level, self.ttl, self.approval = level, ttl, approval
        self.extras: dict[str, Any] = {}  # canonical "arguments"/"budget" copied into what it grants
        self.constraints: Extras | None = None  # ``extras`` compiled, for Check (``Policy.permits``)

    def has_op(self, op: str) -> bool:
        return self.ops is None or op in self.ops

    def covers_pattern(self, pattern: str) -> bool:
        """Whether one of the rule's targets matches everything ``pattern`` matches."""
        return pattern in self.exact or pattern.startswith(self.prefixes)


class StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
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


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_no_duplicates)


def integer(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:  # bool is an int: refuse it
        raise ValueError(f"{what} must be an integer from {low} to {high}, not {value!r}")
    return value


def choice(value: Any, options: Sequence[str], what: str) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, options))}, not {value!r}")
    return value


def check_keys(obj: Any, allowed: frozenset[str], what: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{what} must be a mapping, not {type(obj).__name__}")
    unknown = ", ".join(sorted(map(str, obj.keys() - allowed)))
    if unknown:
        raise ValueError(f"unknown key(s) in {what}: {unknown} (allowed: {', '.join(sorted(allowed))})")


def name(value: Any, what: str) -> str:
    if name_problem(value):
        raise ValueError(f"{what} {name_problem(value)}, not {value!r}")
    return value


def strings(value: Any, what: str, problem: Callable[[Any], str | None]) -> list[str]:
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


def compile_rule(raw: Any, index: int, defaults: dict[str, Any]) -> tuple[Rule, list[str]]:
    """Validate one rule; returns it with its agent patterns. Raises ValueError."""
    check_keys(raw, RULE_KEYS, "rule")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"missing required key(s): {', '.join(missing)}")
    rule_id = name(raw["id"], "id")
    deny = choice(raw.get("effect", "allow"), ("allow", "deny"), "effect") == "deny"
    if deny and raw.keys() & ALLOW_ONLY:
        raise ValueError(f"{', '.join(sorted(raw.keys() & ALLOW_ONLY))}: only meaningful on allow rules")
    if not isinstance(raw.get("description", ""), str):
        raise ValueError("description must be a string")
    agents = strings(raw["agents"], "agents", lambda a: spiffe_problem(a, pattern=True))
    tool = name(raw["tool"], "tool")
    targets = strings(raw["targets"], "targets", target_problem)
    ops = strings(raw["operations"], "operations", lambda op: None if op == "*" else name_problem(op))
    if "*" in ops and len(ops) > 1:
        raise ValueError("operations: '*' (every operation) must stand alone")
    approval = choice(raw.get("approval", "none"), ("required", "none"), "approval") == "required"
    level = choice(raw.get("max_sensitivity", defaults["max_sensitivity"]), SENSITIVITY_LEVELS,
                    "max_sensitivity")
    ttl = integer(raw.get("max_ttl", defaults["max_ttl"]), "max_ttl", 1, MAX_TTL_LIMIT)
    rule = Rule(rule_id, index, deny, tool, tuple(targets), None if ops == ["*"] else frozenset(ops),
                 SENSITIVITY_RANK[level], ttl, approval)
    rule.extras = extras = grant_extras(raw)
    if extras:
        rule.constraints = Extras(compile_arguments(extras.get("arguments", ())),
                                  compile_budget(extras["budget"]) if "budget" in extras else None)
    return rule, agents


def grant_extras(raw: Mapping[str, Any]) -> dict[str, Any]:
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


def request_defaults(raw: Any) -> RequestDefaults:
    if raw is None:
        return DEFAULT_REQUESTS
    check_keys(raw, REQUEST_KEYS, "requests")
    operations = raw.get("operations", DEFAULT_REQUESTS.operations)
    if not isinstance(operations, dict) or not all(
            isinstance(m, str) and m.isupper() and name_problem(op) is None for m, op in operations.items()):
        raise ValueError("requests.operations must map upper-case HTTP methods to operation names")
    tool_from_path = raw.get("tool_from_path", True)
    if not isinstance(tool_from_path, bool):
        raise ValueError("requests.tool_from_path must be true or false")
    sensitivity = choice(raw.get("sensitivity", DEFAULT_SENSITIVITY), SENSITIVITY_LEVELS,
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


def read_boundaries(raw: Any) -> dict[str, Boundary]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError("boundaries must map boundary names to their settings")
    out = {}
    for name, settings in raw.items():
        problem = name_problem(name) if isinstance(name, str) else "must be a string"
        if problem:
            raise ValueError(f"boundary name {name!r} {problem}")
        settings = {} if settings is None else settings
        check_keys(settings, BOUNDARY_KEYS, f"boundaries.{name}")
        binding = settings.get("require_certificate_binding", False)
        if not isinstance(binding, bool):
            raise ValueError(f"boundaries.{name}.require_certificate_binding must be true or false")
        out[name] = Boundary(integer(settings.get("max_ttl", MAX_TTL_LIMIT), f"boundaries.{name}.max_ttl", 1,
                                  MAX_TTL_LIMIT), binding)
    return out
