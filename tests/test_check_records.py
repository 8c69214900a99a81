"""A Check denied after its token verified names who tried: agent, task, token id and delegation chain,
and for an argument denial the argument and its value, redacted (a real daemon, its audit JSONL)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Iterator

import pytest
from limits_support import AGENT, Checker, agent, check_request, grant, plain, start, tool_call
from processes import Daemon, wait_for

from agentauthz import reasons
from agentauthz.audit.records import REDACTED, REDACTED_CREDENTIAL
from agentauthz.client import Decision
from agentauthz.identity.devca import ensure_dev_pki, issue_svid

BETA = "spiffe://dev.local/agent/beta"


class Stack:
    def __init__(self, daemon: Daemon, work: Path) -> None:
        self.daemon, self.work = daemon, work
        self.alpha = agent(daemon, work)
        self.checker = Checker(daemon.check_address)

    def record(self, decision: Decision) -> dict[str, Any]:
        return record_of(self.daemon, decision)


def record_of(daemon: Daemon, decision: Decision) -> dict[str, Any]:
    """The audit record of ``decision``, once the writer has it on disk."""
    found: dict[str, Any] = {}

    def written() -> bool:
        mine = (r for r in daemon.audit_records() if r.get("decision_id") == decision.decision_id)
        found.update(next(mine, {}))
        return bool(found)
    wait_for(written, 10, f"the record of {decision.decision_id}")
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("records")
    daemon = start(work)
    s = Stack(daemon, work)
    try:
        yield s
    finally:
        s.checker.close()
        daemon.stop()


def names_the_token(record: dict[str, Any], minted: Any, agent: str = AGENT, chain: list[str] | None = None,
                    ) -> None:
    assert (record["agent"], record["task"], record["token_id"]) == (agent, minted.task, minted.token_id)
    assert record["chain"] == (chain or [])


def test_a_scope_denial_names_the_agent_task_and_token(stack: Stack) -> None:
    minted = stack.alpha.mint("rec-scope", ["demo:*:read"])
    decision = stack.checker(plain(minted.token, "demo", operation="write"))
    assert (decision.allowed, decision.reason) == (False, reasons.SCOPE_DENIED)
    record = stack.record(decision)
    assert (record["decision"], record["reason"], record["tool"], record["operation"]) == (
        False, reasons.SCOPE_DENIED, "demo", "write")
    names_the_token(record, minted)
    assert "argument" not in record


def test_a_denial_of_a_delegated_token_names_the_chain(stack: Stack) -> None:
    parent = stack.alpha.mint("rec-chain", ["demo:*:read,write"])
    issue_svid(ensure_dev_pki(stack.daemon.state_dir), BETA, stack.work / "beta")
    child = stack.alpha.delegate(parent.token, BETA, ["demo:*:read"], ttl=120)
    decision = stack.checker(plain(child.token, "demo", operation="write"))
    assert decision.reason == reasons.SCOPE_DENIED
    names_the_token(stack.record(decision), child, agent=BETA, chain=[AGENT])


def test_an_argument_denial_names_the_argument_and_its_value(stack: Stack) -> None:
    minted = stack.alpha.mint("rec-args", [grant("read_file")])
    decision = stack.checker(check_request(minted.token, tool_call("read_file", {"path": "/etc/passwd"})))
    assert decision.reason == reasons.ARGUMENT_OUTSIDE_PREFIX
    record = stack.record(decision)
    names_the_token(record, minted)
    assert record["argument"] == {"name": "path", "value": "/etc/passwd"}
    decision = stack.checker(check_request(minted.token, tool_call(
        "read_file", {"path": "/srv/reports/a", "max_bytes": 10**6})))
    assert decision.reason == reasons.ARGUMENT_ABOVE_MAX
    assert stack.record(decision)["argument"] == {"name": "max_bytes", "value": 10**6}
    decision = stack.checker(check_request(minted.token, tool_call("read_file", {"encoding": "utf-8"})))
    assert decision.reason == reasons.ARGUMENT_MISSING
    assert stack.record(decision)["argument"] == {"name": "path", "value": None}


@pytest.mark.parametrize("value", [
    "Bearer {token}",
    "/srv/{token}",
    "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg",
    "sk-proj-Abcdefghijklmnop1234",
    "ghp_0123456789abcdefABCDEF0123456789abcd",
    "token=9f86d081884c7d659a2feaa0c55ad015",
    "QUtJQUlPU0ZPRE5ON0VYQU1QTEUvd0phbHJYVXRuRkVNSS9LN01ERU5HL2JQeFJmaUNZ",
])
def test_an_argument_value_that_looks_like_a_credential_is_never_recorded(stack: Stack, value: str) -> None:
    minted = stack.alpha.mint(f"rec-secret-{abs(hash(value))}", [grant("read_file")])
    value = value.replace("{token}", minted.token)
    decision = stack.checker(check_request(minted.token, tool_call("read_file", {"path": value})))
    assert decision.reason in (reasons.ARGUMENT_OUTSIDE_PREFIX, reasons.ARGUMENT_PATH_UNSAFE)
    record = stack.record(decision)
    names_the_token(record, minted)
    assert record["argument"]["name"] == "path"
    assert record["argument"]["value"] in (REDACTED_CREDENTIAL, f"/srv/{REDACTED}")
    line = next(p for p in (stack.daemon.state_dir / "audit").glob("audit-*.jsonl")
                if decision.decision_id in p.read_text()).read_text()
    assert minted.token not in line and minted.token.split(".")[2] not in line
    for piece in value.split():
        assert len(piece) < 16 or piece not in line, piece


def test_a_budget_denial_names_the_agent_task_and_token(stack: Stack) -> None:
    minted = stack.alpha.mint("rec-budget", [grant("search")])
    for _ in range(5):
        assert stack.checker(check_request(minted.token, tool_call("search", {"q": "x"}))).allowed
    decision = stack.checker(check_request(minted.token, tool_call("search", {"q": "x"})))
    assert decision.reason == reasons.BUDGET_EXHAUSTED
    record = stack.record(decision)
    names_the_token(record, minted)
    assert "argument" not in record


def test_a_revoked_token_is_named_and_a_forged_one_is_not(stack: Stack) -> None:
    minted = stack.alpha.mint("rec-revoked", ["demo:*:read"])
    stack.alpha.revoke(token_id=minted.token_id)
    decision = stack.checker(plain(minted.token, "demo"))
    assert decision.reason == reasons.TOKEN_REVOKED
    names_the_token(stack.record(decision), minted)
    head, payload, signature = minted.token.split(".")
    forged = f"{head}.{payload}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BA'}"
    decision = stack.checker(plain(forged, "demo"))
    assert decision.reason == reasons.TOKEN_SIGNATURE
    record = stack.record(decision)
    assert (record["agent"], record["task"], record["token_id"]) == (None, None, None)


def test_an_argument_denial_under_a_tightened_policy_names_the_policys_argument(tmp_path: Path) -> None:
    """A live token minted before its rule gained argument constraints: the reloaded policy refuses the
    call (issue 16 item 3), and the record names the rule's argument though the token carries none."""
    daemon = start(tmp_path)
    try:
        alpha = agent(daemon, tmp_path)
        minted = alpha.mint("rec-tightened", [grant("echo")])
        checker = Checker(daemon.check_address)
        body = tool_call("echo", {"text": "hello", "mode": "loud"})
        assert checker(check_request(minted.token, body)).allowed
        policy = tmp_path / "policy.yaml"
        rule = "    tool: echo\n    targets: [files]\n    operations: [call]\n"
        assert policy.read_text().count(rule) == 1
        policy.write_text(policy.read_text().replace(
            rule, rule + "    arguments:\n      - {name: mode, one_of: [quiet]}\n"))
        daemon.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        refused = reasons.ARGUMENT_NOT_ALLOWED
        wait_for(lambda: checker(check_request(minted.token, body)).reason == refused, 10, "the reload")
        record = record_of(daemon, checker(check_request(minted.token, body)))
        names_the_token(record, minted)
        assert record["argument"] == {"name": "mode", "value": "loud"}
        checker.close()
    finally:
        daemon.stop()
