"""Trust boundaries: each audience has its own keys, TTL cap and binding rule; no token crosses over."""

from __future__ import annotations

import base64
import json
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from nacl.signing import SigningKey
from processes import Daemon, wait_for

from agentauthz import errors
from agentauthz.client import CHECK_METHOD, Client, Identity, check_request, decision_from, verify_offline
from agentauthz.decision import tokens
from agentauthz.decision.policy import DEV_POLICY, Policy
from agentauthz.errors import PolicyError
from agentauthz.identity.devca import ensure_dev_pki, issue_svid
from agentauthz.state import statuslist
from agentauthz.state.keys import _read_private

AGENT = "spiffe://dev.local/agent/alpha"
ADMIN = "spiffe://dev.local/agent/admin"
GRANT = ["demo:*:read:internal"]
BOUNDARIES = """
boundaries:
  data: {max_ttl: 60, require_certificate_binding: true}
"""


class Boundaries:
    def __init__(self, daemon: Daemon, work: Path) -> None:
        self.daemon = daemon
        pki = ensure_dev_pki(daemon.state_dir)
        self.clients = {}
        for agent in (AGENT, ADMIN):
            out = issue_svid(pki, agent, work / agent.rsplit("/", 1)[1])
            self.clients[agent] = Client(daemon.api_address, Identity.from_dir(out),
                                         check_server=daemon.check_address)
        self.client = self.clients[AGENT]

    def check(self, token: str, boundary: str = "") -> tuple[bool, str]:
        d = self.client.check(token, "demo", "reports", "read", "internal", boundary=boundary)
        return d.allowed, d.reason


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Boundaries]:
    work = tmp_path_factory.mktemp("boundaries")
    policy = work / "policy.yaml"
    policy.write_text(DEV_POLICY.read_text() + BOUNDARIES)
    daemon = Daemon(work / "state", {"leeway": 0, "audiences": ["tools", "data"], "admins": [ADMIN],
                                     "policy_file": str(policy)}).start()
    try:
        yield Boundaries(daemon, work)
    finally:
        daemon.stop()


def check_as(two: Boundaries, token: str, boundary: str, principal: str) -> tuple[bool, str]:
    """A Check as Envoy sends it from an mTLS listener without the certificate: the peer's SPIFFE ID."""
    request = ext_authz.CheckRequest.FromString(
        check_request(token, "demo", "reports", "read", "internal", boundary=boundary))
    request.attributes.source.principal = principal
    with grpc.insecure_channel(two.daemon.check_address) as channel:
        raw = channel.unary_unary(CHECK_METHOD)(request.SerializeToString(), timeout=10)
    decision = decision_from(raw)
    return decision.allowed, decision.reason


def claims_of(token: str) -> dict:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def kids_by_boundary(client: Client) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for key in client.jwks()["keys"]:
        out.setdefault(key["agentauthz_boundary"], set()).add(key["kid"])
    return out


def test_each_boundary_signs_with_its_own_keys_and_caps_ttl(two: Boundaries) -> None:
    tools = two.client.mint("b-1", GRANT, ttl=600)
    data = two.client.mint("b-1d", GRANT, ttl=600, audience="data")
    kids = kids_by_boundary(two.client)
    assert set(kids) == {"tools", "data"} and not kids["tools"] & kids["data"]
    assert tools.key_id in kids["tools"] and data.key_id in kids["data"]
    assert claims_of(tools.token)["aud"] == "tools" and claims_of(data.token)["aud"] == "data"
    assert tools.expires_at - claims_of(tools.token)["iat"] == 600
    assert data.expires_at - claims_of(data.token)["iat"] == 60  # the data boundary's max_ttl


