"""`agentauthz audit verify --cluster`: a node's log cut back to an earlier checkpoint verifies on its own
(it is a shorter, intact chain) but not against the checkpoints the node published to Redis."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from processes import ROOT, Daemon, wait_for
from redis_proc import RedisServer

from agentauthz.audit.files import CHECKPOINTS, log_files
from agentauthz.client import Client, Identity
from agentauthz.identity.devca import ensure_dev_pki, issue_svid

pytestmark = pytest.mark.slow


def verify(state: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "agentauthz", "audit", "verify", str(state / "audit"),
                          "--json", *extra], capture_output=True, text=True, cwd=ROOT, timeout=60)
    return out.returncode, json.loads(out.stdout.splitlines()[0])


def copies(redis: RedisServer, node: str) -> list[dict[str, Any]]:
    return [json.loads(f[b"cp"]) for _, f in redis.client().xrange("agentauthz:audit-checkpoints")
            if f[b"n"] == node.encode()]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RedisServer]:
    """A node that minted and checked a while, its checkpoints copied to Redis, then stopped."""
    work = tmp_path_factory.mktemp("cluster-audit")
    redis = RedisServer(work / "redis").start()
    node = Daemon(work / "a", {"pki_dir": str(work / "pki")})
    node.start(30, "--cluster", redis.url, "--node-id", "a")
    issue_svid(ensure_dev_pki(node.state_dir, pki_dir=work / "pki"), "spiffe://dev.local/agent/alpha",
               work / "alpha")
    agent = Client(node.api_address, Identity.from_dir(work / "alpha"), check_server=node.check_address)
    for round_ in range(3):  # three batches, each checkpointed and copied before the next
        token = agent.mint(f"t{round_}", ["demo:reports:read"]).token
        for _ in range(5):
            assert agent.check(token, "demo", "reports", "read").allowed
        seen = len(copies(redis, "a"))
        wait_for(lambda seen=seen: len(copies(redis, "a")) > seen, 10, "a checkpoint copied to Redis")
    assert node.stop() == 0
    yield node.state_dir, redis
    redis.stop()


def test_an_intact_log_verifies_against_the_cluster_too(stopped: tuple[Path, RedisServer]) -> None:
    state, redis = stopped
    code, result = verify(state, "--cluster", redis.url)  # the node id comes from the state dir
    assert code == 0, result
    assert "against" in result["message"] and "checkpoints the cluster holds" in result["message"]


def test_a_log_cut_back_to_an_earlier_checkpoint_fails_only_against_the_cluster(
        stopped: tuple[Path, RedisServer], tmp_path: Path) -> None:
    state, redis = stopped
    cut = tmp_path / "state"
    subprocess.run(["cp", "-a", str(state), str(cut)], check=True)
    audit = cut / "audit"
    # The attacker's edit: drop the newest records and the newest checkpoints, keeping an intact
    # (shorter) chain that ends at an earlier signed checkpoint.
    first_copy = copies(redis, "a")[0]["seq"]
    lines = b"".join(p.read_bytes() for _, p in log_files(audit)).splitlines(True)
    keep = next(i for i, line in enumerate(lines) if json.loads(line)["seq"] == first_copy + 1) + 1
    for _, path in log_files(audit):
        path.unlink()
    (audit / "audit-0000000001.jsonl").write_bytes(b"".join(lines[:keep]))
    anchors = [line for line in (audit / CHECKPOINTS).read_bytes().splitlines(True)
               if json.loads(line)["seq"] <= first_copy]
    (audit / CHECKPOINTS).write_bytes(b"".join(anchors))

    code, alone = verify(cut)
    assert code == 0, alone  # on its own the shorter log is intact: only an outside copy can tell
    code, result = verify(cut, "--cluster", redis.url, "--node-id", "a")
    assert code == 1
    assert "cluster:" in result["first_bad"] and "truncated" in result["first_bad"]


def test_an_unreachable_redis_is_a_clear_failure(stopped: tuple[Path, RedisServer]) -> None:
    state, redis = stopped
    code, result = verify(state, "--cluster", "redis://127.0.0.1:1/0")
    assert code == 1 and "cannot read the cluster's checkpoints" in result["first_bad"]
