"""Policy files: format validation, permits() at the moment of action, narrow() at mint, the index."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Forge, make_verifier

from agentauthz import reasons
from agentauthz.decision import _accel, policy, tokens
from agentauthz.decision.policy import DEV_POLICY, Narrowed, Policy, check_file
from agentauthz.errors import PolicyError

DENIED = reasons.POLICY_DENIED
RANK = tokens.SENSITIVITY_RANK
ALPHA = "spiffe://dev.local/agent/alpha"


def rule(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": "r1", "agents": ["spiffe://dev.local/agent/*"], "tool": "demo",
                            "targets": ["*"], "operations": ["read"]}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def doc(*rules: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"version": 1, **top, "rules": list(rules)}


def write(tmp_path: Path, data: Any, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def load(tmp_path: Path, *rules: dict[str, Any], **top: Any) -> Policy:
    return Policy.load(write(tmp_path, doc(*rules, **top)))


def g(target: str = "*", ops: tuple[str, ...] = ("read",), sensitivity: str = "public",
      tool: str = "demo") -> dict[str, Any]:
    return tokens.grant(tool, target, ops, sensitivity)


# -- the built-in development policy -------------------------------------------------


@pytest.fixture(scope="module")
def dev() -> Policy:
    return Policy.load(DEV_POLICY)


@pytest.mark.parametrize("agent, tool, target, op, level, expected", [
    (ALPHA, "demo", "anything", "read", "internal", None),
    (ALPHA, "demo", "a/b/c", "write", "public", None),
    # An approval-gated rule allows at Check only a token that carries an approval (test_tightening.py).
    (ALPHA, "demo", "x", "delete", "internal", reasons.APPROVAL_REQUIRED),
    (ALPHA, "demo", "x", "read", "confidential", DENIED),
    (ALPHA, "demo", "x", "admin", "public", DENIED),
    (ALPHA, "other", "x", "read", "public", DENIED),
    ("spiffe://dev.local/agent/team/beta", "demo", "x", "read", "public", None),  # deeper path
    ("spiffe://prod.local/agent/alpha", "demo", "x", "read", "public", DENIED),  # other trust domain
    ("spiffe://dev.local/agent", "demo", "x", "read", "public", DENIED),  # /agent/* needs a child
    ("spiffe://dev.local/agents/alpha", "demo", "x", "read", "public", DENIED),
    ("spiffe://dev.local/agent/../agent/alpha", "demo", "x", "read", "public", DENIED),  # not an ID
    ("spiffe://DEV.local/agent/alpha", "demo", "x", "read", "public", DENIED),
    ("spiffe://dev.local/agent/alpha/", "demo", "x", "read", "public", DENIED),
])
def test_dev_policy_permits(dev: Policy, agent: str, tool: str, target: str, op: str, level: str,
                            expected: str | None) -> None:
    assert dev.permits(agent, tool, target, op, RANK[level]) == expected


def test_dev_policy_narrow(dev: Policy) -> None:
    out = dev.narrow(ALPHA, [g("repo/*", ("read", "write", "delete", "admin"), "restricted"),
                             g("x", ("read",), tool="shell")], 3600)
    assert out == Narrowed(
        granted=[g("repo/*", ("read", "write"), "internal")],
        needs_approval=[g("repo/*", ("delete",), "internal")],
        denied=[g("repo/*", ("admin",), "restricted"), g("x", ("read",), tool="shell")],
        ttl=600,
    )
    assert dev.max_delegation_depth == 2
    assert dev.rule_count == 2


def test_dev_policy_other_trust_domain_gets_nothing(dev: Policy) -> None:
    out = dev.narrow("spiffe://evil.local/agent/alpha", [g()], 300)
    assert out.granted == [] and out.needs_approval == [] and out.denied == [g()] and out.ttl == 0


def test_check_file(tmp_path: Path) -> None:
    result = check_file(DEV_POLICY)
    assert result["ok"] is True and result["rules"] == 2 and result["file"] == str(DEV_POLICY)
    assert re.fullmatch(r"[0-9a-f]{64}", result["digest"])
    bad = write(tmp_path, doc(rule(operations=[])))
    with pytest.raises(PolicyError, match=re.escape(str(bad))):
        check_file(bad)


# -- agent matching ------------------------------------------------------------------


def test_exact_and_pattern_agents(tmp_path: Path) -> None:
    p = load(tmp_path,
             rule(id="exact", agents=["spiffe://t.test/ns/a"], tool="exact-tool"),
             rule(id="deep", agents=["spiffe://t.test/ns/*"], tool="ns-tool"),
             rule(id="domain", agents=["spiffe://t.test/*"], tool="any-tool"))
    ok = lambda agent, tool: p.permits(agent, tool, "x", "read", 0) is None  # noqa: E731
    assert ok("spiffe://t.test/ns/a", "exact-tool")
    assert not ok("spiffe://t.test/ns/a/b", "exact-tool")  # exact means exact
    assert not ok("spiffe://t.test/ns/b", "exact-tool")
    assert ok("spiffe://t.test/ns/a", "ns-tool") and ok("spiffe://t.test/ns/a/b/c", "ns-tool")
    assert not ok("spiffe://t.test/ns", "ns-tool") and not ok("spiffe://t.test/nsx/a", "ns-tool")
    assert ok("spiffe://t.test/w", "any-tool") and ok("spiffe://t.test/ns/a/b", "any-tool")
    assert not ok("spiffe://t.test", "any-tool") and not ok("spiffe://u.test/w", "any-tool")


# -- deny rules ------------------------------------------------------------------------


@pytest.fixture
def with_deny(tmp_path: Path) -> Policy:
    return load(tmp_path,
                rule(id="allow", targets=["*"], operations=["read", "write"], max_sensitivity="restricted"),
                rule(id="no-secrets", effect="deny", targets=["secrets/*"], operations=["*"]),
                rule(id="no-write-etc", effect="deny", targets=["etc"], operations=["write"]))


def test_deny_overrides_allow_in_permits(with_deny: Policy) -> None:
    assert with_deny.permits(ALPHA, "demo", "public/x", "read", 3) is None
    assert with_deny.permits(ALPHA, "demo", "secrets/x", "read", 0) == DENIED
    assert with_deny.permits(ALPHA, "demo", "secrets/", "write", 0) == DENIED
    assert with_deny.permits(ALPHA, "demo", "etc", "write", 0) == DENIED
    assert with_deny.permits(ALPHA, "demo", "etc", "read", 0) is None
    assert with_deny.permits(ALPHA, "demo", "etc/x", "write", 0) is None  # exact deny is exact


def test_deny_overrides_allow_in_narrow(with_deny: Policy) -> None:
    out = with_deny.narrow(ALPHA, [g("secrets/db*", ("read",)), g("etc", ("read", "write")),
                                   g("*", ("read",))], 300)
    # "*" only partly overlaps the deny: kept here, refused by permits() at check time.
    assert out.granted == [g("etc", ("read",)), g("*", ("read",))]
    assert out.denied == [g("secrets/db*", ("read",)), g("etc", ("write",))]


# -- narrowing ---------------------------------------------------------------------------


def test_narrow_ops_sensitivity_and_ttl(tmp_path: Path) -> None:
    p = load(tmp_path,
             rule(id="read", operations=["read"], max_sensitivity="confidential", max_ttl=60),
             rule(id="read-long", operations=["read"], max_sensitivity="internal", max_ttl=900),
             rule(id="write", operations=["write"], max_sensitivity="internal", max_ttl=120),
             defaults={"max_ttl": 300})
    out = p.narrow(ALPHA, [g("x", ("read", "write", "exec"), "restricted")], 3600)
    assert out.granted == [g("x", ("write",), "internal"), g("x", ("read",), "confidential")]
    assert out.denied == [g("x", ("exec",), "restricted")]
    assert out.ttl == 60  # the confidential read comes from the 60 s rule
    # Asking for less sensitivity lets the longer-lived rule grant it.
    assert p.narrow(ALPHA, [g("x", ("read",), "internal")], 3600) == Narrowed(
        [g("x", ("read",), "internal")], [], [], 900)
    assert p.narrow(ALPHA, [g("x", ("read",), "public")], 30).ttl == 30  # the request is lower still
    assert p.narrow(ALPHA, [g("x", ("read",), "public"), g("x", ("write",))], 3600).ttl == 120


def test_narrow_default_ttl_and_sensitivity(tmp_path: Path) -> None:
    p = load(tmp_path, rule(), defaults={"max_ttl": 45, "max_sensitivity": "internal"})
    assert p.narrow(ALPHA, [g("x", ("read",), "restricted")], 3600) == Narrowed(
        [g("x", ("read",), "internal")], [], [], 45)
    assert load(tmp_path, rule()).narrow(ALPHA, [g("x", ("read",), "internal")], 3600).granted == [
        g("x", ("read",), "public")]


@pytest.mark.parametrize("allowed, requested, covered", [
    ("*", "*", True),
    ("*", "repo/a", True),
    ("repo/*", "*", False),
    ("repo/*", "repo/*", True),
    ("repo/*", "repo/a*", True),
    ("repo/*", "repo/a", True),
    ("repo/*", "repo*", False),
    ("repo/*", "rep", False),
    ("repo/a*", "repo/*", False),
    ("repo/a", "repo/a", True),
    ("repo/a", "repo/a*", False),
    ("repo/a", "repo/ab", False),
])
def test_narrow_target_subset(tmp_path: Path, allowed: str, requested: str, covered: bool) -> None:
    p = load(tmp_path, rule(targets=[allowed]))
    out = p.narrow(ALPHA, [g(requested)], 300)
    assert (out.granted == [g(requested)]) is covered
    assert (out.denied == [g(requested)]) is not covered


def test_narrow_approval_split(tmp_path: Path) -> None:
    p = load(tmp_path,
             rule(id="read", operations=["read"], max_sensitivity="internal", max_ttl=600),
             rule(id="read-more", operations=["read"], max_sensitivity="restricted", approval="required",
                  max_ttl=60))
    out = p.narrow(ALPHA, [g("x", ("read",), "restricted")], 3600)
    # Without approval the agent holds internal; with it, restricted as well.
    assert out == Narrowed([g("x", ("read",), "internal")], [g("x", ("read",), "restricted")], [], 600)
    assert p.narrow(ALPHA, [g("x", ("read",), "internal")], 3600).needs_approval == []
    # At Check, the gated rule allows only a token that carries the approval.
    assert p.permits(ALPHA, "demo", "x", "read", RANK["restricted"]) == reasons.APPROVAL_REQUIRED
    assert p.permits(ALPHA, "demo", "x", "read", RANK["restricted"], approved=True) is None
    assert p.permits(ALPHA, "demo", "x", "read", RANK["internal"]) is None


@pytest.mark.parametrize("bad", [
    {"tool": "demo", "target": "a*b", "ops": ["read"], "sensitivity": "public"},
    {"tool": "demo", "target": "x", "ops": [], "sensitivity": "public"},
    {"tool": "demo", "target": "x", "ops": "read", "sensitivity": "public"},
    {"tool": "demo", "target": "x", "ops": ["*"], "sensitivity": "public"},
    {"tool": "demo", "target": "x", "ops": ["read"], "sensitivity": "secret"},
    {"tool": "demo", "target": "x", "ops": ["read"], "sensitivity": "public", "constraints": {}},
    {"tool": "", "target": "x", "ops": ["read"]},
    "demo:x:read",
])
def test_narrow_denies_malformed_requests_whole(dev: Policy, bad: Any) -> None:
    out = dev.narrow(ALPHA, [bad, g()], 300)
    assert out.granted == [g()] and len(out.denied) == 1
    shaped = out.denied[0]  # still grant-shaped, so the API can report it
    assert set(shaped) == {"tool", "target", "ops", "sensitivity"}
    assert all(isinstance(v, str) for v in (shaped["tool"], shaped["target"], shaped["sensitivity"]))
    assert all(isinstance(op, str) for op in shaped["ops"])


# -- bad files ---------------------------------------------------------------------------


BAD_AGENTS = [
    ("spiffe://dev.local/a*b", "'*' is allowed only as the whole last path segment"),
    ("spiffe://dev.local/*/x", "'*' is allowed only as the whole last path segment"),
    ("spiffe://*/agent", "'*' is allowed only as the whole last path segment"),
    ("http://x", "scheme must be exactly 'spiffe'"),
    ("SPIFFE://dev.local/x", "scheme must be exactly 'spiffe'"),
    ("spiffe://Dev.Local/agent/*", "must be lowercase"),
    ("spiffe://dev.local/agent%2Fx", "percent-encoding"),
    ("spiffe://dev.local/agent/../x", "dot segment"),
    ("spiffe://dev.local/./x", "dot segment"),
    ("spiffe://dev.local/agent//x", "empty segment"),
    ("spiffe://dev.local/agent/", "must not end with '/'"),
    ("spiffe://dev.local", "must have a path"),
    ("spiffe://dev.local:8443/x", "must not contain a port"),
    ("spiffe://me@dev.local/x", "must not contain userinfo"),
    ("spiffe://dev.local/x?y=1", "query"),
    ("spiffe://dev.local/x#f", "fragment"),
    ("spiffe://dev.local/a b", "character outside"),
]


@pytest.mark.parametrize("agent, problem", BAD_AGENTS)
def test_bad_agent_patterns_refused(tmp_path: Path, agent: str, problem: str) -> None:
    path = write(tmp_path, doc(rule(id="ok"), rule(id="bad-agent", agents=["spiffe://dev.local/x", agent])))
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    assert info.value.file == str(path) and info.value.rule == "bad-agent"
    assert f"{path}:rule bad-agent: agents[1] {agent!r}" in str(info.value)
    assert problem in str(info.value)


BAD_FILES = [
    ("yaml syntax", "version: 1\nrules: [\n  {id: x\n", None, "YAML error at line"),
    ("duplicate yaml key", "version: 1\nrules:\n  - id: r1\n    operations: [read]\n    operations: [x]\n",
     None, "duplicate key 'operations'"),
    ("not a mapping", "- a\n- b\n", None, "the top level must be a mapping"),
    ("empty file", "", None, "the top level must be a mapping"),
    ("unknown top key", doc() | {"rule": []}, None, "unknown key(s) in the top level: rule"),
    ("unknown defaults key", doc(defaults={"max_tll": 3}), None, "unknown key(s) in defaults: max_tll"),
    ("unknown rule key", doc(rule(operation=["write"])), "r1", "unknown key(s) in rule: operation"),
    ("unknown sensitivity", doc(rule(max_sensitivity="secret")), "r1", "max_sensitivity must be one of"),
    ("middle star target", doc(rule(targets=["repo/*/x"])), "r1", "targets[0] 'repo/*/x' may have '*' only"),
    ("empty target", doc(rule(targets=[""])), "r1", "targets[0] '' must be a non-empty string"),
    ("duplicate rule id", doc(rule(id="a"), rule(id="b"), rule(id="a")), "a",
     "duplicate rule id (also rule #1)"),
    ("empty operations", doc(rule(operations=[])), "r1", "operations must be a non-empty list"),
    ("star mixed in operations", doc(rule(operations=["*", "read"])), "r1", "must stand alone"),
    ("yaml boolean operation", "version: 1\nrules:\n  - {id: r1, agents: ['spiffe://a/b'], tool: t, "
     "targets: ['*'], operations: [read, no]}\n", "r1", "operations[1] must be a string, not False"),
    ("repeated operation", doc(rule(operations=["read", "read"])), "r1", "'read' is listed twice"),
    ("wrong version", doc() | {"version": 2}, None, "version must be 1, not 2"),
    ("string version", doc() | {"version": "1"}, None, "version must be 1, not '1'"),
    ("missing version", {"rules": []}, None, "version must be 1, not None"),
    ("missing rules", {"version": 1}, None, "rules must be a list"),
    ("negative ttl", doc(rule(max_ttl=-5)), "r1", "max_ttl must be an integer from 1 to 86400, not -5"),
    ("boolean ttl", doc(rule(max_ttl=True)), "r1", "max_ttl must be an integer"),
    ("negative default ttl", doc(defaults={"max_ttl": -1}), None, "defaults.max_ttl must be an integer"),
    ("delegation too deep", doc(defaults={"max_delegation_depth": 99}), None,
     "defaults.max_delegation_depth must be an integer from 0 to 8, not 99"),
    ("deny with allow-only key", doc(rule(effect="deny", max_ttl=5)), "r1",
     "max_ttl: only meaningful on allow rules"),
    ("bad effect", doc(rule(effect="permit")), "r1", "effect must be one of 'allow', 'deny', not 'permit'"),
    ("bad approval", doc(rule(approval=True)), "r1", "approval must be one of 'required', 'none', not True"),
    ("missing key", doc(rule(tool=None)), "r1", "missing required key(s): tool"),
    ("star tool", doc(rule(tool="*")), "r1", "tool must be a name"),
    ("rule not a mapping", doc("read everything"), "#1", "rule must be a mapping"),
    ("agents not a list", doc(rule(agents="spiffe://a/b")), "r1", "agents must be a non-empty list"),
]


@pytest.mark.parametrize("data, rule_ref, problem", [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_bad_files_refused(tmp_path: Path, data: Any, rule_ref: str | None, problem: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    message = str(info.value)
    assert info.value.file == str(path) and info.value.rule == rule_ref
    assert message.startswith(f"{path}:rule {rule_ref}: " if rule_ref else f"{path}: ")
    assert problem in message
    assert info.value.reason == "policy_invalid"


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy file"):
        Policy.load(tmp_path / "missing.yaml")
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"version: 1\nrules: []\n# caf\xe9\n")
    with pytest.raises(PolicyError, match="not UTF-8"):
        Policy.load(path)


def test_failed_load_leaves_previous_policy_usable(tmp_path: Path) -> None:
    path = write(tmp_path, doc(rule()))
    good = Policy.load(path)
    assert good.permits(ALPHA, "demo", "x", "read", 0) is None
    path.write_text(yaml.safe_dump(doc(rule(operations=["read", "write"], targets=["a*b"]))))
    with pytest.raises(PolicyError):
        Policy.load(path)
    assert good.permits(ALPHA, "demo", "x", "read", 0) is None
    assert good.permits(ALPHA, "demo", "x", "write", 0) == DENIED
    with pytest.raises(AttributeError):
        good.max_delegation_depth = 8  # type: ignore[misc]
    with pytest.raises(AttributeError):
        good.digest = "x"  # type: ignore[misc]


def test_digest_is_sha256_of_file_bytes(tmp_path: Path) -> None:
    import hashlib
    path = write(tmp_path, doc(rule()))
    assert Policy.load(path).digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert Policy.from_text(path.read_text()).digest == Policy.load(path).digest


def test_empty_rules_deny_everything() -> None:
    p = Policy.from_text("version: 1\nrules: []\n")
    assert p.rule_count == 0 and p.max_delegation_depth == 0
    assert p.permits(ALPHA, "demo", "x", "read", 0) == DENIED


# -- index and cache ---------------------------------------------------------------------


class CountingDict(dict):
    """A dict that counts lookups, to show how many buckets a lookup probes."""

    probes = 0

    def get(self, key: Any, default: Any = None) -> Any:
        CountingDict.probes += 1
        return super().get(key, default)


@pytest.fixture(scope="module")
def big() -> Policy:
    rules = [rule(id=f"r{i}", agents=[f"spiffe://big.test/agent/a{i}"], operations=["read"])
             for i in range(100_000)]
    rules.append(rule(id="writers", agents=["spiffe://big.test/agent/a7/*"], operations=["write"]))
    rules.append(rule(id="deny-a9", effect="deny", agents=["spiffe://big.test/agent/a9"], targets=["x"]))
    return Policy.from_data(doc(*rules), source="big")


def test_index_with_100k_rules_probes_a_bounded_number_of_buckets(big: Policy) -> None:
    assert big.rule_count == 100_002
    assert len(big._exact) == 100_000 and len(big._patterns) == 1  # a9 has two rules in one bucket
    object.__setattr__(big, "_exact", CountingDict(big._exact))
    object.__setattr__(big, "_patterns", CountingDict(big._patterns))
    object.__setattr__(big, "_views", {})
    CountingDict.probes = 0
    agent = "spiffe://big.test/agent/a7"
    assert big.permits(agent, "demo", "y", "read", 0) is None
    assert big.permits(agent, "demo", "y", "write", 0) == DENIED
    # One exact probe plus one per path depth ("spiffe://big.test/", ".../agent/").
    assert CountingDict.probes == 3
    deep = "spiffe://big.test/agent/a7/sub/worker"
    assert big.permits(deep, "demo", "y", "write", 0) is None
    assert big.permits(deep, "demo", "y", "read", 0) == DENIED
    assert CountingDict.probes == 3 + 5
    assert big.permits("spiffe://big.test/agent/a9", "demo", "x", "read", 0) == DENIED
    assert big.permits("spiffe://big.test/agent/a9", "demo", "y", "read", 0) is None
    assert big.permits("spiffe://big.test/agent/a100000", "demo", "y", "read", 0) == DENIED


def test_per_agent_cache_is_bounded(tmp_path: Path) -> None:
    p = Policy.load(write(tmp_path, doc(rule())), cache_size=3)
    agents = [f"spiffe://dev.local/agent/a{i}" for i in range(10)] + ["spiffe://x.local/agent/a"]
    for agent in agents * 2:
        assert p.permits(agent, "demo", "x", "read", 0) == (DENIED if "x.local" in agent else None)
        assert len(p._views) <= 3
    uncached = Policy.load(write(tmp_path, doc(rule())), cache_size=0)
    assert uncached.permits(ALPHA, "demo", "x", "read", 0) is None and uncached._views == {}


def test_overlapping_agent_patterns_merge_once(tmp_path: Path) -> None:
    p = load(tmp_path, rule(agents=["spiffe://dev.local/agent/alpha", "spiffe://dev.local/agent/*",
                                    "spiffe://dev.local/*"]))
    denies, allows = p._view(ALPHA)["demo"]
    assert denies == () and [r.id for r in allows] == ["r1"]


def test_cache_under_concurrent_lookups(tmp_path: Path) -> None:
    p = Policy.load(write(tmp_path, doc(rule())), cache_size=4)
    agents = [f"spiffe://dev.local/agent/a{i}" for i in range(64)]
    failures: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(20):
                for agent in agents:
                    assert p.permits(agent, "demo", "x", "read", 0) is None
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            failures.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [] and len(p._views) <= 4


def test_prefixes_one_per_depth() -> None:
    assert policy._prefixes("spiffe://t/a/b/c") == ["spiffe://t/", "spiffe://t/a/", "spiffe://t/a/b/"]


def test_verifier_consults_the_policy(dev: Policy) -> None:
    forge = Forge()
    verifier = make_verifier(_accel.ACTIVE, forge)
    verifier.set_policy(dev)
    grants = [tokens.grant("demo", "*", ["read", "admin"], "internal")]
    ok = forge.token(grants=grants)
    assert verifier.decide(ok, "demo", "x", "read", "internal", forge.now)[0] == reasons.ALLOW
    assert verifier.decide(ok, "demo", "x", "admin", "public", forge.now)[0] == DENIED
    stranger = forge.token(sub="spiffe://other.local/agent/alpha", grants=grants)
    assert verifier.decide(stranger, "demo", "x", "read", "public", forge.now)[0] == DENIED


# -- property: the index agrees with a scan of every rule --------------------------------

AGENT_IDS = ["spiffe://a.test/agent/x", "spiffe://a.test/agent/x/y", "spiffe://a.test/agent",
             "spiffe://a.test/other", "spiffe://b.test/agent/x", "spiffe://a.test/agentx/y"]
AGENT_PATTERNS = AGENT_IDS + ["spiffe://a.test/*", "spiffe://a.test/agent/*", "spiffe://a.test/agent/x/*",
                              "spiffe://b.test/*"]
RULE_TARGETS = ["*", "x*", "x/1", "x/1*", "y", "y*"]
ASKED_TARGETS = ["x", "x/1", "x/10", "x/2", "y", "yy", "z", ""]
OPS = ["read", "write", "delete"]
LEVELS = list(tokens.SENSITIVITY_LEVELS)

rules_st = st.lists(st.fixed_dictionaries(
    {"effect": st.sampled_from(["allow", "allow", "deny"]),
     "agents": st.lists(st.sampled_from(AGENT_PATTERNS), min_size=1, max_size=3, unique=True),
     "tool": st.sampled_from(["t1", "t2"]),
     "targets": st.lists(st.sampled_from(RULE_TARGETS), min_size=1, max_size=3, unique=True),
     "operations": st.one_of(st.just(["*"]),
                             st.lists(st.sampled_from(OPS), min_size=1, max_size=3, unique=True)),
     "level": st.sampled_from(LEVELS + [None]),
     "approval": st.sampled_from(["none", "required"])}), max_size=8)


def build(raw_rules: list[dict[str, Any]]) -> dict[str, Any]:
    rules = []
    for i, r in enumerate(raw_rules):
        out = {"id": f"r{i}", **{k: v for k, v in r.items() if k not in ("level", "approval")}}
        if r["effect"] == "allow":
            out["approval"] = r["approval"]
            if r["level"]:
                out["max_sensitivity"] = r["level"]
        rules.append(out)
    return {"version": 1, "defaults": {"max_sensitivity": "internal"}, "rules": rules}


def brute(data: dict[str, Any], agent: str, tool: str, target: str, op: str, level: int,
          approved: bool = True) -> bool:
    """Scan every rule, matching with plain string comparisons; True when allowed (``approved``: under
    a human's approval, which approval-gated rules need)."""
    def agent_ok(pattern: str) -> bool:
        if pattern.endswith("/*"):
            return agent.startswith(pattern[:-1]) and len(agent) > len(pattern) - 1
        return agent == pattern

    def target_ok(pattern: str) -> bool:
        return target.startswith(pattern[:-1]) if pattern.endswith("*") else target == pattern

    def hits(r: dict[str, Any]) -> bool:
        return (r["tool"] == tool and any(map(agent_ok, r["agents"])) and any(map(target_ok, r["targets"]))
                and (r["operations"] == ["*"] or op in r["operations"]))

    rules = data["rules"]
    if any(r["effect"] == "deny" and hits(r) for r in rules):
        return False
    default = data["defaults"]["max_sensitivity"]
    return any(r["effect"] == "allow" and hits(r) and level <= RANK[r.get("max_sensitivity", default)]
               and (approved or r.get("approval") != "required") for r in rules)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules_st, st.lists(st.tuples(st.sampled_from(AGENT_IDS), st.sampled_from(["t1", "t2", "t3"]),
                                    st.sampled_from(ASKED_TARGETS), st.sampled_from(OPS),
                                    st.integers(0, 3)), min_size=1, max_size=20))
