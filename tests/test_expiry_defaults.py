"""A token dies at its exp on the daemon's SHIPPED defaults (issue 16, item 4).

The daemon writes exp and checks it on one clock, so exp gets no leeway: a ``--ttl 2`` token was
allowed 25 s past its end while the default 30 s leeway applied to it. No ``leeway`` in these
configs: the defaults are what is tested. The only times asserted are the tokens' own: an allow is
only ever answered to a Check sent before exp.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import pytest
from processes import Daemon, wait_for

from agentauthz import reasons
from agentauthz.client import Client, Identity
from agentauthz.config import Config
from agentauthz.identity.devca import ensure_dev_pki, issue_svid

ALPHA = "spiffe://dev.local/agent/alpha"
BETA = "spiffe://dev.local/agent/beta"
REQUEST = ("demo", "reports", "read", "internal")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("expiry")
    d = Daemon(work / "state").start()  # no config but the state dir: every default as shipped
    assert "leeway" not in d.config_path.read_text()
    yield d
    assert d.stop() == 0


@pytest.fixture(scope="module")
def ids(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("expiry-ids")
    pki = ensure_dev_pki(daemon.state_dir)
    for agent in (ALPHA, BETA):
        issue_svid(pki, agent, out / agent.rsplit("/", 1)[1])
    return {agent: out / agent.rsplit("/", 1)[1] for agent in (ALPHA, BETA)}


def client(daemon: Daemon, identity: Path) -> Client:
    return Client(daemon.api_address, Identity.from_dir(identity), check_server=daemon.check_address)


def dies_at_exp(checker: Client, token: str, exp: int) -> None:
    """Poll Check until the token is refused: each allow was asked before ``exp``; the refusal is
    token_expired, and comes well before the old exp + leeway."""
    refused: list[str] = []

    def expired() -> bool:
        sent = time.time()
        decision = checker.check(token, *REQUEST)
        if decision.allowed:
            assert sent < exp, f"allowed {sent - exp:.2f} s after exp"
            return False
        refused.append(decision.reason)
        return True
    wait_for(expired, exp - time.time() + Config().leeway / 2, "the token to expire")
    assert refused == [reasons.TOKEN_EXPIRED]


def test_a_two_second_cli_token_dies_at_its_exp_on_the_default_config(daemon: Daemon,
                                                                       ids: dict[str, Path]) -> None:
    assert Config().leeway > 2  # the default leeway would outlast the token: exp must not get it
    minted = daemon.cli("mint", "--server", daemon.api_address, "--identity", str(ids[ALPHA]),
                        "--task", "short", "--grant", "demo:*:read:internal", "--ttl", "2", "--json")
    assert minted.returncode == 0, minted.stderr
    token = json.loads(minted.stdout)
    checker = client(daemon, ids[ALPHA])
    assert checker.check(token["token"], *REQUEST).allowed
    dies_at_exp(checker, token["token"], token["expires_at"])


def test_a_delegated_child_dies_with_its_parent(daemon: Daemon, ids: dict[str, Path]) -> None:
    alpha, beta = client(daemon, ids[ALPHA]), client(daemon, ids[BETA])
    parent = alpha.mint("handoff", ["demo:*:read:internal"], ttl=3)
    child = alpha.delegate(parent.token, BETA, ["demo:reports:read:internal"], ttl=300)
    assert child.expires_at == parent.expires_at  # never later than the parent, as enforced
    assert beta.check(child.token, *REQUEST).allowed
    dies_at_exp(beta, child.token, parent.expires_at)
    assert alpha.check(parent.token, *REQUEST).reason == reasons.TOKEN_EXPIRED
