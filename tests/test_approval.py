"""Human approval end to end through real daemons: pending, decide, mint under it, and who may not approve."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import socket
import ssl
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from processes import Daemon, wait_for

from agentauthz import cli
from agentauthz.authority.approvers import DEV_AUDIENCE, DEV_ISSUER, issue_dev_credential
from agentauthz.client import ApprovalsClient, Client, Identity
from agentauthz.config import Config
from agentauthz.errors import ConfigError
from agentauthz.identity.devca import ensure_dev_pki, issue_svid
from agentauthz.identity.jwtsvid import JwtIssuer
from agentauthz.v1 import agentauthz_pb2 as pb
from agentauthz.v1 import agentauthz_pb2_grpc as pb_grpc

ALPHA, BETA = "spiffe://dev.local/agent/alpha", "spiffe://dev.local/agent/beta"
GATED = ["demo:*:read", "demo:reports:delete"]  # the dev policy gates delete behind a human
DAEMON_ISSUER = "https://agentauthz.dev.local"
HUMAN_ISS, AGENT_ISS, HUMAN_AUD = "https://sso.example/humans", "https://oidc.example/agents", "approvals-ui"
HUMAN_KEY, AGENT_KEY = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
SENT: list[str] = []  # every human bearer sent: none may reach the audit log or the daemon log


def identity(d: Daemon, agent: str = ALPHA) -> Identity:
    out = d.state_dir.parent / f"id-{agent.rsplit('/', 1)[-1]}"
    issue_svid(ensure_dev_pki(d.state_dir), agent, out)
    return Identity.from_dir(out)


def agent(d: Daemon, name: str = ALPHA) -> Client:
    return Client(d.api_address, identity(d, name), check_server=d.check_address)


def humans(d: Daemon, credential: str) -> ApprovalsClient:
    SENT.append(credential)
    return ApprovalsClient(d.approval_address, credential, (d.state_dir / "pki" / "ca.pem").read_bytes())


def alice(d: Daemon) -> ApprovalsClient:
    return humans(d, issue_dev_credential(d.state_dir, "alice"))


def refused(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def claims_of(token: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("approval") / "state").start()
    yield d
    d.stop()


def test_pending_then_approved_then_the_token_carries_the_approver(daemon: Daemon) -> None:
    a, human = agent(daemon), alice(daemon)
    first = a.mint("cleanup", GATED, intent="delete last year's reports")
    pending = first.pending
    assert not first.token and first.HasField("pending")
    assert (pending.agent, pending.task, pending.state) == (ALPHA, "cleanup", "pending")
    assert pending.intent == "delete last year's reports"
    assert [(g.tool, g.target, list(g.operations)) for g in pending.grants] == \
        [("demo", "reports", ["delete"])]
    assert time.time() < pending.expires_at <= time.time() + 900
    assert a.mint("cleanup", GATED).pending.id == pending.id  # a retry finds its request, not a new one
    assert refused(lambda: a.mint("cleanup", GATED, approval_id=pending.id))[0] == \
        grpc.StatusCode.FAILED_PRECONDITION  # approval_pending: nobody decided yet
    assert a.get_approval(pending.id).state == "pending"
    assert pending.id in [r.id for r in human.list()]

    approved = human.approve(pending.id, "reports are archived")
    assert (approved.state, approved.comment) == ("approved", "reports are archived")
    assert approved.approver == f"alice ({DEV_ISSUER})" == a.get_approval(pending.id).approver
    assert pending.id not in [r.id for r in human.list()]
    assert pending.id in [r.id for r in human.list("approved")]
    assert refused(lambda: human.reject(pending.id))[0] == grpc.StatusCode.FAILED_PRECONDITION  # decided

    minted = a.mint("cleanup", GATED, approval_id=pending.id)
    claims = claims_of(minted.token)
    assert minted.approver == approved.approver
    assert claims["approval"] == {"id": pending.id, "approver": {"sub": "alice", "iss": DEV_ISSUER},
                                  "grants": [{"tool": "demo", "target": "reports", "ops": ["delete"],
                                              "sensitivity": "public"}]}  # what the human approved
    assert claims["exp"] <= approved.expires_at
    assert a.check(minted.token, "demo", "reports", "delete").allowed
    assert a.check(minted.token, "demo", "payroll", "delete").reason == "scope_denied"  # not approved

    def recorded() -> bool:
        kinds = {(r["kind"], r.get("approval_id")) for r in daemon.audit_records()}
        return {(kind, pending.id) for kind in ("approval_request", "approval_decide", "mint")} <= kinds
    wait_for(recorded, 10, "request, decision and use in the audit log")
    decision = next(r for r in daemon.audit_records() if r["kind"] == "approval_decide" and r["decision"])
    assert decision["approver_subject"] == "alice" and decision["approver_issuer"] == DEV_ISSUER


def test_a_rejected_request_mints_nothing(daemon: Daemon) -> None:
    a = agent(daemon)
    pending = a.mint("risky", GATED).pending
    assert alice(daemon).reject(pending.id, "not today").state == "rejected"
    code, details = refused(lambda: a.mint("risky", GATED, approval_id=pending.id))
    assert code == grpc.StatusCode.PERMISSION_DENIED and details.startswith("approval_rejected")
    again = a.mint("risky", GATED)  # asking again is a new request for a human, never a token
    assert not again.token and again.pending.id != pending.id


def test_an_approval_covers_one_agent_one_task_and_exactly_its_grants(daemon: Daemon) -> None:
    a, b = agent(daemon), agent(daemon, BETA)
    pending = a.mint("task-a", GATED).pending
    alice(daemon).approve(pending.id)
    for task, grants in (("task-b", GATED),  # another task of the same agent
                         ("task-a", ["demo:*:delete"]),  # a wider target
                         ("task-a", ["demo:reports:delete:internal"]),  # more sensitive data
                         ("task-a", ["demo:reports:delete", "demo:archive:delete"])):  # one grant more
        code, details = refused(lambda t=task, g=grants: a.mint(t, g, approval_id=pending.id))
        assert code == grpc.StatusCode.PERMISSION_DENIED and details.startswith("approval_mismatch"), grants
    # Another agent learns nothing about alpha's request, not even that it exists.
    assert refused(lambda: b.mint("task-a", GATED, approval_id=pending.id))[0] == grpc.StatusCode.NOT_FOUND
    assert refused(lambda: b.get_approval(pending.id))[0] == grpc.StatusCode.NOT_FOUND
    assert refused(lambda: a.get_approval("made-up"))[0] == grpc.StatusCode.NOT_FOUND
    narrower = a.mint("task-a", ["demo:reports:delete"], approval_id=pending.id)
    assert [g.target for g in narrower.grants] == ["reports"]


def test_ending_the_task_or_revoking_the_agent_drops_its_approvals(daemon: Daemon) -> None:
    a, gamma = agent(daemon), agent(daemon, "spiffe://dev.local/agent/gamma")
    human = alice(daemon)
    ended = a.mint("short-lived", GATED).pending
    human.approve(ended.id)
    token = a.mint("short-lived", GATED, approval_id=ended.id).token
    a.end_task("short-lived")
    assert refused(lambda: a.get_approval(ended.id))[0] == grpc.StatusCode.NOT_FOUND
    assert ended.id not in [r.id for r in human.list("approved")]
    assert a.check(token, "demo", "reports", "delete").reason == "task_ended"
    waiting = gamma.mint("other", GATED).pending
    gamma.revoke(agent="spiffe://dev.local/agent/gamma")
    assert refused(lambda: human.approve(waiting.id))[0] == grpc.StatusCode.NOT_FOUND
    # Revoking itself banned gamma: it mints nothing at all until an admin lifts the ban.
    code, details = refused(lambda: gamma.mint("other", GATED, approval_id=waiting.id))
    assert (code, details.split(":")[0]) == (grpc.StatusCode.PERMISSION_DENIED, "agent_banned")


def test_an_agent_cannot_bury_the_humans_in_requests(daemon: Daemon) -> None:
    a = agent(daemon, "spiffe://dev.local/agent/noisy")
    for n in range(32):
        assert a.mint(f"t{n}", GATED).HasField("pending")
    assert refused(lambda: a.mint("t32", GATED))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- who cannot approve -------------------------------------------------------------------------------


def _dev_key(d: Daemon) -> tuple[Any, str]:
    directory = d.state_dir / "approver"
    key = serialization.load_pem_private_key((directory / "key.pem").read_bytes(), password=None)
    return key, json.loads((directory / "jwks.json").read_text())["keys"][0]["kid"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], body: dict[str, Any],
              sign: Callable[[bytes], bytes] | None = None) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(body).encode())}"
    return f"{signing_input}.{_b64(sign(signing_input.encode()) if sign else b'')}"


def _human_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": DEV_ISSUER, "sub": "mallory", "aud": DEV_AUDIENCE, "iat": now, "exp": now + 300, **changes}


def _dev_forgeries(d: Daemon) -> dict[str, str]:
    key, kid = _dev_key(d)
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)

    def signed(**changes: Any) -> str:
        return jwt.encode(_human_claims(**changes), key, algorithm="ES256", headers={"kid": kid})
    stranger = ec.generate_private_key(ec.SECP256R1())
    return {
        "spiffe-subject": signed(sub=ALPHA),
        "spiffe-subject-upper-case": signed(sub=" SPIFFE://dev.local/agent/alpha"),
        "wrong-audience": signed(aud=DAEMON_ISSUER),
        "expired": signed(exp=int(time.time()) - 600),
        "unknown-issuer": jwt.encode(_human_claims(iss="https://evil.example"), stranger, algorithm="ES256",
                                     headers={"kid": kid}),
        "forged-with-another-key": jwt.encode(_human_claims(), stranger, algorithm="ES256",
                                              headers={"kid": kid}),
        "hs256-with-the-public-key": _unsigned({"alg": "HS256", "kid": kid, "typ": "JWT"}, _human_claims(),
                                               lambda m: hmac.new(public_pem, m, hashlib.sha256).digest()),
        "alg-none": _unsigned({"alg": "none", "kid": kid, "typ": "JWT"}, _human_claims()),
    }


def test_no_agent_credential_and_no_forged_token_reaches_the_approvals_service(daemon: Daemon) -> None:
    a = agent(daemon)
    pending = a.mint("guarded", GATED).pending
    own_token = a.mint("guarded", ["demo:*:read"]).token  # the agent's agentauthz token, as a bearer
    bearers = {**_dev_forgeries(daemon), "agentauthz-token": own_token}
    for name, bearer in bearers.items():
        code, details = refused(lambda b=bearer: humans(daemon, b).approve(pending.id))
        assert code == grpc.StatusCode.UNAUTHENTICATED and details.startswith("approver_invalid"), name
    assert "agents never approve" in refused(lambda: humans(daemon, bearers["spiffe-subject"]).list())[1]
    # The agent's own mTLS identity: the listener never asks for a certificate, so it proves nothing.
    ident, ca = identity(daemon), (daemon.state_dir / "pki" / "ca.pem").read_bytes()
    with grpc.secure_channel(daemon.approval_address, grpc.ssl_channel_credentials(
            ca, ident.key, ident.certificate)) as channel:
        decide = pb_grpc.ApprovalsStub(channel).Approve
        code, _ = refused(lambda: decide(pb.ApproveRequest(id=pending.id, approve=True), timeout=5))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    with grpc.secure_channel(daemon.api_address, ident.credentials()) as channel:  # nor on the agents' API
        decide = pb_grpc.ApprovalsStub(channel).Approve
        code, _ = refused(lambda: decide(pb.ApproveRequest(id=pending.id, approve=True), timeout=5))
        assert code == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(daemon.approval_address) as channel:  # and never without TLS
        code, _ = refused(lambda: pb_grpc.ApprovalsStub(channel).ListApprovals(pb.ListApprovalsRequest(),
                                                                               timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE
    assert a.get_approval(pending.id).state == "pending"
    wait_for(lambda: sum(r["kind"] == "approver_authn" for r in daemon.audit_records()) >= len(bearers), 10,
             "refused approvers in the audit log")


def test_the_cli_dev_human_approvals_approve_reject(daemon: Daemon, tmp_path: Path) -> None:
    ident_dir = daemon.state_dir.parent / "id-alpha"
    identity(daemon)
    mint = ["mint", "--server", daemon.api_address, "--identity", str(ident_dir), "--task", "cli",
            "--grant", "demo:reports:delete", "--json"]
    asked = daemon.cli(*mint)
    assert asked.returncode == 1 and "approval_required" in asked.stderr
    request_id = json.loads(asked.stdout)["pending"]["id"]
    # Never read as an option by `approve ID` (base64url ids began with "-" one time in 64).
    assert re.fullmatch("[0-9a-f]{32}", request_id), request_id

    credential = tmp_path / "alice.jwt"
    made = daemon.cli("dev-human", "alice", "--state-dir", str(daemon.state_dir), "--out", str(credential),
                      "--ttl", "120")
    assert made.returncode == 0, made.stderr
    assert credential.stat().st_mode & 0o777 == 0o600
    SENT.append(credential.read_text().strip())
    assert daemon.cli("dev-human", ALPHA, "--state-dir", str(daemon.state_dir),
                      "--out", str(tmp_path / "agent.jwt")).returncode == 1  # a SPIFFE ID is no human
    human = ["--server", daemon.approval_address, "--credential", str(credential),
             "--state-dir", str(daemon.state_dir), "--json"]
    listed = daemon.cli("approvals", *human)
    assert request_id in [r["id"] for r in json.loads(listed.stdout)["approvals"]], listed.stderr
    decided = daemon.cli("approve", request_id, "--comment", "fine", *human)
    assert json.loads(decided.stdout)["approver"] == f"alice ({DEV_ISSUER})", decided.stderr
    again = daemon.cli("reject", request_id, *human)
    assert again.returncode == 1 and "approval_already_decided" in again.stderr
    minted = daemon.cli(*mint, "--approval-id", request_id)
    assert minted.returncode == 0 and json.loads(minted.stdout)["approver"] == f"alice ({DEV_ISSUER})"

    # A rejection from the CLI: the request is closed, names who rejected it, and mints nothing.
    asked = daemon.cli(*[a if a != "cli" else "cli-2" for a in mint])
    other = json.loads(asked.stdout)["pending"]["id"]
    rejected = daemon.cli("reject", other, "--comment", "not today", *human)
    assert rejected.returncode == 0, rejected.stderr
    assert json.loads(rejected.stdout)["state"] == "rejected"
    assert json.loads(rejected.stdout)["approver"] == f"alice ({DEV_ISSUER})"
    refused = daemon.cli(*[a if a != "cli" else "cli-2" for a in mint], "--approval-id", other)
    assert refused.returncode == 1 and "approval_rejected" in refused.stderr, refused.stderr


# -- configured approvers next to agent JWT-SVID issuers ----------------------------------------------


def _jwks(path: Path, key: Any, kid: str) -> str:
    jwk = {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid}
    path.write_text(json.dumps({"keys": [jwk]}))
    return str(path)


@pytest.fixture(scope="module")
def sso(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("sso")
    d = Daemon(work / "state", {
        "approvers": [{"issuer": HUMAN_ISS, "jwks_file": _jwks(work / "h.jwks", HUMAN_KEY, "h1"),
                       "algorithms": ["ES256"], "audience": HUMAN_AUD}],
        "jwt_issuers": [{"issuer": AGENT_ISS, "jwks_file": _jwks(work / "a.jwks", AGENT_KEY, "a1"),
                         "algorithms": ["ES256"]}]}).start()
    yield d
    d.stop()


def _token(key: Any, kid: str, **claims: Any) -> str:
    now = int(time.time())
    return jwt.encode({"iat": now, "exp": now + 300, **claims}, key, algorithm="ES256", headers={"kid": kid})


def test_only_the_approver_issuer_approves_never_the_requesting_agent(sso: Daemon) -> None:
    runtime = identity(sso, "spiffe://dev.local/runtime/r1")
    agent_jwt = _token(AGENT_KEY, "a1", iss=AGENT_ISS, sub=BETA, aud=[DAEMON_ISSUER])
    with grpc.secure_channel(sso.api_address, runtime.credentials()) as channel:
        pending = pb_grpc.AgentAuthzStub(channel).Mint(pb.MintRequest(task="t", grants=[
            pb.Grant(tool="demo", target="reports", operations=["delete"])]),
            metadata=(("authorization", f"Bearer {agent_jwt}"),), timeout=5).pending
    assert pending.agent == BETA and pending.state == "pending"
    for name, bearer in {
        "the requesting agent's JWT-SVID": agent_jwt,
        "agent issuer, human audience and name": _token(AGENT_KEY, "a1", iss=AGENT_ISS, sub="carol",
                                                        aud=HUMAN_AUD),
        "human issuer, SPIFFE subject": _token(HUMAN_KEY, "h1", iss=HUMAN_ISS, sub=BETA, aud=HUMAN_AUD),
        "human issuer, the daemon's audience": _token(HUMAN_KEY, "h1", iss=HUMAN_ISS, sub="carol",
                                                      aud=DAEMON_ISSUER),
        "the development issuer is not trusted here": issue_dev_credential(sso.state_dir, "alice"),
    }.items():
        code, _ = refused(lambda b=bearer: humans(sso, b).approve(pending.id))
        assert code == grpc.StatusCode.UNAUTHENTICATED, name
    ca = (sso.state_dir / "pki" / "ca.pem").read_bytes()  # its certificate and its bearer, together
    with grpc.secure_channel(sso.approval_address, grpc.ssl_channel_credentials(
            ca, runtime.key, runtime.certificate)) as channel:
        code, _ = refused(lambda: pb_grpc.ApprovalsStub(channel).Approve(
            pb.ApproveRequest(id=pending.id, approve=True),
            metadata=(("authorization", f"Bearer {agent_jwt}"),), timeout=5))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    assert sso.cli("dev-human", "alice", "--config", str(sso.config_path),
                   "--out", str(sso.state_dir.parent / "h.jwt")).returncode == 1
    carol = humans(sso, _token(HUMAN_KEY, "h1", iss=HUMAN_ISS, sub="carol", aud=HUMAN_AUD))
    assert [r.id for r in carol.list()] == [pending.id]  # still pending after every attempt
    assert carol.approve(pending.id).approver == f"carol ({HUMAN_ISS})"


def test_config_keeps_agent_issuers_and_approver_issuers_apart(tmp_path: Path) -> None:
    jwks = Path(_jwks(tmp_path / "k.jwks", HUMAN_KEY, "h1"))
    human = JwtIssuer(HUMAN_ISS, jwks, ("ES256",), HUMAN_AUD)
    with pytest.raises(ConfigError, match="agents could approve"):
        Config(approvers=(human,), jwt_issuers=(JwtIssuer(HUMAN_ISS, jwks, ("ES256",)),))
    with pytest.raises(ConfigError, match="agents could approve"):  # the development approver too
        Config(jwt_issuers=(JwtIssuer(DEV_ISSUER, jwks, ("ES256",)),))
    with pytest.raises(ConfigError, match="daemon's own token issuer"):
        Config(approvers=(JwtIssuer(DAEMON_ISSUER, jwks, ("ES256",), HUMAN_AUD),))
    for alg in ("HS256", "none", "EdDSA"):
        with pytest.raises(ConfigError, match="algorithms must be among"):
            Config(approvers=(JwtIssuer(HUMAN_ISS, jwks, (alg,), HUMAN_AUD),))
    with pytest.raises(ConfigError, match="audience"):
        Config.from_mapping({"approvers": [{"issuer": HUMAN_ISS, "jwks_file": str(jwks),
                                            "algorithms": ["ES256"]}]})
    with pytest.raises(ConfigError, match="approval_ttl"):
        Config(approval_ttl=0)


# -- expiry and restart ---------------------------------------------------------------------------------


def test_expired_requests_and_approvals_mint_nothing(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "state", {"approval_ttl": 2, "approval_request_ttl": 3, "leeway": 0}).start()
    try:
        a, human = agent(d), alice(d)
        pending = a.mint("soon", GATED).pending
        approved = human.approve(pending.id)
        token = a.mint("soon", GATED, approval_id=pending.id).token
        assert claims_of(token)["exp"] <= approved.expires_at <= time.time() + 3  # the approval caps it
        stale = a.mint("later", GATED).pending
        wait_for(lambda: time.time() > approved.expires_at + 1, 10, "the approval to expire")
        code, details = refused(lambda: a.mint("soon", GATED, approval_id=pending.id))
        assert code == grpc.StatusCode.PERMISSION_DENIED and details.startswith("approval_expired")
        assert a.check(token, "demo", "reports", "delete").reason == "token_expired"
        wait_for(lambda: a.get_approval(stale.id).state == "expired", 10, "the request to expire")
        code, details = refused(lambda: human.approve(stale.id))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and details.startswith("approval_expired")
        assert {pending.id, stale.id} <= {r.id for r in human.list("expired")}
    finally:
        d.stop()


def test_a_restart_keeps_every_decision(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "state").start()
    try:
        a, human = agent(d), alice(d)
        yes, no, open_ = (a.mint(task, GATED).pending for task in ("yes", "no", "open"))
        human.approve(yes.id, "ok")
        human.reject(no.id)
        assert d.stop() == 0
        assert os.stat(d.state_dir / "approvals.json").st_mode & 0o777 == 0o600
        d.start()
        assert [a.get_approval(r.id).state for r in (yes, no, open_)] == ["approved", "rejected", "pending"]
        assert a.mint("yes", GATED, approval_id=yes.id).approver == f"alice ({DEV_ISSUER})"
        assert refused(lambda: a.mint("no", GATED, approval_id=no.id))[1].startswith("approval_rejected")
        assert alice(d).approve(open_.id).state == "approved"
    finally:
        d.stop()


def test_no_human_credential_reaches_a_log(daemon: Daemon) -> None:
    text = b"".join(p.read_bytes() for p in (daemon.state_dir / "audit").rglob("*") if p.is_file())
    text += daemon.log().encode()
    for bearer in SENT:
        for segment in bearer.split(".")[1:]:  # payload and signature are unique to each token
            assert len(segment) < 8 or segment.encode() not in text


# -- the store on its own --------------------------------------------------------------------------------


def test_an_approved_grant_covers_only_what_the_human_saw() -> None:
    from agentauthz.authority.approvals import Approval
    approved = {"tool": "demo", "target": "reports/*", "ops": ["delete", "write"], "sensitivity": "internal",
                "budget": {"max_calls": 3}}
    a = Approval("id", ALPHA, "t", "", [approved], "approved", 0, 10)
    inside = {**approved, "target": "reports/q3", "ops": ["delete"], "sensitivity": "public"}
    assert a.covers(approved) and a.covers(inside)
    unbudgeted = {k: v for k, v in inside.items() if k != "budget"}
    for outside in ({**inside, "budget": {"max_calls": 4}}, unbudgeted,
                    {**inside, "arguments": [{"name": "path", "prefix": "/"}]},
                    {**inside, "target": "reports"}, {**inside, "target": "*"}, {**inside, "tool": "billing"},
                    {**inside, "ops": ["read"]}, {**inside, "sensitivity": "confidential"}):
        assert not a.covers(outside), outside


def test_unreadable_approvals_refuse_to_start_rather_than_forget(tmp_path: Path) -> None:
    from agentauthz.authority.approvals import ApprovalStore
    from agentauthz.errors import StateError
    for text in ("{", '{"version": 2, "approvals": []}',
                 '{"version": 1, "approvals": [{"id": "x", "state": "approved"}]}'):
        (tmp_path / "approvals.json").write_text(text)
        with pytest.raises(StateError, match="approvals are unreadable"):
            ApprovalStore.open(tmp_path / "approvals.json")


def test_a_grant_a_terminal_would_not_show_as_it_is_never_reaches_a_human(daemon: Daemon) -> None:
    """A target with terminal controls (here: move back over the '*' and erase the line) put a request
    for demo:*:delete before the human as demo:reports:delete. Control and format characters (bidi
    overrides too) are refused in a requested tool or target: such a grant is denied, never pending;
    and the CLI escapes whatever an older daemon's request may still carry."""
    a = agent(daemon)
    for target in ("\x1b[21D\x1b[Kreports", "reports\u202e", "reports\nid=x", "rep\x00orts"):
        minted = a.mint("spoof", [pb.Grant(tool="demo", target="*", operations=["read"]),
                                  pb.Grant(tool="demo", target=target, operations=["delete"])])
        assert minted.token and not minted.HasField("pending"), repr(target)
        assert [(g.target, list(g.operations)) for g in minted.denied] == [(target, ["delete"])]
        assert [g.target for g in minted.grants] == ["*"]
    escaping = pb.Grant(tool="demo\x1b[K", target="*", operations=["read"])
    assert refused(lambda: a.mint("spoof", [escaping]))[0] == grpc.StatusCode.PERMISSION_DENIED  # nothing
    line = cli._approval_line(pb.ApprovalRequest(id="x", agent=ALPHA, task="t", state="pending", grants=[
        pb.Grant(tool="demo", target="\x1b[21D\x1b[Kreports", operations=["delete"], sensitivity="public")]))
    assert "\x1b" not in line and "demo:\\u001b[21D\\u001b[Kreports:delete:public" in line


def test_connections_no_one_authenticates_never_take_the_daemons_descriptors(daemon: Daemon) -> None:
    """Anyone may open a TLS connection to the humans' listener before any bearer is asked for. Each
    one held a file descriptor for good: 20,000 of them would take every descriptor the daemon has,
    the audit log's and the Check's too. They are capped (and closed when idle); the daemon serves on."""
    assert daemon.proc is not None
    fds = Path(f"/proc/{daemon.proc.pid}/fd")
    before = len(list(fds.iterdir()))
    client = ssl.create_default_context()
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    client.set_alpn_protocols(["h2"])
    host, port = daemon.approval_address.rsplit(":", 1)
    held = []
    try:
        for _ in range(600):
            try:
                held.append(client.wrap_socket(socket.create_connection((host, int(port)), timeout=5)))
            except OSError:
                pass  # closed by the cap while handshaking: one more refused
        time.sleep(0.5)
        assert len(list(fds.iterdir())) < before + 300  # before: one descriptor more per connection
        a = agent(daemon)
        assert a.check(a.mint("still", ["demo:*:read"]).token, "demo", "x", "read").allowed
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: alice(daemon).list() is not None, 10, "the approvals listener to take a human again")
