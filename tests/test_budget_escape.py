"""A delegator cannot escape its own budget through a budget of another window, and one agent cannot
fill the shared budget table for the others (security review: budget_escape.py, budget_window.py,
budget_table_fill.py)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator

import pytest
from limits_support import Checker, agent, grant, plain
from processes import Daemon
from support import Forge, make_verifier

from agentauthz import reasons
from agentauthz.authority.budgets import BudgetTable
from agentauthz.authority.delegation import for_child
from agentauthz.decision import tokens
from agentauthz.decision.constraints import (
    AGENT_COUNTERS,
    DEFAULT_WINDOW,
    Budget,
    budget_key,
    canonical_budget,
    compile_extras,
    enforce,
    tighten,
    tighter_budget,
)
from agentauthz.decision.policy import Policy
from agentauthz.v1 import agentauthz_pb2 as pb

ALLOW, EXHAUSTED, AGENT_LIMIT = reasons.ALLOW, reasons.BUDGET_EXHAUSTED, reasons.BUDGET_AGENT_LIMIT
AGENTS = "spiffe://dev.local/agent/"
YEAR = 365 * 86_400
POLICY = f"""
version: 1
defaults: {{max_ttl: 600, max_sensitivity: internal, max_delegation_depth: 2}}
rules:
  - {{id: bud-alpha, agents: ["{AGENTS}alpha", "{AGENTS}alpha-2"], tool: bud, targets: ["*"],
     operations: [read], budget: {{max_calls: 3}}}}
  - {{id: bud-beta, agents: ["{AGENTS}beta"], tool: bud, targets: ["*"], operations: [read],
     budget: {{max_calls: 3, window: {YEAR}}}}}
  - {{id: bud-gamma, agents: ["{AGENTS}gamma"], tool: bud, targets: ["*"], operations: [read]}}
  - {{id: rl, agents: ["{AGENTS}*"], tool: rl, targets: ["*"], operations: [read],
     budget: {{rate_per_second: 1000, burst: 1000}}}}
