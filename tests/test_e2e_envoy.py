"""End to end through a real Envoy: agent mints over mTLS, calls a tool through Envoy, agentauthz decides."""

from __future__ import annotations

import contextlib
import http.client
import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from processes import Daemon, dies_at_exp, echo_upstream, envoy, envoy_config, free_port, request, wait_for

from agentauthz.client import Client, Identity
from agentauthz.config import Config
from agentauthz.decision.policy import DEV_POLICY
from agentauthz.identity.devca import ensure_dev_pki, issue_svid

AGENT = "spiffe://dev.local/agent/alpha"
OTHER_AGENT = "spiffe://dev.local/agent/beta"
READ_WRITE = ["demo:*:read,write:internal"]
READ = ["demo:*:read:internal"]


class Stack:
    """Daemon + Envoy + upstream tool, and identities for two agents."""

    def __init__(self, daemon: Daemon, proxy_port: int, work: Path) -> None:
        self.daemon = daemon
        self.port = proxy_port
        pki = ensure_dev_pki(daemon.state_dir)
        self.clients = {}
        for agent in (AGENT, OTHER_AGENT):
            out = work / agent.rsplit("/", 1)[1]
            issue_svid(pki, agent, out)
            self.clients[agent] = Client(daemon.api_address, Identity.from_dir(out),
                                         check_server=daemon.check_address)

    def mint(self, task: str, grants: list[str] = READ_WRITE, agent: str = AGENT, **kw: Any) -> Any:
        return self.clients[agent].mint(task, grants, **kw)

    def call(self, token: str | None, method: str = "GET", path: str = "/demo/reports") -> Any:
        return request(self.port, path, method, token)


@contextlib.contextmanager
def envoy_stack(work: Path, config: dict[str, Any]) -> Iterator[Stack]:
    """A daemon on ``config``, the echo tool, and the example Envoy config in front of both."""
    daemon = Daemon(work / "state", config).start()
    proxy_port, admin_port = free_port(), free_port()
    try:
        with echo_upstream() as upstream_port:
            config = envoy_config(daemon.check_port, upstream_port, proxy_port, admin_port)
            with envoy(config, work, admin_port):
                yield Stack(daemon, proxy_port, work)
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with envoy_stack(tmp_path_factory.mktemp("e2e"), {"leeway": 0}) as s:
        yield s


def test_no_token_is_401_with_bearer_challenge(stack: Stack) -> None:
    status, body, headers = stack.call(None)
    assert status == 401
    assert body == {"error": "token_missing"}
    assert headers["www-authenticate"].startswith("Bearer")


def test_granted_call_reaches_tool_with_identity_headers_and_without_token(stack: Stack) -> None:
    minted = stack.mint("report-1", intent="summarise the reports")
    status, body, _ = stack.call(minted.token)
    assert status == 200, body
    seen = body["headers"]
    assert seen["x-agentauthz-agent"] == AGENT
    assert seen["x-agentauthz-task"] == "report-1"
    assert seen["x-agentauthz-token-id"] == minted.token_id
    assert "authorization" not in seen  # the tool never sees the credential
    status, body, _ = stack.call(minted.token, "POST")
    assert status == 200 and body["method"] == "POST"


def test_a_caller_cannot_forge_the_identity_headers_the_tool_trusts(stack: Stack) -> None:
    # The tool believes x-agentauthz-*: a caller's own copies must be replaced, never sent alongside.
    minted = stack.mint("forge-1")
    forged = {"x-agentauthz-agent": "spiffe://dev.local/agent/root", "x-agentauthz-task": "someone-elses",
              "x-agentauthz-token-id": "forged"}
    status, body, _ = request(stack.port, "/demo/reports", "GET", minted.token, headers=forged)
    assert status == 200, body
    seen = body["headers"]
    assert (seen["x-agentauthz-agent"], seen["x-agentauthz-task"], seen["x-agentauthz-token-id"]) == \
        (AGENT, "forge-1", minted.token_id)
    # Sent twice, each: still only agentauthz's value reaches the tool.
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=5)
    try:
        conn.putrequest("GET", "/demo/reports")
        conn.putheader("authorization", f"Bearer {minted.token}")
        for name, value in forged.items():
            conn.putheader(name, value)
            conn.putheader(name, value + "-again")
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 200
        seen = json.loads(response.read())["headers"]
    finally:
        conn.close()
    assert (seen["x-agentauthz-agent"], seen["x-agentauthz-task"], seen["x-agentauthz-token-id"]) == \
        (AGENT, "forge-1", minted.token_id)
    # Without a credential the forged headers reach nothing.
    status, body, _ = request(stack.port, "/demo/reports", "GET", None, headers=forged)
    assert (status, body) == (401, {"error": "token_missing"})


def test_other_operation_and_other_tool_are_403(stack: Stack) -> None:
    token = stack.mint("report-2").token
    status, body, headers = stack.call(token, "DELETE")
    assert (status, body["error"]) == (403, "scope_denied")
    assert 'error="insufficient_scope"' in headers["www-authenticate"]
    status, body, _ = stack.call(token, "GET", "/billing/invoices")
    assert (status, body["error"]) == (403, "scope_denied")


