"""Faults with real components failing: the audit disk full or failing fsync, the daemon killed mid-write.

The guarantee under test: no allow is answered that is not on disk in the audit log, whatever fails
and whenever the process dies; the hash chain stays continuous across every failure and restart.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from faults_support import (
    AGENT,
    AUTHZ,
    NOT_SERVING,
    SERVING,
    Load,
    failing_fsync_disk,
    fill,
    grpc_health,
    healthz,
    tmpfs,
)
from processes import Daemon, audit_records, wait_for

from agentauthz.audit.files import public_pem
from agentauthz.audit.records import prepare
from agentauthz.audit.verify import verify_dir
from agentauthz.audit.writer import WITHDRAWN, AuditLog
from agentauthz.client import Client, Decision, Identity
from agentauthz.errors import AuditUnavailable
from agentauthz.identity.devca import ensure_dev_pki, issue_svid

FAST_AUDIT = {"audit_flush_interval": 0.01}
AUDIT_KEY = Ed25519PrivateKey.generate()  # the checkpoint key, kept outside the audit directory


def agent_client(daemon: Daemon, work: Path, agent: str = AGENT) -> Client:
    issue_svid(ensure_dev_pki(daemon.state_dir), agent, work / "id")
    return Client(daemon.api_address, Identity.from_dir(work / "id"), check_server=daemon.check_address)


def verify_cli(daemon: Daemon) -> None:
    done = daemon.cli("audit", "verify", str(daemon.state_dir / "audit"))
    assert done.returncode == 0, done.stderr
    assert "OK:" in done.stdout


def assert_log_tells_the_truth(records: list[dict[str, Any]], seen: dict[str, tuple[bool, str]]) -> None:
    """Every allow a client saw is logged as an allow; a denial it saw is never logged as an allow
    unless a later ``checks_withdrawn`` record says the allow was answered audit_unavailable."""
    logged = {r.get("decision_id"): r["decision"] for r in records if r["kind"] == "check"}
    withdrawn = {d for r in records if r["kind"] == WITHDRAWN for d in r["decision_ids"]}
    lost = [d for d, (allowed, _) in seen.items() if allowed and logged.get(d) is not True]
    assert not lost, f"{len(lost)} of {sum(a for a, _ in seen.values())} allows seen are not logged as allows"
    false_allows = [d for d, (allowed, _) in seen.items()
                    if not allowed and logged.get(d) and d not in withdrawn]
    assert not false_allows, f"denials logged as allows: {false_allows[:5]}"


class AuditDisk:
    """The daemon's audit directory on a filesystem the test can break and mend."""

    def __init__(self, directory: Path, exhaust: Any, restore: Any) -> None:
        self.directory, self.exhaust, self.restore = directory, exhaust, restore


@contextmanager
def audit_disk(kind: str, work: Path, state: Path) -> Iterator[AuditDisk]:
    state.mkdir(mode=0o700, parents=True)
    directory = state / "audit"
    if kind == "disk_full":  # write() fails: ENOSPC, a short write first
        with tmpfs(directory, "512k"):
            filler = directory / "filler"
            yield AuditDisk(directory, lambda: fill(filler), lambda: filler.unlink(missing_ok=True))
    else:  # write() succeeds, fsync() fails: the kernel cannot write the pages back (ENOSPC, EIO)
        with failing_fsync_disk(work, directory) as disk:
            yield AuditDisk(directory, disk.exhaust, disk.restore)


@pytest.mark.parametrize("kind", ["disk_full", "fsync_fails"])
def test_audit_that_cannot_write_denies_every_check_until_it_can(tmp_path: Path, kind: str) -> None:
    with audit_disk(kind, tmp_path, tmp_path / "state") as disk:
        daemon = Daemon(tmp_path / "state", FAST_AUDIT).start()
        seen: dict[str, tuple[bool, str]] = {}

        def check() -> Decision:
            decision = client.check(token, "demo", "a", "read")
            seen[decision.decision_id] = (decision.allowed, decision.reason)
            return decision

        try:
            client = agent_client(daemon, tmp_path)
            token = client.mint("disk", ["demo:*:read"]).token
            assert check().allowed
            disk.exhaust()
            wait_for(lambda: check().reason == "audit_unavailable", 10, "the first audit_unavailable")
            for _ in range(20):
                d = check()
                assert (d.allowed, d.status, d.reason) == (False, 503, "audit_unavailable")
            assert healthz(daemon) == 503
            for service in ("", AUTHZ):
                wait_for(lambda s=service: grpc_health(daemon.check_address, s) == NOT_SERVING, 5,
                         f"gRPC health of {service!r} NOT_SERVING")
            disk.restore()
            wait_for(lambda: check().allowed, 10, "Checks allowed again once the disk takes writes")
            assert healthz(daemon) == 200
            wait_for(lambda: grpc_health(daemon.check_address, AUTHZ) == SERVING, 5, "gRPC health SERVING")
            assert all(check().allowed for _ in range(5))
        finally:
            assert daemon.stop() == 0
        verify_cli(daemon)  # one chain, continuous across the failure
        records = audit_records(disk.directory)
        assert_log_tells_the_truth(records, seen)
        denials = [r for r in records if r["kind"] == "check" and r["reason"] == "audit_unavailable"]
        assert denials, "the denials were recorded too, once the disk came back"


