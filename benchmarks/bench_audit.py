"""Audit log micro benchmarks: record() enqueue cost with the writer running, and writer throughput."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agentauthz.audit.writer import AuditLog

# What a Check records: the fields §5 of the design lists, with realistic sizes.
CHECK: dict[str, Any] = {
    "decision": "allow", "reason": "allow", "agent": "spiffe://prod.example/ns/agents/sa/planner",
    "task": "task-7f3c2a", "tool": "github", "target": "repo:acme/payments", "operation": "read",
    "intent": "summarise open pull requests for the weekly report", "token_id": "tok_9VbQ2xkq1Zr8",
    "chain": ["spiffe://prod.example/ns/agents/sa/root", "spiffe://prod.example/ns/agents/sa/planner"],
    "decision_id": "dec_01HZX3K4V6M2", "status": 200,
}
CALLS = 20_000  # fixed: the writer drains while we enqueue, and stop() then writes every record


@pytest.fixture
def running(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog.open(tmp_path, key=Ed25519PrivateKey.generate(), queue_max=1 << 20)
    log.start()
    yield log
    assert log.flush(60) and log.healthy
    log.stop(60)


def test_record_check(benchmark: Any, running: AuditLog) -> None:
    benchmark.pedantic(running.record, args=("check",), kwargs=CHECK, rounds=CALLS // 50, iterations=50)
    assert running.pending < 1 << 20, "every call must have been taken, not refused"


def test_record_minimal(benchmark: Any, running: AuditLog) -> None:
    benchmark.pedantic(running.record, args=("revoke",), kwargs={"token_id": "tok_9VbQ2xkq1Zr8"},
                       rounds=CALLS // 50, iterations=50)


def test_writer_throughput_10k(benchmark: Any, running: AuditLog) -> None:
    """Enqueue 10k records and wait until they are fsynced: the writer's sustained rate."""
    def burst() -> None:
        for _ in range(10_000):
            running.record("check", **CHECK)
        assert running.flush(60)

    benchmark.pedantic(burst, rounds=5, iterations=1)
