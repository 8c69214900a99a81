"""Cluster budgets (cluster/budgets.py) on a real redis-server: the single-node table's exact answers,
exact counts from threads and processes, and budget_unavailable (never an allow) whenever Redis cannot
say: another epoch, its data lost, stopped, killed."""

from __future__ import annotations

import itertools
import logging
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from limits_support import allowed_from_processes_and_threads
from redis_proc import RedisServer

from agentauthz import reasons
from agentauthz.authority.budgets import BudgetTable
from agentauthz.cluster.budgets import KEEP_MARGIN_MS, SharedBudgets, counter_key
from agentauthz.cluster.engine import Engine
from agentauthz.cluster.settings import ClusterSettings
from agentauthz.decision.constraints import AGENT_COUNTERS, Budget, budget_key

ALLOW, UNAVAILABLE = reasons.ALLOW, reasons.BUDGET_UNAVAILABLE


def joined(server: RedisServer, node: str = "n1") -> Engine:
    engine = Engine(ClusterSettings(redis=server.url, node_id=node))
    engine.epoch = engine.found_epoch()
    return engine


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield s
    s.stop()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server this test may stop, kill or wipe."""
    s = RedisServer(tmp_path / "redis").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def budgets(server: RedisServer) -> Iterator[SharedBudgets]:
    b = SharedBudgets(joined(server))
    yield b
    b.close()


# -- the same answers as the single-node table ----------------------------------------------------------

_examples = itertools.count()
BUDGETS = [Budget(m, r, b, w) for m, r, b, w in
           [(1, 0.0, 1, 60), (3, 0.0, 1, 2), (2, 1.0, 1, 5), (0, 2.0, 3, 60), (0, 3.3, 2, 1), (5, 0.5, 2, 1),
            (4, 10.0, 1, 3600), (0, 0.0, 1, 60)]]
# Whole and half seconds land exactly on window ends (kept == now); tenths bring float noise to the rate.
STEP = st.tuples(st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0, 1.0, 2.0, 3.0, 61.0, 0.1, 0.3]),
                 st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from(BUDGETS)), min_size=1, max_size=3,
                          unique_by=lambda c: c[0]))


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(STEP, min_size=1, max_size=25))
def test_every_answer_is_the_single_node_tables(budgets: SharedBudgets, steps: list) -> None:
    n = next(_examples)  # fresh keys per example: the Redis counters of earlier ones stay behind
    with tempfile.TemporaryDirectory() as tmp:
        table = BudgetTable.open(Path(tmp) / "budgets", 4096)
        now = 1_700_000_000.0
        try:
            for advance, charges in steps:
                now += advance
                keyed = [(f"ex{n}:{key}", budget) for key, budget in charges]
                # Exactly equal, waits included: Lua computes on the same doubles.
                assert budgets.charge(keyed, now) == table.charge(keyed, now), (now, keyed)
        finally:
            table.close()


def test_one_agent_at_its_counter_limit_is_refused_alone_as_by_the_table(budgets: SharedBudgets,
                                                                          tmp_path: Path) -> None:
    """The ledger the single-node table keeps per task's minting agent, kept in Redis: counters of
    windows without end (each kept in Redis for its window) stop at AGENT_COUNTERS for that agent
    alone, a counter it holds counts on, one past its window frees its place; every answer the table's."""
    table = BudgetTable.open(tmp_path / "budgets", 4096)
    one = Budget(1, 0.0, 1, window=60)
    run = next(_examples)
    filler, other = f"spiffe://dev.local/agent/filler-{run}", f"spiffe://dev.local/agent/other-{run}"
    keys = [budget_key(filler, "rl", window) for window in range(100, 100 + AGENT_COUNTERS + 1)]
    now = 1_700_000_000.0

    def both(charges: list[tuple[str, Budget]], at: float, owner: str | None = None) -> str:
        answer = budgets.charge(charges, at, owner)
        assert answer == table.charge(charges, at, owner), (charges, at)
        return answer[0]

    try:
        assert [both([(k, one)], now) for k in keys[:-1]] == [ALLOW] * AGENT_COUNTERS
        assert both([(keys[-1], one)], now) == reasons.BUDGET_AGENT_LIMIT  # before: allowed, kept in Redis
        assert both([(keys[0], Budget(2, 0.0, 1, window=100))], now) == ALLOW
        assert both([(budget_key(other, "rl", 60), one)], now) == ALLOW
        # A delegated call's counters are its minting agent's: the other agent's key counts for filler.
        assert both([(budget_key(other, "rl", 61), one), (keys[-1], one)], now, filler) == \
            reasons.BUDGET_AGENT_LIMIT
        assert both([(budget_key(other, "rl", 61), one)], now) == ALLOW  # the refused call counted none
        assert both([(keys[-1], one)], now + AGENT_COUNTERS + 1) == ALLOW  # a window over: its place free
    finally:
        table.close()


