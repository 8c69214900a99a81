"""Several Check worker processes: one listener, one revocation state, no stale worker."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import grpc
from processes import Daemon, wait_for

from agentauthz.audit.verify import verify_dir
from agentauthz.client import Client, Identity
from agentauthz.identity.devca import ensure_dev_pki, issue_svid

AGENT = "spiffe://dev.local/agent/alpha"
CHECKS = 60  # new connections each, so SO_REUSEPORT spreads them over the workers


def fresh_check(daemon: Daemon, token: str) -> str:
    """One Check on a new connection: lands on whichever worker the kernel picks."""
    return Client(daemon.api_address, check_server=daemon.check_address).check(
        token, "demo", "a", "read").reason


def test_workers_share_the_port_and_every_worker_sees_each_revocation(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "state", {"workers": 2}).start(30.0)
    try:
        issue_svid(ensure_dev_pki(daemon.state_dir), AGENT, tmp_path / "id")
        client = Client(daemon.api_address, Identity.from_dir(tmp_path / "id"))
        by_bit, by_task, kept = (client.mint(t, ["demo:*:read"]) for t in ("bit", "task", "kept"))
        assert {fresh_check(daemon, by_bit.token) for _ in range(CHECKS)} == {"allow"}
        client.revoke(token_id=by_bit.token_id)  # shared-memory bit
        client.end_task("task")  # replicated to the worker before the ack
        for _ in range(CHECKS):
            assert fresh_check(daemon, by_bit.token) == "token_revoked"
            assert fresh_check(daemon, by_task.token) == "task_ended"
            assert fresh_check(daemon, kept.token) == "allow"
    finally:
        assert daemon.stop() == 0
    audit = tmp_path / "state" / "audit"
    worker_log = audit / "worker-1"
    pinned = (tmp_path / "state" / "audit-key" / "public.pem").read_bytes()  # one key signs every log
    assert verify_dir(audit, pinned).ok and verify_dir(worker_log, pinned).ok
    checks = [json.loads(line) for f in sorted(worker_log.glob("audit-*.jsonl"))
              for line in f.read_text().splitlines()]
    # The worker really answered some of the calls (the kernel spreads new connections).
    assert any(r["kind"] == "check" for r in checks)


def test_a_dead_primary_stops_its_workers(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "state", {"workers": 2}).start(30.0)
    children = [int(p) for p in Path(f"/proc/{daemon.proc.pid}/task/{daemon.proc.pid}/children")
                .read_text().split()]
    assert children
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)

    def gone() -> bool:
        for pid in children:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            try:  # reap if it is a zombie reparented to us
                if open(f"/proc/{pid}/stat").read().split()[2] == "Z":
                    continue
            except OSError:
                continue
            return False
        return True
    wait_for(gone, 20, "workers to exit after the primary died")
    with grpc.insecure_channel(daemon.check_address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=1)
            raise AssertionError("a worker still answers without its primary")
        except grpc.FutureTimeoutError:
            pass


def test_a_worker_adopts_only_the_policy_text_it_is_sent_and_refuses_a_wrong_digest(tmp_path: Path) -> None:
    from multiprocessing.connection import Pipe

    from agentauthz.authority.core import Authority
    from agentauthz.cluster.replication import _apply
    from agentauthz.config import Config
    from agentauthz.decision.policy import DEV_POLICY

    path = tmp_path / "policy.yaml"
    path.write_text(DEV_POLICY.read_text())
    a = Authority(Config(state_dir=tmp_path / "state", policy_file=path, revocation_capacity=1 << 16))
    path.unlink()  # a worker that read the file would fail now
    primary, worker = Pipe()
    text = DEV_POLICY.read_text() + "# validated by the primary\n"
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert not _apply(worker, a, ("policy", text, "0" * 64))
    assert primary.recv()[0] == "error" and a.policy.digest != digest
    assert _apply(worker, a, ("policy", text, digest))
    assert primary.recv() == "ack" and a.policy.digest == digest and a.policy_text == text


def test_a_new_workers_index_is_exactly_the_primarys(hot: Any) -> None:
    from agentauthz.cluster.replication import index_state, restore_index

    def index() -> Any:
        return hot.RevocationIndex(hot.Bitset(64))
    primary, stale = index(), index()
    primary.revoke_task("t1", 5)
    primary.revoke_agent("spiffe://dev.local/agent/a", 7)
    primary.revoke_key("k1")
    # The copy a worker is forked from is stale: cutoffs the primary has since forgotten or lowered
    # (a lifted ban) must not survive into the new worker.
    stale.revoke_task("t1", 9)
    stale.revoke_task("gone", 3)
    stale.revoke_agent("spiffe://dev.local/agent/unbanned", 2**63 - 1)
    restore_index(stale, index_state(primary))
    assert index_state(stale) == index_state(primary)