def test_permits_agrees_with_brute_force(raw_rules: list[dict[str, Any]], asks: list[tuple]) -> None:
    data = build(raw_rules)
    p = Policy.from_text(yaml.safe_dump(data))
    for agent, tool, target, op, level in asks:
        for approved in (False, True):
            allowed = p.permits(agent, tool, target, op, level, approved=approved) is None
            assert allowed == brute(data, agent, tool, target, op, level, approved), \
                (agent, tool, target, op, level, approved)


@settings(max_examples=200, deadline=None)
@given(rules_st, st.sampled_from(AGENT_IDS), st.sampled_from(["t1", "t2"]),
       st.sampled_from(RULE_TARGETS + ASKED_TARGETS[:-1]), st.sampled_from(OPS), st.sampled_from(LEVELS))
def test_narrow_agrees_with_permits(raw_rules: list[dict[str, Any]], agent: str, tool: str, target: str,
                                    op: str, level: str) -> None:
    data = build(raw_rules)
    p = Policy.from_data(data)
    out = p.narrow(agent, [tokens.grant(tool, target, [op], level)], 300)
    held = out.granted + out.needs_approval
    for got in held:  # never wider than asked
        assert got["tool"] == tool and got["target"] == target and got["ops"] == [op]
        assert RANK[got["sensitivity"]] <= RANK[level]
    if not target.endswith("*"):
        # For an exact target, mint-time and check-time answers are the same question.
        full = any(RANK[x["sensitivity"]] == RANK[level] for x in held)
        assert full == brute(data, agent, tool, target, op, RANK[level])
        for x in held:
            assert p.permits(agent, tool, target, op, RANK[x["sensitivity"]], approved=True) is None
    else:
        # A pattern grant: every concrete target under it passes at check time, unless a
        # deny rule overlaps part of it (which narrow() deliberately leaves to permits()).
        for x in held:
            for concrete in ASKED_TARGETS:
                if concrete.startswith(target[:-1]):
                    level_ = RANK[x["sensitivity"]]
                    allowed = p.permits(agent, tool, concrete, op, level_, approved=True) is None
                    assert allowed or _denied_by_rule(data, agent, tool, concrete, op)
    assert out.ttl == (300 if held else 0)


