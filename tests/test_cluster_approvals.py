"""Cluster approvals (cluster/approvals.py) on a real redis-server: the file store's behaviour, shared by
every node, one winner when two humans decide at once, and nothing acknowledged that Redis did not take."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest
from redis_proc import RedisServer

from agentauthz.authority import approvals
from agentauthz.authority.approvals import Approval, ApprovalStore, LimitReached, NotPending
from agentauthz.cluster import approvals as shared_module
from agentauthz.cluster.approvals import SharedApprovals
from agentauthz.cluster.engine import Engine, EpochLost
from agentauthz.cluster.settings import ClusterSettings
from agentauthz.errors import ClusterUnavailable, StateError

AGENT = "spiffe://dev.local/agent/alpha"
GRANT = {"tool": "demo", "target": "reports/*", "ops": ["delete"], "sensitivity": "internal"}
OTHER = {**GRANT, "tool": "billing"}


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Audit:
    """The ``commit`` callbacks: what the Authority would audit, in order."""

    def __init__(self, fail: bool = False) -> None:
        self.records: list[list[Approval]] = []
        self.fail = fail

    def __call__(self, changed: Sequence[Approval]) -> None:
        if self.fail:
            raise OSError("audit log unavailable")
        self.records.append(list(changed))


def joined(server: RedisServer, node: str) -> Engine:
    engine = Engine(ClusterSettings(redis=server.url, node_id=node))
    engine.epoch = engine.found_epoch()
    return engine


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path / "redis").start()
    yield s
    s.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def nodes(server: RedisServer, clock: Clock) -> tuple[SharedApprovals, SharedApprovals]:
    """Two nodes' stores on one Redis (one clock: the nodes' clocks agree)."""
    return SharedApprovals(joined(server, "a"), clock), SharedApprovals(joined(server, "b"), clock)


def ask(store: Any, task: str = "t", grants: list[dict[str, Any]] | None = None,
        audit: Any = None) -> tuple[Approval, bool]:
    return store.request(AGENT, task, "why", grants or [GRANT], 600, audit or Audit())


def test_the_same_answers_as_the_file_store(tmp_path: Path, server: RedisServer) -> None:
    """One script of calls against both stores: the same answers (ids aside) at every step."""
    clocks = Clock(), Clock()
    stores = ApprovalStore.open(tmp_path / "approvals.json", clocks[0]), SharedApprovals(joined(server, "a"),
                                                                                          clocks[1])

    def both(call: Any) -> list[Any]:
        out = []
        for store in stores:
            try:
                out.append(call(store))
            except (KeyError, NotPending, LimitReached) as exc:
                out.append((type(exc).__name__, exc.args))
        return out

    def same(results: list[Any]) -> None:
        def plain(r: Any) -> Any:  # ids are random; ties in age are ordered by id, so order by task
            if isinstance(r, list):
                return sorted((plain(a) for a in r), key=repr)
            return {**vars(r), "id": ""} if isinstance(r, Approval) else r
        assert plain(results[0]) == plain(results[1])

    ids: list[list[str]] = []
    for task in ("t1", "t2", "t3"):
        made = both(lambda s, task=task: ask(s, task)[0])
        same(made)
        ids.append([a.id for a in made])
    assert [a[1] for a in both(lambda s: ask(s, "t1"))] == [False, False]  # a retried mint finds its request
    same(both(lambda s: s.decide(ids[0][stores.index(s)], True, "alice", "sso", "ok", 300, Audit())))
    same(both(lambda s: s.decide(ids[1][stores.index(s)], False, "bob", "sso", "no", 300, Audit())))
    same(both(lambda s: s.decide(ids[1][stores.index(s)], True, "bob", "sso", "", 300, Audit())))  # decided
    same(both(lambda s: s.decide("nope", True, "bob", "sso", "", 300, Audit())))  # unknown
    for advance in (0, 301, 600, 3600, 3700):
        for c in clocks:
            c.now += advance
        for state in approvals.STATES:
            same(both(lambda s, state=state: s.by_state(state)))
        same(both(lambda s: ask(s, "t4")[1]))  # each mutation forgets what stopped mattering an hour ago
        same(both(lambda s: [s.get(i[stores.index(s)]) is None for i in ids]))
    same(both(lambda s: s.drop(AGENT, "t4", Audit())))
    same(both(lambda s: s.drop_where(lambda a: True)))


def test_two_nodes_see_each_others_requests_and_decisions(nodes: tuple[SharedApprovals, ...]) -> None:
    a, b = nodes
    made, new = ask(a)
    assert new and b.get(made.id) == made and b.by_state("pending") == [made]
    assert ask(b) == (made, False)  # the agent's retried mint on the other node finds the same request
    audit = Audit()
    decided = b.decide(made.id, True, "alice", "https://sso", "fine", 300, audit)
    assert audit.records == [[decided]] and decided.state == "approved" and decided.approver == "alice (https://sso)"
    assert a.get(made.id) == decided and a.by_state("approved") == [decided] and a.by_state("pending") == []
    with pytest.raises(NotPending, match="approved"):
        a.decide(made.id, False, "bob", "https://sso", "", 300, Audit())
    with pytest.raises(KeyError):
        a.decide("0" * 32, True, "bob", "https://sso", "", 300, Audit())


def race(stores: list[SharedApprovals], approval_id: str, audit: Audit) -> tuple[list[Approval], list[str]]:
    """Eight humans decide ``approval_id`` at once, spread over the nodes: (the decisions, the refusals)."""
    start = threading.Barrier(8)
    won: list[Approval] = []
    lost: list[str] = []

    def decide(store: SharedApprovals, approve: bool) -> None:
        start.wait()
        try:
            won.append(store.decide(approval_id, approve, "h", "sso", "", 300, audit))
        except NotPending as exc:
            lost.append(exc.args[0])
    threads = [threading.Thread(target=decide, args=(stores[i % len(stores)], i % 2 == 0)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, lost


def test_racing_decides_on_several_nodes_exactly_one_wins_and_only_it_is_audited(server: RedisServer) -> None:
    stores = [SharedApprovals(joined(server, f"n{i}")) for i in range(4)]
    for round_ in range(5):
        made, _ = ask(stores[0], task=f"race-{round_}")
        audit = Audit()
        won, lost = race(stores, made.id, audit)
        assert len(won) == 1 and len(lost) == 7 and set(lost) == {won[0].state}
        assert audit.records == [won]  # the losers audited nothing
        assert stores[3].get(made.id) == won[0]


def test_the_agent_limit_and_a_failed_audit_change_nothing(nodes: tuple[SharedApprovals, ...]) -> None:
    a, b = nodes
    for i in range(approvals.MAX_OPEN_PER_AGENT):
        ask(a if i % 2 else b, task=f"t{i}")
    with pytest.raises(LimitReached):
        ask(a, task="one-too-many")
    assert len(b.by_state("pending")) == approvals.MAX_OPEN_PER_AGENT
    first = b.by_state("pending")[0]
    with pytest.raises(OSError):
        a.decide(first.id, True, "h", "sso", "", 300, Audit(fail=True))
    assert b.get(first.id) == first  # the audit record could not be written: nothing was decided
    b.drop(AGENT, None, Audit())
    with pytest.raises(OSError):
        ask(a, task="unaudited", audit=Audit(fail=True))
    assert a.by_state("pending") == []


def test_expiry_and_forgetting_as_the_file_store(server: RedisServer, nodes: tuple[SharedApprovals, ...],
                                                 clock: Clock) -> None:
    a, b = nodes
    stale, _ = ask(a, task="stale")
    rejected = a.decide(ask(a, task="no")[0].id, False, "h", "sso", "", 300, Audit())
    clock.now += 600
    assert [r.id for r in b.by_state("expired")] == [stale.id]
    with pytest.raises(NotPending, match="expired"):
        b.decide(stale.id, True, "h", "sso", "", 300, Audit())
    clock.now += approvals.RETAIN + 1  # an hour past stopping to matter
    assert a.get(stale.id) == stale  # forgotten by the next change, as the file store does
    ask(b, task="later")
    assert a.get(stale.id) is None and a.get(rejected.id) is None
    r = server.client()
    assert r.hlen(a._engine.keys.approvals) == 1 and r.zcard(f"{a._engine.keys.approvals}:forget") == 1


def test_drop_and_drop_where(nodes: tuple[SharedApprovals, ...]) -> None:
    a, b = nodes
    one, _ = ask(a, task="one")
    two, _ = ask(a, task="two", grants=[OTHER])
    other = b.request("spiffe://dev.local/agent/beta", "one", "", [GRANT], 600, Audit())[0]
    audit = Audit()
    assert b.drop(AGENT, "one", audit) == [one] and audit.records == [[one]]
    assert a.get(one.id) is None and a.get(two.id) == two
    assert a.drop_where(lambda x: x.agent == AGENT) == [two]
    assert b.by_state("pending") == [other] and b.drop(AGENT, None, audit) == []


def test_a_lease_that_ran_out_writes_nothing(nodes: tuple[SharedApprovals, ...],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = nodes
    made, _ = ask(a)
    monkeypatch.setattr(shared_module, "LEASE_MS", 100)
    other: list[Approval] = []

    def slow_audit(changed: Sequence[Approval]) -> None:  # the lease runs out while this node audits
        threading.Thread(target=lambda: other.append(b.decide(made.id, False, "h2", "sso", "", 300,
                                                              Audit()))).start()
        while not other:
            threading.Event().wait(0.01)
    with pytest.raises(ClusterUnavailable, match="lease ran out"):
        a.decide(made.id, True, "h1", "sso", "", 300, slow_audit)
    assert a.get(made.id) == other[0] and other[0].state == "rejected"


def test_an_unreadable_record_is_refused_not_guessed_at(server: RedisServer,
                                                       nodes: tuple[SharedApprovals, ...]) -> None:
    a, _ = nodes
    server.client().hset(a._engine.keys.approvals, "x", '{"id": "x", "state": "approved"}')
    with pytest.raises(StateError, match="unreadable"):
        a.get("x")


def test_a_redis_that_lost_its_data_or_is_down_acknowledges_nothing(
        server: RedisServer, nodes: tuple[SharedApprovals, ...]) -> None:
    a, _ = nodes
    made, _ = ask(a)
    server.wipe()
    server.start()
    audit = Audit()
    for call in (lambda: a.get(made.id), lambda: a.by_state("pending"), lambda: ask(a, audit=audit),
                 lambda: a.decide(made.id, True, "h", "sso", "", 300, audit)):
        with pytest.raises(EpochLost):
            call()
    assert audit.records == []  # refused before anything was audited
    server.kill()
    for call in (lambda: a.get(made.id), lambda: ask(a, audit=audit)):
        with pytest.raises(ClusterUnavailable, match="unreachable"):
            call()
    assert audit.records == []
