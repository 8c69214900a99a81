"""Sender-bound tokens through a real Envoy mTLS listener (RFC 8705): a stolen token fails elsewhere."""

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
import yaml
from processes import ROOT, Daemon, echo_upstream, envoy, free_port

from agentauthz.client import CHECK_METHOD, Client, Identity, check_request, decision_from
from agentauthz.identity.devca import ensure_dev_pki, issue_svid

ALPHA = "spiffe://dev.local/agent/alpha"
BETA = "spiffe://dev.local/agent/beta"
GAMMA = "spiffe://dev.local/agent/gamma"
ENVOY = "spiffe://dev.local/envoy"
MTLS_EXAMPLE = ROOT / "examples" / "envoy-mtls.yaml"


def mtls_example_config(state_dir: Path, check_port: int, upstream_port: int, listen_port: int,
                        admin_port: int) -> str:
    """examples/envoy-mtls.yaml as the README runs it, on the test's ports, dev PKI and Envoy identity
    (the development check_clients default, for a daemon with check_mtls)."""
    envoy_id = issue_svid(ensure_dev_pki(state_dir), ENVOY, state_dir.parent / "envoy-id")
    text = MTLS_EXAMPLE.read_text().replace("filename: .agentauthz/pki/", f"filename: {state_dir}/pki/")
    text = text.replace("filename: demo/envoy/", f"filename: {envoy_id}/")
    ports = {9191: check_port, 8080: upstream_port, 10443: listen_port, 9902: admin_port}
    return re.sub(r"port_value: (\d+)", lambda m: f"port_value: {ports[int(m.group(1))]}", text)


