"""/metrics adds up over every Check worker, through a worker's kill -9 and restart; the latency twins."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import attribute_context_pb2 as attrs
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from processes import Daemon, audit_records, http_get, wait_for, workers_of
from prometheus_client.parser import text_string_to_metric_families
from support import AUDIENCE, Forge, make_verifier

from agentauthz import reasons
from agentauthz.audit import metrics
from agentauthz.authority.approvers import issue_dev_credential
from agentauthz.client import ApprovalsClient, Client, Identity
from agentauthz.decision import _accel
from agentauthz.decision.policy import DEV_POLICY, Policy
from agentauthz.identity.devca import ensure_dev_pki, issue_svid
from agentauthz.serve import extauthz

ALPHA, BETA = "spiffe://dev.local/agent/alpha", "spiffe://dev.local/agent/beta"
WORKERS = 3  # the primary and two workers answer Check
ROUNDS = 30  # allowed, scope-denied and malformed Checks each, on new connections: spread over all


def scrape(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as prometheus_client's own parser reads it: (sample name, labels) -> value."""
    status, body = http_get(f"http://127.0.0.1:{daemon.http_port}/metrics")[:2]
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def decisions(samples: dict[Any, float], reason: str) -> float:
    return samples.get(("agentauthz_check_decisions_total", (("reason", reason),)), 0.0)


def checks(samples: dict[Any, float]) -> float:
    return samples[("agentauthz_check_duration_seconds_count", ())]


def answered_by_every_process(daemon: Daemon) -> bool:
    audit = daemon.state_dir / "audit"
    logs = [audit, *(audit / f"worker-{n}" for n in range(1, WORKERS))]
    return all(any(r["kind"] == "check" for r in audit_records(log)) for log in logs)


def check_rounds(daemon: Daemon, token: str) -> None:
    """ROUNDS of: one allow, one scope_denied, one token_malformed; each on a new connection."""
    for _ in range(ROUNDS):
        for tok, operation, want in ((token, "read", "allow"), (token, "write", "scope_denied"),
                                     ("not-a-token", "read", "token_malformed")):
            checker = Client(daemon.api_address, check_server=daemon.check_address)
            assert checker.check(tok, "demo", "reports", operation).reason == want


@pytest.fixture
def daemon(tmp_path: Path) -> Any:
    d = Daemon(tmp_path / "state", {"workers": WORKERS}).start(60.0)
    yield d
    d.kill()


def identity(daemon: Daemon, agent: str) -> Identity:
    out = daemon.state_dir.parent / f"id-{agent.rsplit('/', 1)[-1]}"
    issue_svid(ensure_dev_pki(daemon.state_dir), agent, out)
    return Identity.from_dir(out)


def test_check_counts_add_up_over_every_worker_and_a_killed_worker_keeps_its_counts(daemon: Daemon) -> None:
    alpha = Client(daemon.api_address, identity(daemon, ALPHA))
    token = alpha.mint("metrics", ["demo:*:read"]).token
    before = scrape(daemon)
    assert checks(before) == 0 and decisions(before, "allow") == 0
    check_rounds(daemon, token)
    # Meaningful only if every process answered some: each keeps its own audit log.
    wait_for(lambda: answered_by_every_process(daemon), 20, "a Check record in every process's log")
    after = scrape(daemon)
    assert decisions(after, "allow") == ROUNDS
    assert decisions(after, "scope_denied") == ROUNDS and decisions(after, "token_malformed") == ROUNDS
    assert checks(after) == 3 * ROUNDS  # the histogram times every Check, on whichever process
    assert after[("agentauthz_check_duration_seconds_bucket", (("le", "+Inf"),))] == 3 * ROUNDS
    assert after[("agentauthz_check_duration_seconds_sum", ())] > 0

    victim = workers_of(daemon)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: scrape(daemon).get(("agentauthz_worker_restarts_total", (("cause", "died"),))) == 1,
             30, "the killed worker's restart")
    wait_for(lambda: victim not in workers_of(daemon) and len(workers_of(daemon)) == WORKERS - 1, 30,
             "its replacement")
    # A worker's counts live in memory shared with the primary: its death loses none of them, and
    # its replacement counts on from them.
    restarted = scrape(daemon)
    for reason in ("allow", "scope_denied", "token_malformed"):
        assert decisions(restarted, reason) == ROUNDS, reason
    assert checks(restarted) == 3 * ROUNDS
    check_rounds(daemon, token)
    again = scrape(daemon)
    assert decisions(again, "allow") == 2 * ROUNDS and checks(again) == 6 * ROUNDS


def test_process_metrics_name_every_process(daemon: Daemon) -> None:
    samples = scrape(daemon)
    processes = {"primary", *(f"worker-{n}" for n in range(1, WORKERS))}
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds"):
        assert {dict(labels)["process"] for sample, labels in samples if sample == name} == processes, name