"""


# -- budgets of different windows are never merged ------------------------------------------------


def test_tightening_keeps_each_window_and_merges_within_one() -> None:
    day, longer = {"max_calls": 3}, {"max_calls": 3, "window": DEFAULT_WINDOW + 1}
    # Before: {"max_calls": 3, "window": 86401}, so the daily limit was gone from the token.
    assert tighter_budget(day, longer) == [day, longer]
    assert tighter_budget([day, longer], {"max_calls": 1, "window": DEFAULT_WINDOW + 1}) == \
        [day, {"max_calls": 1, "window": DEFAULT_WINDOW + 1}]
    assert tighten({"tool": "bud", "budget": day}, {"budget": longer})["budget"] == [day, longer]
    # A list is canonical: ordered by window, one budget per window, a single one as a mapping.
    assert canonical_budget([longer, day]) == [day, longer]
    assert canonical_budget([day]) == day
    with pytest.raises(ValueError, match="own window"):
        canonical_budget([day, {"max_calls": 5, "window": DEFAULT_WINDOW}])
    with pytest.raises(ValueError, match="list of 1 to"):
        canonical_budget([])


def test_a_child_keeps_its_delegators_daily_budget_beside_its_own_yearly_one() -> None:
    policy = Policy.from_text(POLICY)
    parent = tokens.grant("bud", "*", ["read"], "internal", budget={"max_calls": 3})
    child = for_child(policy, AGENTS + "beta", [parent], 600).granted
    # Before: one {"max_calls": 3, "window": YEAR}: alpha's calls through beta counted per year.
    assert [g["budget"] for g in child] == [[{"max_calls": 3}, {"max_calls": 3, "window": YEAR}]]


def test_enforce_charges_every_window_of_a_grant_for_every_agent(hot: Any, tmp_path: Path) -> None:
    forge = Forge()
    table = BudgetTable.open(tmp_path / "b", 256)
    root, child = AGENTS + "alpha", AGENTS + "gamma"
    longer = DEFAULT_WINDOW + 7
    both = tokens.grant("bud", "*", ["read"], budget=[{"max_calls": 3}, {"max_calls": 3, "window": longer}])
    entry = make_verifier(hot, forge).verify(forge.token(sub=child, grants=[both],
                                                         act={"sub": root, "idx": 7}), forge.now)
    # alpha already spent its three calls of the day: the longer window has room, the call has none.
    for _ in range(3):
        assert table.charge([(budget_key(root, "bud", DEFAULT_WINDOW), Budget(3, 0.0, 1))], 0.0)[0] == ALLOW
    assert enforce(entry, "bud", "x", "read", "public", None, table, 0.0)[0] == EXHAUSTED
    # All or nothing: the refused call counted nothing under the longer window, nor for gamma.
    for agent_id in (root, child):
        key = budget_key(agent_id, "bud", longer)
        assert [table.charge([(key, Budget(3, 0.0, 1, longer))], 0.0)[0] for _ in range(4)] == \
            [ALLOW] * 3 + [EXHAUSTED]
    # A token minted before this change (one budget object) is read and enforced as before.
    old = compile_extras({"budget": {"max_calls": 3}})
    assert old is not None and old.budgets is not None
    assert [(b.max_calls, b.window) for b in old.budgets] == [(3, DEFAULT_WINDOW)]
    table.close()


# -- one agent cannot fill the table for the others ----------------------------------------------------


def test_an_agent_past_its_counter_limit_is_refused_alone(tmp_path: Path) -> None:
    table = BudgetTable.open(tmp_path / "b", 1024)
    one = Budget(1, 0.0, 1, window=60)
    filler, other = AGENTS + "filler", AGENTS + "other"
    keys = [budget_key(filler, "rl", window) for window in range(100, 100 + AGENT_COUNTERS + 1)]
    assert [table.charge([(k, one)], 0.0)[0] for k in keys[:-1]] == [ALLOW] * AGENT_COUNTERS
    # Before: allowed until the shared table was full, then budget_table_full for every agent.
    assert table.charge([(keys[-1], one)], 0.0)[0] == AGENT_LIMIT
    # Its counters already held still count; another agent places its own.
    assert table.charge([(keys[0], Budget(2, 0.0, 1, window=100))], 0.0)[0] == ALLOW
    assert table.charge([(budget_key(other, "rl", 60), one)], 0.0)[0] == ALLOW
    # A refused call is all or nothing: the other agent's key in it (a chain's) was not counted.
    assert table.charge([(budget_key(other, "rl", 61), one), (keys[-1], one)], 0.0, filler)[0] == AGENT_LIMIT
    assert table.charge([(budget_key(other, "rl", 61), one)], 0.0)[0] == ALLOW
    # Once a counter's window is over, its place in the ledger is free again.
    assert table.charge([(keys[-1], one)], 100.0 + AGENT_COUNTERS + 1)[0] == ALLOW
    table.close()


def test_delegating_to_agents_without_end_places_no_more_counters_than_the_delegator_may_hold(
        hot: Any, tmp_path: Path) -> None:
    """A chain's counters are all its minting agent's share: delegating to fresh agent ids (any the
    policy's patterns admit) would otherwise place a counter per id, each in a ledger of its own."""
    forge, table = Forge(), BudgetTable.open(tmp_path / "b", 1 << 12)
    verifier = make_verifier(hot, forge)
    rated = tokens.grant("rl", "*", ["read"], budget={"rate_per_second": 1000, "burst": 1000})

    def call(sub: str, root: str) -> str:
        entry = verifier.verify(forge.token(sub=sub, grants=[rated], act={"sub": root, "idx": 7}), forge.now)
        return enforce(entry, "rl", "x", "read", "public", None, table, 0.0)[0]

    # alpha's own counter, then one per fresh child: the last that fits is the limit's.
    seen = [call(f"{AGENTS}fresh-{k}", AGENTS + "alpha") for k in range(AGENT_COUNTERS)]
    assert seen == [ALLOW] * (AGENT_COUNTERS - 1) + [AGENT_LIMIT]
    assert call(AGENTS + "fresh-0", AGENTS + "alpha") == ALLOW  # a counter it holds counts on
    assert call(AGENTS + "fresh-x", AGENTS + "beta") == ALLOW  # another task's minting agent: its own share
    table.close()


# -- on a daemon, over mTLS ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("budget-escape")
    (work / "policy.yaml").write_text(POLICY)
    d = Daemon(work / "state", {"policy_file": str(work / "policy.yaml"), "leeway": 0,
                                "budget_capacity": 256}).start()
    d.work = work  # type: ignore[attr-defined]
    try:
        yield d
    finally:
        assert d.stop() == 0


def bud(budget: pb.Budget | None = None) -> pb.Grant:
    return grant("bud", "x", ("read",), budget=budget)


def test_a_longer_window_does_not_reopen_a_spent_daily_budget(daemon: Any) -> None:
    alpha = agent(daemon, daemon.work, AGENTS + "alpha")
    check = Checker(daemon.check_address)
    own = alpha.mint("esc", [bud()]).token
    assert [check(plain(own, "bud", "x")).reason for _ in range(4)] == [ALLOW] * 3 + [EXHAUSTED]
    base = random.randrange(DEFAULT_WINDOW + 1, 30 * DEFAULT_WINDOW)
    for k in range(1, 4):  # the reviewer's trick: a fresh window per round, delegated to gamma
        longer = pb.Budget(max_calls=3, window=base + k)
        minted = alpha.mint("esc", [bud(longer)])
        assert [(b.max_calls, b.window) for g in minted.grants for b in (g.budget, *g.other_budgets)] == \
            [(3, 0), (3, base + k)]  # both bind; the response shows both
        child = alpha.delegate(minted.token, AGENTS + "gamma", [bud(longer)]).token
        # Before: three calls allowed per round, counted under the new window only.
        assert [check(plain(child, "bud", "x")).reason for _ in range(3)] == [EXHAUSTED] * 3
    check.close()


def test_a_childs_yearly_rule_does_not_replace_its_delegators_daily_budget(daemon: Any) -> None:
    alpha, beta = agent(daemon, daemon.work, AGENTS + "alpha-2"), agent(daemon, daemon.work, AGENTS + "beta")
    check = Checker(daemon.check_address)
    own = alpha.mint("window", [bud()]).token
    assert [check(plain(own, "bud", "x")).reason for _ in range(4)] == [ALLOW] * 3 + [EXHAUSTED]
    child = alpha.delegate(own, AGENTS + "beta", [bud()]).token
    # Before: beta's calls on alpha's behalf counted on alpha's yearly counter: three more allowed.
    assert [check(plain(child, "bud", "x")).reason for _ in range(3)] == [EXHAUSTED] * 3
    assert beta.mint("own", [bud()]).token  # beta's own budget is untouched by the refusals
    assert check(plain(beta.mint("own", [bud()]).token, "bud", "x")).reason == ALLOW
    check.close()


def test_one_agent_at_its_counter_limit_leaves_the_others_working(daemon: Any) -> None:
    filler = agent(daemon, daemon.work, AGENTS + "filler")
    check = Checker(daemon.check_address)
    base = random.randrange(1_000_000, 30_000_000)
    seen = []
    for k in range(AGENT_COUNTERS + 4):  # each token adds a counter of its own window
        window = pb.Budget(max_calls=1, window=base + k)
        token = filler.mint("fill", [grant("rl", "x", ("read",), budget=window)])
        seen.append(check(plain(token.token, "rl", "x")).reason)
    # The rule's own (rate) counter takes one place; every new window after the limit is refused.
    assert seen == [ALLOW] * (AGENT_COUNTERS - 1) + [AGENT_LIMIT] * 5
    for name in ("victim-1", "victim-2"):
        victim = agent(daemon, daemon.work, AGENTS + name)
        assert check(plain(victim.mint("v", [grant("rl", "x", ("read",))]).token, "rl", "x")).reason == ALLOW
    check.close()
