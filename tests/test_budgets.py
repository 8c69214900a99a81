"""Task budgets: exact counts under concurrent calls from threads, processes and daemon workers, GCRA
rates answered 429 with Retry-After, a full table failing closed, counts that outlive renewals and
restarts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
from limits_support import Checker, agent, allowed_from_processes_and_threads, grant, plain, start
from support import Forge, make_verifier

from agentauthz import reasons
from agentauthz.authority.budgets import BudgetTable, retry_after
from agentauthz.decision import _accel, tokens
from agentauthz.decision.constraints import DEFAULT_WINDOW, Budget, budget_key, enforce
from agentauthz.v1 import agentauthz_pb2 as pb

ALLOW = reasons.ALLOW


@pytest.fixture
def table(tmp_path: Path) -> Iterator[BudgetTable]:
    t = BudgetTable.open(tmp_path / "budgets", 64)
    yield t
    t.close()


# -- the table --------------------------------------------------------------------------------------


def test_total_calls_stop_exactly_at_the_limit_per_key(table: BudgetTable) -> None:
    three = Budget(3, 0.0, 1)
    assert [table.charge([("a", three)], 100.0)[0] for _ in range(5)] == [ALLOW] * 3 + \
        [reasons.BUDGET_EXHAUSTED] * 2
    assert table.charge([("b", three)], 100.0)[0] == ALLOW  # another key counts apart
    # A bigger budget on the same key sees the calls already made.
    assert table.charge([("a", Budget(4, 0.0, 1))], 100.0)[0] == ALLOW
    assert table.charge([("a", Budget(4, 0.0, 1))], 100.0)[0] == reasons.BUDGET_EXHAUSTED


def test_rate_allows_the_burst_then_one_call_per_interval(table: BudgetTable) -> None:
    rate = Budget(0, 2.0, 3)  # one call per 0.5 s, three at once
    now = 1000.0
    assert [table.charge([("r", rate)], now)[0] for _ in range(3)] == [ALLOW] * 3
    reason, wait = table.charge([("r", rate)], now)
    assert reason == reasons.RATE_LIMITED and wait == pytest.approx(0.5)
    assert table.charge([("r", rate)], now + 0.49)[0] == reasons.RATE_LIMITED
    assert table.charge([("r", rate)], now + 0.5)[0] == ALLOW
    assert table.charge([("r", rate)], now + 0.5)[0] == reasons.RATE_LIMITED
    # Idle for a long time: the burst is back, never more.
    assert [table.charge([("r", rate)], now + 100)[0] for _ in range(4)] == [ALLOW] * 3 + \
        [reasons.RATE_LIMITED]
    assert (retry_after(0.01), retry_after(1.0), retry_after(1.2)) == (1, 1, 2)


def test_a_refused_call_counts_nothing(table: BudgetTable) -> None:
    both = Budget(2, 1.0, 1)
    assert table.charge([("k", both)], 0.0)[0] == ALLOW
    assert table.charge([("k", both)], 0.0)[0] == reasons.RATE_LIMITED  # not counted toward the 2
    assert table.charge([("k", both)], 1.0)[0] == ALLOW
    assert table.charge([("k", both)], 5.0)[0] == reasons.BUDGET_EXHAUSTED


def test_a_full_table_fails_closed_until_entries_expire(tmp_path: Path) -> None:
    t = BudgetTable.open(tmp_path / "small", 2)
    one = Budget(10, 0.0, 1, window=90)  # counted from now=10: its window ends at 100
    assert t.charge([("a", one)], 10.0)[0] == ALLOW
    assert t.charge([("b", one)], 10.0)[0] == ALLOW
    assert t.charge([("c", one)], 10.0) == (reasons.BUDGET_TABLE_FULL, 0.0)
    assert t.charge([("a", one)], 10.0)[0] == ALLOW  # known keys still count
    assert t.charge([("c", one)], 101.0)[0] == ALLOW  # a and b are past their windows: reused
    assert t.charge([("a", one)], 101.0)[0] == ALLOW  # and a starts afresh: its window is over
    t.close()


def test_counts_survive_reopening_and_another_layout_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / "budgets"
    two = Budget(2, 0.0, 1)
    t = BudgetTable.open(path, 8)
    assert [t.charge([("k", two)], 1.0)[0] for _ in range(2)] == [ALLOW, ALLOW]
    t.close()
    t = BudgetTable.open(path, 8)
    assert t.charge([("k", two)], 1.0)[0] == reasons.BUDGET_EXHAUSTED
    t.close()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    t = BudgetTable.open(path, 16)  # capacity changed: the layout cannot be trusted
    assert t.charge([("k", two)], 1.0)[0] == ALLOW
    t.close()


def test_exact_under_concurrent_threads_and_forked_processes(table: BudgetTable) -> None:
    limit = Budget(300, 0.0, 1)

    def charge() -> str:
        return table.charge([("shared", limit)], 1.0)[0]
    # The processes are forked after the table is mapped, as the daemon's workers are.
    assert allowed_from_processes_and_threads(lambda _: charge, charge) == 300  # of 900, exactly the budget
    assert table.charge([("shared", limit)], 1.0)[0] == reasons.BUDGET_EXHAUSTED


# -- which grant pays ----------------------------------------------------------------------------------


def test_an_unbudgeted_grant_covering_the_call_is_never_charged(tmp_path: Path) -> None:
    forge = Forge()
    t = BudgetTable.open(tmp_path / "b", 8)
    budgeted = tokens.grant("demo", "*", ["read"], budget={"max_calls": 1})
    free = tokens.grant("demo", "public*", ["read"])
    for n, hot in enumerate((_accel.pure(), _accel.ACTIVE)):
        sub = f"spiffe://dev.local/agent/twin-{n}"  # budgets count per agent: one each
        entry = make_verifier(hot, forge).verify(forge.token(grants=[budgeted, free], sub=sub), forge.now)
        key = budget_key(sub, "demo", DEFAULT_WINDOW)
        for _ in range(3):
            assert enforce(entry, "demo", "public-x", "read", "public", None, t, 0.0)[0] == ALLOW
        assert enforce(entry, "demo", "secret", "read", "public", None, t, 0.0)[0] == ALLOW
        assert enforce(entry, "demo", "secret", "read", "public", None, t, 0.0)[0] == reasons.BUDGET_EXHAUSTED
        assert enforce(entry, "demo", "secret", "read", "public", None, None, 0.0)[0] == \
            reasons.BUDGET_UNAVAILABLE
        # Exactly one call was counted: a budget of two has room for one more.
        assert t.charge([(key, Budget(2, 0.0, 1))], 0.0)[0] == ALLOW
        assert t.charge([(key, Budget(2, 0.0, 1))], 0.0)[0] == reasons.BUDGET_EXHAUSTED
    t.close()


# -- end to end through the daemon ------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    work = tmp_path_factory.mktemp("budgets")
    d = start(work)
    d.work = work  # type: ignore[attr-defined]  # where the agent's identity lives
    try:
        yield d
    finally:
        assert d.stop() == 0


def counted(max_calls: int | None = None) -> pb.Grant:
    budget = pb.Budget(max_calls=max_calls) if max_calls else None
    return grant("counted", "*", ("read",), budget=budget)


def run_concurrently(address: str, token: str, calls: int, fresh: bool = False) -> list[Any]:
    """``calls`` Checks from 8 threads at once; ``fresh``: each on its own connection (any worker)."""
    def one(_: int) -> Any:
        checker = Checker(address, fresh=fresh)
        try:
            return checker(plain(token, "counted"))
        finally:
            checker.close()
    shared = Checker(address)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one if fresh else (lambda _: shared(plain(token, "counted"))), range(calls)))
    shared.close()
    return results


def test_concurrent_calls_stop_exactly_at_the_budget(daemon: Any) -> None:
    token = agent(daemon, daemon.work).mint("concurrent", [counted()]).token  # the policy's 40
    results = run_concurrently(daemon.check_address, token, 64)
    assert sum(d.allowed for d in results) == 40
    refused = [d for d in results if not d.allowed]
    assert {(d.status, d.reason) for d in refused} == {(403, reasons.BUDGET_EXHAUSTED)}
    assert 'error="insufficient_scope"' in refused[0].headers["www-authenticate"]


def test_a_budget_survives_renewal_and_fresh_task_names_and_binds_delegated_children(daemon: Any) -> None:
    # Budgets count per agent and tool (issue 16): once per task name, a fresh name restarted them.
    client = agent(daemon, daemon.work, "spiffe://dev.local/agent/renewer")
    check = Checker(daemon.check_address)
    first = client.mint("renewed", [counted(3)])  # the request tightens the policy's 40 to 3
    assert [check(plain(first.token, "counted")).allowed for _ in range(2)] == [True, True]
    second = client.mint("renewed", [counted(3)])  # a renewal: same task, new token
    assert second.token != first.token
    assert check(plain(second.token, "counted")).allowed
    assert check(plain(second.token, "counted")).reason == reasons.BUDGET_EXHAUSTED
    assert check(plain(first.token, "counted")).reason == reasons.BUDGET_EXHAUSTED
    # Another task name of the same agent opens no fresh budget.
    other = client.mint("another", [counted(3)]).token
    assert check(plain(other, "counted")).reason == reasons.BUDGET_EXHAUSTED
    # A child the parent delegates to counts on the delegator's counter too.
    delegator = agent(daemon, daemon.work, "spiffe://dev.local/agent/delegator")
    parent = delegator.mint("delegating", [counted(3)]).token
    child = delegator.delegate(parent, "spiffe://dev.local/agent/delegate", [counted()]).token
    assert [check(plain(t, "counted")).allowed for t in (parent, child, child)] == [True, True, True]
    assert check(plain(parent, "counted")).reason == reasons.BUDGET_EXHAUSTED
    assert check(plain(child, "counted")).reason == reasons.BUDGET_EXHAUSTED
    check.close()


def test_the_rate_limit_answers_429_with_retry_after(daemon: Any) -> None:
    token = agent(daemon, daemon.work).mint("ticking", [grant("ticker", "*", ("read",))]).token
    check = Checker(daemon.check_address)
    assert [check(plain(token, "ticker")).allowed for _ in range(2)] == [True, True]  # the burst
    limited = check(plain(token, "ticker"))
    assert (limited.allowed, limited.status, limited.reason) == (False, 429, reasons.RATE_LIMITED)
    assert 1 <= int(limited.headers["retry-after"]) <= 4  # 0.25 calls per second
    assert "www-authenticate" not in limited.headers
    check.close()


def test_calls_without_budgets_are_not_counted(daemon: Any) -> None:
    token = agent(daemon, daemon.work).mint("free", [grant("demo", "*", ("read",))]).token
    check = Checker(daemon.check_address)
    assert all(check(plain(token, "demo")).allowed for _ in range(100))
    check.close()


def test_two_workers_share_one_exact_count(tmp_path: Path) -> None:
    d = start(tmp_path, {"workers": 2})
    try:
        token = agent(d, tmp_path).mint("workers", [counted()]).token
        results = run_concurrently(d.check_address, token, 70, fresh=True)
        assert sum(r.allowed for r in results) == 40
        assert {r.reason for r in results if not r.allowed} == {reasons.BUDGET_EXHAUSTED}
        # Decision ids start with a per-process prefix: both workers really answered.
        assert len({r.decision_id[:6] for r in results}) == 2
    finally:
        assert d.stop() == 0


def test_a_full_table_is_503_and_counts_outlive_a_restart(tmp_path: Path) -> None:
    d = start(tmp_path, {"budget_capacity": 1})
    try:
        # One counter per agent and tool: a second agent needs a second entry, and there is none.
        first = agent(d, tmp_path).mint("first", [counted(2)]).token
        second = agent(d, tmp_path, "spiffe://dev.local/agent/second").mint("second", [counted(2)]).token
        check = Checker(d.check_address)
        assert check(plain(first, "counted")).allowed
        full = check(plain(second, "counted"))
        assert (full.allowed, full.status, full.reason) == (False, 503, reasons.BUDGET_TABLE_FULL)
        assert check(plain(first, "counted")).allowed
        check.close()
        assert d.stop() == 0
        d.start()
        check = Checker(d.check_address)
        assert check(plain(first, "counted")).reason == reasons.BUDGET_EXHAUSTED  # not reset by a restart
        check.close()
    finally:
        assert d.stop() == 0
