"""Sender-bound tokens through a real Envoy mTLS listener (RFC 8705): a stolen token fails elsewhere."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from processes import Daemon, echo_upstream, envoy, envoy_config, free_port

from agentauthz.client import Client, Identity
from agentauthz.devca import ensure_dev_pki, issue_svid

ALPHA = "spiffe://dev.local/agent/alpha"
BETA = "spiffe://dev.local/agent/beta"


def mtls_envoy_config(text: str, work: Path, pki: Any) -> str:
    """The example config with its listener behind mTLS (dev CA) and the peer certificate forwarded."""
    for name, pem in (("envoy.pem", pki.server_cert_pem), ("envoy.key", pki.server_key_pem),
                      ("ca.pem", pki.ca_cert_pem)):
        (work / name).write_bytes(pem)
    config = yaml.safe_load(text)
    chain = config["static_resources"]["listeners"][0]["filter_chains"][0]
    chain["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": {
            "tls_certificates": [{"certificate_chain": {"filename": str(work / "envoy.pem")},
                                  "private_key": {"filename": str(work / "envoy.key")}}],
            "validation_context": {"trusted_ca": {"filename": str(work / "ca.pem")}}}}}
    hcm = chain["filters"][0]["typed_config"]
    ext_authz = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz")
    ext_authz["typed_config"]["include_peer_certificate"] = True
    return yaml.safe_dump(config)


class Stack:
    def __init__(self, daemon: Daemon, port: int, work: Path) -> None:
        self.daemon, self.port, self.work = daemon, port, work
        self.pki = ensure_dev_pki(daemon.state_dir)

    def identity(self, agent: str, name: str) -> Path:
        return issue_svid(self.pki, agent, self.work / name)

    def mint(self, identity: Path, task: str) -> str:
        client = Client(self.daemon.api_address, Identity.from_dir(identity))
        return str(client.mint(task, ["demo:*:read:internal"]).token)

    def call(self, identity: Path, token: str) -> tuple[int, dict[str, Any]]:
        context = ssl.create_default_context(cafile=str(identity / "bundle.pem"))
        context.load_cert_chain(identity / "svid.pem", identity / "svid.key")
        req = urllib.request.Request(f"https://localhost:{self.port}/demo/reports",
                                     headers={"authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=5, context=context) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("binding")
    daemon = Daemon(work / "state", {"leeway": 0}).start()
    proxy_port, admin_port = free_port(), free_port()
    try:
        with echo_upstream() as upstream_port:
            text = envoy_config(daemon.check_port, upstream_port, proxy_port, admin_port)
            with envoy(mtls_envoy_config(text, work, ensure_dev_pki(daemon.state_dir)), work, admin_port):
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
    """Without a forwarded certificate the dev policy lets a bound token through (no mTLS to check)."""
    alpha = stack.identity(ALPHA, "alpha-4")
    client = Client(stack.daemon.api_address, Identity.from_dir(alpha),
                    check_server=stack.daemon.check_address)
    token = client.mint("bind-4", ["demo:*:read:internal"]).token
    assert client.check(token, "demo", "reports", "read", "internal").allowed
