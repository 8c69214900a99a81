"""Mint and revoke over real mTLS against the daemon process: only a valid X.509-SVID gets a token."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from processes import ROOT, Daemon

from agentauthz.client import Client, Identity
from agentauthz.identity.devca import CertAndKey, DevPki, ensure_dev_pki, issue_svid, make_ca, make_leaf
from agentauthz.v1 import agentauthz_pb2 as pb
from agentauthz.v1 import agentauthz_pb2_grpc as pb_grpc

AGENT = "spiffe://dev.local/agent/alpha"
GRANT = ["demo:*:read"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("mtls")
    d = Daemon(work / "state", {"admins": ["spiffe://dev.local/admin/ops"]}).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def pki(daemon: Daemon) -> DevPki:
    return ensure_dev_pki(daemon.state_dir)


def identity(leaf: CertAndKey, pki: DevPki) -> Identity:
    return Identity(leaf.cert_pem, leaf.key_pem, pki.ca_cert_pem)


def mint_with(daemon: Daemon, ident: Identity | None, pki: DevPki) -> pb.MintResponse:
    credentials = ident.credentials() if ident else grpc.ssl_channel_credentials(pki.ca_cert_pem)
    with grpc.secure_channel(daemon.api_address, credentials) as channel:
        stub = pb_grpc.AgentAuthzStub(channel)
        return stub.Mint(pb.MintRequest(task="t", grants=[pb.Grant(tool="demo", target="*",
                                                                   operations=["read"])]), timeout=5)


def test_valid_svid_mints_a_token_bound_to_its_certificate(daemon: Daemon, pki: DevPki,
                                                           tmp_path: Path) -> None:
    issue_svid(pki, AGENT, tmp_path)
    minted = Client(daemon.api_address, Identity.from_dir(tmp_path)).mint("t", GRANT, intent="test")
    assert minted.agent == AGENT and minted.token.count(".") == 2
    assert [(g.tool, g.target, list(g.operations)) for g in minted.grants] == [("demo", "*", ["read"])]
    claims = json.loads(base64.urlsafe_b64decode(minted.token.split(".")[1] + "=="))
    assert claims["sub"] == AGENT and claims["cnf"]["x5t#S256"]
    assert claims["exp"] - claims["iat"] <= 600  # the dev policy's cap


def test_policy_narrows_what_is_minted(daemon: Daemon, pki: DevPki, tmp_path: Path) -> None:
    issue_svid(pki, AGENT, tmp_path)
    client = Client(daemon.api_address, Identity.from_dir(tmp_path))
    minted = client.mint("narrow", ["demo:*:read,write,admin:restricted", "billing:*:read"], ttl=86400)
    assert [(g.tool, sorted(g.operations), g.sensitivity) for g in minted.grants] == \
        [("demo", ["read", "write"], "internal")]
    assert minted.expires_at - time.time() <= 601
    assert {g.tool for g in minted.denied} >= {"billing"}


def test_approval_required_grant_mints_nothing_and_waits_for_a_human(daemon: Daemon, pki: DevPki,
                                                                      tmp_path: Path) -> None:
    issue_svid(pki, AGENT, tmp_path)  # the whole flow is in test_approval.py
    client = Client(daemon.api_address, Identity.from_dir(tmp_path))
    minted = client.mint("rm", ["demo:*:read", "demo:*:delete"])
    assert not minted.token and minted.pending.state == "pending"
    assert [list(g.operations) for g in minted.pending.grants] == [["delete"]]


def test_no_client_certificate_is_refused(daemon: Daemon, pki: DevPki) -> None:
    with pytest.raises(grpc.RpcError) as err:
        mint_with(daemon, None, pki)
    # The daemon terminates TLS itself: the handshake completes, and the call is refused with a reason.
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "presented no client certificate" in err.value.details()


def test_certificate_from_another_ca_is_refused(daemon: Daemon, pki: DevPki) -> None:
    rogue = make_ca("rogue CA")
    with pytest.raises(grpc.RpcError) as err:
        mint_with(daemon, identity(make_leaf(rogue, [AGENT]), pki), pki)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "is not in the trust bundle" in err.value.details()


@pytest.mark.parametrize("uris, is_ca, usage", [
    (["spiffe://other.domain/agent/alpha"], False, ("digital_signature",)),  # another trust domain
    ([AGENT, "spiffe://dev.local/agent/beta"], False, ("digital_signature",)),  # two URI SANs
    ([AGENT], True, ("digital_signature", "key_cert_sign")),  # a CA certificate as leaf
    ([], False, ("digital_signature",)),  # no SPIFFE ID at all
    (["spiffe://dev.local/agent/%61lpha"], False, ("digital_signature",)),  # percent-encoded
], ids=["other-trust-domain", "two-uri-sans", "ca-as-leaf", "no-uri-san", "percent-encoded"])
def test_hostile_certificates_from_the_right_ca_are_unauthenticated(
        daemon: Daemon, pki: DevPki, uris: list[str], is_ca: bool, usage: tuple[str, ...]) -> None:
    leaf = make_leaf(pki.ca, uris, is_ca=is_ca, key_usage=usage)
    with pytest.raises(grpc.RpcError) as err:
        mint_with(daemon, identity(leaf, pki), pki)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "identity_invalid" in err.value.details()


def test_expired_certificate_is_refused(daemon: Daemon, pki: DevPki) -> None:
    past = datetime.now(timezone.utc) - timedelta(days=2)
    leaf = make_leaf(pki.ca, [AGENT], not_before=past, not_after=past + timedelta(hours=1))
    with pytest.raises(grpc.RpcError) as err:
        mint_with(daemon, identity(leaf, pki), pki)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "expired at" in err.value.details()


def test_only_an_admin_may_revoke_another_agent_or_a_key(daemon: Daemon, pki: DevPki, tmp_path: Path) -> None:
    issue_svid(pki, AGENT, tmp_path / "a")
    issue_svid(pki, "spiffe://dev.local/admin/ops", tmp_path / "admin")
    agent = Client(daemon.api_address, Identity.from_dir(tmp_path / "a"))
    admin = Client(daemon.api_address, Identity.from_dir(tmp_path / "admin"))
    for kwargs in ({"agent": "spiffe://dev.local/agent/beta"}, {"key_id": "x" * 43}):
        with pytest.raises(grpc.RpcError) as err:
            agent.revoke(**kwargs)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert admin.revoke(agent="spiffe://dev.local/agent/beta") > 0


def test_cli_mint_and_check_round_trip(daemon: Daemon, pki: DevPki, tmp_path: Path) -> None:
    out = tmp_path / "id"
    made = subprocess.run([sys.executable, "-m", "agentauthz", "dev-identity", AGENT, "--state-dir",
                           str(daemon.state_dir), "--out", str(out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert made.returncode == 0, made.stderr
    minted = daemon.cli("mint", "--server", daemon.api_address, "--identity", str(out), "--task", "cli",
                        "--grant", "demo:reports:read", "--json")
    assert minted.returncode == 0, minted.stderr
    token = json.loads(minted.stdout)["token"]
    allowed = daemon.cli("check", "--server", daemon.check_address, "--token", token, "--tool", "demo",
                         "--target", "reports", "--operation", "read", "--json")
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["headers"]["x-agentauthz-agent"] == AGENT
    denied = daemon.cli("check", "--server", daemon.check_address, "--token", token, "--tool", "demo",
                        "--target", "other", "--operation", "read")
    assert denied.returncode == 1 and "scope_denied" in denied.stderr
    refused = daemon.cli("mint", "--server", daemon.api_address, "--identity", str(out), "--task", "x",
                         "--grant", "not-a-grant")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1


def test_cli_keys_list_and_admin_rotation(daemon: Daemon, pki: DevPki, tmp_path: Path) -> None:
    def keys() -> dict[str, str]:
        listed = daemon.cli("keys", "list", "--state-dir", str(daemon.state_dir), "--json")
        assert listed.returncode == 0, listed.stderr
        return {k["kid"]: k["state"] for k in json.loads(listed.stdout)["keys"]}
    before = keys()
    issue_svid(pki, "spiffe://dev.local/admin/ops", tmp_path / "admin")
    issue_svid(pki, AGENT, tmp_path / "agent")
    refused = daemon.cli("keys", "rotate", "--server", daemon.api_address, "--identity",
                         str(tmp_path / "agent"))
    assert refused.returncode == 1 and refused.stderr.startswith("agentauthz: not_permitted: ")
    rotated = daemon.cli("keys", "rotate", "--server", daemon.api_address, "--identity",
                         str(tmp_path / "admin"), "--json")
    assert rotated.returncode == 0, rotated.stderr
    new_current = json.loads(rotated.stdout)["current_key_id"]
    after = keys()
    assert after[new_current] == "current" and before[new_current] == "next"  # published before it signed
    assert sum(state == "previous" for state in after.values()) >= 1


def test_ending_a_task_no_token_can_carry_is_refused_before_the_journal(daemon: Daemon, pki: DevPki,
                                                                         tmp_path: Path) -> None:
    """EndTask and a task-scoped Revoke take the task names Mint takes (1-256 printable characters):
    a 3 MB name would otherwise go to the revocation journal and the audit log as it is."""
    issue_svid(pki, AGENT, tmp_path)
    client = Client(daemon.api_address, Identity.from_dir(tmp_path))
    journal = daemon.state_dir / "revocations" / "journal.jsonl"
    size = journal.stat().st_size
    for name in ("x" * (3 << 20), "x" * 257, "two words", "tab\there", "nul\x00"):
        for end in (client.end_task, lambda task: client.revoke(task=task)):
            with pytest.raises(grpc.RpcError) as info:
                end(name)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name[:20]
            assert "task must be 1-256 printable characters" in (info.value.details() or "")
    assert journal.stat().st_size == size
    client.end_task("x" * 256)  # the longest name a token can carry still ends
    assert journal.stat().st_size > size