def test_operations_move_by_exactly_what_was_done(daemon: Daemon) -> None:
    alpha = Client(daemon.api_address, identity(daemon, ALPHA))

    before = scrape(daemon)
    minted = [alpha.mint(f"task-{n}", ["demo:*:read"]) for n in range(3)]
    alpha.delegate(minted[0].token, BETA, ["demo:reports/*:read"])
    alpha.revoke(token_id=minted[1].token_id)
    alpha.end_task("task-2")
    pending = alpha.mint("gated", ["demo:*:read", "demo:reports:delete"]).pending
    human = ApprovalsClient(daemon.approval_address, issue_dev_credential(daemon.state_dir, "alice"),
                            (daemon.state_dir / "pki" / "ca.pem").read_bytes())
    human.approve(pending.id)
    after = scrape(daemon)
    moved = {(labels["operation"], labels["decision"], labels["reason"]): after[key] - before.get(key, 0.0)
             for key in after if key[0] == "agentauthz_operations_total" and after[key] != before.get(key)
             for labels in [dict(key[1])]}
    assert moved == {("mint", "true", "allow"): 3, ("delegate", "true", "allow"): 1,
                     ("revoke", "true", ""): 2, ("approval_request", "", ""): 1,
                     ("mint", "false", "approval_required"): 1, ("approval_decide", "true", ""): 1}


@pytest.mark.parametrize(("ago", "bucket"), [(-10.0, 0), (0.003, metrics.LATENCY_BOUNDS.index(0.005)),
                                             (5.0, len(metrics.LATENCY_BOUNDS))])
def test_latency_counts_a_check_in_the_bucket_its_time_falls_in(hot: _accel.HotPath, ago: float,
                                                                bucket: int) -> None:
    counts = metrics.MeterTable(1).row(0)[metrics.LATENCY]
    latency = hot.Latency(counts, metrics.LATENCY_BOUNDS_NS)
    latency.observe(latency.now() - ago)  # -10: a clock that reads earlier than the start counts 0
    values = counts.tolist()
    assert values[:-1] == [int(i == bucket) for i in range(len(metrics.LATENCY_BOUNDS) + 1)]
    assert (values[-1] == 0) if ago < 0 else (ago * 1e9 <= values[-1] < (ago + 1) * 1e9)


def test_latency_refuses_a_layout_it_cannot_count_into(hot: _accel.HotPath) -> None:
    counts = metrics.MeterTable(1).row(0)[metrics.LATENCY]
    with pytest.raises(ValueError):
        hot.Latency(counts[:-1], metrics.LATENCY_BOUNDS_NS)
    with pytest.raises(ValueError):
        hot.Latency(counts, tuple(reversed(metrics.LATENCY_BOUNDS_NS)))


class TakesEveryRecord:
    """An audit log that takes every record (the histogram, not the log, is under test here)."""

    healthy = True

    def write_allow(self, *args: Any) -> bool:
        return True

    def record_check(self, *args: Any) -> bool:
        return True


def check_request(authorization: str) -> Any:
    return extauthz.parse_check_request(ext_authz.CheckRequest(attributes=attrs.AttributeContext(
        request=attrs.AttributeContext.Request(http=attrs.AttributeContext.HttpRequest(
            id="req-1", method="GET", path="/demo/reports", headers={"authorization": authorization})),
        context_extensions={"tool": "demo", "target": "reports", "operation": "read",
                            "sensitivity": "internal"})).SerializeToString())


def test_every_check_is_timed_once_whichever_path_answers_it(hot: _accel.HotPath) -> None:
    forge, policy, row = Forge(), Policy.from_text(DEV_POLICY.read_text()), metrics.MeterTable(1).row(0)
    service = extauthz.CheckService({AUDIENCE: make_verifier(hot, forge)}, TakesEveryRecord(), lambda: policy,
                                    hot=hot, meters=row)
    token = forge.token()
    paths = {
        "warm allow": (check_request(f"Bearer {token}"), reasons.ALLOW),
        "full path": (check_request("Bearer not-a-token"), reasons.TOKEN_MALFORMED),
        "not a CheckRequest": (None, reasons.REQUEST_INVALID),
        "the parser failed": (extauthz.UNPARSED, reasons.INTERNAL_ERROR),
        "the warm path raised": (("too", "short"), reasons.INTERNAL_ERROR),
    }
    loop = asyncio.new_event_loop()
    try:
        for name, (fields, reason) in paths.items():
            before = row.tolist()
            loop.run_until_complete(service.check(fields, None))
            after = row.tolist()
            timed = sum(after[metrics.LATENCY][:-1]) - sum(before[metrics.LATENCY][:-1])
            assert timed == 1, name
            assert metrics.decision_counts(after) - metrics.decision_counts(before) == {reason: 1}, name
    finally:
        loop.close()
    assert service.decision_counts()[reasons.ALLOW] == service.warm_path.allowed == 1
