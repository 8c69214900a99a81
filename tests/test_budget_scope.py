"""What a budget bounds (issue 16): calls per agent and tool per window, whatever task name the agent
picks, with a delegated child's calls counted for every agent on its chain, all or nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
from limits_support import Checker, agent, grant, plain
from processes import Daemon
from support import Forge, make_verifier

from agentauthz import reasons
from agentauthz.authority.budgets import BudgetTable
from agentauthz.decision import tokens
from agentauthz.decision.constraints import (
    DEFAULT_WINDOW,
    Budget,
    budget_key,
    canonical_budget,
    enforce,
    tighter_budget,
)
from agentauthz.decision.policy import Policy
from agentauthz.errors import PolicyError
from agentauthz.v1 import agentauthz_pb2 as pb

ALLOW = reasons.ALLOW
AGENTS = "spiffe://dev.local/agent/"
POLICY = f"""
version: 1
defaults: {{max_ttl: 600, max_sensitivity: internal, max_delegation_depth: 2}}
rules:
  - id: quota
    agents: ["{AGENTS}*"]
    tool: quota
    targets: ["*"]
    operations: [read]
    budget: {{max_calls: 3}}
  - id: hourly
    agents: ["{AGENTS}*"]
    tool: hourly
    targets: ["*"]
    operations: [read]
    budget: {{max_calls: 2, window: 3600}}
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("budget-scope")
    (work / "policy.yaml").write_text(POLICY)
    d = Daemon(work / "state", {"policy_file": str(work / "policy.yaml"), "leeway": 0}).start()
    d.work = work  # type: ignore[attr-defined]
    try:
        yield d
    finally:
        assert d.stop() == 0


def reasons_of(check: Checker, token: str, tool: str, calls: int) -> list[str]:
    return [check(plain(token, tool)).reason for _ in range(calls)]


def test_a_fresh_task_name_does_not_restart_a_budget(daemon: Any) -> None:
    client = agent(daemon, daemon.work, AGENTS + "renamer")
    check = Checker(daemon.check_address)
    first = client.mint("task-1", [grant("quota", "*", ("read",))]).token
    assert reasons_of(check, first, "quota", 4) == [ALLOW] * 3 + [reasons.BUDGET_EXHAUSTED]
    # Before issue 16 each task name was a fresh counter: three more calls per name.
    for name in ("task-2", "task-3"):
        fresh = client.mint(name, [grant("quota", "*", ("read",))]).token
        assert check(plain(fresh, "quota")).reason == reasons.BUDGET_EXHAUSTED
    # A token asking a looser budget than policy's gets policy's; the count is the agent's either way.
    looser = client.mint("task-4", [grant("quota", "*", ("read",), budget=pb.Budget(max_calls=100))])
    assert looser.grants[0].budget.max_calls == 3
    assert check(plain(looser.token, "quota")).reason == reasons.BUDGET_EXHAUSTED
    # Another agent has its own count.
    other = agent(daemon, daemon.work, AGENTS + "bystander").mint("task-1", [grant("quota", "*", ("read",))])
    assert check(plain(other.token, "quota")).allowed
    check.close()


def test_a_childs_calls_count_for_its_delegator(daemon: Any) -> None:
    parent_agent = agent(daemon, daemon.work, AGENTS + "lender")
    check = Checker(daemon.check_address)
    parent = parent_agent.mint("lending", [grant("quota", "*", ("read",))]).token
    child = parent_agent.delegate(parent, AGENTS + "borrower", [grant("quota", "*", ("read",))]).token
    assert reasons_of(check, child, "quota", 3) == [ALLOW] * 3
    # The child used the lender's three calls: the lender's own token (and a fresh task) has none left.
    assert check(plain(parent, "quota")).reason == reasons.BUDGET_EXHAUSTED
    again = parent_agent.mint("lending-again", [grant("quota", "*", ("read",))]).token
    assert check(plain(again, "quota")).reason == reasons.BUDGET_EXHAUSTED
    check.close()


def test_the_window_is_in_the_minted_grant_and_bounds_the_count(daemon: Any) -> None:
    client = agent(daemon, daemon.work, AGENTS + "hourly")
    minted = client.mint("h", [grant("hourly", "*", ("read",))])
    assert (minted.grants[0].budget.max_calls, minted.grants[0].budget.window) == (2, 3600)
    check = Checker(daemon.check_address)
    assert reasons_of(check, minted.token, "hourly", 3) == [ALLOW] * 2 + [reasons.BUDGET_EXHAUSTED]
    check.close()


