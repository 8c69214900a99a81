"""Delegation's rules without a network: grant narrowing, and approvals and depth on a real Authority."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from agentauthz import reasons
from agentauthz.authority.approvers import Human
from agentauthz.authority.core import Authority
from agentauthz.authority.delegation import fits, for_child, normalize, pattern_within, within_parent
from agentauthz.authority.outcomes import Refused
from agentauthz.config import Config
from agentauthz.decision import _accel
from agentauthz.decision.policy import Policy
from agentauthz.decision.tokens import grant

AGENT = "spiffe://dev.local/agent/"
ALPHA, BETA, CAROL = AGENT + "alpha", AGENT + "beta", AGENT + "carol"


# -- target patterns ------------------------------------------------------------------------

@pytest.mark.parametrize("child, parent, inside", [
    ("*", "*", True), ("p*", "*", True), ("p", "*", True), ("", "*", False),
    ("*", "p*", False), ("p*", "p*", True), ("pq*", "p*", True), ("p", "p*", True), ("pq", "p*", True),
    ("q", "p*", False), ("q*", "p*", False), ("p*", "pq*", False), ("p", "pq*", False),
    ("p", "p", True), ("p*", "p", False), ("pq", "p", False), ("*", "p", False), ("", "p", False),
    ("reports", "reports/*", False), ("reports/", "reports/*", True), ("reports/*", "reports/", False),
    ("a*b", "*", False), ("**", "*", False), (None, "*", False), (7, "*", False),
])
def test_pattern_within(child: Any, parent: str, inside: bool) -> None:
    assert pattern_within(child, parent) is inside


def test_pattern_within_is_exactly_containment_of_what_check_matches() -> None:
    """Over a small universe: within means every target the child matches, the parent matches too."""
    stems = ["".join(p) for n in range(3) for p in itertools.product("pq", repeat=n)]
    patterns = [s for s in stems if s] + [s + "*" for s in stems]
    targets = ["".join(p) for n in range(5) for p in itertools.product("pq", repeat=n)]
    Grant = _accel.pure().Grant
    for child, parent in itertools.product(patterns, repeat=2):
        c, p = Grant("t", child, frozenset({"op"}), 0), Grant("t", parent, frozenset({"op"}), 0)
        contained = all(p.covers("t", t, "op", 0) for t in targets if c.covers("t", t, "op", 0))
        assert pattern_within(child, parent) is contained, (child, parent)


# -- grants ---------------------------------------------------------------------------------

PARENT = grant("demo", "r*", ["read", "write"], "internal")


@pytest.mark.parametrize("child, inside", [
    (grant("demo", "r1", ["read"]), True),
    (grant("demo", "r*", ["read", "write"], "internal"), True),
    (grant("demo", "r1", ["read"], "confidential"), False),
    (grant("demo", "r1", ["delete"]), False),
    (grant("demo", "r1", ["read", "delete"]), False),
    (grant("mail", "r1", ["read"]), False),
    (grant("demo", "*", ["read"]), False),
])
def test_fits_tool_target_ops_and_sensitivity(child: dict[str, Any], inside: bool) -> None:
    assert fits(child, PARENT) is inside


@pytest.mark.parametrize("raw", [
    {"tool": "demo", "target": "r", "ops": ["read"], "surprise": 1},  # unknown key
    {"tool": "demo", "target": "r", "ops": "read"},                  # ops must be a list
    {"tool": "demo", "target": "r", "ops": []},
    {"tool": "demo", "target": "r", "ops": [""]},
    {"tool": "demo", "target": "r", "ops": ["read"], "sensitivity": "secret"},
    {"tool": "demo", "target": "r", "ops": ["read"], "sensitivity": ["public"]},
    {"tool": "", "target": "r", "ops": ["read"]},
    {"tool": "demo", "target": 3, "ops": ["read"]},
    "demo:r:read",
])
def test_malformed_child_grants_fit_nothing(raw: Any) -> None:
    assert normalize(raw) is None
    assert within_parent([raw], [grant("demo", "*", ["read"], "restricted")]) == ([], [raw])


def test_child_inherits_the_covering_parent_grants_arguments_and_budget() -> None:
    arguments = [{"name": "path", "prefix": "/srv/reports/"}]
    budget = {"max_calls": 5}
    parents = [grant("demo", "q*", ["read"]), grant("demo", "r*", ["read", "write"], "internal",
                                                   arguments=arguments, budget=budget)]
    asked = {"tool": "demo", "target": "r1", "ops": ["write", "read", "read"]}
    children, outside = within_parent([asked], parents)
    assert outside == [] and children == [grant("demo", "r1", ["read", "write"], "public",
                                                arguments=arguments, budget=budget)]
    # Naming the parent's own constraints is fine; naming others is asking for a different grant.
    same = {**asked, "arguments": arguments, "budget": budget}
    assert within_parent([same], parents)[0] == children
    assert within_parent([{**asked, "arguments": [], "budget": None}], parents)[0] == children
    for other in ({"arguments": [{"name": "path", "prefix": "/"}]}, {"budget": {"max_calls": 50}}):
        assert within_parent([{**asked, **other}], parents) == ([], [{**asked, **other}])
    # The first covering parent grant wins, constraints and all; none is dropped by a later match.
    loose_first = [grant("demo", "*", ["read"]), parents[1]]
    assert "arguments" not in within_parent([{"tool": "demo", "target": "r1", "ops": ["read"]}],
                                            loose_first)[0][0]


def test_for_child_refuses_anything_narrowed_away() -> None:
    policy = Policy.from_data({"version": 1, "rules": [
        {"id": "read", "agents": [BETA], "tool": "demo", "targets": ["*"], "operations": ["read"],
         "max_sensitivity": "internal", "max_ttl": 120},
        {"id": "delete", "agents": [BETA], "tool": "demo", "targets": ["r*"], "operations": ["delete"],
         "max_sensitivity": "internal", "approval": "required", "max_ttl": 60},
    ]})
    verdict = for_child(policy, BETA, [grant("demo", "r1", ["read", "write"], "internal"),
                                       grant("demo", "x", ["read"], "confidential"),
                                       grant("demo", "r2", ["delete"], "public")], 3600)
    assert verdict.denied == [grant("demo", "r1", ["write"], "internal"), grant("demo", "x", ["read"],
                                                                                   "confidential")]
    assert verdict.needs_approval == [grant("demo", "r2", ["delete"], "public")]
    assert verdict.ttl == 60  # the gated rule's cap counts
    ok = for_child(policy, BETA, [grant("demo", "r1", ["read"], "internal")], 3600)
    assert (ok.denied, ok.needs_approval, ok.ttl) == ([], [], 120)
    assert for_child(policy, CAROL, [grant("demo", "r1", ["read"])], 3600).denied == [
        grant("demo", "r1", ["read"])]


# -- on a real Authority: approvals and the depth limit ---------------------------------------

POLICY = {
    "version": 1,
    "defaults": {"max_sensitivity": "internal", "max_delegation_depth": 1},
    "rules": [
        {"id": "read", "agents": [AGENT + "*"], "tool": "demo", "targets": ["*"], "operations": ["read"]},
        {"id": "reports-delete", "agents": [AGENT + "*"], "tool": "demo", "targets": ["reports/*"],
         "operations": ["delete"], "approval": "required"},
        {"id": "archive-delete-alpha", "agents": [ALPHA], "tool": "demo", "targets": ["archive/*"],
         "operations": ["delete"]},
        {"id": "archive-delete", "agents": [AGENT + "*"], "tool": "demo", "targets": ["archive/*"],
         "operations": ["delete"], "approval": "required"},
    ],
}


def authority_with(tmp_path: Path, policy: dict[str, Any]) -> Authority:
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    authority = Authority(Config(state_dir=tmp_path / "state", policy_file=path, revocation_capacity=1 << 16))
    authority.start()
    return authority


@pytest.fixture
def authority(tmp_path: Path) -> Iterator[Authority]:
    a = authority_with(tmp_path, POLICY)
    yield a
    a.stop()


def refusal(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(Refused) as err:
        call(*args, **kwargs)
    return err.value.reason


def test_an_approval_reaches_the_child_only_for_what_the_human_approved(authority: Authority) -> None:
    wanted = [grant("demo", "*", ["read"]), grant("demo", "reports/*", ["delete"]),
              grant("demo", "archive/*", ["delete"])]
    pending = authority.mint(ALPHA, "cleanup", wanted).pending
    assert pending is not None and pending.grants == [grant("demo", "reports/*", ["delete"])]
    authority.decide_approval(Human("alice", "https://idp.example"), pending.id, True)
    parent = authority.mint(ALPHA, "cleanup", wanted, approval_id=pending.id)
    claim = authority.verifier.verify(parent.token, time.time()).claims["approval"]

    child = authority.delegate(ALPHA, parent.token, BETA, [grant("demo", "reports/q3", ["delete"])])
    entry = authority.verifier.verify(child.token, time.time())
    assert entry.claims["approval"] == claim and child.approval is not None
    assert authority.verifier.decide(child.token, "demo", "reports/q3", "delete", "public", time.time())[0] \
        == reasons.ALLOW
    # Alpha deletes archives without approval; for beta that needs one the human never gave.
    assert refusal(authority.delegate, ALPHA, parent.token, BETA,
                   [grant("demo", "archive/*", ["delete"])]) == reasons.APPROVAL_REQUIRED
    # A child that needs no approval does not carry one.
    plain = authority.delegate(ALPHA, parent.token, BETA, [grant("demo", "*", ["read"])])
    assert "approval" not in authority.verifier.verify(plain.token, time.time()).claims


def test_gated_grants_need_an_approval_claim_on_the_parent(authority: Authority) -> None:
    parent = authority.mint(ALPHA, "no-approval", [grant("demo", "archive/*", ["delete"])])
    assert parent.token and parent.approval is None
    assert refusal(authority.delegate, ALPHA, parent.token, BETA,
                   [grant("demo", "archive/a", ["delete"])]) == reasons.APPROVAL_REQUIRED


def test_depth_limit_comes_from_the_policy(authority: Authority, tmp_path: Path) -> None:
    root = authority.mint(ALPHA, "depth", [grant("demo", "*", ["read"])])
    child = authority.delegate(ALPHA, root.token, BETA, [grant("demo", "*", ["read"])])
    assert refusal(authority.delegate, BETA, child.token, CAROL,
                   [grant("demo", "*", ["read"])]) == reasons.DELEGATION_DEPTH
    none = authority_with(tmp_path / "none", {**POLICY, "defaults": {"max_delegation_depth": 0}})
    try:
        root = none.mint(ALPHA, "depth", [grant("demo", "*", ["read"])])
        assert refusal(none.delegate, ALPHA, root.token, BETA,
                       [grant("demo", "*", ["read"])]) == reasons.DELEGATION_DEPTH
    finally:
        none.stop()


def test_requests_are_validated_before_anything_is_issued(authority: Authority) -> None:
    root = authority.mint(ALPHA, "valid", [grant("demo", "*", ["read"])], intent="tidy the archive")
    read = [grant("demo", "*", ["read"])]
    assert refusal(authority.delegate, ALPHA, root.token, BETA, []) == reasons.REQUEST_INVALID
    # Within the parent, but more grants than the verifier accepts: refused, not issued unusable.
    assert refusal(authority.delegate, ALPHA, root.token, BETA, read * 65) == reasons.REQUEST_INVALID
    assert refusal(authority.delegate, ALPHA, root.token, BETA, read, ttl=-1) == reasons.REQUEST_INVALID
    assert refusal(authority.delegate, ALPHA, root.token, BETA, read, intent="x" * 5000) \
        == reasons.REQUEST_INVALID
    assert refusal(authority.delegate, ALPHA, root.token, AGENT + "*", read) == reasons.REQUEST_INVALID
    # The intent defaults to the parent's.
    child = authority.delegate(ALPHA, root.token, BETA, read)
    assert authority.verifier.verify(child.token, time.time()).claims["intent"] == "tidy the archive"


def test_a_parent_at_its_exp_has_nothing_left_to_delegate(tmp_path: Path) -> None:
    now = [float(int(time.time()))]
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(POLICY))
    a = Authority(Config(state_dir=tmp_path / "state", policy_file=path, revocation_capacity=1 << 16),
                  clock=lambda: now[0])
    a.start()
    try:
        root = a.mint(ALPHA, "late", [grant("demo", "*", ["read"])], ttl=10)
        now[0] += 9
        last = a.delegate(ALPHA, root.token, BETA, [grant("demo", "*", ["read"])], ttl=300)
        assert last.expires_at == root.expires_at and last.expires_at - int(now[0]) == 1
        now[0] += 1  # at exp: expired, with no leeway, parent and child alike (issue 16)
        assert a.verifier.verify_live(root.token, now[0])[0] == reasons.TOKEN_EXPIRED
        assert a.verifier.verify_live(last.token, now[0])[0] == reasons.TOKEN_EXPIRED
        assert refusal(a.delegate, ALPHA, root.token, BETA, [grant("demo", "*", ["read"])]) \
            == reasons.TOKEN_EXPIRED
    finally:
        a.stop()


def test_the_child_stays_in_its_parents_trust_boundary(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(POLICY))
    a = Authority(Config(state_dir=tmp_path / "state", policy_file=path, revocation_capacity=1 << 16,
                         audiences=("tools", "payments")))
    a.start()
    try:
        root = a.mint(ALPHA, "pay", [grant("demo", "*", ["read"])], audience="payments")
        child = a.delegate(ALPHA, root.token, BETA, [grant("demo", "*", ["read"])])
        entry = a.verifiers["payments"].verify(child.token, time.time())
        assert entry.claims["aud"] == "payments"
        assert child.key_id in a.keyrings["payments"].verification_keys()
        assert a.verifiers["tools"].verify_live(child.token, time.time())[0] == reasons.TOKEN_KEY_UNKNOWN
    finally:
        a.stop()
