"""Redis HA for cluster mode, on real processes: a replica and ``wait_replicas`` (a revoke is acknowledged
only once a replica holds it), and Sentinel (the nodes find the primary through it, and after a failover
the promoted replica still holds every acknowledged revocation)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from cluster_support import READ, Cluster, Node, reasons_on, wait_until
from processes import ROOT, audit_records
from redis_proc import RedisServer, Sentinel

from agentauthz import reasons

pytestmark = pytest.mark.slow


def refused(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


class HaCluster(Cluster):
    """A Cluster whose nodes reach Redis as ``settings`` says (a replica to wait for, or sentinels)."""

    def __init__(self, work: Path, settings: dict[str, Any]) -> None:
        super().__init__(work)
        self.settings = settings

    def add(self, name: str, *, flags: bool = False, start: bool = True) -> Node:
        config = {"pki_dir": str(self.pki), **self.config,
                  "cluster": {"node_id": name, "max_staleness": 1, **self.settings}}
        node = self.nodes[name] = Node(name, self.work / name, config, ())
        return node.start() if start else node


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[tuple[HaCluster, RedisServer]]:
    primary = RedisServer(tmp_path / "primary").start()
    replica = RedisServer(tmp_path / "replica", replica_of=primary.port).start()
    wait_until(lambda: replica.client().info("replication")["master_link_status"] == "up", 10,
               "the replica to sync")
    cluster = HaCluster(tmp_path, {"redis": primary.url, "wait_replicas": 1, "wait_timeout": 0.5})
    cluster.redis.stop()
    cluster.redis = primary
    try:
        yield cluster, replica
    finally:
        cluster.stop()
        replica.stop()


def test_a_revoke_is_acknowledged_only_once_a_replica_holds_it(replicated: tuple[HaCluster, RedisServer]
                                                               ) -> None:
    cluster, replica = replicated
    nodes = cluster.start_all("a", "b")
    token = cluster.client("a").mint("held", READ)
    cluster.client("b").revoke(token_id=token.token_id)
    assert reasons_on(nodes, token.token) == [reasons.TOKEN_REVOKED] * 2
    # The replica holds it: the stream's newest entry there is the revocation's.
    entries = replica.client().xrevrange("agentauthz:revocations", count=5)
    assert any(b'"op":"token"' in fields[b"r"] for _, fields in entries)

    replica.kill()  # no replica to confirm: nothing more is acknowledged
    error = refused(lambda: cluster.client("b").revoke(token_id=token.token_id))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "replicas confirmed" in error.details()


@pytest.fixture
def sentinel_cluster(tmp_path: Path) -> Iterator[tuple[HaCluster, RedisServer, RedisServer, Sentinel]]:
    primary = RedisServer(tmp_path / "primary").start()
    replica = RedisServer(tmp_path / "replica", replica_of=primary.port).start()
    wait_until(lambda: replica.client().info("replication")["master_link_status"] == "up", 10,
               "the replica to sync")
    sentinel = Sentinel(tmp_path / "sentinel", primary.port).start()
    cluster = HaCluster(tmp_path, {"sentinels": [f"127.0.0.1:{sentinel.port}"],
                                   "sentinel_master": sentinel.master, "wait_replicas": 1,
                                   "wait_timeout": 0.5})
    cluster.redis.stop()
    cluster.redis = primary
    try:
        yield cluster, primary, replica, sentinel
    finally:
        cluster.stop()
        for process in (sentinel, replica):
            process.stop()


def test_through_sentinel_a_failover_keeps_every_acknowledged_revocation(
        sentinel_cluster: tuple[HaCluster, RedisServer, RedisServer, Sentinel]) -> None:
    cluster, primary, replica, sentinel = sentinel_cluster
    nodes = cluster.start_all("a", "b")
    revoked = [cluster.client("a").mint(f"before-{i}", READ) for i in range(3)]
    for m in revoked:
        cluster.client("b").revoke(token_id=m.token_id)  # acked: the replica holds each
    live = cluster.client("b").mint("live", READ)

    primary.signal(signal.SIGKILL)
    wait_until(lambda: sentinel.primary_port() == replica.port, 30, "sentinel to promote the replica")
    # The nodes follow the promoted replica: fresh again, every acked revocation still there.
    wait_until(lambda: reasons_on(nodes, live.token) == [reasons.ALLOW] * 2, 30,
               "the nodes to follow the new primary")
    for m in revoked:
        assert reasons_on(nodes, m.token) == [reasons.TOKEN_REVOKED] * 2
    # No replica is left to confirm a revoke now: refused, not acknowledged and forgotten at the next loss.
    assert refused(lambda: cluster.client("a").revoke(token_id=live.token_id)).code() == \
        grpc.StatusCode.UNAVAILABLE
    assert [n.metrics()["agentauthz_cluster_recoveries_total"] for n in nodes] == [0.0, 0.0]


def test_a_node_with_check_workers_applies_other_nodes_changes_in_every_worker(tmp_path: Path) -> None:
    """Remote changes reach forked workers through the same seam as local ones: revocations, keys
    (a token of another node verifies in every worker) and the budget counted in Redis by all."""
    cluster = HaCluster(tmp_path, {})
    cluster.settings = {"redis": cluster.redis.url}
    cluster.config = {"workers": 2}
    try:
        nodes = cluster.start_all("a", "b")
        token = cluster.client("b").mint("workers", READ)
        # A fresh connection per Check: SO_REUSEPORT spreads them over node a's primary and its worker.
        assert set(answers(nodes[0], token.token, 24)) == {reasons.ALLOW}
        cluster.client("b").revoke(token_id=token.token_id)
        assert set(answers(nodes[0], token.token, 24)) == {reasons.TOKEN_REVOKED}
        audit = nodes[0].state_dir / "audit"
        # Both of node a's processes answered some of those denials (each keeps its own audit log,
        # written within a flush interval).
        wait_until(lambda: denials(audit) > 0 and denials(audit / "worker-1") > 0, 5,
                   "denials recorded by the primary and by the worker")
    finally:
        cluster.stop()


def answers(node: Node, token: str, count: int) -> list[str]:
    return [reasons_on([node], token)[0] for _ in range(count)]


def denials(directory: Path) -> int:
    return sum(r.get("reason") == reasons.TOKEN_REVOKED for r in audit_records(directory))


def test_the_shipped_cluster_config_joins_nodes_as_the_readme_runs_them(tmp_path: Path) -> None:
    """examples/cluster.yaml as the README's three-node walkthrough uses it: the file, then per node
    --node-id and --state-dir (and here the test's Redis and CA directory instead of the defaults)."""
    redis = RedisServer(tmp_path / "redis").start()
    shipped = str(ROOT / "examples" / "cluster.yaml")
    nodes = []
    try:
        for name in ("a", "b"):
            node = Node(name, tmp_path / name, {}, ("--config", shipped, "--state-dir", str(tmp_path / name),
                                                   "--cluster", redis.url, "--node-id", name,
                                                   "--pki-dir", str(tmp_path / "pki")))
            nodes.append(node.start())
        cluster = Cluster(tmp_path / "clients")
        cluster.redis.stop()
        cluster.redis, cluster.pki, cluster.nodes = redis, tmp_path / "pki", {n.name: n for n in nodes}
        token = cluster.client("a").mint("shipped", READ)
        assert reasons_on(nodes, token.token) == [reasons.ALLOW] * 2
        cluster.client("b").end_task("shipped")
        assert reasons_on(nodes, token.token) == [reasons.TASK_ENDED] * 2
        assert all(n.metrics()["agentauthz_cluster_fresh"] == 1.0 for n in nodes)
    finally:
        for node in nodes:
            node.stop()
        redis.stop()
