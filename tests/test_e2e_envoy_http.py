"""The HTTP Check end to end: a real Envoy on examples/envoy-http.yaml (HTTP ext_authz) asking the daemon's
granian listener. test_e2e_envoy.py's cases run here unchanged, then what HTTP mode adds: forged route
headers and paths, forged x-forwarded-client-cert, MCP bodies, budgets and rate limits, restarts."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import ssl
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from limits_support import agent, grant, rpc, tool_call
from limits_support import start as start_limits
from processes import (
    ROOT,
    Daemon,
    echo_upstream,
    envoy,
    envoy_config,
    free_port,
    http_get,
    post,
    request,
    wait_for,
)
from test_e2e_envoy import (  # noqa: F401  (collected here, on this module's fixtures)
    AGENT,
    OTHER_AGENT,
    READ,
    Stack,
    dies_at_exp_through_envoy,
    test_a_caller_cannot_forge_the_identity_headers_the_tool_trusts,
    test_a_token_works_on_its_own_boundarys_routes_only,
    test_ended_task_is_401_at_the_next_request_and_other_tasks_live_on,
    test_every_method_on_a_tools_paths_is_decided_as_its_route_or_answered_405,
    test_expired_token_is_401,
    test_granted_call_reaches_tool_with_identity_headers_and_without_token,
    test_no_token_is_401_with_bearer_challenge,
    test_other_operation_and_other_tool_are_403,
    test_revoked_token_is_401,
    test_route_naming_a_boundary_the_daemon_does_not_serve_is_403,
    test_routes_without_context_extensions_use_the_policy_request_defaults,
    test_sensitivity_above_grant_is_403,
    test_tampered_and_garbage_tokens_are_401,
    test_token_in_the_request_path_is_answered_and_never_audited,
)

from agentauthz import reasons
from agentauthz.client import Client, Identity
from agentauthz.decision import mcp
from agentauthz.decision.policy import DEV_POLICY
from agentauthz.identity.devca import ensure_dev_pki, issue_svid

HTTP_EXAMPLE = ROOT / "examples" / "envoy-http.yaml"


def http_envoy_config(check_port: int, upstream_port: int, listen_port: int, admin_port: int,
                      mtls_pki: Path | None = None, example: str | None = None) -> str:
    """examples/envoy-http.yaml (or the ``example`` text) on the test's ports; with ``mtls_pki``, its
    listener asks for client certificates of that dev PKI (as examples/envoy-mtls.yaml does), nothing
    else changed."""
    text = envoy_config(0, upstream_port, listen_port, admin_port, example or HTTP_EXAMPLE.read_text(),
                        check_port)
    if mtls_pki is None:
        return text
    config = yaml.safe_load(text)
    config["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"] = {
        "name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True, "common_tls_context": {
                "tls_certificates": [{"certificate_chain": {"filename": str(mtls_pki / "server.pem")},
                                      "private_key": {"filename": str(mtls_pki / "server.key")}}],
                "validation_context": {"trusted_ca": {"filename": str(mtls_pki / "ca.pem")}}}}}
    return yaml.safe_dump(config)


class HttpStack(Stack):
    """A Stack that knows Envoy's admin port, whose stats say what reached the tool."""

    def __init__(self, daemon: Daemon, proxy_port: int, work: Path, admin_port: int) -> None:
        super().__init__(daemon, proxy_port, work)
        self.admin_port = admin_port

    def stat(self, name: str) -> int:
        body = http_get(f"http://127.0.0.1:{self.admin_port}/stats?filter=^{re.escape(name)}$")[1].decode()
        return int(body.split(":")[1]) if ":" in body else 0


