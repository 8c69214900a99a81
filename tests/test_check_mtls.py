"""Check over mTLS answers only the configured Envoy identities (``check_clients``): an agent's certificate,
which the same trust bundle admits, gets check_client_refused and no decision, no record, no budget.
Real daemon, real dev-CA certificates, and real Envoy running examples/envoy-mtls.yaml."""

from __future__ import annotations

import json
import re
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from envoy.service.auth.v3 import attribute_context_pb2 as attrs
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from processes import ROOT, Daemon, echo_upstream, envoy, free_port, http_get, wait_for

from agentauthz import reasons
from agentauthz.client import CHECK_METHOD, Client, Decision, Identity, decision_from
from agentauthz.config import DEV_CHECK_CLIENT, Config
from agentauthz.decision.policy import DEV_POLICY
from agentauthz.errors import ConfigError
from agentauthz.identity.devca import ensure_dev_pki, issue_svid

ALPHA = "spiffe://dev.local/agent/alpha"
EDGE = "spiffe://dev.local/edge-proxy"
MTLS_EXAMPLE = ROOT / "examples" / "envoy-mtls.yaml"
METERED = """
  - id: mtls-metered
    agents: ["spiffe://dev.local/agent/*"]
    tool: metered
    targets: ["*"]
    operations: [read]
    budget: {max_calls: 2}
"""


# -- configuration ------------------------------------------------------------------------------------


def test_check_clients_are_validated_at_load(tmp_path: Path) -> None:
    assert Config(check_mtls=True).check_client_ids == {DEV_CHECK_CLIENT} == {"spiffe://dev.local/envoy"}
    assert Config(check_mtls=True, check_clients=(EDGE,)).check_client_ids == {EDGE}
    production = {"trust_domain": "example.org", "tls_cert": tmp_path / "c", "tls_key": tmp_path / "k",
                  "trust_bundle": tmp_path / "b"}
    for settings, problem in (
        ({"check_mtls": True, **production}, "check_mtls needs check_clients"),
        ({"check_clients": (EDGE,)}, "check_clients needs check_mtls"),
        ({"check_mtls": True, "check_clients": ("envoy",)}, "check_clients: 'envoy' is not"),
        ({"check_mtls": True, "check_clients": ("spiffe://dev.local",)}, "names no workload"),
    ):
        with pytest.raises(ConfigError, match=problem):
            Config(**settings)  # type: ignore[arg-type]
    config = tmp_path / "c.yaml"
    config.write_text("check_mtls: true\ncheck_clients: spiffe://dev.local/envoy\n")
    with pytest.raises(ConfigError, match="check_clients must be a list"):
        Config.load(config)
    assert Config.load(ROOT / "examples" / "check-mtls.yaml").check_client_ids == {DEV_CHECK_CLIENT}


# -- a real daemon -----------------------------------------------------------------------------------


class Caller:
    """Check over mTLS as one workload of the dev CA."""

    def __init__(self, daemon: Daemon, identity: Path, answered: set[str]) -> None:
        self.answered = answered  # every decision id any caller was answered
        self.channel = grpc.secure_channel(f"localhost:{daemon.check_port}",
                                           Identity.from_dir(identity).credentials())
        self._call = self.channel.unary_unary(CHECK_METHOD)

    def __call__(self, token: str | None, tool: str = "demo", operation: str = "read", principal: str = "",
                 certificate: str = "") -> Decision:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        raw = ext_authz.CheckRequest(attributes=attrs.AttributeContext(
            source=attrs.AttributeContext.Peer(principal=principal, certificate=certificate),
            request=attrs.AttributeContext.Request(http=attrs.AttributeContext.HttpRequest(
                method="GET", path=f"/{tool}/x", headers=headers)),
            context_extensions={"tool": tool, "target": "x", "operation": operation,
                                "sensitivity": "public"})).SerializeToString()
        decision = decision_from(self._call(raw, timeout=5))
        if decision.decision_id:
            self.answered.add(decision.decision_id)
        return decision


