"""A fault inside Check is a recorded, counted internal_error denial (503) that says nothing of the fault,
never a gRPC error Envoy's failure_mode_allow would turn into an allow; the daemon keeps serving.

Each step of the request path is made to raise in turn, in-process on a real Authority; then a real
daemon whose budget table fails (tests/fault_hook) answers a real Envoy with failure_mode_allow on.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import processes
import pytest
from envoy.service.auth.v3 import attribute_context_pb2 as attrs
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from processes import Daemon, audit_records, echo_upstream, envoy, envoy_config, free_port, request

from agentauthz import reasons
from agentauthz.authority.core import Authority
from agentauthz.client import Client, Identity, decision_from
from agentauthz.config import Config
from agentauthz.decision import _accel, tokens
from agentauthz.decision.policy import DEV_POLICY
from agentauthz.identity.devca import ensure_dev_pki, issue_svid
from agentauthz.serve import extauthz

ALPHA = "spiffe://dev.local/agent/alpha"
SECRET = "injected fault: /srv/secret/state"  # internal text that must never reach a caller
HOOK = Path(__file__).resolve().parent / "fault_hook"
RULES = """
  - id: faults-metered
    agents: ["spiffe://dev.local/agent/*"]
    tool: metered
    targets: ["*"]
    operations: [read]
    budget: {max_calls: 1000}
  - id: faults-read-file
    agents: ["spiffe://dev.local/agent/*"]
    tool: read_file
    targets: [files]
    operations: [call]
    arguments:
      - {name: path, prefix: /srv, required: true}
