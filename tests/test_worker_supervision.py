"""Check workers that die or stop answering are restarted with the primary's current state, audited and
counted; workers decide only by the policy the primary validated, never by what the file says now."""

from __future__ import annotations

import errno
import os
import re
import signal
import threading
from pathlib import Path

import pytest
from processes import Daemon, audit_records, http_get, wait_for, workers_of

from agentauthz.audit.verify import verify_dir
from agentauthz.client import Client, Identity
from agentauthz.decision.policy import DEV_POLICY
from agentauthz.identity.devca import ensure_dev_pki, issue_svid

ALPHA = "spiffe://dev.local/agent/alpha"
BETA = "spiffe://dev.local/agent/beta"
WORKERS = 3  # the primary and two forked workers
MAX_CHECKS = 600  # fresh connections until every process has answered (the kernel picks by hash)
NO_SECRETS = DEV_POLICY.read_text() + """
  - id: no-secrets
    effect: deny
    agents: ["spiffe://dev.local/agent/*"]
    tool: demo
    targets: ["secret/*"]
    operations: ["*"]
"""
NOTHING = "version: 1\nrules: []\n"  # valid, and allows nothing: a worker that read it would deny all


def fresh_check(daemon: Daemon, token: str, target: str) -> str:
    """One Check on a new connection: lands on whichever process the kernel picks."""
    return Client(daemon.api_address, check_server=daemon.check_address).check(
        token, "demo", target, "read").reason


def process_logs(daemon: Daemon) -> list[Path]:
    audit = daemon.state_dir / "audit"
    return [audit, *(audit / f"worker-{n}" for n in range(1, WORKERS))]


def checks_on_every_process(daemon: Daemon, answers: dict[tuple[str, str], str]) -> None:
    """Check every (token, target) in ``answers`` on fresh connections until each process's audit log
    holds a Check of each target; every answer, wherever it lands, is the expected one."""
    def answered(log: Path, target: str) -> bool:
        return any(r.get("kind") == "check" and r.get("target") == target for r in audit_records(log))
    for i in range(MAX_CHECKS):
        for (token, target), expected in answers.items():
            assert fresh_check(daemon, token, target) == expected, (target, expected)
        logs = process_logs(daemon)
        if i % 10 == 9 and all(answered(log, target) for log in logs for _, target in answers):
            return
    raise AssertionError(f"some process answered none of {sorted(t for _, t in answers)}")


def restarts(daemon: Daemon, cause: str) -> float:
    body = http_get(f"http://127.0.0.1:{daemon.http_port}/metrics")[1].decode()
    match = re.search(rf'^agentauthz_worker_restarts_total{{cause="{cause}"}} (\S+)$', body, re.M)
    assert match, body
    return float(match.group(1))


def restart_records(daemon: Daemon) -> list[dict]:
    return [r for r in daemon.audit_records() if r["kind"] == "worker_restart"]


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    policy = tmp_path / "policy.yaml"
    policy.write_text(DEV_POLICY.read_text())
    d = Daemon(tmp_path / "state", {"workers": WORKERS, "policy_file": str(policy)}).start(60.0)
    yield d
    d.kill()


def identity(daemon: Daemon, out: Path, agent: str) -> Identity:
    issue_svid(ensure_dev_pki(daemon.state_dir), agent, out)
    return Identity.from_dir(out)


def test_a_killed_worker_is_restarted_with_the_current_revocations_and_policy(daemon: Daemon,
                                                                               tmp_path: Path) -> None:
    alpha = Client(daemon.api_address, identity(daemon, tmp_path / "alpha", ALPHA))
    beta = Client(daemon.api_address, identity(daemon, tmp_path / "beta", BETA))
    revoked, ended, kept = (alpha.mint(t, ["demo:*:read"]) for t in ("revoked", "ended", "kept"))
    banned = beta.mint("beta-task", ["demo:*:read"])
    alpha.revoke(token_id=revoked.token_id)
    alpha.end_task("ended")
    beta.revoke(agent=BETA)
    # A new policy the primary validates, then a file it never validated: no worker may run that one.
    policy = tmp_path / "policy.yaml"
    policy.write_text(NO_SECRETS)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: any(r["kind"] == "policy_reload" for r in daemon.audit_records()), 20, "the reload")
    policy.write_text(NOTHING)
    assert restarts(daemon, "died") == 0

    victim = workers_of(daemon)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: restart_records(daemon), 30, "the restart's audit record")
    (record,) = restart_records(daemon)
    assert record["previous_pid"] == victim and record["decision"] is True
    assert "signal 9" in record["reason"] and record["cause"] == "died"
    assert record["pid"] in workers_of(daemon) and victim not in workers_of(daemon)
    assert restarts(daemon, "died") == 1

    checks_on_every_process(daemon, {
        (revoked.token, "a-1"): "token_revoked", (ended.token, "a-2"): "task_ended",
        (banned.token, "a-3"): "agent_revoked", (kept.token, "secret/a-4"): "policy_denied",
        (kept.token, "a-5"): "allow"})
    # The restarted worker carried on its own audit log: still one verifiable chain.
    key = http_get(f"http://127.0.0.1:{daemon.http_port}/.well-known/agentauthz-audit-key")[1]
    assert daemon.stop() == 0
    for log in process_logs(daemon):
        assert verify_dir(log, key).ok, log