def test_the_tables_own_sequences(budgets: SharedBudgets) -> None:
    two = Budget(2, 0.0, 1, window=60)
    assert [budgets.charge([("seq:w", two)], t)[0] for t in (100.0, 130.0, 160.0, 160.5, 161.0, 200.0)] == \
        [ALLOW, ALLOW, reasons.BUDGET_EXHAUSTED, ALLOW, ALLOW, reasons.BUDGET_EXHAUSTED]  # window from 100
    both = Budget(2, 1.0, 1)
    assert [budgets.charge([("seq:k", both)], t)[0] for t in (0.0, 0.0, 1.0, 5.0)] == \
        [ALLOW, reasons.RATE_LIMITED, ALLOW, reasons.BUDGET_EXHAUSTED]  # a refused call counts nothing
    one, three = Budget(1, 0.0, 1), Budget(3, 0.0, 1)
    assert budgets.charge([("seq:child", three), ("seq:parent", one)], 1.0)[0] == ALLOW
    assert budgets.charge([("seq:child", three), ("seq:parent", one)], 1.0)[0] == reasons.BUDGET_EXHAUSTED
    assert [budgets.charge([("seq:child", three)], 1.0)[0] for _ in range(3)] == [ALLOW] * 2 + \
        [reasons.BUDGET_EXHAUSTED]  # all or nothing: the refused call did not count for the child
    rate = Budget(0, 2.0, 3)
    assert [budgets.charge([("seq:r", rate)], 1000.0)[0] for _ in range(3)] == [ALLOW] * 3
    assert budgets.charge([("seq:r", rate)], 1000.0) == (reasons.RATE_LIMITED, 0.5)


def test_counters_are_digests_that_expire_after_their_window_and_rate(server: RedisServer,
                                                                     budgets: SharedBudgets) -> None:
    engine = joined(server)
    assert budgets.charge([("spiffe://x/agent/a|demo|60", Budget(3, 0.0, 1, window=60))], 500.0)[0] == ALLOW
    key = counter_key(engine.keys.budget, "spiffe://x/agent/a|demo|60")
    assert key.startswith(engine.keys.budget) and len(key) == len(engine.keys.budget) + 32
    assert 60_000 < server.client().pttl(key) <= 60_000 + KEEP_MARGIN_MS  # never kept for ever
    assert budgets.charge([("slow", Budget(0, 0.001, 1, window=1))], 500.0)[0] == ALLOW  # tat 1000 s ahead
    assert server.client().pttl(counter_key(engine.keys.budget, "slow")) > 1_000_000


# -- exact under concurrency ------------------------------------------------------------------------------


def test_exact_under_concurrent_threads_and_processes(server: RedisServer) -> None:
    shared = SharedBudgets(joined(server))
    limit = Budget(300, 0.0, 1)
    assert shared.charge([("conc", limit)], 1.0)[0] == ALLOW  # a client made before the fork, as in a worker

    def child(i: int) -> Any:
        # The inherited one (it must make its own connection) and one of the child's own.
        mine = shared if i else SharedBudgets(joined(server, "child"))
        return lambda: mine.charge([("conc", limit)], 1.0)[0]
    allowed = allowed_from_processes_and_threads(child, lambda: shared.charge([("conc", limit)], 1.0)[0])
    assert 1 + allowed == 300  # of 901 attempts from 4 processes, exactly the budget
    assert shared.charge([("conc", limit)], 1.0)[0] == reasons.BUDGET_EXHAUSTED
    shared.close()