"""


class Fault(Exception):
    """What an injected step raises."""


def raising(*args: Any, **kwargs: Any) -> Any:
    raise Fault(SECRET)


def disk_error(*args: Any, **kwargs: Any) -> Any:
    raise OSError(5, SECRET)


ARMED = {"on": False}  # the faults a service holds (its verifiers, its policy) raise while on


def armed(real: Callable[..., Any]) -> Callable[..., Any]:
    return lambda *args: raising() if ARMED["on"] else real(*args)


class RaisingVerifier:
    """A real verifier whose decision raises while armed, as a bug in either twin would."""

    def __init__(self, verifier: Any) -> None:
        self.verifier = verifier

    def decide(self, *args: Any) -> Any:
        if ARMED["on"]:
            raise Fault(SECRET)
        return self.verifier.decide(*args)

    def verify(self, *args: Any) -> Any:
        return self.verifier.verify(*args)


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Authority, dict[str, str]]]:
    work = tmp_path_factory.mktemp("faults")
    policy = work / "policy.yaml"
    policy.write_text(DEV_POLICY.read_text() + RULES)
    a = Authority(Config(state_dir=work / "state", policy_file=policy, revocation_capacity=1 << 12,
                         budget_capacity=1 << 8))
    a.start()
    grant = tokens.grant
    minted = {name: a.mint(ALPHA, f"faults-{name}", grants).token for name, grants in {
        "plain": [grant("demo", "*", ["read"], "internal")],
        "metered": [grant("metered", "*", ["read"])],
        "constrained": [grant("read_file", "files", ["call"])],
    }.items()}
    try:
        yield a, minted
    finally:
        a.stop()


def check_request(token: str, extensions: dict[str, str] | None = None, *, principal: str = "",
                  body: str = "", request_id: str = "fault-1") -> bytes:
    headers = {"authorization": f"Bearer {token}"}
    if body:
        headers["content-type"] = "application/json"
    if extensions is None:
        extensions = {"tool": "demo", "target": "reports", "operation": "read", "sensitivity": "internal"}
    return ext_authz.CheckRequest(attributes=attrs.AttributeContext(
        source=attrs.AttributeContext.Peer(principal=principal),
        request=attrs.AttributeContext.Request(http=attrs.AttributeContext.HttpRequest(
            id=request_id, method="POST" if body else "GET", path="/demo/reports", headers=headers,
            body=body)),
        context_extensions=extensions)).SerializeToString()


def requests(minted: dict[str, str]) -> dict[str, bytes]:
    mcp = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": "read_file", "arguments": {"path": "/srv/a"}}})
    return {
        "warm": check_request(minted["plain"]),
        "defaults": check_request(minted["plain"], {}),
        "peer": check_request(minted["plain"], principal=ALPHA),
        "metered": check_request(minted["metered"], {"tool": "metered", "target": "m", "operation": "read",
                                                     "sensitivity": "public"}),
        "mcp": check_request(minted["constrained"], {"target": "files", "mcp": "true"}, body=mcp),
        "denied": check_request(minted["plain"], {"tool": "demo", "target": "reports", "operation": "write",
                                                  "sensitivity": "internal"}),
    }


# step -> (the request that reaches it, how to make it raise, what is answered)
Inject = Callable[[pytest.MonkeyPatch, Authority, dict[str, Any]], None]
STEPS: dict[str, tuple[str, Inject, str]] = {
    "parser": ("warm", lambda mp, a, kw: mp.setattr(extauthz, "_scan", raising), reasons.INTERNAL_ERROR),
    "verifier (warm path)": ("warm", lambda mp, a, kw: kw.update(verifiers={
        name: RaisingVerifier(v) for name, v in a.verifiers.items()}), reasons.INTERNAL_ERROR),
    "verifier (full path)": ("defaults", lambda mp, a, kw: kw.update(verifiers={
        name: RaisingVerifier(v) for name, v in a.verifiers.items()}), reasons.INTERNAL_ERROR),
    "policy": ("defaults", lambda mp, a, kw: kw.update(policy=lambda: raising() if ARMED["on"] else a.policy),
               reasons.INTERNAL_ERROR),
    "request fields": ("defaults", lambda mp, a, kw: mp.setattr(extauthz, "request_fields", raising),
                       reasons.INTERNAL_ERROR),
    "MCP body": ("mcp", lambda mp, a, kw: mp.setattr(extauthz, "read_call", raising), reasons.INTERNAL_ERROR),
    "argument constraints": ("mcp", lambda mp, a, kw: mp.setattr(extauthz, "enforce", raising),
                             reasons.INTERNAL_ERROR),
    "peer match": ("peer", lambda mp, a, kw: mp.setattr(extauthz.CheckService, "_peer_reason", raising),
                   reasons.INTERNAL_ERROR),
    "budgets.charge": ("metered", lambda mp, a, kw: mp.setattr(a.budgets, "charge", disk_error),
                       reasons.INTERNAL_ERROR),
    # The warm path holds the log's write_allow from its start: armed, not swapped back.
    "allow record": ("warm", lambda mp, a, kw: mp.setattr(a.audit, "write_allow", armed(a.audit.write_allow)),
                     reasons.INTERNAL_ERROR),
    "durable allow record": ("metered", lambda mp, a, kw: (
        mp.setattr(a.audit, "write_allow", lambda *args: False),
        mp.setattr(a.audit, "record_check_durable", raising)), reasons.INTERNAL_ERROR),
    "denial response": ("denied", lambda mp, a, kw: mp.setattr(extauthz, "denied_response",
                                                                armed(extauthz.denied_response)),
                        reasons.INTERNAL_ERROR),
    # The record of the fault itself cannot be made: still a denial, audit_unavailable.
    "denial record": ("denied", lambda mp, a, kw: mp.setattr(a.audit, "record_check", raising),
                      reasons.AUDIT_UNAVAILABLE),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_a_fault_in_any_step_is_a_recorded_counted_denial(
        authority: tuple[Authority, dict[str, str]], hot: _accel.HotPath, step: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    a, minted = authority
    which, inject, want = STEPS[step]
    raw = requests(minted)[which]
    kwargs: dict[str, Any] = {"verifiers": a.verifiers, "policy": lambda: a.policy}
    inject(monkeypatch, a, kwargs)
    service = extauthz.CheckService(kwargs["verifiers"], a.audit, kwargs["policy"], a.clock,
                                    budgets=a.budgets, hot=hot)
    ARMED["on"] = True
    loop = asyncio.new_event_loop()
    try:
        answer = loop.run_until_complete(service.check(extauthz.parse_check_request(raw), None))
        decision = decision_from(answer)
        assert (decision.allowed, decision.status, decision.reason) == (False, 503, want), step
        assert SECRET.encode() not in answer and b"Fault" not in answer and b"Traceback" not in answer
        assert service.decision_counts()[want] == 1
        monkeypatch.undo()  # the fault gone, the same service serves on
        ARMED["on"] = False
        if want == reasons.INTERNAL_ERROR:
            assert a.audit.flush()
            # A fault after the decision's record (the denial response) adds one: the last one of a
            # decision id says what was answered.
            record = [r for r in audit_records(a.config.state_dir / "audit")
                      if r.get("decision_id") == decision.decision_id][-1]
            assert (record["decision"], record["reason"], record["request_id"]) == (
                False, reasons.INTERNAL_ERROR, None if step == "parser" else "fault-1")
            assert SECRET not in json.dumps(record)
        after = decision_from(loop.run_until_complete(service.check(
            extauthz.parse_check_request(requests(minted)["warm"]), None)))
        assert after.allowed, after
    finally:
        ARMED["on"] = False
        loop.close()


def test_the_parser_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extauthz, "_scan", raising)
    assert extauthz.parse_check_request(b"\x0a\x00") is extauthz.UNPARSED
    monkeypatch.setattr(extauthz, "_scan", lambda raw: None)
    monkeypatch.setattr(extauthz._request_py, "scan", raising)
    assert extauthz.parse_check_request(b"\x0a\x00") is extauthz.UNPARSED


# -- a real daemon behind a real Envoy that fails open on errors --------------------------------------


@pytest.fixture(scope="module")
def failing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, int, Client]]:
    """A daemon whose budget table raises OSError on every charge, behind Envoy with
    ``failure_mode_allow: true``: any Check that errors instead of answering is let through."""
    work = tmp_path_factory.mktemp("faults-e2e")
    policy = work / "policy.yaml"
    policy.write_text(DEV_POLICY.read_text() + RULES)
    daemon = Daemon(work / "state", {"policy_file": str(policy)})
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "AGENTAUTHZ_TEST_FAULT")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(HOOK), saved["PYTHONPATH"])))
    os.environ["AGENTAUTHZ_TEST_FAULT"] = "budgets.charge"
    try:
        daemon.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    proxy_port, admin_port = free_port(), free_port()
    try:
        with echo_upstream() as upstream_port:
            text = envoy_config(daemon.check_port, upstream_port, proxy_port, admin_port)
            assert text.count("failure_mode_allow: false") == 1
            text = text.replace("failure_mode_allow: false", "failure_mode_allow: true")
            with envoy(text, work, admin_port):
                identity = issue_svid(ensure_dev_pki(daemon.state_dir), ALPHA, work / "alpha")
                yield daemon, proxy_port, Client(daemon.api_address, Identity.from_dir(identity))
    finally:
        daemon.stop()


def test_a_failing_budget_table_is_denied_503_through_envoy_failing_open(
        failing: tuple[Daemon, int, Client]) -> None:
    daemon, port, client = failing
    token = client.mint("faults-e2e", ["metered:*:read", "demo:*:read:internal"]).token
    for _ in range(3):
        status, body, headers = request(port, "/metered/m", token=token)
        assert (status, body) == (503, {"error": "internal_error"})  # before: 200, Envoy failed open
        assert SECRET not in json.dumps(headers)
    status, body, _ = request(port, "/demo/reports", token=token)
    assert status == 200, body  # the daemon serves on
    faults = lambda: sum(r.get("reason") == reasons.INTERNAL_ERROR for r in daemon.audit_records())  # noqa: E731
    processes.wait_for(lambda: faults() == 3, 10, "three internal_error records")
    metrics = processes.http_get(f"http://127.0.0.1:{daemon.http_port}/metrics")[1].decode()
    assert 'agentauthz_check_decisions_total{reason="internal_error"} 3.0' in metrics
    log = daemon.log()
    assert "a Check failed; denied internal_error" in log and SECRET in log  # the operator sees why
    assert 1 <= log.count("Traceback") <= 3