def test_a_worker_that_does_not_acknowledge_is_restarted(daemon: Daemon, tmp_path: Path) -> None:
    # The API answers once the stuck worker is given up on (workers.ACK_TIMEOUT): wait longer than that.
    alpha = Client(daemon.api_address, identity(daemon, tmp_path / "alpha", ALPHA), timeout=60.0)
    ended, kept = alpha.mint("ended", ["demo:*:read"]), alpha.mint("kept", ["demo:*:read"])
    stuck = workers_of(daemon)[1]
    os.kill(stuck, signal.SIGSTOP)  # alive, but answers nothing: not even the primary
    try:
        alpha.end_task("ended")  # acknowledged once every worker applied it, or was killed for not
    finally:
        try:
            os.kill(stuck, signal.SIGCONT)
        except ProcessLookupError:
            pass
    wait_for(lambda: restart_records(daemon), 30, "the restart's audit record")
    (record,) = restart_records(daemon)
    assert record["previous_pid"] == stuck and record["cause"] == "unresponsive"
    assert "did not acknowledge" in record["reason"]
    assert restarts(daemon, "unresponsive") == 1 and stuck not in workers_of(daemon)
    checks_on_every_process(daemon, {(ended.token, "b-1"): "task_ended", (kept.token, "b-2"): "allow"})
    assert daemon.stop() == 0


class PolicyFeed:
    """A policy file that is a FIFO: each read of it is served by the test, so every read is seen."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path

    def serve(self, text: str) -> threading.Thread:
        """Give ``text`` to the next reader, in a thread (opening blocks until someone reads)."""
        def run() -> None:
            with open(self.path, "w") as f:
                f.write(text)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def someone_waits(self) -> bool:
        """A process has the file open for reading (and would read whatever is written next)."""
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            return True
        except OSError as exc:
            assert exc.errno == errno.ENXIO
            return False


def test_workers_run_the_policy_the_primary_validated_never_the_file(tmp_path: Path) -> None:
    feed = PolicyFeed(tmp_path / "policy.yaml")
    first = feed.serve(DEV_POLICY.read_text())
    daemon = Daemon(tmp_path / "state", {"workers": WORKERS, "policy_file": str(feed.path)})
    try:
        daemon.start(60.0)
        first.join(1)
        alpha = Client(daemon.api_address, identity(daemon, tmp_path / "alpha", ALPHA))
        token = alpha.mint("t", ["demo:*:read"]).token
        checks_on_every_process(daemon, {(token, "secret/c-1"): "allow"})

        def reloads() -> list[bool]:
            return [r["decision"] for r in daemon.audit_records() if r["kind"] == "policy_reload"]
        daemon.proc.send_signal(signal.SIGHUP)
        feed.serve(NO_SECRETS).join(20)  # the primary reads it once...
        wait_for(lambda: reloads() == [True], 20, "the reload, acknowledged by every worker")
        assert not feed.someone_waits()  # ...and no worker reads the file after it
        checks_on_every_process(daemon, {(token, "secret/c-2"): "policy_denied", (token, "c-3"): "allow"})

        daemon.proc.send_signal(signal.SIGHUP)
        feed.serve("version: 1\nrules: [{id: broken, tool: demo}\n").join(20)  # refused by the primary
        wait_for(lambda: reloads() == [True, False], 20, "the refused reload")
        assert not feed.someone_waits()
        checks_on_every_process(daemon, {(token, "secret/c-4"): "policy_denied", (token, "c-5"): "allow"})
        assert daemon.stop() == 0
    finally:
        daemon.kill()
