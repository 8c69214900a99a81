"""Cluster faults on real processes (issue 19): a node killed mid revocation storm, redis-server stopped,
killed and restarted from its AOF, and restarted empty. No acknowledged revocation is ever lost or
honoured past max_staleness, nothing unacknowledged is reported acknowledged, and the nodes fail closed."""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from cluster_support import (
    READ,
    Cluster,
    Node,
    Probe,
    Watch,
    mint_many,
    reasons_on,
    slot_of,
    wait_for_a_recovery,
    wait_until,
)

from agentauthz import reasons
from agentauthz.decision.policy import DEV_POLICY

MAX_STALENESS = 1.0
STALE, REVOKED, ALLOW = reasons.REVOCATION_STALE, reasons.TOKEN_REVOKED, reasons.ALLOW


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, cluster={"max_staleness": MAX_STALENESS})
    try:
        yield c
    finally:
        c.stop()


def unavailable(call: Any) -> grpc.StatusCode:
    """The status code of a call the API must refuse (it must not answer as if acknowledged)."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def everywhere(nodes: list[Node], token: str, reason: str, what: str, timeout: float = 15.0) -> None:
    wait_until(lambda: reasons_on(nodes, token) == [reason] * len(nodes), timeout, what)


# -- a node killed during a revocation storm -----------------------------------------------------------


@pytest.mark.slow
def test_a_node_killed_in_a_revocation_storm_denies_every_acked_revoke_at_its_first_answer(
        cluster: Cluster) -> None:
    a, b, c = cluster.start_all("a", "b", "c")
    minted = mint_many(cluster, "abc", 600, "storm")
    doomed, kept = minted[:500], minted[500:]
    revokers = [cluster.client("a"), cluster.client("b")]
    acked: list[Any] = []  # appended only once the node acknowledged the revoke
    failures: list[BaseException] = []

    def storm() -> None:
        try:
            for i, m in enumerate(doomed):
                revokers[i % 2].revoke(token_id=m.token_id)
                acked.append(m)
        except BaseException as exc:  # reported on the test's thread
            failures.append(exc)
    stormer = threading.Thread(target=storm)
    stormer.start()
    wait_until(lambda: len(acked) >= 100, 60, "the storm to be under way")
    c.kill()
    wait_until(lambda: len(acked) >= 200 or not stormer.is_alive(), 60, "revokes while c is down")
    acked_before_restart = list(acked)
    starting = c.start_in_background()
    probe = Probe(c.check_address, timeout=1.0)
    try:
        # Ask c about revoked tokens until it answers at all: its first answer already denies.
        first, asked = None, 0
        deadline = time.monotonic() + 60
        while first is None and time.monotonic() < deadline:
            token = acked_before_restart[asked % len(acked_before_restart)].token
            asked += 1
            try:
                first = probe(token)
            except grpc.RpcError:
                time.sleep(0.005)
        assert first is not None, "c never answered"
        try:
            health_at_first_answer: Any = c.healthz()
        except OSError as exc:  # the HTTP listener opens after the Check listener
            health_at_first_answer = exc
        assert (first.allowed, first.reason) == (False, REVOKED)
        answers = {probe(m.token).reason for m in acked_before_restart}
        assert answers == {REVOKED}, f"/healthz at the first answer: {health_at_first_answer}"
    finally:
        probe.close()
        starting.join(60)
    stormer.join(120)
    assert not failures, failures
    assert len(acked) == len(doomed)
    # Once the bound has passed since the last ack, c (like every node) denies every one, and no other.
    time.sleep(MAX_STALENESS)
    probe = Probe(c.check_address)
    try:
        assert {probe(m.token).reason for m in doomed} == {REVOKED}
        assert {probe(m.token).reason for m in kept} == {ALLOW}
    finally:
        probe.close()
    assert c.stop() == 0


# -- Redis stopped: fail closed, acknowledge nothing, catch up ------------------------------------------


def test_a_stopped_redis_makes_checks_stale_and_revokes_unacknowledged_until_it_runs_again(
        cluster: Cluster) -> None:
    nodes = cluster.start_all("a", "b", "c")
    live, victim, ended = (cluster.client("a").mint(t, ["demo:*:read"]) for t in ("live", "victim", "end"))
    everywhere(nodes, live.token, ALLOW, "the live token allowed everywhere")
    cluster.redis.signal(signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        everywhere(nodes, live.token, STALE, "every node to deny revocation_stale")
        print(f"\nevery node stale {time.monotonic() - stopped:.2f} s after SIGSTOP (max_staleness "
              f"{MAX_STALENESS} s)")
        stale = Probe(nodes[1].check_address)(live.token)
        assert (stale.allowed, stale.status) == (False, 503)
        assert nodes[0].metrics()["agentauthz_cluster_fresh"] == 0.0
        assert nodes[0].metrics()["agentauthz_cluster_staleness_seconds"] >= MAX_STALENESS
        status = nodes[0].cli("cluster", "status", "--cluster", cluster.redis.url)
        assert status.returncode == 1 and "cluster_unavailable" in status.stderr
        assert "Traceback" not in status.stderr
        # Nothing that needs Redis is acknowledged: each answers UNAVAILABLE within the client's timeout.
        assert unavailable(lambda: cluster.client("b").revoke(token_id=victim.token_id)) == \
            grpc.StatusCode.UNAVAILABLE
        assert unavailable(lambda: cluster.client("c").end_task("end")) == grpc.StatusCode.UNAVAILABLE
        assert unavailable(lambda: cluster.client("a").mint("during", ["demo:*:read"])) == \
            grpc.StatusCode.UNAVAILABLE
        assert reasons_on(nodes, live.token) == [STALE] * 3  # still fail closed
    finally:
        cluster.redis.signal(signal.SIGCONT)
    everywhere(nodes, live.token, ALLOW, "every node to catch up and allow again")
    # The unacknowledged revoke and end may still have reached the stream (sent before the timeout):
    # whichever it was, every node ends up with the same answer, never one node alone honouring it.
    for token in (victim.token, ended.token):
        wait_until(lambda t=token: len(set(reasons_on(nodes, t))) == 1, 10, "the nodes to agree")
        time.sleep(MAX_STALENESS)
        assert len(set(reasons_on(nodes, token))) == 1
    # Acknowledged now, it holds everywhere.
    cluster.client("b").revoke(token_id=victim.token_id)
    cluster.client("c").end_task("end")
    everywhere(nodes, victim.token, REVOKED, "the acked revoke everywhere", timeout=MAX_STALENESS + 5)
    everywhere(nodes, ended.token, reasons.TASK_ENDED, "the acked end everywhere", timeout=MAX_STALENESS + 5)
    assert cluster.client("a").mint("after", ["demo:*:read"]).token


# -- Redis killed and restarted from its AOF --------------------------------------------------------------


def test_redis_killed_and_restarted_from_its_aof_loses_no_acknowledged_revocation(cluster: Cluster) -> None:
    nodes = cluster.start_all("a", "b")
    minted = mint_many(cluster, "ab", 40, "aof")
    revoked = minted[:20]
    for i, m in enumerate(revoked):
        cluster.client("ab"[i % 2]).revoke(token_id=m.token_id)
    cluster.client("b").end_task("aof-39")  # the last one acknowledged, a task end
    cluster.redis.kill()  # kill -9 at once: what the AOF holds is what was acknowledged
    everywhere(nodes, minted[30].token, STALE, "the nodes to fail closed without Redis")
    cluster.redis.start()
    everywhere(nodes, minted[30].token, ALLOW, "the nodes to follow the restarted Redis")
    late = cluster.add("d")  # a node that joins after the restart knows only what Redis kept
    everyone = [*nodes, late]
    for m in revoked:
        assert reasons_on(everyone, m.token) == [REVOKED] * 3, m.token_id
    assert reasons_on(everyone, minted[39].token) == [reasons.TASK_ENDED] * 3
    for m in minted[20:39]:
        assert reasons_on(everyone, m.token) == [ALLOW] * 3
    # The AOF kept the epoch: a restart is not a lost engine, and nobody had to recover.
    assert [n.metrics()["agentauthz_cluster_recoveries_total"] for n in everyone] == [0.0] * 3
    again = cluster.client("d").mint("after-aof", ["demo:*:read"])
    assert slot_of(again.token_id) not in {slot_of(m.token_id) for m in minted}


# -- Redis restarted empty ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("downtime", ["until_stale", "none"])
def test_redis_restarted_empty_the_nodes_fail_closed_and_republish_every_revocation(
        cluster: Cluster, downtime: str) -> None:
    nodes = cluster.start_all("a", "b", "c")
    minted = mint_many(cluster, "abc", 60, "wipe")
    revoked = minted[:30]
    for i, m in enumerate(revoked):
        cluster.client("abc"[(i + 1) % 3]).revoke(token_id=m.token_id)  # never on the minting node
    cluster.client("a").end_task("wipe-59")
    everywhere(nodes, minted[59].token, reasons.TASK_ENDED, "the end everywhere")
    last = cluster.client("c").mint("last", ["demo:*:read"])
    cluster.client("a").revoke(token_id=last.token_id)  # just before the wipe: b may not have it yet
    acked = time.monotonic()
    old_slots = {slot_of(m.token_id) for m in [*minted, last]}
    watch = Watch(nodes, [last.token, revoked[0].token, minted[59].token])
    try:
        cluster.redis.wipe()
        if downtime == "until_stale":
            everywhere(nodes, minted[40].token, STALE, "the nodes to fail closed without Redis")
        cluster.redis.start()  # the same port and directory, empty: another epoch, another stream
        for node in nodes:  # a node still fresh from before the loss may not have noticed it yet
            wait_until(lambda n=node: n.metrics()["agentauthz_cluster_recoveries_total"] >= 1, 30,
                       f"{node.name} to recover")
        everywhere(nodes, minted[40].token, ALLOW, "the nodes to serve again", timeout=30)
    finally:
        watch.stop()
    # Throughout the loss and the recovery, no node honoured a revoked token past the bound.
    assert [(round(t - acked, 3), n) for t, n in watch.allows if t > acked + MAX_STALENESS] == []
    assert REVOKED in watch.answers
    for node in nodes:
        wait_until(lambda n=node: any(r["kind"] == "cluster_recover" for r in n.audit_records()), 10,
                   f"{node.name}'s recovery in its audit log")
    late = cluster.add("d")  # joins the new epoch: it learns everything from the re-published journals
    everyone = [*nodes, late]
    for m in [*revoked, last]:
        assert reasons_on(everyone, m.token) == [REVOKED] * 4, m.token_id
    assert reasons_on(everyone, minted[59].token) == [reasons.TASK_ENDED] * 4
    for m in minted[30:59]:
        assert reasons_on(everyone, m.token) == [ALLOW] * 4
    # Minting works again on every node, and no new token gets a slot an old one holds.
    fresh = [cluster.client(n.name).mint(f"after-{n.name}", ["demo:*:read"]) for n in everyone]
    assert not {slot_of(m.token_id) for m in fresh} & old_slots
    for m in fresh:
        everywhere(everyone, m.token, ALLOW, "the new token allowed everywhere")
    # Token ids minted before the wipe and after it are revocable on any node, the new one included.
    for m, revoker in ((minted[45], "d"), (fresh[3], "a"), (fresh[0], "d")):
        cluster.client(revoker).revoke(token_id=m.token_id)
        everywhere(everyone, m.token, REVOKED, f"{m.token_id} revoked on {revoker} everywhere")


# -- Redis back with older data --------------------------------------------------------------------------

ADMIN = "spiffe://dev.local/admin/ops"
GAMMA = "spiffe://dev.local/agent/gamma"
COUNTER = "spiffe://dev.local/agent/counter"
BUDGET_POLICY = DEV_POLICY.read_text() + """
  - id: counted
    agents: ["spiffe://dev.local/agent/counter"]
    tool: counted
    targets: ["*"]
    operations: [read]
    budget: {max_calls: 3}