def test_kill_9_mid_load_loses_no_allow_the_client_saw(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "state").start()
    audit = daemon.state_dir / "audit"
    try:
        token = agent_client(daemon, tmp_path).mint("load", ["demo:*:read"]).token
        with Load(daemon.check_address, token) as load:
            wait_for(lambda: load.count() > 1000, 30, "load")
            daemon.stop(signal.SIGKILL)
        before = {p.name: p.read_bytes() for p in audit.glob("audit-*.jsonl")}
        daemon.start()
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    records = audit_records(audit)
    assert_log_tells_the_truth(records, load.seen.decisions)
    assert len(load.seen.allowed) > 1000
    # Nothing that was written before the kill was cut or changed, torn or not.
    for name, data in before.items():
        kept = data[:data.rfind(b"\n") + 1]
        assert (audit / name).read_bytes().startswith(kept)
    cuts = [r for r in records if r["kind"] == "audit_truncated"]
    torn = sum(len(data) - len(data[:data.rfind(b"\n") + 1]) for data in before.values())
    assert sum(c["bytes_cut"] for c in cuts) == torn
    verify_cli(daemon)


def test_kill_9_while_batch_writes_fail_and_a_torn_tail_is_cut(tmp_path: Path) -> None:
    """Disk full under load: every short batch write is undone at once (a whole line it left would
    survive as an allow its caller was told was refused), the writer holds the batch and retries.
    SIGKILL then; a write the kill cut short leaves a torn tail, which the restart cuts and records."""
    with audit_disk("disk_full", tmp_path, tmp_path / "state") as disk:
        daemon = Daemon(tmp_path / "state", FAST_AUDIT).start()
        try:
            token = agent_client(daemon, tmp_path).mint("torn", ["demo:*:read"]).token
            with Load(daemon.check_address, token) as load:
                wait_for(lambda: load.count() > 200, 30, "load")
                disk.exhaust()
                wait_for(lambda: "audit_unavailable" in load.seen.reasons(), 10, "audit_unavailable")
                time.sleep(1)  # the writer retries the held batch meanwhile
                daemon.stop(signal.SIGKILL)
            log_file = max(disk.directory.glob("audit-*.jsonl"))
            data = log_file.read_bytes()  # the kill may have caught a retry mid-write: torn already
            durable = data[:data.rfind(b"\n") + 1]
            # What a kill in the middle of write(2) leaves: the start of the next record, no newline.
            torn = durable[durable.rfind(b"\n", 0, len(durable) - 1) + 1:][:57]
            disk.restore()
            with open(log_file, "ab") as f:
                f.write(torn)
            daemon.start()
            assert daemon.stop() == 0
        finally:
            daemon.kill()
        after = log_file.read_bytes()
        assert after.startswith(durable)
        cut = json.loads(after[len(durable):].splitlines()[0])
        assert cut["kind"] == "audit_truncated"
        assert (cut["file"], cut["offset"], cut["bytes_cut"]) == (log_file.name, len(durable),
                                                                 len(data) + len(torn) - len(durable))
        records = audit_records(disk.directory)
        # Whole lines of a failed write would show here: allows logged that their callers saw refused.
        assert_log_tells_the_truth(records, load.seen.decisions)
        verify_cli(daemon)


def test_an_allow_waits_for_its_fsync_and_a_failed_disk_withdraws_it(tmp_path: Path) -> None:
    """The group commit under Check, in-process: a record is in the log file when its future is done
    (even with a flush interval of a minute); a failing disk fails the waiting future instead, and
    the log says so once it can."""
    prepared = prepare(decision=True, reason="allow", agent=AGENT)

    async def scenario(log: AuditLog, directory: Path) -> None:
        started = time.monotonic()
        futures = [log.record_check_durable(f"ok-{i}", "", prepared) for i in range(50)]
        await asyncio.gather(*futures)  # type: ignore[arg-type]
        assert time.monotonic() - started < 2, "group commit does not wait for the flush interval"
        on_disk = b"".join(p.read_bytes() for p in directory.glob("audit-*.jsonl"))
        assert all(f'"decision_id":"ok-{i}"'.encode() in on_disk for i in range(50))
        fill(directory / "filler")
        # Bigger than what is left of the log file's last, partly used page.
        big = prepare(decision=True, reason="allow", agent=AGENT, note="x" * 8192)
        waiting = log.record_check_durable("doomed", "", big)
        assert waiting is not None
        with pytest.raises(AuditUnavailable):
            await asyncio.wait_for(waiting, 10)
        assert not log.healthy
        (directory / "filler").unlink()
        assert await asyncio.to_thread(log.flush) and log.healthy

    with tmpfs(tmp_path / "fs", "256k") as fs:
        log = AuditLog.open(fs / "audit", key=AUDIT_KEY, flush_interval=60)
        log.start()
        try:
            asyncio.run(scenario(log, fs / "audit"))
        finally:
            log.stop()
        records = audit_records(fs / "audit")
        doomed = [i for i, r in enumerate(records) if r.get("decision_id") == "doomed"]
        withdrawn = [i for i, r in enumerate(records) if r["kind"] == WITHDRAWN]
        assert len(doomed) == 1 and records[doomed[0]]["decision"] is True
        assert len(withdrawn) == 1 and withdrawn[0] > doomed[0]
        assert records[withdrawn[0]]["decision_ids"] == ["doomed"]
        assert records[withdrawn[0]]["reason"] == "audit_unavailable"
        assert verify_dir(fs / "audit", public_pem(AUDIT_KEY.public_key())).ok


