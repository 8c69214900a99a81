"""A token dies at its exp on the daemon's SHIPPED defaults (issue 16, item 4).

The daemon writes exp and checks it on one clock, so exp gets no leeway: a ``--ttl 2`` token was
allowed 25 s past its end while the default 30 s leeway applied to it. No ``leeway`` in these
configs: the defaults are what is tested. The only times asserted are the tokens' own: an allow is
only ever answered to a Check sent before exp.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
from processes import Daemon, dies_at_exp

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


def refusal(checker: Client, token: str) -> Any:
    """One Check: None if allowed, else its reason."""
    decision = checker.check(token, *REQUEST)
    return None if decision.allowed else decision.reason


def test_a_two_second_cli_token_dies_at_its_exp_on_the_default_config(daemon: Daemon,
                                                                       ids: dict[str, Path]) -> None:
    assert Config().leeway > 2  # the default leeway would outlast the token: exp must not get it
    minted = daemon.cli("mint", "--server", daemon.api_address, "--identity", str(ids[ALPHA]),
                        "--task", "short", "--grant", "demo:*:read:internal", "--ttl", "2", "--json")
    assert minted.returncode == 0, minted.stderr
    token = json.loads(minted.stdout)
    checker = client(daemon, ids[ALPHA])
    assert checker.check(token["token"], *REQUEST).allowed
    refused = dies_at_exp(lambda: refusal(checker, token["token"]), token["expires_at"])
    assert refused == [reasons.TOKEN_EXPIRED]


def test_a_delegated_child_dies_with_its_parent(daemon: Daemon, ids: dict[str, Path]) -> None:
    alpha, beta = client(daemon, ids[ALPHA]), client(daemon, ids[BETA])
    parent = alpha.mint("handoff", ["demo:*:read:internal"], ttl=3)
    child = alpha.delegate(parent.token, BETA, ["demo:reports:read:internal"], ttl=300)
    assert child.expires_at == parent.expires_at  # never later than the parent, as enforced
    assert beta.check(child.token, *REQUEST).allowed
    assert dies_at_exp(lambda: refusal(beta, child.token), parent.expires_at) == [reasons.TOKEN_EXPIRED]
    assert alpha.check(parent.token, *REQUEST).reason == reasons.TOKEN_EXPIRED
