"""`audit verify` knows which logs must exist: the primary's log names every Check worker's log, and a
log deleted whole (a worker's directory, every audit-*.jsonl, the checkpoints file) fails."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from faults_support import fill, healthz, tmpfs
from processes import Daemon, wait_for
from test_audit import KEY, PUB_B64, build  # the unit suite's key and log builder
from test_faults import FAST_AUDIT, agent_client

from agentauthz.audit.verify import main_verify
from agentauthz.audit.writer import AuditLog
from agentauthz.client import Client


def verify(audit: Path) -> dict[str, Any]:
    """`agentauthz audit verify AUDIT` on the pinned key beside it, as the operator runs it."""
    code, result = main_verify(audit)
    assert code == (0 if result["ok"] else 1)
    return result


def records(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in sorted(directory.glob("audit-*.jsonl"))
            for line in path.read_bytes().splitlines()]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The state directory of a daemon with two Check workers, started and stopped."""
    work = tmp_path_factory.mktemp("workers")
    daemon = Daemon(work / "state", {"workers": 3}).start(60.0)
    assert daemon.stop() == 0
    return daemon.state_dir


@pytest.fixture
def state(stopped: Path, tmp_path: Path) -> Path:
    """A copy of ``stopped`` to damage: the module's daemon's log stays intact."""
    shutil.copytree(stopped, tmp_path / "state")
    return tmp_path / "state"


def test_the_primary_names_every_worker_log_and_each_starts_with_its_own_start_record(state: Path) -> None:
    audit = state / "audit"
    (start,) = [r for r in records(audit) if r["kind"] == "start"]
    assert start["worker_logs"] == ["worker-1", "worker-2"]
    for number in (1, 2):
        first = records(audit / f"worker-{number}")[0]
        assert (first["seq"], first["kind"], first["worker"]) == (1, "start", number)
    result = verify(audit)
    assert result["ok"] and result["worker_logs"] == ["worker-1", "worker-2"], result
    assert "earlier version" not in result["message"]


def test_a_worker_log_deleted_whole_fails(state: Path) -> None:
    shutil.rmtree(state / "audit" / "worker-1")
    result = verify(state / "audit")
    assert not result["ok"]
    assert result["first_bad"] == ("worker-1/: missing, but record 1 of the primary's log names this log "
                                   "(deleted?)")


@pytest.mark.parametrize("log", [".", "worker-2"])
def test_a_log_whose_records_are_all_deleted_fails(state: Path, log: str) -> None:
    directory = state / "audit" / log
    for path in directory.glob("*.jsonl"):  # the checkpoints file too: it alone would say "truncated"
        path.unlink()
    result = verify(state / "audit")
    assert not result["ok"], result
    why = "the daemon writes a start record first" if log == "." else \
        "record 1 of the primary's log names this log"
    assert result["first_bad"] == ("" if log == "." else f"{log}/") + \
        f"audit-*.jsonl: no records, but {why} (deleted?)"


@pytest.mark.parametrize("log", [".", "worker-1"])
def test_a_deleted_checkpoints_file_fails(state: Path, log: str) -> None:
    (state / "audit" / log / "checkpoints.jsonl").unlink()
    result = verify(state / "audit")
    assert not result["ok"]
    assert "but checkpoints.jsonl is missing (deleted?)" in result["first_bad"], result


def cut_checkpoints(directory: Path, drop: int) -> None:
    """The checkpoints file without its last ``drop`` entries."""
    path = directory / "checkpoints.jsonl"
    kept = path.read_bytes().splitlines(keepends=True)
    assert len(kept) >= 2
    path.write_bytes(b"".join(kept[:-drop]))