def test_routes_without_context_extensions_use_the_policy_request_defaults(stack: Stack) -> None:
    token = stack.mint("fallback", ["demo:notes*:read"]).token
    status, body, _ = stack.call(token, "GET", "/demo/notes/today")  # tool demo, target notes/today
    assert status == 200 and body["headers"]["x-agentauthz-task"] == "fallback"
    assert stack.call(token, "POST", "/demo/notes/today")[1]["error"] == "scope_denied"  # write
    assert stack.call(token, "GET", "/demo/drafts")[1]["error"] == "scope_denied"


def test_sensitivity_above_grant_is_403(stack: Stack) -> None:
    token = stack.mint("report-3", ["demo:*:read,write:public"]).token
    status, body, _ = stack.call(token)
    assert (status, body["error"]) == (403, "sensitivity_exceeded")


def test_every_method_on_a_tools_paths_is_decided_as_its_route_or_answered_405(stack: Stack) -> None:
    """A method a tool's routes do not name must not fall through to the catch-all route, where the
    policy's defaults would decide it (the public sensitivity, no boundary, the path's target): PUT and
    PATCH are writes and HEAD a read of the route's internal data; any other method Envoy answers 405
    itself, on /demo/reports, /data/reports and /billing/invoices alike (the echo tool answers 501)."""
    public = stack.mint("methods-public", ["demo:*:read,write:public"]).token
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH"):
        status, body, _ = stack.call(public, method)
        assert status == 403, method
        if method != "HEAD":  # no body
            assert body["error"] == "sensitivity_exceeded", method
    read = stack.mint("methods-read", READ).token
    assert stack.call(read, "HEAD")[0] == 200
    for method in ("PUT", "PATCH"):
        assert stack.call(read, method)[:2] == (403, {"error": "scope_denied"}), method
        assert stack.call(stack.mint("methods-write").token, method)[1]["method"] == method  # reaches it
    for path in ("/demo/reports", "/demo/reports/q3", "/data/reports", "/billing/invoices/42"):
        for method in ("OPTIONS", "PURGE", "POST", "PUT", "DELETE"):
            if path.startswith("/demo") and method in ("POST", "PUT", "DELETE"):
                continue  # routed: decided above
            assert stack.call(read, method, path)[:2] == (405, {}), (method, path)


@pytest.mark.parametrize("mangle", [
    lambda t: t[:-4] + ("AAAA" if not t.endswith("AAAA") else "BBBB"),  # signature changed
    lambda t: t.split(".")[0] + "." + t.split(".")[1][:-2] + "xx." + t.split(".")[2],  # claims changed
    lambda t: "garbage",
    lambda t: t + ".extra",
    lambda t: "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",  # alg none
])
def test_tampered_and_garbage_tokens_are_401(stack: Stack, mangle: Any) -> None:
    token = stack.mint("tamper").token
    status, body, headers = stack.call(mangle(token))
    assert status == 401, body
    assert body["error"].startswith("token_")
    assert 'error="invalid_token"' in headers["www-authenticate"]


def test_ended_task_is_401_at_the_next_request_and_other_tasks_live_on(stack: Stack) -> None:
    doomed = stack.mint("doomed").token
    survivor = stack.mint("survivor").token
    other_agents_same_name = stack.mint("doomed", agent=OTHER_AGENT).token
    assert stack.call(doomed)[0] == 200
    stack.clients[AGENT].end_task("doomed")
    status, body, _ = stack.call(doomed)
    assert (status, body["error"]) == (401, "task_ended")
    assert stack.call(survivor)[0] == 200
    # Tasks are per agent: ending mine does not end another agent's task of the same name.
    assert stack.call(other_agents_same_name)[0] == 200


def test_revoked_token_is_401(stack: Stack) -> None:
    minted = stack.mint("revoke-one")
    sibling = stack.mint("revoke-one")
    assert stack.call(minted.token)[0] == 200
    stack.clients[AGENT].revoke(token_id=minted.token_id)
    assert stack.call(minted.token)[1]["error"] == "token_revoked"
    assert stack.call(sibling.token)[0] == 200


def test_another_agent_cannot_revoke_my_token_or_end_my_task(stack: Stack) -> None:
    import grpc
    minted = stack.mint("mine")
    with pytest.raises(grpc.RpcError) as err:
        stack.clients[OTHER_AGENT].revoke(token_id=minted.token_id)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    stack.clients[OTHER_AGENT].end_task("mine")  # ends beta's own (nonexistent) task "mine" only
    assert stack.call(minted.token)[0] == 200