# -- the counters, without a daemon -------------------------------------------------------------------


@pytest.fixture
def table(tmp_path: Path) -> Iterator[BudgetTable]:
    t = BudgetTable.open(tmp_path / "budgets", 64)
    yield t
    t.close()


def test_a_window_restarts_the_count_from_its_first_call(table: BudgetTable) -> None:
    two = Budget(2, 0.0, 1, window=60)
    assert [table.charge([("k", two)], t)[0] for t in (100.0, 130.0, 159.0)] == \
        [ALLOW, ALLOW, reasons.BUDGET_EXHAUSTED]
    assert table.charge([("k", two)], 160.5)[0] == ALLOW  # the window that began at 100 is over
    assert table.charge([("k", two)], 161.0)[0] == ALLOW
    assert table.charge([("k", two)], 200.0)[0] == reasons.BUDGET_EXHAUSTED


def test_a_charge_under_several_keys_is_all_or_nothing(table: BudgetTable) -> None:
    one, three = Budget(1, 0.0, 1), Budget(3, 0.0, 1)
    assert table.charge([("child", three), ("parent", one)], 1.0)[0] == ALLOW
    # The parent's key is full: the call is refused and the child's key is not counted either.
    for _ in range(3):
        assert table.charge([("child", three), ("parent", one)], 1.0)[0] == reasons.BUDGET_EXHAUSTED
    assert [table.charge([("child", three)], 1.0)[0] for _ in range(3)] == [ALLOW] * 2 + \
        [reasons.BUDGET_EXHAUSTED]
    # A rate on one key makes the whole call wait, counting nothing anywhere.
    rated = Budget(0, 1.0, 1)
    assert table.charge([("a", rated), ("b", rated)], 10.0)[0] == ALLOW
    assert table.charge([("a", rated), ("c", rated)], 10.0)[0] == reasons.RATE_LIMITED
    assert table.charge([("c", rated)], 10.0)[0] == ALLOW


def test_enforce_charges_every_agent_on_the_chain(hot: Any, tmp_path: Path) -> None:
    forge = Forge()
    t = BudgetTable.open(tmp_path / "b", 64)
    budgeted = tokens.grant("demo", "*", ["read"], budget={"max_calls": 5})
    root, child = AGENTS + "root", AGENTS + "child"
    token = forge.token(sub=child, grants=[budgeted], act={"sub": root, "idx": 7})
    entry = make_verifier(hot, forge).verify(token, forge.now)
    assert enforce(entry, "demo", "x", "read", "public", None, t, 0.0)[0] == ALLOW
    for agent_id in (child, root):  # one call counted on each: four left of five
        key = budget_key(agent_id, "demo", DEFAULT_WINDOW)
        assert [t.charge([(key, Budget(5, 0.0, 1))], 0.0)[0] for _ in range(5)] == [ALLOW] * 4 + \
            [reasons.BUDGET_EXHAUSTED]
    assert enforce(entry, "demo", "x", "read", "public", None, t, 0.0)[0] == reasons.BUDGET_EXHAUSTED
    t.close()


def test_the_window_is_validated_and_budgets_of_other_windows_are_all_kept() -> None:
    assert canonical_budget({"max_calls": 2, "window": 60}) == {"max_calls": 2, "window": 60}
    for bad in (0, -1, 1.5, True, "60", 366 * 86_400 + 1):
        with pytest.raises(ValueError, match="budget.window"):
            canonical_budget({"max_calls": 2, "window": bad})
    with pytest.raises(ValueError, match="limits nothing"):
        canonical_budget({"window": 60})
    with pytest.raises(PolicyError, match="budget.window"):
        Policy.from_text(POLICY.replace("window: 3600", "window: 0"))
    # Budgets of different windows both bind (test_budget_escape.py): neither is merged into the other.
    assert tighter_budget({"max_calls": 5, "window": 60}, {"max_calls": 3}) == \
        [{"max_calls": 5, "window": 60}, {"max_calls": 3}]
    assert tighter_budget({"rate_per_second": 2, "burst": 4}, {"rate_per_second": 1}) == \
        {"rate_per_second": 1, "burst": 1}