def test_group_commit_does_not_storm_checkpoints(tmp_path: Path) -> None:
    """Allows one after another each get their own write; checkpoints (a signature and a second fsync
    each) still come at most about once a flush interval."""
    log = AuditLog.open(tmp_path, key=AUDIT_KEY, flush_interval=0.2)
    log.start()
    prepared = prepare(decision=True, reason="allow")

    async def one_by_one() -> float:
        started = time.monotonic()
        for i in range(300):
            await log.record_check_durable(f"d{i}", "", prepared)  # type: ignore[misc]
        return time.monotonic() - started

    try:
        elapsed = asyncio.run(one_by_one())
    finally:
        log.stop()
    records = audit_records(tmp_path)
    checkpoints = sum(r["kind"] == "checkpoint" for r in records)
    assert sum(r["kind"] == "check" for r in records) == 300
    assert checkpoints <= elapsed / 0.2 + 3, f"{checkpoints} checkpoints in {elapsed:.2f}s"
    assert verify_dir(tmp_path, public_pem(AUDIT_KEY.public_key())).ok


ADMIN = "spiffe://dev.local/admin/ops"
BETA = "spiffe://dev.local/agent/beta"


def test_kill_9_right_after_mints_are_answered_keeps_their_records(tmp_path: Path) -> None:
    """A token a caller holds is in the log: Mint, Delegate and Revoke answer once their records are
    fsynced, not a flush interval later (here 30 s, so only that can pass)."""
    daemon = Daemon(tmp_path / "state", {"audit_flush_interval": 30}).start()
    try:
        alpha = agent_client(daemon, tmp_path / "alpha")
        minted = [alpha.mint(f"task-{i}", ["demo:*:read"]) for i in range(3)]
        child = alpha.delegate(minted[0].token, BETA, ["demo:*:read"])
        alpha.revoke(token_id=minted[1].token_id)
        daemon.stop(signal.SIGKILL)
        records = audit_records(daemon.state_dir / "audit")
        logged = {(r["kind"], r.get("token_id")) for r in records}
        for m in minted:
            assert ("mint", m.token_id) in logged
        assert ("delegate", child.token_id) in logged
        assert any(r["kind"] == "revoke" for r in records)
        daemon.start()
    finally:
        assert daemon.stop() == 0
    verify_cli(daemon)


def test_kill_9_right_after_a_revocation_is_acknowledged_keeps_it(tmp_path: Path) -> None:
    """Each kind of revocation is durable before its ack: SIGKILL the moment it returns, restart, refused."""
    daemon = Daemon(tmp_path / "state", {"admins": [ADMIN]}).start()
    try:
        alpha = agent_client(daemon, tmp_path / "alpha")
        beta = agent_client(daemon, tmp_path / "beta", BETA)
        admin = agent_client(daemon, tmp_path / "admin", ADMIN)
        by_id, by_task, keep = (alpha.mint(task, ["demo:*:read"]) for task in ("by-id", "by-task", "keep"))
        by_agent = beta.mint("beta-task", ["demo:*:read"])
        for minted in (by_id, by_task, keep, by_agent):
            assert alpha.check(minted.token, "demo", "a", "read").allowed  # verified and cached
        alpha.revoke(token_id=by_id.token_id)
        alpha.end_task("by-task")
        beta.revoke(agent=BETA)
        daemon.stop(signal.SIGKILL)
        daemon.start()
        reasons = {name: alpha.check(m.token, "demo", "a", "read").reason
                   for name, m in (("id", by_id), ("task", by_task), ("agent", by_agent), ("keep", keep))}
        assert reasons == {"id": "token_revoked", "task": "task_ended", "agent": "agent_revoked",
                           "keep": "allow"}
        admin.revoke(key_id=keep.key_id)  # the signing key of every token above
        daemon.stop(signal.SIGKILL)
        daemon.start()
        # Retired from the keyring (unknown kid) and revoked in the journal: refused either way.
        assert alpha.check(keep.token, "demo", "a", "read").reason in ("token_key_unknown", "key_revoked")
        fresh = alpha.mint("after", ["demo:*:read"])
        assert fresh.key_id != keep.key_id and alpha.check(fresh.token, "demo", "a", "read").allowed
    finally:
        assert daemon.stop() == 0
    verify_cli(daemon)
