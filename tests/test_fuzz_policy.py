"""Structure-aware fuzzing of the policy loader, seeded from tests/corpus/policies/.

Documents are generated as data (every key, valid and hostile values, unknown keys) and written out as
block YAML, flow YAML or JSON; the corpus policies are mutated line by line and spliced with hostile
YAML (tags, anchors, recursive aliases, merge keys, documents, tabs, odd scalars). ``Policy.from_text``
must answer each with a Policy or a PolicyError that names the source, never another exception. A
policy that loads is then asked about requests built from its own rules and their near misses: it
allows exactly what a brute-force reading of its allow and deny rules allows, and ``narrow`` never
grants an operation, target, sensitivity or TTL that no allow rule names.
"""

from __future__ import annotations

import copy
import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import event, given, settings
from hypothesis import strategies as st

from agentauthz.decision import tokens
from agentauthz.decision.constraints import Constrained
from agentauthz.decision.policy import Policy, spiffe_problem
from agentauthz.errors import PolicyError

CORPUS = Path(__file__).resolve().parent / "corpus" / "policies"
GOOD = sorted(CORPUS.glob("ok-*.yaml"))
BAD = sorted(CORPUS.glob("bad-*.yaml"))
RANK = tokens.SENSITIVITY_RANK
LEVELS = tokens.SENSITIVITY_LEVELS
SOURCE = "fuzzed.yaml"


def load(text: str) -> Policy | None:
    """The policy, or None when refused; anything but PolicyError fails the test."""
    try:
        return Policy.from_text(text, SOURCE)
    except PolicyError as exc:
        assert str(exc).startswith(SOURCE + ":") and str(exc) != SOURCE + ":", str(exc)
        event("refused")
        return None