def _denied_by_rule(data: dict[str, Any], agent: str, tool: str, target: str, op: str) -> bool:
    """Whether an explicit deny rule hits this request (brute force with allows removed)."""
    only_allow_all = {"version": 1, "defaults": data["defaults"], "rules": [
        *(r for r in data["rules"] if r["effect"] == "deny"),
        {"effect": "allow", "agents": [agent], "tool": tool, "targets": ["*"], "operations": ["*"],
         "max_sensitivity": "restricted"}]}
    return not brute(only_allow_all, agent, tool, target, op, 0)


def test_request_defaults_parse_and_refuse_bad_values() -> None:
    from agentauthz.decision.policy import DEFAULT_REQUESTS
    assert Policy.load(DEV_POLICY).requests == DEFAULT_REQUESTS
    custom = Policy.from_text("version: 1\nrules: []\nrequests: {operations: {GET: fetch}, "
                              "tool_from_path: false, sensitivity: internal}\n")
    assert (dict(custom.requests.operations), custom.requests.tool_from_path,
            custom.requests.sensitivity) == ({"GET": "fetch"}, False, "internal")
    for bad, why in (("{operations: {get: read}}", "upper-case"), ("{tool_from_path: 1}", "true or false"),
                     ("{sensitivity: secret}", "sensitivity"), ("{method: GET}", "unknown")):
        with pytest.raises(PolicyError) as info:
            Policy.from_text(f"version: 1\nrules: []\nrequests: {bad}\n")
        assert why in str(info.value)
