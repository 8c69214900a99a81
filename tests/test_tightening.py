"""Tightening a rule reaches live tokens (issue 16 item 3): after a reload, a token minted before it
meets the current policy's approval gates, argument constraints and budgets at its next Check,
through a real Envoy; and both verifier twins answer the policy's constraints alike."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from limits_support import tool_call
from processes import Daemon, echo_upstream, envoy, envoy_config, free_port, request, wait_for
from support import Forge, make_verifier

from agentauthz import reasons
from agentauthz.authority.approvers import issue_dev_credential
from agentauthz.authority.budgets import BudgetTable
from agentauthz.client import ApprovalsClient, Client, Identity
from agentauthz.decision import tokens
from agentauthz.decision.constraints import Constrained, enforce
from agentauthz.decision.policy import Policy
from agentauthz.identity.devca import ensure_dev_pki, issue_svid

AGENTS = "spiffe://dev.local/agent/"
DELETE = {"id": "delete", "agents": [AGENTS + "*"], "tool": "demo", "targets": ["reports"],
          "operations": ["delete"], "max_sensitivity": "internal", "max_ttl": 600, "approval": "required"}
DEMO = {"id": "demo", "agents": [AGENTS + "*"], "tool": "demo", "targets": ["*"],
        "operations": ["read", "write"], "max_sensitivity": "internal", "max_ttl": 600}
FILES = {"id": "files", "agents": [AGENTS + "*"], "tool": "read_file", "targets": ["files"],
         "operations": ["call"], "max_sensitivity": "internal", "max_ttl": 600}


def policy_text(*changes: dict[str, Any]) -> str:
    """The test policy, each rule of ``changes`` replacing the rule of its id."""
    rules = {r["id"]: r for r in (DEMO, FILES, DELETE)}
    for change in changes:
        rules[change["id"]] = {**rules[change["id"]], **change}
    return yaml.safe_dump({"version": 1, "rules": list(rules.values())})


class Stack:
    """Daemon + Envoy (the example config) + the echo tool; a policy file the tests rewrite."""

    def __init__(self, daemon: Daemon, port: int, work: Path) -> None:
        self.daemon, self.port, self.work = daemon, port, work
        self.policy = work / "policy.yaml"

    def client(self, name: str) -> Client:
        out = self.work / name
        if not (out / "svid.pem").exists():
            issue_svid(ensure_dev_pki(self.daemon.state_dir), AGENTS + name, out)
        return Client(self.daemon.api_address, Identity.from_dir(out), check_server=self.daemon.check_address)

    def reload(self, text: str) -> None:
        """Write the policy file and SIGHUP the daemon; returns once it says it reloaded."""
        before = self.daemon.log().count("policy reloaded")
        self.policy.write_text(text)
        assert self.daemon.proc is not None
        self.daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: self.daemon.log().count("policy reloaded") > before, 10, "policy reload")

    def get(self, token: str) -> tuple[int, str]:
        status, body, _ = request(self.port, "/demo/reports", "GET", token)
        return status, body.get("error", "")

    def call(self, token: str, path: str) -> tuple[int, str]:
        """An MCP tools/call of read_file with ``path``, through Envoy's /mcp route: (status, the reason
        a denial's JSON-RPC error names)."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/mcp", data=tool_call("read_file", {"path": path}),
            method="POST", headers={"content-type": "application/json", "authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw, status = r.read(), r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        error = (json.loads(raw) if raw else {}).get("error", {})
        return status, error["data"]["reason"] if error else ""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("tightening")
    (work / "policy.yaml").write_text(policy_text())
    daemon = Daemon(work / "state", {"policy_file": str(work / "policy.yaml")}).start()
    proxy, admin = free_port(), free_port()
    try:
        with echo_upstream() as upstream:
            with envoy(envoy_config(daemon.check_port, upstream, proxy, admin), work, admin):
                yield Stack(daemon, proxy, work)
    finally:
        assert daemon.stop() == 0


def test_an_approval_gate_added_by_reload_denies_a_live_token_without_approval(stack: Stack) -> None:
    stack.reload(policy_text())
    token = stack.client("gated").mint("gate", ["demo:*:read:internal"]).token
    assert stack.get(token) == (200, "")  # allowed, and answered warm from now on
    stack.reload(policy_text({"id": "demo", "approval": "required"}))
    assert stack.get(token) == (403, reasons.APPROVAL_REQUIRED)  # allowed before issue 16
    stack.reload(policy_text())
    assert stack.get(token) == (200, "")


def test_a_humans_approval_never_stretches_to_a_grant_a_reload_gates_later(stack: Stack) -> None:
    """A token minted under a human's approval of a delete also carries an ungated read. When a reload
    gates the read, the approval does not answer for it: the human approved the delete alone."""
    stack.reload(policy_text())
    agent = stack.client("approved")
    grants = ["demo:reports:delete:internal", "demo:docs:read:internal"]
    pending = agent.mint("cleanup", grants).pending
    state = stack.daemon.state_dir
    human = ApprovalsClient(stack.daemon.approval_address, issue_dev_credential(state, "alice"),
                            (state / "pki" / "ca.pem").read_bytes())
    assert human.approve(pending.id).state == "approved"
    token = agent.mint("cleanup", grants, approval_id=pending.id).token
    read, delete = ("demo", "docs", "read", "internal"), ("demo", "reports", "delete", "internal")
    assert agent.check(token, *read).allowed and agent.check(token, *delete).allowed
    stack.reload(policy_text({"id": "demo", "approval": "required"}))
    try:
        assert agent.check(token, *read).reason == reasons.APPROVAL_REQUIRED  # allowed before
        assert agent.check(token, *delete).allowed
    finally:
        stack.reload(policy_text())


def test_a_budget_added_by_reload_binds_a_live_token(stack: Stack) -> None:
    stack.reload(policy_text())
    token = stack.client("budgeted").mint("budget", ["demo:*:read:internal"]).token
    assert [stack.get(token) for _ in range(3)] == [(200, "")] * 3  # no budget: nothing counted
    stack.reload(policy_text({"id": "demo", "budget": {"max_calls": 2}}))
    assert [stack.get(token) for _ in range(3)] == [(200, "")] * 2 + [(403, reasons.BUDGET_EXHAUSTED)]
    # The count is the agent's: a token minted now under a fresh task name has no calls left either.
    fresh = stack.client("budgeted").mint("budget-2", ["demo:*:read:internal"]).token
    assert stack.get(fresh) == (403, reasons.BUDGET_EXHAUSTED)


def test_argument_constraints_added_by_reload_bind_a_live_token(stack: Stack) -> None:
    stack.reload(policy_text())
    token = stack.client("reader").mint("files", ["read_file:files:call:internal"]).token
    assert stack.call(token, "/etc/passwd") == (200, "")
    stack.reload(policy_text({"id": "files", "arguments": [{"name": "path", "prefix": "/srv/reports"}]}))
    assert stack.call(token, "/etc/passwd") == (200, reasons.ARGUMENT_OUTSIDE_PREFIX)
    assert stack.call(token, "/srv/reports/../../etc/passwd") == (200, reasons.ARGUMENT_PATH_UNSAFE)
    assert stack.call(token, "/srv/reports/q1") == (200, "")


# -- both twins, without a daemon -------------------------------------------------------------------


RULES = """
version: 1
defaults: {max_sensitivity: internal}
rules:
  - {id: open, agents: ["spiffe://dev.local/agent/*"], tool: demo, targets: ["open*"], operations: [read]}
  - {id: gated, agents: ["spiffe://dev.local/agent/*"], tool: demo, targets: ["gated*"], operations: [read],
     approval: required}
  - {id: metered, agents: ["spiffe://dev.local/agent/*"], tool: demo, targets: ["metered*"],
     operations: [read], budget: {max_calls: 1}}
  - {id: metered-more, agents: ["spiffe://dev.local/agent/*"], tool: demo, targets: ["metered/big*"],
     operations: [read], budget: {max_calls: 3}}
  - {id: both, agents: ["spiffe://dev.local/agent/*"], tool: demo, targets: ["both*"], operations: [read],
     budget: {max_calls: 1}}
  - {id: both-free, agents: ["spiffe://dev.local/agent/*"], tool: demo, targets: ["both*"],
     operations: [read]}
  - {id: path, agents: ["spiffe://dev.local/agent/*"], tool: read_file, targets: [files],
     operations: [call], arguments: [{name: path, prefix: /srv}]}
"""
WIDE = [tokens.grant("demo", "*", ["read"], "internal"),
        tokens.grant("read_file", "files", ["call"], "internal")]


def test_decide_answers_the_policys_constraints_with_the_token(hot: Any) -> None:
    forge = Forge()
    verifier = make_verifier(hot, forge)
    verifier.set_policy(Policy.from_text(RULES))
    token = forge.token(grants=WIDE)
    assert verifier.decide(token, "demo", "open/1", "read", "internal", forge.now)[0] == reasons.ALLOW
    for _ in range(2):  # computed, then from the memo (native: its last-request fast path too)
        reason, entry = verifier.decide(token, "demo", "metered/1", "read", "internal", forge.now)
        assert reason.__class__ is Constrained and entry is not None
        assert [e.budget.max_calls for e in reason.alternatives] == [1]
    reason, _ = verifier.decide(token, "demo", "metered/big/1", "read", "internal", forge.now)
    assert sorted(e.budget.max_calls for e in reason.alternatives) == [1, 3]  # either rule may allow
    # An unconstrained rule among the matches needs nothing more: the plain, warm allow.
    assert verifier.decide(token, "demo", "both/1", "read", "internal", forge.now)[0] == reasons.ALLOW
    assert verifier.decide(token, "demo", "elsewhere", "read", "internal", forge.now) == \
        (reasons.POLICY_DENIED, None)


def test_an_approval_gate_allows_only_a_token_that_carries_an_approval(hot: Any) -> None:
    forge = Forge()
    verifier = make_verifier(hot, forge)
    verifier.set_policy(Policy.from_text(RULES))
    plain = forge.token(grants=WIDE)

    def approval(*grants: dict[str, Any]) -> dict[str, Any]:
        return {"id": "appr-1", "approver": {"sub": "human", "iss": "x"}, "grants": list(grants)}

    gated = tokens.grant("demo", "gated*", ["read"], "internal")
    approved = forge.token(grants=WIDE, approval=approval(gated))
    assert verifier.decide(plain, "demo", "gated/1", "read", "internal", forge.now) == \
        (reasons.APPROVAL_REQUIRED, None)
    assert verifier.decide(approved, "demo", "gated/1", "read", "internal", forge.now)[0] == reasons.ALLOW
    # The approval stands for what the human approved, never for the token's other grants: a rule gating
    # them (after a reload) asks a human again; so does an approval naming no grants (an older token's).
    for claim in (approval(tokens.grant("demo", "gated/2", ["read"], "internal")),
                  approval(tokens.grant("demo", "gated*", ["write"], "internal")),
                  approval(tokens.grant("demo", "gated*", ["read"], "public")),
                  approval(tokens.grant("read_file", "*", ["read"], "internal")),
                  approval(tokens.grant("demo", "g*ted*", ["read"], "internal")),
                  {"id": "appr-1", "approver": {"sub": "human", "iss": "x"}}, "yes"):
        other = forge.token(grants=WIDE, approval=claim)
        assert verifier.decide(other, "demo", "gated/1", "read", "internal", forge.now)[0] == \
            reasons.APPROVAL_REQUIRED, claim


def test_a_policy_swap_reaches_a_token_already_answered(hot: Any) -> None:
    forge = Forge()
    verifier = make_verifier(hot, forge)
    verifier.set_policy(Policy.from_text(RULES.replace("approval: required", "approval: none")))
    token = forge.token(grants=WIDE)
    assert verifier.decide(token, "demo", "gated/1", "read", "internal", forge.now)[0] == reasons.ALLOW
    verifier.set_policy(Policy.from_text(RULES))
    assert verifier.decide(token, "demo", "gated/1", "read", "internal", forge.now)[0] == \
        reasons.APPROVAL_REQUIRED


def test_enforce_applies_the_policys_arguments_and_budget(hot: Any, tmp_path: Path) -> None:
    forge = Forge()
    verifier = make_verifier(hot, forge)
    verifier.set_policy(Policy.from_text(RULES))
    table = BudgetTable.open(tmp_path / "budgets", 64)
    token = forge.token(grants=WIDE)
    terms, entry = verifier.decide(token, "read_file", "files", "call", "internal", forge.now)
    assert not entry.constrained  # the token is not; the policy is
    assert enforce(entry, "read_file", "files", "call", "internal", {"path": "/srv/a"}, table, 0.0,
                   terms)[0] == reasons.ALLOW
    assert enforce(entry, "read_file", "files", "call", "internal", {"path": "/etc/passwd"}, table, 0.0,
                   terms)[0] == reasons.ARGUMENT_OUTSIDE_PREFIX
    assert enforce(entry, "read_file", "files", "call", "internal", None, table, 0.0,
                   terms)[0] == reasons.ARGUMENTS_UNAVAILABLE
    terms, entry = verifier.decide(token, "demo", "metered/1", "read", "internal", forge.now)
    assert [enforce(entry, "demo", "metered/1", "read", "internal", None, table, 0.0, terms)[0]
            for _ in range(2)] == [reasons.ALLOW, reasons.BUDGET_EXHAUSTED]
    assert enforce(entry, "demo", "metered/1", "read", "internal", None, None, 0.0, terms)[0] == \
        reasons.BUDGET_UNAVAILABLE
    table.close()