class Stack:
    def __init__(self, daemon: Daemon, port: int, work: Path) -> None:
        self.daemon, self.port, self.work = daemon, port, work
        self.pki = ensure_dev_pki(daemon.state_dir)

    def identity(self, agent: str, name: str) -> Path:
        return issue_svid(self.pki, agent, self.work / name)

    def client(self, identity: Path) -> Client:
        return Client(self.daemon.api_address, Identity.from_dir(identity))

    def mint(self, identity: Path, task: str, grants: tuple[str, ...] = ("demo:*:read:internal",)) -> str:
        return str(self.client(identity).mint(task, list(grants)).token)

    def request(self, identity: Path, token: str,
                method: str = "GET") -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, JSON body, lower-cased headers) of a call to /demo/reports over ``identity``'s mTLS."""
        context = ssl.create_default_context(cafile=str(identity / "bundle.pem"))
        context.load_cert_chain(identity / "svid.pem", identity / "svid.key")
        req = urllib.request.Request(f"https://localhost:{self.port}/demo/reports", method=method,
                                     headers={"authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=5, context=context) as r:
                status, body, headers = r.status, r.read(), r.headers
        except urllib.error.HTTPError as e:
            status, body, headers = e.code, e.read(), e.headers
        return status, json.loads(body or b"{}"), {k.lower(): v for k, v in headers.items()}

    def call(self, identity: Path, token: str, method: str = "GET") -> tuple[int, dict[str, Any]]:
        return self.request(identity, token, method)[:2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("binding")
    daemon = Daemon(work / "state", {"leeway": 0, "check_mtls": True}).start()
    proxy_port, admin_port = free_port(), free_port()
    try:
        with echo_upstream() as upstream_port:
            config = mtls_example_config(daemon.state_dir, daemon.check_port, upstream_port, proxy_port,
                                         admin_port)
            with envoy(config, work, admin_port):
                yield Stack(daemon, proxy_port, work)
    finally:
        daemon.stop()


def test_bound_token_works_from_the_certificate_it_was_minted_over(stack: Stack) -> None:
    alpha = stack.identity(ALPHA, "alpha")
    status, body = stack.call(alpha, stack.mint(alpha, "bind-1"))
    assert status == 200, body
    assert body["headers"]["x-agentauthz-agent"] == ALPHA


def test_stolen_token_fails_from_another_certificate_of_the_same_agent(stack: Stack) -> None:
    """Same SPIFFE ID, different certificate and key: the thief has the token, not the key."""
    alpha, thief = stack.identity(ALPHA, "alpha-2"), stack.identity(ALPHA, "alpha-thief")
    token = stack.mint(alpha, "bind-2")
    assert stack.call(thief, token) == (401, {"error": "token_binding_mismatch"})
    assert stack.call(alpha, token)[0] == 200


def test_token_presented_by_another_agent_fails(stack: Stack) -> None:
    alpha, beta = stack.identity(ALPHA, "alpha-3"), stack.identity(BETA, "beta")
    token = stack.mint(alpha, "bind-3")
    assert stack.call(beta, token) == (401, {"error": "token_sender_mismatch"})


def test_unbound_direct_check_follows_policy(stack: Stack) -> None:
    """Without a forwarded certificate the dev policy lets a bound token through (no mTLS to check);
    the Check listener answers Envoy's identity alone (check_mtls)."""
    alpha = stack.identity(ALPHA, "alpha-4")
    token = stack.client(alpha).mint("bind-4", ["demo:*:read:internal"]).token
    envoy_id = Identity.from_dir(stack.daemon.state_dir.parent / "envoy-id")
    with grpc.secure_channel(f"localhost:{stack.daemon.check_port}", envoy_id.credentials()) as channel:
        raw = channel.unary_unary(CHECK_METHOD)(
            check_request(token, "demo", "reports", "read", "internal"), timeout=5)
    assert decision_from(raw).allowed


def test_delegated_child_works_only_for_the_child_agent_within_its_narrowed_grants(stack: Stack) -> None:
    """alpha hands beta a read-only child of its read-write token: beta may read over its own
    certificate; alpha (the parent's holder) and a third agent presenting the child are refused."""
    alpha = stack.identity(ALPHA, "alpha-5")
    beta, gamma = stack.identity(BETA, "beta-5"), stack.identity(GAMMA, "gamma-5")
    parent = stack.mint(alpha, "bind-5", ("demo:*:read,write:internal",))
    assert stack.call(alpha, parent, "POST")[0] == 200  # the parent may write; the child will not
    child = stack.client(alpha).delegate(parent, BETA, ["demo:reports:read:internal"], ttl=120)
    assert child.agent == BETA

    # (a) The child agent, over its own certificate: allowed to read, and only to read.
    status, body, _ = stack.request(beta, child.token)
    assert status == 200, body
    assert body["headers"]["x-agentauthz-agent"] == BETA
    assert body["headers"]["x-agentauthz-token-id"] == child.token_id
    status, body, headers = stack.request(beta, child.token, "POST")
    assert (status, body) == (403, {"error": "scope_denied"})
    assert 'error="insufficient_scope"' in headers["www-authenticate"]

    # (b) The delegator holds the parent, not the child: its certificate names another sub.
    # (c) Nor may anyone else on the trust domain use it.
    for thief in (alpha, gamma):
        status, body, headers = stack.request(thief, child.token)
        assert (status, body) == (401, {"error": "token_sender_mismatch"})
        assert headers["www-authenticate"] == ('Bearer realm="agentauthz", error="invalid_token", '
                                               'error_description="token_sender_mismatch"')
    # Refusing the thieves spent nothing of the child's: beta still reads.
    assert stack.call(beta, child.token)[0] == 200


def test_the_mtls_example_fails_closed() -> None:
    """Like examples/envoy.yaml (tests/test_faults_load.py): a failed or late Check is a denial."""
    config = yaml.safe_load(MTLS_EXAMPLE.read_text())
    chain = config["static_resources"]["listeners"][0]["filter_chains"][0]
    assert chain["transport_socket"]["typed_config"]["require_client_certificate"] is True
    hcm = chain["filters"][0]["typed_config"]
    settings = next(f["typed_config"] for f in hcm["http_filters"]
                    if f["name"] == "envoy.filters.http.ext_authz")
    assert settings["failure_mode_allow"] is False
    assert settings["status_on_error"] == {"code": "ServiceUnavailable"}
    assert settings["include_peer_certificate"] is True