def parsed(text: str) -> Any:
    """The document as the policy's own YAML parser (libyaml when built) reads it: pure PyYAML differs."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 - safe


# -- the brute-force reading of the README's Policy section ------------------------------------------


def _agent_matches(pattern: str, agent: str) -> bool:
    if pattern.endswith("/*"):  # one or more further path segments
        return agent.startswith(pattern[:-1]) and len(agent) > len(pattern) - 1
    return agent == pattern


def _target_matches(pattern: str, target: str) -> bool:
    return target.startswith(pattern[:-1]) if pattern.endswith("*") else target == pattern


def _inside(asked: str, pattern: str) -> bool:
    """Whether every target ``asked`` (itself a pattern) matches also matches ``pattern``."""
    return asked.startswith(pattern[:-1]) if pattern.endswith("*") else asked == pattern


def _has_op(rule: dict[str, Any], op: str) -> bool:
    return rule["operations"] == ["*"] or op in rule["operations"]


def _rules(data: dict[str, Any], effect: str, agent: str, tool: str) -> list[dict[str, Any]]:
    return [r for r in data["rules"] if r.get("effect", "allow") == effect and r["tool"] == tool
            and any(_agent_matches(p, agent) for p in r["agents"])]


def _level(data: dict[str, Any], rule: dict[str, Any]) -> int:
    return RANK[rule.get("max_sensitivity", (data.get("defaults") or {}).get("max_sensitivity", "public"))]


def _ttl(data: dict[str, Any], rule: dict[str, Any]) -> int:
    return int(rule.get("max_ttl", (data.get("defaults") or {}).get("max_ttl", 300)))


def brute_permits(data: dict[str, Any], agent: str, tool: str, target: str, op: str, level: int,
                  approved: bool = True) -> bool:
    """Allowed (perhaps only under the rule's constraints); ``approved``: the token carries an approval."""
    if any(_has_op(r, op) and any(_target_matches(t, target) for t in r["targets"])
           for r in _rules(data, "deny", agent, tool)):
        return False
    allows = _rules(data, "allow", agent, tool)
    return any(_has_op(r, op) and level <= _level(data, r) and (approved or r.get("approval") != "required")
               and any(_target_matches(t, target) for t in r["targets"]) for r in allows)


def probes(data: dict[str, Any], rng: random.Random) -> list[tuple[str, str, str, str, int]]:
    """Requests built from the policy's own rules and their near misses (a sample of them)."""
    rules = data["rules"]
    agents = {"spiffe://dev.local/agent/alpha", "spiffe://other.example/x", "spiffe://dev.local"}
    tools, targets, ops = {"demo", "other"}, {"", "x", "reports/q3"}, {"read", "write", "*"}
    for r in rules:
        for p in r["agents"]:
            agents.update([p, p[:-1] + "x", p[:-1] + "x/y", p[:-2]] if p.endswith("/*") else [p, p + "/x"])
        tools.add(r["tool"])
        for t in r["targets"]:
            near = [t[:-1], t[:-1] + "q", t[:-1] + "*"] if t.endswith("*") else [t + "x", t + "*"]
            targets.update([t, *near])
        ops.update(r["operations"])
    space = list(itertools.product(sorted(agents), sorted(tools), sorted(targets), sorted(ops), range(4)))
    return rng.sample(space, min(len(space), 600))


def assert_never_wider(policy: Policy, data: dict[str, Any], rng: random.Random) -> None:
    """``permits`` is the brute-force answer; ``narrow`` grants only what some allow rule names."""
    for agent, tool, target, op, level in probes(data, rng):
        if "*" not in target[:-1]:
            concrete = target.rstrip("*") if target.endswith("*") else target
            for approved in (True, False):
                answer = policy.permits(agent, tool, concrete, op, level, approved=approved)
                allowed = answer is None or answer.__class__ is Constrained  # Constrained: under its rules'
                if allowed:
                    assert spiffe_problem(agent) is None, agent
                expected = spiffe_problem(agent) is None and brute_permits(
                    data, agent, tool, concrete, op, level, approved)
                assert allowed == expected, (agent, tool, concrete, op, level, approved)
        asked = tokens.grant(tool, target or "x", [op], LEVELS[level])
        narrowed = policy.narrow(agent, [asked], 300)
        assert narrowed.ttl <= 300
        held = narrowed.granted + narrowed.needs_approval
        for g in held:
            assert g["tool"] == tool and g["target"] == asked["target"] and set(g["ops"]) <= {op}
            assert RANK[g["sensitivity"]] <= level
            for one in g["ops"]:
                givers = [r for r in _rules(data, "allow", agent, tool) if _has_op(r, one)
                          and RANK[g["sensitivity"]] <= _level(data, r)
                          and any(_inside(g["target"], t) for t in r["targets"])]
                assert givers, ("granted without an allow rule", agent, g)
                assert not any(_has_op(r, one) and any(_inside(g["target"], t) for t in r["targets"])
                               for r in _rules(data, "deny", agent, tool)), ("granted under a deny rule", g)
                assert narrowed.ttl <= max(_ttl(data, r) for r in givers)


# -- the corpus -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_fuzz_policy_corpus_loads(path: Path) -> None:
    policy = Policy.load(path)
    data = parsed(path.read_text(encoding="utf-8"))
    assert policy.rule_count == len(data["rules"])
    assert_never_wider(policy, data, random.Random(path.name))


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_fuzz_policy_corpus_is_refused_naming_the_file(path: Path) -> None:
    with pytest.raises(PolicyError) as refused:
        Policy.load(path)
    message = str(refused.value)
    assert message.startswith(f"{path}:") and len(message) > len(str(path)) + 8, message


# -- generated documents ----------------------------------------------------------------------------------

HOSTILE = st.sampled_from([
    None, True, False, 0, -1, 1, 86400, 86401, 2**63, 1.5, float("nan"), float("inf"), "", " ", "*", "**",
    "a*b", "\x00", "é", "spiffe://", "1", "yes", [], {}, [None], {"": ""}, ["*", "read"], [[]],
]).map(copy.deepcopy)
AGENT_PATTERNS = st.sampled_from([
    "spiffe://dev.local/agent/*", "spiffe://dev.local/agent/alpha", "spiffe://dev.local/*",
    "spiffe://other.example/ns/x/*", "spiffe://dev.local/agent/alpha/*", "spiffe://dev.local/agent/*/x",
    "spiffe://*", "*", "spiffe://dev.local/agent/", "SPIFFE://dev.local/a", "spiffe://dev.local/agent/a*", "",
    "spiffe://dev.local/agent/../b", "spiffe://dev.local:443/a", "spiffe://dev.local/a%20b", "spiffe://dev.local",
])
NAMES = st.sampled_from(["demo", "files", "read_file", "mcp", "a.b:c/d-e_f", "", "a b", "dé", "*"])
TARGETS = st.sampled_from(["*", "repo/*", "repo/app", "repo/lib*", "files", "a*b", "", "**", "x"])
OPERATIONS = st.sampled_from(["read", "write", "delete", "call", "*", "READ", "re ad", "", "tools/list"])


def some(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly ``strategy``'s valid values, sometimes a hostile one."""
    return st.one_of(strategy, strategy, strategy, strategy, strategy, strategy, strategy, HOSTILE)


def lists_of(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return some(st.lists(strategy, min_size=1, max_size=3))


RULE = st.fixed_dictionaries(
    {"id": some(st.sampled_from(["r1", "r2", "r3", "read-all", "x.y:z"])), "agents": lists_of(AGENT_PATTERNS),
     "tool": some(NAMES), "targets": lists_of(TARGETS), "operations": lists_of(OPERATIONS)},
    optional={
        "effect": some(st.sampled_from(["allow", "deny", "Allow", ""])),
        "max_sensitivity": some(st.sampled_from([*LEVELS, "secret"])),
        "max_ttl": some(st.sampled_from([1, 60, 300, 86400, 0, 86401])),
        "approval": some(st.sampled_from(["required", "none", "yes"])),
        "description": some(st.text(max_size=10)),
        "arguments": some(st.just([{"name": "path", "prefix": "/srv/reports", "required": True}])),
        "budget": some(st.sampled_from([{"max_calls": 5}, {"rate_per_second": 1, "burst": 2}, {"burst": 1}])),
        "targest": st.just(["*"]),
    })
DOCUMENT = st.fixed_dictionaries(
    {"version": some(st.just(1)), "rules": some(st.lists(some(RULE), max_size=5))},
    optional={
        "defaults": some(st.fixed_dictionaries({}, optional={
            "max_ttl": some(st.sampled_from([1, 300, 86400])),
            "max_sensitivity": some(st.sampled_from(LEVELS)),
            "max_delegation_depth": some(st.integers(0, 9))})),
        "requests": some(st.fixed_dictionaries({}, optional={
            "operations": some(st.just({"GET": "read", "POST": "write"})),
            "tool_from_path": some(st.booleans()), "sensitivity": some(st.sampled_from(LEVELS))})),
        "boundaries": some(st.dictionaries(st.sampled_from(["tools", "data", "a b"]), some(
            st.fixed_dictionaries({}, optional={"max_ttl": some(st.sampled_from([1, 60])),
                                                "require_certificate_binding": some(st.booleans())})),
            max_size=2)),
    })


@st.composite
def written(draw: st.DrawFn) -> str:
    """A generated document in one of the spellings an operator might use."""
    data = draw(DOCUMENT)
    if draw(st.integers(0, 9)) == 0:
        data[draw(st.sampled_from(["extra", "rule", "Rules", "version "]))] = draw(HOSTILE)
    style = draw(st.sampled_from(["block", "flow", "json", "unicode"]))
    if style == "json":
        return json.dumps(data)
    return str(yaml.safe_dump(data, default_flow_style=style == "flow", allow_unicode=style == "unicode",
                              sort_keys=draw(st.booleans())))


@settings()
@given(written(), st.randoms(use_true_random=False))
def test_fuzz_policy_generated_documents(text: str, rng: random.Random) -> None:
    policy = load(text)
    if policy is not None:
        event("loaded")
        assert_never_wider(policy, parsed(text), rng)


# -- mutated corpus texts ---------------------------------------------------------------------------------

SNIPPETS = st.sampled_from([
    "x: &a [*a]", "<<: {effect: deny}", "!!python/object/apply:os.system ['true']", "? [a, b]\n: c",
    "%YAML 1.1\n---", "---", "...", "\t- x", "'unterminated", "\"unterminated", "!!binary aGVsbG8=",
    "!!set {a, b}", "2001-13-45", "!!timestamp 2001-12-14", "&anchor", "*undefined", "{", "]", "- *a",
    "1e999", ".nan", ".inf", "0x1F", "0o17", "1_000", "~", "yes", "no", "on", "!!bool maybe", "!!int 0xZZ",
    "!!float abc", "|", ">-", "#", "- - -",
    "effect: deny", "effect: allow", "operations: ['*']", "targets: ['*']", "agents: ['spiffe://dev.local/*']",
    "max_sensitivity: restricted", "max_ttl: 86400", "approval: none", "tool: *", "id: dev-demo-read-write",
    "  - id: sneaky\n    agents: ['spiffe://dev.local/*']\n    tool: demo\n    targets: ['*']\n"
    "    operations: ['*']",
    "\ufeff", "\x85", "\u2028", "1" + "0" * 4400,
])


@st.composite
def mutated_corpus(draw: st.DrawFn) -> str:
    lines = draw(st.sampled_from(GOOD)).read_text(encoding="utf-8").split("\n")
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "indent", "dedent", "insert",
                                     "replace value", "char"]))
        if not lines:
            lines = [draw(SNIPPETS)]
        elif kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, lines[i])
        elif kind == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "indent":
            lines[i] = "  " + lines[i]
        elif kind == "dedent":
            lines[i] = lines[i][2:] if lines[i].startswith("  ") else lines[i]
        elif kind == "insert":
            indent = lines[i][:len(lines[i]) - len(lines[i].lstrip(" "))]
            lines.insert(i, indent + draw(SNIPPETS))
        elif kind == "replace value" and ":" in lines[i]:
            lines[i] = lines[i].split(":", 1)[0] + ": " + draw(SNIPPETS)
        else:
            at = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + draw(st.sampled_from(list("[]{}:,-*&!|>'\"#%@`? \t"))) + lines[i][at:]
    return "\n".join(lines)


@settings()
@given(mutated_corpus(), st.randoms(use_true_random=False))
def test_fuzz_policy_mutated_corpus(text: str, rng: random.Random) -> None:
    policy = load(text)
    if policy is not None:
        event("loaded")
        assert_never_wider(policy, parsed(text), rng)


@settings()
@given(st.text(max_size=80) | st.text(alphabet="[]{}:,-*&!|>'\"#%@`? \t\nab1.", max_size=80))
def test_fuzz_policy_arbitrary_text(text: str) -> None:
    load(text)


def test_fuzz_policy_found_values_pyyaml_cannot_construct_are_policy_errors() -> None:
    """Found by this fuzzer: scalars PyYAML parses but cannot construct raised ValueError/KeyError."""
    for text in ("version: 2001-13-45\nrules: []\n", "version: !!bool maybe\nrules: []\n",
                 "version: !!float abc\nrules: []\n", "version: 1" + "0" * 5000 + "\nrules: []\n",
                 "version: 1\nrules: []\nx: \ud800\n"):
        with pytest.raises(PolicyError) as refused:
            Policy.from_text(text, SOURCE)
        assert str(refused.value).startswith(SOURCE + ": ")