@contextlib.contextmanager
def http_stack(work: Path, config: dict[str, Any], daemon: Daemon | None = None, check_port: int = 0,
               mtls: bool = False, example: str | None = None) -> Iterator[HttpStack]:
    """A daemon with an HTTP Check (``config``; or ``daemon``, checking on ``check_port``), the echo
    tool, and examples/envoy-http.yaml (or the ``example`` text) in front."""
    if daemon is None:
        check_port = free_port()
        daemon = Daemon(work / "state", {**config, "http_check_listen": f"127.0.0.1:{check_port}"}).start()
    proxy_port, admin_port = free_port(), free_port()
    try:
        with echo_upstream() as upstream_port:
            text = http_envoy_config(check_port, upstream_port, proxy_port, admin_port,
                                     daemon.state_dir / "pki" if mtls else None, example)
            with envoy(text, work, admin_port):
                yield HttpStack(daemon, proxy_port, work, admin_port)
    finally:
        assert daemon.stop() == 0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with http_stack(tmp_path_factory.mktemp("e2e-http"), {"leeway": 0}) as s:
        yield s


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("e2e-http-boundaries")
    policy = work / "policy.yaml"
    policy.write_text(DEV_POLICY.read_text() + "\nboundaries:\n  data: {max_ttl: 60}\n")
    with http_stack(work, {"leeway": 0, "audiences": ["tools", "data"], "policy_file": str(policy)}) as s:
        yield s


def test_an_allow_carries_a_decision_id_to_the_access_log_and_a_denial_to_the_client(stack: Stack) -> None:
    token = stack.mint("ids").token
    assert stack.call(token)[0] == 200
    status, _, headers = stack.call(token, "DELETE")
    assert status == 403 and re.fullmatch(r"[0-9a-f]{32}", headers["x-agentauthz-decision-id"])
    decision_id = headers["x-agentauthz-decision-id"]
    wait_for(lambda: any(r.get("decision_id") == decision_id and r["reason"] == reasons.SCOPE_DENIED
                         for r in stack.daemon.audit_records()), 10, "the denial's record")
    # Envoy's access log names it too (dynamic_metadata_from_headers), as the upstream never does.
    logs = list(stack.daemon.state_dir.parent.glob("envoy-*.log"))
    wait_for(lambda: any(f"DELETE /demo/reports 403 decision={decision_id}" in p.read_text() for p in logs),
             10, "Envoy's access log line")


def test_forged_route_headers_and_path_never_reach_the_decision(stack: Stack) -> None:
    token = stack.mint("forge-route", ["demo:notes*:read", "demo:reports:read:internal"]).token
    # A route that sets its own: the client's copies are replaced (DELETE stays delete).
    forged = {"x-agentauthz-route-operation": "read", "x-agentauthz-route-target": "notes",
              "x-agentauthz-route-sensitivity": "public", "x-agentauthz-route-bogus": "1"}
    status, body, _ = request(stack.port, "/demo/reports", "DELETE", token, headers=forged)
    assert (status, body) == (403, {"error": reasons.SCOPE_DENIED})
    # The catch-all sets none: the client's are removed, and the path decides (drafts, not notes).
    forged["x-agentauthz-route-tool"] = "demo"
    forged["x-agentauthz-path"] = "/demo/notes/today"
    status, body, _ = request(stack.port, "/demo/drafts", "GET", token, headers=forged)
    assert (status, body) == (403, {"error": reasons.SCOPE_DENIED})
    # The same forged headers on a request the token covers change nothing: removed, not refused.
    status, body, _ = request(stack.port, "/demo/notes/today", "GET", token, headers=forged)
    assert status == 200, body
    assert not any(k.startswith("x-agentauthz-route-") or k == "x-agentauthz-path" for k in body["headers"])


def test_a_path_the_upstream_could_resolve_elsewhere_is_400(stack: Stack) -> None:
    token = stack.mint("abnormal", ["demo:*:read"]).token
    status, body, _ = stack.call(token, "GET", "/demo/notes;x=1")
    assert (status, body) == (400, {"error": reasons.REQUEST_INVALID})


def test_a_forged_client_certificate_header_is_dropped_on_plaintext(stack: Stack) -> None:
    # Were the client's own x-forwarded-client-cert read, naming another agent would deny sender_mismatch.
    token = stack.mint("xfcc-plain").token
    forged = {"x-forwarded-client-cert": f"By=spiffe://dev.local/agentauthz;URI={OTHER_AGENT}"}
    status, body, _ = request(stack.port, "/demo/reports", "GET", token, headers=forged)
    assert status == 200, body