def test_expired_token_is_401(stack: Stack) -> None:
    # exp is the issuing second, truncated, plus the TTL: minted just after a second begins, a 3 s
    # token lives ~3 s (a 1 s one was once spent before its first call, on a loaded CI machine).
    time.sleep(1.02 - time.time() % 1)
    minted = stack.mint("short", ttl=3)
    assert stack.call(minted.token)[0] == 200
    time.sleep(max(0.0, minted.expires_at - time.time()) + 0.2)
    status, body, _ = stack.call(minted.token)
    assert (status, body["error"]) == (401, "token_expired")


def dies_at_exp_through_envoy(stack: Stack) -> None:
    """A 2 s token through Envoy on the daemon's shipped defaults (no ``leeway`` set: its default
    outlasts the token): every call Envoy lets through was sent before exp, and the first refusal is
    401 token_expired, well before exp + leeway."""
    assert "leeway" not in stack.daemon.config_path.read_text() and Config().leeway > 2
    minted = stack.mint("short", ttl=2)
    assert stack.call(minted.token)[0] == 200

    def refusal() -> tuple[int, str] | None:
        status, body, _ = stack.call(minted.token)
        return None if status == 200 else (status, body["error"])
    assert dies_at_exp(refusal, minted.expires_at) == [(401, "token_expired")]


def test_a_short_token_dies_at_its_exp_through_envoy_on_the_shipped_defaults(tmp_path: Path) -> None:
    with envoy_stack(tmp_path, {}) as stack:
        dies_at_exp_through_envoy(stack)


def test_restart_keeps_live_tokens_and_revocations_and_stop_fails_closed(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "state").start()
    proxy_port, admin_port = free_port(), free_port()
    with echo_upstream() as upstream_port:
        config = envoy_config(daemon.check_port, upstream_port, proxy_port, admin_port)
        with envoy(config, tmp_path, admin_port):
            stack = Stack(daemon, proxy_port, tmp_path)
            live = stack.mint("keep").token
            revoked = stack.mint("drop")
            ended = stack.mint("end").token
            stack.clients[AGENT].revoke(token_id=revoked.token_id)
            stack.clients[AGENT].end_task("end")
            assert daemon.stop() == 0
            # Daemon down: Envoy must deny, never pass the call through.
            status, _, _ = stack.call(live)
            assert status == 503
            daemon.start()
            assert stack.call(live)[0] == 200
            assert stack.call(revoked.token)[1]["error"] == "token_revoked"
            assert stack.call(ended)[1]["error"] == "task_ended"
    assert daemon.stop() == 0
    verified = daemon.cli("audit", "verify", str(tmp_path / "state" / "audit"), "--json")
    assert verified.returncode == 0, verified.stderr


def test_token_in_the_request_path_is_answered_and_never_audited(stack: Stack) -> None:
    token = stack.mint("leak").token
    status, _, _ = stack.call(token, "GET", f"/demo/{token}")
    assert status == 200  # an attacker-chosen path cannot make the decision fail
    audit_dir = stack.daemon.state_dir / "audit"
    wait_for(lambda: any(b'"task":"leak"' in f.read_bytes() for f in audit_dir.glob("audit-*.jsonl")),
             10, "the check to be audited")
    for f in audit_dir.glob("*.jsonl"):
        assert token.encode() not in f.read_bytes()


def test_route_naming_a_boundary_the_daemon_does_not_serve_is_403(stack: Stack) -> None:
    """The example's /data/reports route names boundary ``data``; this daemon serves ``tools`` only."""
    token = stack.mint("no-data").token
    assert stack.call(token)[0] == 200
    status, body, headers = stack.call(token, "GET", "/data/reports")
    assert (status, body) == (403, {"error": "boundary_unknown"})
    assert 'error="insufficient_scope"' in headers["www-authenticate"]


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The example Envoy config in front of a daemon serving two boundaries, ``tools`` and ``data``."""
    work = tmp_path_factory.mktemp("e2e-boundaries")
    policy = work / "policy.yaml"
    policy.write_text(DEV_POLICY.read_text() + "\nboundaries:\n  data: {max_ttl: 60}\n")
    with envoy_stack(work, {"leeway": 0, "audiences": ["tools", "data"], "policy_file": str(policy)}) as s:
        yield s


def test_a_token_works_on_its_own_boundarys_routes_only(bounded: Stack) -> None:
    tools = bounded.mint("bounds", READ, ttl=600)  # no audience: the first one, tools
    data = bounded.mint("bounds-data", READ, ttl=600, audience="data")
    assert data.expires_at <= time.time() + 60 < tools.expires_at  # data's max_ttl caps it, not tools'
    # /demo/reports names no boundary (tools); /data/reports names data.
    for token, own, other in ((tools, "/demo/reports", "/data/reports"),
                              (data, "/data/reports", "/demo/reports")):
        status, body, _ = bounded.call(token.token, "GET", own)
        assert status == 200, body
        assert body["headers"]["x-agentauthz-token-id"] == token.token_id
        status, body, headers = bounded.call(token.token, "GET", other)
        assert (status, body) == (401, {"error": "token_boundary_mismatch"})
        assert 'error="invalid_token"' in headers["www-authenticate"]