"""


def test_redis_back_from_an_older_snapshot_loses_no_acknowledged_revocation_nor_ban(tmp_path: Path) -> None:
    """Redis restarted from a snapshot older than the last revocations (no AOF, an fsync that never ran,
    a replica that was behind): the same epoch, but an older stream and bans hash. A node that applied
    more sees its numbering go back and publishes its journal again; a node that was down meanwhile
    learns everything; a ban the snapshot lacks is published again, never lifted."""
    c = Cluster(tmp_path, cluster={"max_staleness": MAX_STALENESS}, config={"admins": [ADMIN]},
                persistent=False)
    try:
        a, b, down = c.start_all("a", "b", "c")
        revoked, ended = c.client("a").mint("snap-revoked", READ), c.client("a").mint("snap-ended", READ)
        banned = c.client("b", GAMMA).mint("snap-banned", READ)
        assert down.stop() == 0
        c.redis.client().save()
        c.client("a").revoke(token_id=revoked.token_id)
        c.client("b").end_task("snap-ended")
        c.client("a", ADMIN).revoke(agent=GAMMA)
        c.redis.kill()
        c.redis.start()  # from the snapshot: the epoch is there, the last three entries are not
        wait_for_a_recovery([a, b], "a node to see the stream go back")
        down.start()
        everyone = [a, b, down]
        watch = Watch(everyone, [revoked.token, ended.token, banned.token])
        try:
            everywhere(everyone, revoked.token, REVOKED, "the revoke everywhere")
            everywhere(everyone, ended.token, reasons.TASK_ENDED, "the end everywhere")
            everywhere(everyone, banned.token, reasons.AGENT_REVOKED, "the ban everywhere")
            assert b.stop() == 0
            b.start()  # reads the bans hash again: the ban stands
            everywhere(everyone, banned.token, reasons.AGENT_REVOKED, "the ban after b's restart")
        finally:
            watch.stop()
        assert watch.allows == []  # not one answer from the node that was down, nor from b restarted
        with pytest.raises(grpc.RpcError):
            c.client("b", GAMMA).mint("after-the-snapshot", READ)
    finally:
        c.stop()


def test_a_node_founding_first_after_a_loss_leaves_every_agent_able_to_revoke_its_tokens(
        cluster: Cluster) -> None:
    """Redis lost its data while every node was down, and a new node came up first: its token-id key
    is the cluster's now. The old nodes' key is retired, not forgotten: an agent still revokes by id,
    on any node, the tokens it minted before."""
    a, b = cluster.start_all("a", "b")
    before = [cluster.client(n).mint(f"before-{n}", READ) for n in ("a", "b")]
    assert a.stop() == 0 and b.stop() == 0
    cluster.redis.wipe()
    cluster.redis.start()
    d = cluster.add("d")  # founds the epoch, and offers its own token-id key first
    a.start()
    b.start()
    after = cluster.client("d").mint("after-d", READ)
    everyone = [a, b, d]
    for minted, revoker in ((before[0], "d"), (before[1], "a"), (after, "b")):
        cluster.client(revoker).revoke(token_id=minted.token_id)
        everywhere(everyone, minted.token, REVOKED, f"{minted.token_id} revoked on {revoker} everywhere")
    # Another agent still may not.
    other = cluster.client("a").mint("other", READ)
    with pytest.raises(grpc.RpcError) as err:
        cluster.client("b", GAMMA).revoke(token_id=other.token_id)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_stream_counter_lost_alone_is_raised_again_and_the_nodes_serve_on(cluster: Cluster) -> None:
    """The stream's numbering counter gone (evicted, deleted) with the stream still there: a node sees
    it below what it applied, recovers, and numbers the next entries past every earlier one,
    rather than reading the stream's old numbers as out of order for ever."""
    nodes = cluster.start_all("a", "b")
    live, dead = cluster.client("a").mint("live", READ), cluster.client("b").mint("dead", READ)
    cluster.client("a").revoke(token_id=dead.token_id)
    numbered = int(cluster.redis.client().get("agentauthz:sequence"))
    cluster.redis.client().delete("agentauthz:sequence")
    wait_for_a_recovery(nodes, "a node to see the counter go back")
    everywhere(nodes, live.token, ALLOW, "the nodes to serve again")
    assert reasons_on(nodes, dead.token) == [REVOKED] * 2
    later = cluster.client("b").mint("later", READ)
    cluster.client("a").revoke(token_id=later.token_id)
    everywhere(nodes, later.token, REVOKED, "a revoke after it everywhere")
    assert int(cluster.redis.client().get("agentauthz:sequence")) > numbered


