"""Delegation end to end (DESIGN §4): a real daemon, real mTLS SVIDs, decisions through its Check listener."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
import yaml
from limits_support import Checker, check_request, tool_call
from processes import Daemon, wait_for

from agentauthz.client import AsyncClient, Client, Identity
from agentauthz.identity.devca import ensure_dev_pki, issue_svid
from agentauthz.v1 import agentauthz_pb2 as pb

AGENT = "spiffe://dev.local/agent/"
ALPHA, BETA, CAROL, DAVE, ERIN, MALLORY = (AGENT + n for n in ("alpha", "beta", "carol", "dave", "erin",
                                                                "mallory"))
HELPER = "spiffe://dev.local/helper/h1"

POLICY = {
    "version": 1,
    "defaults": {"max_ttl": 300, "max_sensitivity": "internal", "max_delegation_depth": 2},
    "rules": [
        {"id": "agents-demo", "agents": [AGENT + "*"], "tool": "demo", "targets": ["*"],
         "operations": ["read", "write"], "max_ttl": 600},
        {"id": "agents-delete-approved", "agents": [AGENT + "*"], "tool": "demo", "targets": ["*"],
         "operations": ["delete"], "approval": "required"},
        {"id": "alpha-delete", "agents": [ALPHA], "tool": "demo", "targets": ["*"], "operations": ["delete"]},
        {"id": "alpha-files", "agents": [ALPHA], "tool": "files", "targets": ["*"], "operations": ["read"]},
        {"id": "beta-no-secrets", "effect": "deny", "agents": [BETA], "tool": "demo",
         "targets": ["secrets/*"], "operations": ["*"]},
        {"id": "helper-reads-briefly", "agents": [HELPER], "tool": "demo", "targets": ["*"],
         "operations": ["read"], "max_sensitivity": "public", "max_ttl": 20},
        # The receiving agent's own constraints (issue 16 item 1): alpha holds these unconstrained.
        {"id": "alpha-ledger", "agents": [ALPHA], "tool": "ledger", "targets": ["*"], "operations": ["read"]},
        {"id": "dave-ledger-twice", "agents": [DAVE], "tool": "ledger", "targets": ["*"],
         "operations": ["read"], "budget": {"max_calls": 2}},
        {"id": "alpha-files-mcp", "agents": [ALPHA], "tool": "read_file", "targets": ["files"],
         "operations": ["call"]},
        {"id": "dave-files-mcp", "agents": [DAVE], "tool": "read_file", "targets": ["files"],
         "operations": ["call"], "arguments": [{"name": "path", "prefix": "/srv/dave"}]},
    ],
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("delegation")
    policy = work / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY))
    d = Daemon(work / "state", {"leeway": 0, "policy_file": str(policy)}).start()
    yield d
    assert d.stop() == 0


@pytest.fixture(scope="module")
def ids(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("ids")
    pki = ensure_dev_pki(daemon.state_dir)
    dirs = {}
    for agent in (ALPHA, BETA, CAROL, DAVE, ERIN, MALLORY, HELPER):
        dirs[agent] = out / agent.rsplit("/", 1)[1]
        issue_svid(pki, agent, dirs[agent])
    return dirs


@pytest.fixture(scope="module")
def agents(daemon: Daemon, ids: dict[str, Path]) -> dict[str, Client]:
    return {agent: Client(daemon.api_address, Identity.from_dir(d), check_server=daemon.check_address)
            for agent, d in ids.items()}


def claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def slot(minted: pb.MintResponse) -> int:
    return claims(minted.token)["status"]["status_list"]["idx"]


def refused(call: Callable[..., Any], *args: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call(*args)
    return err.value.code(), err.value.details()


def reason(client: Client, token: str, target: str = "reports/q3", operation: str = "read",
           sensitivity: str = "public") -> str:
    return client.check(token, "demo", target, operation, sensitivity).reason


def test_child_works_only_within_its_narrowed_grants(agents: dict[str, Client]) -> None:
    a = agents[ALPHA]
    parent = a.mint("narrow", ["demo:*:read,write:internal"], intent="weekly report")
    child = a.delegate(parent.token, BETA, ["demo:reports/*:read"], intent="read the reports")
    assert (child.agent, child.task, child.expires_at <= parent.expires_at) == (BETA, "narrow", True)
    assert [(g.tool, g.target, list(g.operations), g.sensitivity) for g in child.grants] == [
        ("demo", "reports/*", ["read"], "public")]
    c, p = claims(child.token), claims(parent.token)
    assert (c["sub"], c["task"], c["aud"], c["intent"]) == (BETA, "narrow", p["aud"], "read the reports")
    assert c["act"] == {"sub": ALPHA, "idx": slot(parent)}
    assert "cnf" in p and "cnf" not in c  # the child's certificate is unknown: bound by its sub
    decision = agents[BETA].check(child.token, "demo", "reports/q3", "read")
    assert decision.allowed and decision.headers["x-agentauthz-agent"] == BETA
    assert decision.headers["x-agentauthz-task"] == "narrow"
    assert reason(agents[BETA], child.token, operation="write") == "scope_denied"
    assert reason(agents[BETA], child.token, target="invoices/1") == "scope_denied"
    assert reason(agents[BETA], child.token, sensitivity="internal") == "sensitivity_exceeded"
    assert reason(a, parent.token, target="invoices/1", operation="write") == "allow"  # the parent is intact


@pytest.mark.parametrize("grant", [
    "demo:*:read",                      # a wider target
    "demo:report*:read",                # a wider prefix
    "demo:reports:read",                # "reports/*" does not match "reports"
    "demo:reports/*:delete",            # an operation the parent lacks
    "demo:reports/*:read,delete",       # one operation too many
    "demo:reports/*:read:confidential",  # more sensitive than the parent's internal
    "mail:reports/*:read",              # another tool
])
def test_child_cannot_exceed_the_parent(agents: dict[str, Client], grant: str) -> None:
    a = agents[ALPHA]
    parent = a.mint("exceed", ["demo:reports/*:read,write:internal", "files:docs/*:read"])
    code, details = refused(lambda: a.delegate(parent.token, BETA, ["demo:reports/q3:read", grant]))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert details.startswith("delegation_exceeds_parent:") and grant.split(":")[1] in details


def test_child_never_outlives_the_parent(agents: dict[str, Client]) -> None:
    a = agents[ALPHA]
    parent = a.mint("short", ["demo:*:read"], ttl=30)
    child = a.delegate(parent.token, BETA, ["demo:*:read"], ttl=600)
    assert child.expires_at == parent.expires_at == claims(child.token)["exp"]
    brief = a.delegate(parent.token, BETA, ["demo:*:read"], ttl=5)
    assert claims(brief.token)["exp"] - claims(brief.token)["iat"] == 5


def test_policy_must_give_the_child_agent_each_grant(agents: dict[str, Client]) -> None:
    a = agents[ALPHA]
    parent = a.mint("child-policy", ["demo:*:read,write,delete:internal", "files:*:read"])
    assert len(parent.grants) == 2 and not parent.needs_approval  # alpha needs no approval
    for to, grant, why in [
        (BETA, "files:*:read", f"delegation_policy_denied: policy does not give {BETA}: files:*:read:public"),
        (BETA, "demo:secrets/*:read", "delegation_policy_denied"),  # a deny rule for beta
        (HELPER, "demo:*:read,write", "delegation_policy_denied: policy does not give " + HELPER
         + ": demo:*:write:public"),
        (HELPER, "demo:*:read:internal", "delegation_policy_denied"),  # the helper's rule stops at public
        ("spiffe://elsewhere.example/agent/x", "demo:*:read", "delegation_policy_denied"),
        (BETA, "demo:*:delete", "approval_required"),  # the parent carries no approval for beta
    ]:
        code, details = refused(a.delegate, parent.token, to, [grant])
        assert (code, details[:len(why)]) == (grpc.StatusCode.PERMISSION_DENIED, why), (to, grant)
    for to in ("not-a-spiffe-id", ALPHA, ""):
        code, details = refused(a.delegate, parent.token, to, ["demo:*:read"])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request_invalid"), to
    helper = a.delegate(parent.token, HELPER, ["demo:*:read"])
    assert claims(helper.token)["exp"] - claims(helper.token)["iat"] == 20  # the helper's own cap
    # Policy keeps applying to the child at every Check: beta may never touch secrets.
    child = a.delegate(parent.token, BETA, ["demo:*:read"])
    assert reason(agents[BETA], child.token, target="secrets/key") == "policy_denied"
    assert reason(agents[BETA], child.token, target="notes") == "allow"


def test_a_child_keeps_its_own_agents_budget(agents: dict[str, Client]) -> None:
    # Before issue 16 the child inherited only alpha's (absent) budget and was allowed 5 of 5.
    parent = agents[ALPHA].mint("ledger-parent", ["ledger:*:read"])
    child = agents[ALPHA].delegate(parent.token, DAVE, ["ledger:*:read"])
    assert [g.budget.max_calls for g in child.grants] == [2]  # the child's grant is the intersection
    decisions = [agents[DAVE].check(child.token, "ledger", "a", "read") for _ in range(5)]
    assert [d.reason for d in decisions] == ["allow"] * 2 + ["budget_exhausted"] * 3
    # Dave's own token draws on the same count: delegation opened no second budget for dave.
    own = agents[DAVE].mint("ledger-own", ["ledger:*:read"])
    assert agents[DAVE].check(own.token, "ledger", "a", "read").reason == "budget_exhausted"


def test_a_child_keeps_its_own_agents_argument_constraints(daemon: Daemon, agents: dict[str, Client]) -> None:
    parent = agents[ALPHA].mint("files-parent", ["read_file:files:call"])
    child = agents[ALPHA].delegate(parent.token, DAVE, ["read_file:files:call"])
    assert [(c.name, c.prefix) for c in child.grants[0].arguments] == [("path", "/srv/dave")]
    check = Checker(daemon.check_address)
    try:
        def call(path: str) -> str:
            return check(check_request(child.token, tool_call("read_file", {"path": path}),
                                       {"mcp": "true", "target": "files"})).reason
        assert call("/srv/dave/notes.txt") == "allow"
        assert call("/etc/passwd") == "argument_outside_prefix"  # allowed before issue 16
        assert call("/srv/dave/../../etc/passwd") == "argument_path_unsafe"
    finally:
        check.close()


def test_depth_is_capped_by_policy(agents: dict[str, Client]) -> None:
    root = agents[ALPHA].mint("depth", ["demo:*:read"])
    child = agents[ALPHA].delegate(root.token, BETA, ["demo:*:read"])
    grandchild = agents[BETA].delegate(child.token, CAROL, ["demo:*:read"])
    assert claims(grandchild.token)["act"] == {"sub": BETA, "idx": slot(child),
                                               "act": {"sub": ALPHA, "idx": slot(root)}}
    assert reason(agents[CAROL], grandchild.token) == "allow"
    code, details = refused(lambda: agents[CAROL].delegate(grandchild.token, DAVE, ["demo:*:read"]))
    assert (code, details.split(":")[0]) == (grpc.StatusCode.PERMISSION_DENIED, "delegation_depth_exceeded")


def test_only_the_tokens_subject_may_delegate_it(agents: dict[str, Client]) -> None:
    root = agents[ALPHA].mint("stolen", ["demo:*:read"])
    child = agents[ALPHA].delegate(root.token, BETA, ["demo:*:read"])
    for thief, token in ((MALLORY, root.token), (BETA, root.token), (ALPHA, child.token),
                         (CAROL, child.token)):
        code, details = refused(agents[thief].delegate, token, CAROL, ["demo:*:read"])
        assert (code, details.split(":")[0]) == (grpc.StatusCode.PERMISSION_DENIED, "delegation_not_holder")
    for garbage, why in (("not.a.token", "token_malformed"), (root.token[:-4] + "AAAA", "token_signature")):
        code, details = refused(agents[ALPHA].delegate, garbage, BETA, ["demo:*:read"])
        assert details.startswith(why), details


@pytest.mark.parametrize("revoke, middle, expected", [
    ("root token", BETA, ("token_revoked", "delegation_revoked", "delegation_revoked")),
    ("root task", BETA, ("task_ended", "task_ended", "task_ended")),
    ("middle agent", ERIN, ("allow", "agent_revoked", "agent_revoked")),
    ("middle token", BETA, ("allow", "token_revoked", "delegation_revoked")),
])
def test_revocation_reaches_the_grandchild_at_the_next_check(
        agents: dict[str, Client], revoke: str, middle: str, expected: tuple[str, str, str]) -> None:
    task = "revoke-" + revoke.replace(" ", "-")
    a = agents[ALPHA]
    root = a.mint(task, ["demo:*:read"])
    child = a.delegate(root.token, middle, ["demo:*:read"])
    grandchild = agents[middle].delegate(child.token, CAROL, ["demo:reports/*:read"])
    tokens = (root.token, child.token, grandchild.token)
    assert [reason(a, t) for t in tokens] == ["allow"] * 3
    {"root token": lambda: a.revoke(token_id=root.token_id),
     "root task": lambda: a.end_task(task),
     "middle agent": lambda: agents[middle].revoke(agent=middle),
     # The delegator owns its child's token id, so it can revoke that one token.
     "middle token": lambda: a.revoke(token_id=child.token_id)}[revoke]()
    assert tuple(reason(a, t) for t in tokens) == expected
    # A dead parent delegates nothing; a revoked agent is banned: it delegates nothing at all.
    _, details = refused(lambda: agents[middle].delegate(child.token, DAVE, ["demo:*:read"]))
    assert details.startswith("agent_banned" if revoke == "middle agent" else expected[1]), details


def test_audit_records_the_chain(daemon: Daemon, agents: dict[str, Client]) -> None:
    root = agents[ALPHA].mint("audited", ["demo:*:read"])
    child = agents[ALPHA].delegate(root.token, BETA, ["demo:*:read"], intent="help with the report")
    grandchild = agents[BETA].delegate(child.token, CAROL, ["demo:reports/*:read"])
    refused(lambda: agents[MALLORY].delegate(grandchild.token, DAVE, ["demo:*:read"]))
    assert agents[CAROL].check(grandchild.token, "demo", "reports/a", "read").allowed

    def records() -> list[dict[str, Any]]:
        return [r for r in daemon.audit_records() if grandchild.token_id in (r.get("token_id"),
                                                                            r.get("parent_token_id"))]
    wait_for(lambda: len(records()) >= 3, 10, "audit flush")
    delegated, refusal, check = (next(r for r in records() if r["kind"] == kind and r["decision"] is d)
                                 for kind, d in (("delegate", True), ("delegate", False), ("check", True)))
    # Nearest delegator first, root last: as every check record's chain.
    assert (delegated["agent"], delegated["to"], delegated["chain"]) == (BETA, CAROL, [BETA, ALPHA])
    assert (delegated["parent_token_id"], delegated["task"]) == (child.token_id, "audited")
    assert check["chain"] == [BETA, ALPHA] and check["agent"] == CAROL
    assert (refusal["agent"], refusal["reason"]) == (MALLORY, "delegation_not_holder")
    first = next(r for r in daemon.audit_records() if r.get("token_id") == child.token_id)
    assert (first["chain"], first["intent"]) == ([ALPHA], "help with the report")
    assert not any(grandchild.token in json.dumps(r) for r in daemon.audit_records())  # ids, never tokens


def test_cli_delegate(daemon: Daemon, agents: dict[str, Client], ids: dict[str, Path]) -> None:
    parent = agents[ALPHA].mint("cli", ["demo:*:read,write"])
    common = ("delegate", "--server", daemon.api_address, "--identity", str(ids[ALPHA]),
              "--token", parent.token, "--to", BETA)
    done = daemon.cli(*common, "--grant", "demo:docs/*:read", "--ttl", "60", "--intent", "docs", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["agent"], out["task"], out["grants"]) == (BETA, "cli", [
        {"tool": "demo", "target": "docs/*", "ops": ["read"], "sensitivity": "public"}])
    assert reason(agents[BETA], out["token"], target="docs/x") == "allow"
    bad = daemon.cli(*common, "--grant", "demo:*:delete")
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("agentauthz: delegation_exceeds_parent: ")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_async_client_delegate(daemon: Daemon, agents: dict[str, Client], ids: dict[str, Path]) -> None:
    parent = agents[ALPHA].mint("async-delegate", ["demo:*:read"])

    async def scenario() -> str:
        client = AsyncClient(daemon.api_address, Identity.from_dir(ids[ALPHA]),
                             check_server=daemon.check_address)
        child = await client.delegate(parent.token, BETA, ["demo:*:read"], ttl=30)
        return (await client.check(child.token, "demo", "x", "read")).reason
    assert asyncio.run(scenario()) == "allow"