def raw_call(port: int, method: str, path: str, headers: dict[str, str | bytes],
             body: bytes = b"") -> tuple[int, dict[str, Any]]:
    """(status, JSON body or {}) of one call through Envoy whose header values go out as the bytes given
    (UTF-8, say, which urllib would send as Latin-1)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest(method, path)
        for name, value in {**headers, "content-length": str(len(body))}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    return response.status, json.loads(raw) if raw else {}


def test_a_header_value_that_is_not_ascii_is_refused_not_read_as_absent(stack: Stack, tmp_path: Path) -> None:
    """granian hands the Check no value that is not visible ASCII (UTF-8 included), yet names its header:
    read as absent, the bearer would be token_missing, a route's target the path's, an MCP body's
    Content-Encoding identity (test_mcp_bodies_budgets_and_rate_limits)."""
    token = stack.mint("non-ascii").token
    bearer = f"Bearer {token}"
    assert raw_call(stack.port, "GET", "/demo/reports", {"authorization": bearer})[0] == 200
    for name, value in (("authorization", bearer + "é"), ("content-type", "text/plain; charset=é")):
        headers: dict[str, str | bytes] = {"authorization": bearer, name: value.encode()}
        refused = raw_call(stack.port, "GET", "/demo/reports", headers)
        assert refused == (400, {"error": reasons.REQUEST_INVALID}), name
    # A route naming a target that is not ASCII: never the path's target (reports), which the token covers.
    target = "{key: x-agentauthz-route-target, value: %s}"
    example = HTTP_EXAMPLE.read_text().replace(target % "reports", target % '"rapports-privés"', 1)
    with http_stack(tmp_path, {}, example=example) as s:
        token = s.mint("non-ascii-route", ["demo:reports:read:internal", "demo:reports:write:internal"]).token
        assert raw_call(s.port, "GET", "/demo/reports", {"authorization": f"Bearer {token}"}) == (
            400, {"error": reasons.REQUEST_INVALID})
        assert s.stat("cluster.tool.upstream_rq_total") == 0
        assert raw_call(s.port, "POST", "/demo/reports", {"authorization": f"Bearer {token}"})[0] == 200
        assert s.stat("cluster.tool.upstream_rq_total") == 1  # the one call that reached the tool


def test_restart_keeps_revocations_and_a_stopped_daemon_fails_closed(tmp_path: Path) -> None:
    port = free_port()
    daemon = Daemon(tmp_path / "state", {"http_check_listen": f"127.0.0.1:{port}"}).start()
    with http_stack(tmp_path, {}, daemon, port) as s:
        live, revoked = s.mint("keep").token, s.mint("drop")
        s.clients[AGENT].revoke(token_id=revoked.token_id)
        assert daemon.stop() == 0
        assert s.call(live)[0] == 503  # Envoy's status_on_error: never through
        daemon.start()
        assert s.call(live)[0] == 200
        assert s.call(revoked.token)[1] == {"error": reasons.TOKEN_REVOKED}
    verified = daemon.cli("audit", "verify", str(tmp_path / "state" / "audit"), "--json")
    assert verified.returncode == 0, verified.stderr


def test_mcp_bodies_budgets_and_rate_limits(tmp_path: Path) -> None:
    port = free_port()
    daemon = start_limits(tmp_path, {"http_check_listen": f"127.0.0.1:{port}"})
    with http_stack(tmp_path, {}, daemon, port) as s:
        client = agent(daemon, tmp_path)
        grants = [grant("read_file"), grant("echo"), grant("mcp", ops=("session",))]
        token = client.mint("mcp-http", grants).token
        budgeted = client.mint("budget-http", [grant("search")]).token
        ticker = client.mint("ticker-http", [grant("ticker", "*", ("read",))]).token
        status, body, _ = post(s.port, tool_call("read_file", {"path": "/srv/reports/q1"}), token)
        assert status == 200 and body["path"] == "/mcp" and "authorization" not in body["headers"], body
        assert post(s.port, rpc("initialize", {"protocolVersion": "2025-06-18"}), token)[0] == 200
        # A denied request: its JSON-RPC error, at the plain route's status (a 200 would be an allow).
        status, body, headers = post(s.port, rpc("tools/call", {"name": "read_file", "arguments": {
            "path": "/srv/reports/../../etc"}}, id="call-7"), token)
        assert (status, body["id"], body["error"]["data"]["reason"]) == (403, "call-7",
                                                                         reasons.ARGUMENT_PATH_UNSAFE)
        assert headers["content-type"] == "application/json"
        assert post(s.port, b"[" + tool_call("echo") + b"]", token)[:2] == (
            400, {"error": reasons.MCP_BATCH_REFUSED})
        assert post(s.port, tool_call("echo"), token, content_type="text/plain")[:2] == (
            400, {"error": reasons.MCP_BODY_INVALID})
        # A Content-Encoding the Check cannot be handed (UTF-8 in it): refused, never read as identity.
        encoded = {"authorization": f"Bearer {token}", "content-type": "application/json",
                   "content-encoding": "br, ü".encode()}
        assert raw_call(s.port, "POST", "/mcp", encoded, tool_call("echo")) == (
            400, {"error": reasons.REQUEST_INVALID})
        huge = tool_call("echo", {"pad": "a" * (mcp.MAX_BODY_BYTES + 10)})
        assert post(s.port, huge, token)[:2] == (400, {"error": reasons.MCP_BODY_TRUNCATED})
        assert post(s.port, tool_call("echo"), None)[:2] == (401, {"error": reasons.TOKEN_MISSING})
        # The policy's budget of five search calls, then budget_exhausted.
        for _ in range(5):
            assert post(s.port, tool_call("search", {"q": "x"}), budgeted)[0] == 200
        status, body, _ = post(s.port, tool_call("search", {"q": "x"}), budgeted)
        assert (status, body["error"]["data"]["reason"]) == (403, reasons.BUDGET_EXHAUSTED)
        # A rate limit on a plain route: 429 and Retry-After reach the client.
        assert [request(s.port, "/ticker/x", token=ticker)[0] for _ in range(2)] == [200, 200]
        status, body, headers = request(s.port, "/ticker/x", token=ticker)
        assert (status, body) == (429, {"error": reasons.RATE_LIMITED})
        assert 1 <= int(headers["retry-after"]) <= 4


def mtls_call(port: int, identity: Path, token: str,
              headers: dict[str, str] | None = None) -> tuple[int, Any]:
    context = ssl.create_default_context(cafile=str(identity / "bundle.pem"))
    context.load_cert_chain(identity / "svid.pem", identity / "svid.key")
    req = urllib.request.Request(f"https://localhost:{port}/demo/reports",
                                 headers={"authorization": f"Bearer {token}", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=5, context=context) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_sender_binding_over_envoys_forwarded_certificate_and_a_forged_one(tmp_path: Path) -> None:
    with http_stack(tmp_path, {"leeway": 0}, mtls=True) as s:
        pki = ensure_dev_pki(s.daemon.state_dir)
        alpha, thief = issue_svid(pki, AGENT, tmp_path / "alpha"), issue_svid(pki, AGENT, tmp_path / "thief")
        beta = issue_svid(pki, OTHER_AGENT, tmp_path / "beta")
        token = Client(s.daemon.api_address, Identity.from_dir(alpha)).mint("bound", READ).token
        assert mtls_call(s.port, alpha, token)[0] == 200
        # The thief holds the token and claims alpha's certificate in its own header: Envoy replaces it.
        cert = urllib.parse.quote((alpha / "svid.pem").read_text(), safe="")
        forged = {"x-forwarded-client-cert": f'By=spiffe://dev.local/agentauthz;Cert="{cert}";URI={AGENT}'}
        assert mtls_call(s.port, thief, token, forged) == (401, {"error": reasons.TOKEN_BINDING})
        assert mtls_call(s.port, beta, token, forged) == (401, {"error": reasons.TOKEN_SENDER})


def test_a_short_token_dies_at_its_exp_through_envoy_http_on_the_shipped_defaults(tmp_path: Path) -> None:
    """examples/envoy-http.yaml, the daemon on every default but the listener: exp gets no leeway."""
    with http_stack(tmp_path, {}) as stack:
        dies_at_exp_through_envoy(stack)