def test_a_node_back_after_the_stream_was_trimmed_takes_bans_and_unbans_from_the_bans_hash(
        tmp_path: Path) -> None:
    """The stream is trimmed, a ban lasts: a node that was down reads each agent's last ban or unban
    from the bans hash. An unban there (a tombstone) lifts its ban; a ban the hash lacks stays."""
    c = Cluster(tmp_path, config={"admins": [ADMIN]})
    try:
        a, b = c.start_all("a", "b")
        lifted, kept = GAMMA, "spiffe://dev.local/agent/delta"
        for agent in (lifted, kept):
            c.client("a", ADMIN).revoke(agent=agent)
        assert b.stop() == 0
        c.client("a", ADMIN).unban(lifted)
        redis_client = c.redis.client()
        redis_client.xtrim("agentauthz:revocations", maxlen=0)  # b reads neither entry from the stream
        redis_client.hdel("agentauthz:bans", kept)  # as if Redis had lost it
        b.start()
        assert reasons_on([b], c.client("b", lifted).mint("after-the-trim", READ).token) == [ALLOW]
        with pytest.raises(grpc.RpcError):
            c.client("b", kept).mint("after-the-trim", READ)  # still banned on b: never lifted by absence
    finally:
        c.stop()


def test_a_budget_spent_before_redis_lost_its_data_is_not_handed_out_again(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(BUDGET_POLICY)
    c = Cluster(tmp_path, cluster={"max_staleness": MAX_STALENESS}, config={"policy_file": str(policy)})
    try:
        nodes = c.start_all("a", "b")
        token = c.client("a", COUNTER).mint("counting", ["counted:*:read"]).token
        calls = [c.client("ab"[i % 2], COUNTER).check(token, "counted", "x", "read").reason for i in range(4)]
        assert calls == [ALLOW] * 3 + [reasons.BUDGET_EXHAUSTED]
        c.redis.wipe()
        c.redis.start()
        for node in nodes:
            wait_until(lambda n=node: n.metrics()["agentauthz_cluster_recoveries_total"] >= 1, 30,
                       f"{node.name} to recover")
        # The three counted calls are gone with Redis: for the budget's window (a day) nothing says how
        # many were spent, so none is handed out again.
        for name in "ab":
            assert c.client(name, COUNTER).check(token, "counted", "x", "read").reason == \
                reasons.BUDGET_UNAVAILABLE
    finally:
        c.stop()


# -- a stream entry this node cannot apply ------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    {"n": "intruder", "r": "not json"},  # unreadable
    {"n": "intruder", "r": '[{"op": "token", "jti": "x", "slot": -1, "exp": 1}]'},  # a field out of range
    {"n": "intruder", "r": '[{"op": "forget_everything"}]'},  # a change this version does not know
    {"n": "intruder"},  # no records at all
    {"n": "intruder", "s": "many", "r": "[]"},  # a number that is none
])
def test_an_entry_no_node_can_apply_fails_closed_until_it_is_removed(cluster: Cluster,
                                                                     fields: dict[str, str]) -> None:
    """Whoever can write to the stream could try a change this node cannot read (garbage, or a newer
    node's revocation of a new kind): skipping it could skip a revocation, so the node stops
    applying, goes stale and denies, and serves again only once the entry is gone."""
    nodes = cluster.start_all("a", "b")
    live = cluster.client("a").mint("live", ["demo:*:read"])
    assert reasons_on(nodes, live.token) == [ALLOW] * 2
    entry = cluster.redis.client().xadd("agentauthz:revocations", fields)
    wait_until(lambda: reasons_on(nodes, live.token) == [STALE] * 2, 10, "both nodes to deny stale")
    assert all(n.proc is not None and n.proc.poll() is None for n in nodes)  # denying, not crashed
    wait_until(lambda: "cannot apply the cluster stream" in nodes[0].log(), 10, "the node to say why")
    assert reasons_on(nodes, live.token) == [STALE] * 2
    cluster.redis.client().xdel("agentauthz:revocations", entry)
    wait_until(lambda: reasons_on(nodes, live.token) == [ALLOW] * 2, 10, "both nodes to serve again")