class Stack:
    def __init__(self, daemon: Daemon, work: Path) -> None:
        self.daemon, self.work = daemon, work
        self.pki = ensure_dev_pki(daemon.state_dir)
        self.ids = {name: issue_svid(self.pki, spiffe_id, work / name) for name, spiffe_id in (
            ("alpha", ALPHA), ("envoy", DEV_CHECK_CLIENT), ("envoy-edge", DEV_CHECK_CLIENT + "/edge"),
            ("edge", EDGE))}
        self.alpha = Client(daemon.api_address, Identity.from_dir(self.ids["alpha"]))
        self.answered: set[str] = set()

    def caller(self, name: str) -> Caller:
        return Caller(self.daemon, self.ids[name], self.answered)

    def metric(self, line: str) -> float:
        text = http_get(f"http://127.0.0.1:{self.daemon.http_port}/metrics")[1].decode()
        found = re.search(rf"^{re.escape(line)} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def recorded(self) -> set[str]:
        """The decision ids of the Check records in the log, once every answered one is there."""
        found: set[str] = set()

        def complete() -> bool:
            found.clear()
            found.update(r["decision_id"] for r in self.daemon.audit_records() if r.get("kind") == "check")
            return self.answered <= found
        wait_for(complete, 10, "every answered Check's record")
        return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("check-mtls")
    policy = work / "policy.yaml"
    policy.write_text(DEV_POLICY.read_text() + METERED)
    daemon = Daemon(work / "state", {"check_mtls": True, "policy_file": str(policy)}).start()
    try:
        yield Stack(daemon, work)
    finally:
        daemon.stop()


def test_envoys_certificate_is_answered(stack: Stack) -> None:
    envoy_ = stack.caller("envoy")
    assert envoy_(None).reason == reasons.TOKEN_MISSING
    token = stack.alpha.mint("mtls-envoy", ["demo:*:read"]).token
    decision = envoy_(token)
    assert decision.allowed and decision.decision_id


def test_an_agents_certificate_is_refused_undecided_and_unrecorded(stack: Stack) -> None:
    """alpha's certificate chains to the trust bundle like Envoy's: it may not act as Envoy. Naming
    itself, naming another agent, forwarding a certificate, or charging a budget: all refused alike."""
    token = stack.alpha.mint("mtls-agent", ["demo:*:read", "metered:*:read"]).token
    certificate = (stack.ids["alpha"] / "svid.pem").read_text()
    refused_before = stack.metric("agentauthz_check_clients_refused_total")
    decided_before = stack.metric(f'agentauthz_check_decisions_total{{reason="{reasons.ALLOW}"}}')
    attempts = [dict(token=token), dict(token=token, principal=ALPHA),
                dict(token=token, principal="spiffe://dev.local/agent/beta", certificate=certificate),
                dict(token=token, tool="metered"), dict(token=token, tool="metered"),
                dict(token=token, tool="metered"), dict(token=None)]
    for name in ("alpha", "envoy-edge", "edge"):  # an agent; a path under Envoy's; a workload not listed
        caller = stack.caller(name)
        for attempt in attempts:
            decision = caller(**attempt)  # type: ignore[arg-type]
            assert (decision.allowed, decision.status, decision.reason, decision.decision_id) == (
                False, 403, reasons.CHECK_CLIENT_REFUSED, ""), (name, attempt)
    assert stack.metric("agentauthz_check_clients_refused_total") == refused_before + 3 * len(attempts)
    assert stack.metric(f'agentauthz_check_decisions_total{{reason="{reasons.ALLOW}"}}') == decided_before
    # Nothing was decided, so nothing recorded, and the budget is whole: Envoy gets both calls.
    envoy_ = stack.caller("envoy")
    assert [envoy_(token, "metered").reason for _ in range(3)] == [reasons.ALLOW, reasons.ALLOW,
                                                                   reasons.BUDGET_EXHAUSTED]
    assert stack.recorded() == stack.answered  # Envoy's Checks, and nothing of the refused ones
    assert "refused a client not in check_clients" in stack.daemon.log()


def test_without_a_client_certificate_there_is_no_connection(stack: Stack) -> None:
    credentials = grpc.ssl_channel_credentials((stack.ids["alpha"] / "bundle.pem").read_bytes())
    with grpc.secure_channel(f"localhost:{stack.daemon.check_port}", credentials) as channel:
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary(CHECK_METHOD)(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_configured_check_clients_replace_the_development_default(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "state", {"check_mtls": True, "check_clients": [EDGE]}).start()
    try:
        stack = Stack(daemon, tmp_path)
        assert stack.caller("edge")(None).reason == reasons.TOKEN_MISSING
        assert stack.caller("envoy")(None).reason == reasons.CHECK_CLIENT_REFUSED
    finally:
        assert daemon.stop() == 0


# -- real Envoy, examples/envoy-mtls.yaml -------------------------------------------------------------


def mtls_example(state_dir: Path, envoy_identity: Path, ports: dict[int, int]) -> str:
    """examples/envoy-mtls.yaml on the test's ports, dev PKI and Envoy identity."""
    text = MTLS_EXAMPLE.read_text().replace("filename: .agentauthz/pki/", f"filename: {state_dir}/pki/")
    assert text.count("filename: demo/envoy/") == 2
    text = text.replace("filename: demo/envoy/", f"filename: {envoy_identity}/")
    return re.sub(r"port_value: (\d+)", lambda m: f"port_value: {ports[int(m.group(1))]}", text)


def call(port: int, identity: Path, token: str) -> tuple[int, dict[str, Any]]:
    context = ssl.create_default_context(cafile=str(identity / "bundle.pem"))
    context.load_cert_chain(identity / "svid.pem", identity / "svid.key")
    req = urllib.request.Request(f"https://localhost:{port}/demo/reports",
                                 headers={"authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5, context=context) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_envoy_mtls_example_works_as_the_allowed_identity_and_not_as_an_agent(stack: Stack) -> None:
    token = stack.alpha.mint("mtls-e2e", ["demo:*:read:internal"]).token
    with echo_upstream() as upstream_port:
        for envoy_identity, want in (("envoy", (200, reasons.ALLOW)),
                                     ("alpha", (403, reasons.CHECK_CLIENT_REFUSED))):
            proxy_port, admin_port = free_port(), free_port()
            config = mtls_example(stack.daemon.state_dir, stack.ids[envoy_identity], {
                9191: stack.daemon.check_port, 8080: upstream_port, 10443: proxy_port, 9902: admin_port})
            with envoy(config, stack.work, admin_port):
                status, body = call(proxy_port, stack.ids["alpha"], token)
            assert (status, body.get("error", reasons.ALLOW)) == want, (envoy_identity, body)
            if status == 200:
                assert body["headers"]["x-agentauthz-agent"] == ALPHA