# -- fail closed ------------------------------------------------------------------------------------------


def test_another_epoch_or_a_redis_that_lost_its_data_denies(own_server: RedisServer) -> None:
    engine = joined(own_server)
    b = SharedBudgets(engine)
    one = Budget(1, 0.0, 1)
    assert b.charge([("k", one)], 1.0)[0] == ALLOW
    joined_epoch, engine.epoch = engine.epoch, "another"
    assert b.charge([("fresh", one)], 1.0) == (UNAVAILABLE, 0.0)
    engine.epoch = joined_epoch
    own_server.wipe()
    own_server.start()  # empty: every count is gone, so none may be handed out again
    assert b.charge([("k", one)], 1.0) == (UNAVAILABLE, 0.0)
    assert own_server.client().keys("*") == []  # and the refused call wrote nothing
    b.close()


def test_a_stopped_redis_denies_within_the_timeout_then_counts_again(own_server: RedisServer) -> None:
    b = SharedBudgets(joined(own_server))
    three = Budget(3, 0.0, 1)
    assert b.charge([("k", three)], 1.0)[0] == ALLOW
    own_server.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert b.charge([("k", three)], 1.0) == (UNAVAILABLE, 0.0)
        # Not a benchmark: the bound only tells "one short timeout" from redis-py's default retries
        # (10, with backoff), which would hold a Check for seconds.
        assert time.monotonic() - started < 2.0
    finally:
        own_server.signal(signal.SIGCONT)
    # Redis had the timed-out call in its socket: it counts it on resuming (denied and spent, which is
    # the safe side of not knowing), or never saw it. Either way no more than three calls are allowed.
    after = [b.charge([("k", three)], 1.0)[0] for _ in range(3)]
    spent = reasons.BUDGET_EXHAUSTED
    assert after in ([ALLOW, ALLOW, spent], [ALLOW, spent, spent])
    b.close()


def test_a_killed_redis_denies_and_logs_once_and_its_aof_keeps_the_counts(
        own_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    b = SharedBudgets(joined(own_server))
    one = Budget(1, 0.0, 1)
    assert b.charge([("k", one)], 1.0)[0] == ALLOW
    own_server.kill()
    with caplog.at_level(logging.ERROR, logger="agentauthz.budgets"):
        assert [b.charge([("k", one)], 1.0) for _ in range(5)] == [(UNAVAILABLE, 0.0)] * 5
    assert len([r for r in caplog.records if "budget_unavailable" in r.getMessage()]) == 1
    own_server.start()  # from its AOF (appendfsync always): the counted call is still counted
    assert b.charge([("k", one)], 1.0)[0] == reasons.BUDGET_EXHAUSTED
    b.close()


def test_after_a_recovery_a_total_denies_for_a_window_and_a_rate_counts_on(server: RedisServer) -> None:
    """Redis lost data (a node recovered: ``Engine.mark_lost``): the calls counted before are gone, so
    a total cannot be trusted until one window has passed since; a rate limit alone loses one burst."""
    engine = joined(server, "lost")
    shared = SharedBudgets(engine)
    daily, rate = Budget(5, 0.0, 1, window=86_400), Budget(0, 1.0, 1)
    try:
        engine.mark_lost(10_000.0)
        assert shared.charge([("lost:total", daily)], 10_000.0) == (UNAVAILABLE, 0.0)
        assert shared.charge([("lost:total", daily)], 10_000.0 + 86_399.0) == (UNAVAILABLE, 0.0)
        assert shared.charge([("lost:total", daily), ("lost:rate", rate)], 10_000.0) == (UNAVAILABLE, 0.0)
        assert shared.charge([("lost:rate", rate)], 10_000.0)[0] == ALLOW  # the refused call counted none
        assert shared.charge([("lost:total", daily)], 10_000.0 + 86_400.0)[0] == ALLOW  # a window on
    finally:
        server.client().delete(engine.keys.lost_at)
        shared.close()