# -- a node whose clock runs ahead ---------------------------------------------------------------------


def test_a_task_ended_on_one_node_ends_the_tokens_a_node_whose_clock_runs_ahead_minted(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Node b's wall clock runs 5 s ahead, well within the leeway every node allows an iat: its tokens
    say they were issued after a's cutoff for an end a acknowledges at once. They die all the same (an
    ended task mints nothing more: every token of it is a mint that raced the end)."""
    a = cluster.start_all("a")[0]
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent / "skewed_clock"))
    monkeypatch.setenv("AGENTAUTHZ_TEST_CLOCK_AHEAD", "5")
    b = cluster.add("b")
    monkeypatch.delenv("PYTHONPATH")
    monkeypatch.delenv("AGENTAUTHZ_TEST_CLOCK_AHEAD")
    minted = cluster.client("b").mint("skewed-task", ["demo:*:read"])
    cutoff = cluster.client("a").end_task("skewed-task")
    payload = minted.token.split(".")[1]
    iat = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["iat"]
    assert iat > cutoff  # b's clock is ahead: its token says it was issued after the end
    assert reasons_on([a, b], minted.token) == [reasons.TASK_ENDED] * 2
    # And the task mints nothing more on either node.
    for node in ("a", "b"):
        with pytest.raises(grpc.RpcError):
            cluster.client(node).mint("skewed-task", ["demo:*:read"])