def test_no_token_works_across_boundaries(two: Boundaries) -> None:
    tools = two.client.mint("b-2", GRANT).token
    data = two.client.mint("b-2d", GRANT, audience="data").token
    assert two.check(tools) == (True, "allow")
    assert two.check(tools, "tools") == (True, "allow")
    assert two.check(tools, "data") == (False, "token_boundary_mismatch")
    # The data boundary requires certificate binding, and a direct Check carries no certificate.
    assert two.check(data, "data") == (False, "token_certificate_required")
    assert two.check(data) == (False, "token_boundary_mismatch")
    assert two.check(tools, "billing") == (False, "boundary_unknown")


def test_a_leaked_key_of_one_boundary_cannot_mint_for_another(two: Boundaries) -> None:
    """Sign a token for ``data`` with the tools boundary's real private key from the state dir."""
    real = claims_of(two.client.mint("b-3", GRANT).token)
    kid = two.client.mint("b-3", GRANT).key_id
    pem = (two.daemon.state_dir / "keys" / f"{kid}.pem").read_bytes()
    raw = serialization.load_pem_private_key(pem, password=None).private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    now = int(time.time())
    forged = tokens.encode({**real, "aud": "data", "iat": now, "nbf": now, "exp": now + 30,
                            "jti": real["jti"] + "x"}, SigningKey(raw), kid)
    assert two.check(forged, "data")[0] is False
    assert two.check(forged, "data")[1] in ("token_boundary_mismatch", "token_key_unknown")
    assert two.check(forged, "tools") == (False, "token_audience_mismatch")


def test_revoking_one_boundarys_key_leaves_the_other_working(two: Boundaries) -> None:
    tools = two.client.mint("b-4", GRANT)
    data = two.client.mint("b-4d", GRANT, audience="data")
    admin = two.clients[ADMIN]
    admin.revoke(key_id=tools.key_id)
    allowed, reason = two.check(tools.token)
    assert not allowed and reason in ("key_revoked", "token_key_unknown")  # revoked and retired
    assert two.check(data.token, "data") == (False, "token_certificate_required")  # still verifies
    assert data.key_id in kids_by_boundary(two.client)["data"]
    # The tools boundary signs again with a fresh key; data's key never changed.
    fresh = two.client.mint("b-4e", GRANT)
    assert fresh.key_id != tools.key_id and two.check(fresh.token) == (True, "allow")
    assert two.client.mint("b-4f", GRANT, audience="data").key_id == data.key_id


def test_mint_for_a_boundary_not_served_is_refused(two: Boundaries) -> None:
    with pytest.raises(errors.RequestInvalid) as info:
        two.client.mint("b-5", GRANT, audience="billing")
    assert info.value.reason == "token_audience_mismatch"
    assert "billing" in str(info.value)


@pytest.mark.parametrize("text, problem", [
    ("boundaries: [data]", "must map boundary names"),
    ("boundaries: {data: {max_ttl: 0}}", "max_ttl"),
    ("boundaries: {data: {require_certificate_binding: 'yes'}}", "true or false"),
    ("boundaries: {data: {ttl: 5}}", "unknown key"),
    ("boundaries: {'a b': {}}", "boundary name"),
])
def test_policy_refuses_bad_boundaries(text: str, problem: str) -> None:
    with pytest.raises(PolicyError, match=problem):
        Policy.from_text("version: 1\nrules: []\n" + text + "\n")


def test_policy_boundaries_default_to_open() -> None:
    policy = Policy.from_text("version: 1\nrules: []\nboundaries: {data: {max_ttl: 30}}\n")
    assert policy.boundary("data").max_ttl == 30 and not policy.boundary("data").require_certificate_binding
    assert policy.boundary("tools").max_ttl >= 3600