def test_a_checkpoints_file_cut_back_fails_but_a_crash_before_the_last_copy_verifies(state: Path) -> None:
    audit = state / "audit"
    # kill -9 between writing a checkpoint to the log and copying it (batches._copy_checkpoint) leaves
    # exactly that one out, also after the next start adds more.
    cut_checkpoints(audit, 1)
    assert verify(audit)["ok"]
    daemon = Daemon(state, {"workers": 3}).start(60.0)
    assert daemon.stop() == 0
    assert verify(audit)["ok"]
    cut_checkpoints(audit, 1)
    assert verify(audit)["ok"]
    cut_checkpoints(audit, 1)  # more than a crash leaves out
    result = verify(audit)
    assert not result["ok"] and "missing from checkpoints.jsonl" in result["first_bad"], result


def test_worker_logs_of_an_earlier_start_with_more_workers_must_still_be_there(state: Path) -> None:
    daemon = Daemon(state, {"workers": 1}).start(60.0)
    assert daemon.stop() == 0
    audit = state / "audit"
    starts = [r["worker_logs"] for r in records(audit) if r["kind"] == "start"]
    assert starts == [["worker-1", "worker-2"], []]
    assert verify(audit)["ok"]
    shutil.rmtree(audit / "worker-2")
    assert verify(audit)["first_bad"].startswith("worker-2/: missing, but record 1 of the primary's log")


def test_a_log_from_before_start_records_listed_worker_logs_verifies_as_before_and_says_so(
        tmp_path: Path) -> None:
    audit = tmp_path / "audit"
    log = AuditLog.open(audit, key=KEY, flush_interval=60)
    log.start()
    log.record("start", policy_digest="d", keys=[])  # as an earlier version wrote it: no worker_logs
    log.stop()
    build(audit / "worker-1", groups=1)
    shutil.rmtree(audit / "worker-1")  # cannot be told from a daemon that had no workers
    code, result = main_verify(audit, key=PUB_B64)
    assert code == 0 and result["worker_logs"] is None
    assert result["message"].endswith("; the primary's log does not list its worker logs (written by an "
                                      "earlier version): a worker log deleted whole would go unnoticed")


def test_each_run_may_lack_only_its_last_checkpoint_copy(tmp_path: Path) -> None:
    """Two runs, each killed between a checkpoint and its copy: one gap each verifies, a second does not."""
    for _ in range(2):
        log = AuditLog.open(tmp_path, key=KEY, flush_interval=60)
        log.start()
        log.record("start", worker_logs=[])
        for i in range(2):  # a checkpoint after each batch
            assert log.flush() and log.record("check", target=f"t{i}")
        assert log.flush()
        log.stop()
        cut_checkpoints(tmp_path, 1)
        assert main_verify(tmp_path, key=PUB_B64)[0] == 0
    cut_checkpoints(tmp_path, 1)
    code, result = main_verify(tmp_path, key=PUB_B64)
    assert code == 1 and "missing from checkpoints.jsonl" in result["first_bad"], result


def test_healthz_reports_a_worker_whose_audit_log_cannot_be_written(tmp_path: Path) -> None:
    """Only the worker's log is full: the primary's own log is writable (and idle), yet /healthz says
    what the worker's gRPC health says, and recovers with it."""
    state = tmp_path / "state"
    (state / "audit").mkdir(mode=0o700, parents=True)
    state.chmod(0o700)
    with tmpfs(state / "audit" / "worker-1", "512k") as worker:
        daemon = Daemon(state, {"workers": 2, **FAST_AUDIT}).start(60.0)
        try:
            token = agent_client(daemon, tmp_path).mint("full", ["demo:*:read"]).token
            fill(worker / "filler")

            def fresh_check() -> str:  # a new connection: the kernel picks the primary or the worker
                return Client(daemon.api_address, check_server=daemon.check_address).check(
                    token, "demo", "a", "read").reason
            wait_for(lambda: fresh_check() == "audit_unavailable", 30, "a Check the worker cannot log")
            wait_for(lambda: healthz(daemon) == 503, 5, "/healthz 503")
            (worker / "filler").unlink()
            wait_for(lambda: healthz(daemon) == 200, 10, "/healthz 200 once the worker's log writes again")
        finally:
            daemon.stop()
