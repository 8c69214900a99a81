"""Revoking an agent bans it until an admin unbans it: Mint, Delegate and Check, restarts and workers."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Callable

import grpc
import pytest
from processes import Daemon, audit_records

from agentauthz import reasons
from agentauthz.authority.core import Authority
from agentauthz.authority.outcomes import Refused
from agentauthz.client import Client, Identity
from agentauthz.config import Config
from agentauthz.decision import tokens
from agentauthz.identity.devca import ensure_dev_pki, issue_svid

ALPHA = "spiffe://dev.local/agent/alpha"
BETA = "spiffe://dev.local/agent/beta"
ADMIN = "spiffe://dev.local/admin/ops"
CHECKS = 20  # new connections each, so SO_REUSEPORT spreads them over the workers


def refused(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def reasons_everywhere(daemon: Daemon, token: str) -> set[str]:
    """What every worker answers for ``token``: one Check per new connection."""
    return {Client(daemon.api_address, check_server=daemon.check_address).check(
        token, "demo", "a", "read").reason for _ in range(CHECKS)}


def test_a_revoked_agent_is_banned_until_an_admin_unbans_it(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "state", {"admins": [ADMIN], "workers": 2}).start(30.0)
    try:
        pki = ensure_dev_pki(daemon.state_dir)
        for name, spiffe in (("alpha", ALPHA), ("beta", BETA), ("admin", ADMIN)):
            issue_svid(pki, spiffe, tmp_path / name)
        alpha, beta, admin = (Client(daemon.api_address, Identity.from_dir(tmp_path / name))
                              for name in ("alpha", "beta", "admin"))
        before = alpha.mint("before", ["demo:*:read"])
        delegated = alpha.delegate(before.token, BETA, ["demo:*:read"])
        held_by_beta = beta.mint("beta-own", ["demo:*:read"])
        assert reasons_everywhere(daemon, before.token) == {"allow"}

        admin.revoke(agent=ALPHA)

        def banned_everywhere() -> None:
            assert reasons_everywhere(daemon, before.token) == {"agent_revoked"}
            assert reasons_everywhere(daemon, delegated.token) == {"agent_revoked"}  # alpha on its chain
            assert reasons_everywhere(daemon, held_by_beta.token) == {"allow"}
            # One second later (the cutoff alone let this through): still no token for alpha.
            code, details = refused(lambda: alpha.mint("after", ["demo:*:read"]))
            assert (code, details.split(":")[0]) == (grpc.StatusCode.PERMISSION_DENIED, "agent_banned")
            code, details = refused(lambda: alpha.delegate(before.token, BETA, ["demo:*:read"]))
            assert details.startswith("agent_banned"), details  # from a banned agent
            code, details = refused(lambda: beta.delegate(held_by_beta.token, ALPHA, ["demo:*:read"]))
            assert details.startswith("agent_banned"), details  # to a banned agent

        time.sleep(1.1)
        banned_everywhere()
        assert daemon.stop() == 0
        daemon.start(30.0)
        banned_everywhere()  # journaled: the restart forgot nothing
        daemon.stop(signal.SIGKILL)
        daemon.start(30.0)
        banned_everywhere()

        # Only an admin lifts a ban; not the agent, not another agent.
        for who in (alpha, beta):
            assert refused(lambda c=who: c.unban(ALPHA))[0] == grpc.StatusCode.PERMISSION_DENIED
        done = daemon.cli("unban", "--server", daemon.api_address, "--identity", str(tmp_path / "admin"),
                          "--agent", ALPHA, "--json")
        assert done.returncode == 0, done.stderr
        code, details = refused(lambda: admin.unban(ALPHA))
        assert (code, details.split(":")[0]) == (grpc.StatusCode.FAILED_PRECONDITION, "agent_not_banned")

        after = alpha.mint("after", ["demo:*:read"])
        assert reasons_everywhere(daemon, after.token) == {"allow"}
        assert reasons_everywhere(daemon, before.token) == {"agent_revoked"}  # issued before: stays dead
        assert reasons_everywhere(daemon, delegated.token) == {"agent_revoked"}
        for delegated_again in (alpha.delegate(after.token, BETA, ["demo:*:read"]),
                                beta.delegate(held_by_beta.token, ALPHA, ["demo:*:read"])):
            assert reasons_everywhere(daemon, delegated_again.token) == {"allow"}
    finally:
        assert daemon.stop() == 0
    records = daemon.audit_records()
    bans = [r for r in records if r["kind"] in ("ban", "unban") and r["decision"] is True]
    assert [(r["kind"], r["agent"], r["target_agent"]) for r in bans] == [
        ("ban", ADMIN, ALPHA), ("unban", ADMIN, ALPHA)]
    refusals = {(r["kind"], r.get("agent")) for r in records
                if r.get("decision") is False and r.get("reason") == "agent_banned"}
    assert {("mint", ALPHA), ("delegate", ALPHA), ("delegate", BETA)} <= refusals
    assert {(r["kind"], r["agent"]) for r in records if r["kind"] == "unban" and r["decision"] is False} == {
        ("unban", ALPHA), ("unban", BETA)}
    # The worker decided some of those Checks: the ban and the unban reached it.
    worker = [r for r in audit_records(daemon.state_dir / "audit" / "worker-1") if r["kind"] == "check"]
    assert any(r["reason"] == "agent_revoked" and r["token_id"] == before.token_id for r in worker)
    assert any(r["reason"] == "allow" and r["token_id"] == after.token_id for r in worker)


def test_a_token_issued_after_the_ban_is_denied_too(tmp_path: Path) -> None:
    """Nothing mints for a banned agent; a token signed for it anyway (a mint racing the ban) is dead."""
    a = Authority(Config(state_dir=tmp_path / "state", admins=(ADMIN,)))
    a.start()
    try:
        a.revoke_agent(ADMIN, ALPHA)
        now = int(a.clock()) + 5  # well after the ban's cutoff
        for act in (None, {"sub": ALPHA, "idx": 0}):  # alpha as the holder, and as a delegator
            subject = BETA if act else ALPHA
            slot = a.revocations.allocate_slot(now + 60)
            claims = tokens.build_claims(
                issuer=a.config.issuer, audience=a.config.audiences[0], subject=subject, task="t",
                grants=[tokens.grant("demo", "*", ["read"])], issued_at=now, ttl=60, slot=slot,
                status_uri=a.status_list.uri(a.config.audiences[0]), intent="", token_id=f"x{slot}", act=act)
            reason, _ = a.verifier.verify_live(a.keyring.sign(claims), now + 1)
            assert reason == reasons.AGENT_REVOKED
        with pytest.raises(Refused) as refusal:
            a.mint(ALPHA, "t", [tokens.grant("demo", "*", ["read"])])
        assert refusal.value.reason == reasons.AGENT_BANNED
    finally:
        a.stop()