def test_cli_check_names_the_boundary_as_a_route_would(two: Boundaries) -> None:
    """``agentauthz check --boundary NAME`` asks as a route with that ``boundary`` extension."""
    token = two.client.mint("b-6", GRANT).token

    def check(*boundary: str) -> tuple[int, str, str]:
        done = two.daemon.cli("check", "--server", two.daemon.check_address, "--token", token,
                              "--tool", "demo", "--target", "reports", "--operation", "read",
                              "--sensitivity", "internal", *boundary)
        return done.returncode, done.stdout, done.stderr

    code, out, _ = check()
    assert code == 0 and out.startswith("allowed (")
    code, out, _ = check("--boundary", "tools")
    assert code == 0 and out.startswith("allowed (")
    assert check("--boundary", "data")[::2] == (1, "agentauthz: denied: token_boundary_mismatch (HTTP 401)\n")
    assert check("--boundary", "billing")[::2] == (1, "agentauthz: denied: boundary_unknown (HTTP 403)\n")
    code, out, _ = check("--boundary", "data", "--json")
    assert code == 1 and json.loads(out)["reason"] == "token_boundary_mismatch"
    assert json.loads(out)["status"] == 401


def test_a_delegated_child_needs_a_certificate_where_the_boundary_requires_binding(two: Boundaries) -> None:
    parent = two.client.mint("b-7", GRANT, audience="data").token
    assert two.check(parent, "data") == (False, "token_certificate_required")
    child = two.client.delegate(parent, "spiffe://dev.local/agent/beta", GRANT).token
    # Unbound (the child agent was not on the Delegate call), so only its subject's mTLS will do.
    assert "cnf" not in claims_of(child)
    assert two.check(child, "data") == (False, "token_certificate_required")
    assert check_as(two, child, "data", principal="spiffe://dev.local/agent/beta") == (True, "allow")
    assert check_as(two, child, "data", principal=AGENT) == (False, "token_sender_mismatch")
    assert two.check(child) == (False, "token_boundary_mismatch")  # and it stays in its boundary


def test_each_boundary_publishes_its_status_list_signed_by_its_own_key(two: Boundaries) -> None:
    """A data token names /status-list/data, signed by a data key; a leaked tools key forges none."""
    http = f"http://127.0.0.1:{two.daemon.http_port}"
    jwks = two.client.jwks()
    minted = two.client.mint("b-8", GRANT, audience="data")
    uri = claims_of(minted.token)["status"]["status_list"]["uri"]
    assert uri == f"{http}/status-list/data"
    with urllib.request.urlopen(uri, timeout=5) as r:
        listing = r.read().decode()
    assert json.loads(base64.urlsafe_b64decode(listing.split(".")[0] + "=="))["kid"] \
        in kids_by_boundary(two.client)["data"]
    assert verify_offline(minted.token, jwks, listing)["jti"] == minted.token_id
    with pytest.raises(errors.StatusListError):  # the default list: another key, another URI
        verify_offline(minted.token, jwks, urllib.request.urlopen(f"{http}/status-list", timeout=5).read())

    # Every bit unset, for the data list's URI: signed with the data key it verifies (the forgery is
    # well-formed); signed with a tools key, the key of another boundary, it is refused.
    clean = tokens.b64url(zlib.compress(bytes(1 << 16)))
    forged = statuslist.list_claims(uri, claims_of(minted.token)["iss"], clean, int(time.time()))
    for boundary, keys in (("data", "keys-data"), ("tools", "keys")):
        ring = json.loads((two.daemon.state_dir / keys / "keyring.json").read_text())["keys"]
        kid = next(k["kid"] for k in ring if k["state"] == "current")
        signed = tokens.encode(forged, _read_private(two.daemon.state_dir / keys / f"{kid}.pem", kid), kid,
                               typ=statuslist.TYP)
        if boundary == "data":
            assert verify_offline(minted.token, jwks, signed)["jti"] == minted.token_id
        else:
            with pytest.raises(errors.StatusListInvalid, match="key not in the JWKS"):
                verify_offline(minted.token, jwks, signed)

    two.client.revoke(token_id=minted.token_id)

    def revoked() -> bool:
        try:
            verify_offline(minted.token, jwks, urllib.request.urlopen(uri, timeout=5).read())
        except errors.TokenRevoked:
            return True
        return False
    wait_for(revoked, 10, "the data list shows the revocation")
