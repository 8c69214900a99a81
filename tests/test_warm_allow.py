"""The warm allow (``_check_c`` / ``_check_py``) answers only what the full Check path would, alike.

A service with the warm path and one without it (``_warm`` declining everything) get the same
requests on one real Authority: every answer, and the audit record of every decision, must be the
same but for the decision id. The warm path must decide each request at most once, and must
answer the plain warm allow itself.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from envoy.service.auth.v3 import attribute_context_pb2 as attrs
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from google.protobuf import json_format
from processes import Daemon, audit_records
from support import Forge, make_verifier, native_or_fail

from agentauthz import reasons
from agentauthz.audit.writer import AuditLog
from agentauthz.authority.core import Authority
from agentauthz.client import Client, Identity
from agentauthz.config import Config
from agentauthz.decision import _accel, tokens
from agentauthz.decision.constraints import Constrained
from agentauthz.decision.policy import DEV_POLICY, Policy
from agentauthz.identity.devca import ensure_dev_pki, issue_svid
from agentauthz.serve import extauthz

ALPHA = "spiffe://dev.local/agent/alpha"
POLICY = """
  - id: warm-read-file
    agents: ["spiffe://dev.local/agent/*"]
    tool: read_file
    targets: [files]
    operations: [call]
    arguments:
      - {name: path, prefix: /srv, required: true}
  - id: warm-metered
    agents: ["spiffe://dev.local/agent/*"]
    tool: metered
    targets: ["*"]
    operations: [read]
    budget: {max_calls: 1000}
boundaries:
  data: {require_certificate_binding: true}
"""


class CountingVerifier:
    """A real verifier that counts its decisions."""

    def __init__(self, verifier: Any) -> None:
        self.verifier, self.decided = verifier, 0

    def decide(self, *args: Any) -> Any:
        self.decided += 1
        return self.verifier.decide(*args)

    def verify(self, *args: Any) -> Any:
        return self.verifier.verify(*args)


class Declines:
    """A warm path that takes nothing."""

    allowed = 0
    started = 0.0  # when a Check began, for the full path's latency: never, here

    def __call__(self, fields: Any) -> None:
        return None


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Authority, dict[str, str], str]]:
    work = tmp_path_factory.mktemp("warm")
    policy = work / "policy.yaml"
    policy.write_text(DEV_POLICY.read_text() + POLICY)
    a = Authority(Config(state_dir=work / "state", policy_file=policy, audiences=("tools", "data"),
                         revocation_capacity=1 << 12, budget_capacity=1 << 8))
    a.start()
    grant = tokens.grant
    minted = {
        "plain": a.mint(ALPHA, "t1", [grant("demo", "*", ["read"], "internal")]).token,
        "constrained": a.mint(ALPHA, "t2", [grant("read_file", "files", ["call"])]).token,
        "metered": a.mint(ALPHA, "t5", [grant("metered", "*", ["read"])]).token,
        "data": a.mint(ALPHA, "t3", [grant("demo", "*", ["read"], "internal")], audience="data").token,
    }
    revoked = a.mint(ALPHA, "t4", [grant("demo", "*", ["read"])])
    a.revoke_token(ALPHA, revoked.token_id)
    minted["revoked"] = revoked.token
    pki = ensure_dev_pki(work / "state")
    certificate = urllib.parse.quote((issue_svid(pki, ALPHA, work / "alpha") / "svid.pem").read_text())
    try:
        yield a, minted, certificate
    finally:
        a.stop()


def request(authorization: str | None, extensions: dict[str, str] | None = None, *, method: str = "GET",
            path: str = "/demo/reports", principal: str = "", certificate: str = "", body: str = "",
            request_id: str = "req-1") -> bytes:
    headers = {"authorization": authorization} if authorization is not None else {}
    if body:
        headers["content-type"] = "application/json"
    if extensions is None:
        extensions = {"tool": "demo", "target": "reports", "operation": "read", "sensitivity": "internal"}
    return ext_authz.CheckRequest(attributes=attrs.AttributeContext(
        source=attrs.AttributeContext.Peer(principal=principal, certificate=certificate),
        request=attrs.AttributeContext.Request(http=attrs.AttributeContext.HttpRequest(
            id=request_id, method=method, path=path, headers=headers, body=body)),
        context_extensions=extensions)).SerializeToString()


def route(tool: str = "demo", target: str = "r", operation: str = "read", sensitivity: str = "internal",
          **more: str) -> dict[str, str]:
    return {"tool": tool, "target": target, "operation": operation, "sensitivity": sensitivity, **more}


def cases(minted: dict[str, str], certificate: str) -> dict[str, bytes]:
    plain, data, constrained = (f"Bearer {minted[name]}" for name in ("plain", "data", "constrained"))
    mcp = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": "read_file", "arguments": {"path": "/srv/a"}}})
    return {
        "warm allow": request(plain),
        "lowercase scheme": request(f"bearer {minted['plain']}"),
        "uppercase scheme": request(f"BEARER {minted['plain']}"),
        "scope denied": request(plain, route(operation="write")),
        "too sensitive": request(plain, route(sensitivity="confidential")),
        "revoked": request(f"Bearer {minted['revoked']}"),
        "malformed": request("Bearer abc.def.ghi"),
        "two tokens": request(f"{plain} {minted['plain']}"),
        "no token": request(None),
        "other scheme": request(f"Basic {minted['plain']}"),
        "route defaults": request(plain, {}),
        "empty operation": request(plain, route(operation="")),
        "unknown boundary": request(plain, route(boundary="nowhere")),
        "other boundary's token": request(data),
        "binding boundary": request(data, route(boundary="data")),
        "binding boundary, peer": request(data, route(boundary="data"), principal=ALPHA,
                                          certificate=certificate),
        "peer is the subject": request(plain, principal=ALPHA),
        "peer is another": request(plain, principal="spiffe://dev.local/agent/mallory"),
        "constrained": request(constrained, route("read_file", "files", "call", "public")),
        "metered": request(f"Bearer {minted['metered']}", route("metered", "m", "read", "public")),
        "mcp route": request(constrained, {"target": "files", "mcp": "true"},
                             method="POST", path="/mcp", body=mcp),
        "request id with a token": request(plain, request_id=f"id-{minted['plain']}"),
    }


def answer(raw: bytes) -> tuple[dict[str, Any], str]:
    """The CheckResponse as a dict without its decision id, and the decision id."""
    response = json_format.MessageToDict(ext_authz.CheckResponse.FromString(raw))
    decision_id = response.pop("dynamicMetadata")["decision_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", decision_id)
    return response, decision_id


def record(records: dict[str, dict[str, Any]], decision_id: str) -> dict[str, Any]:
    found = dict(records[decision_id])
    for key in ("seq", "prev", "ts", "decision_id"):
        del found[key]
    return found


@pytest.mark.parametrize("twin", ["native", "pure"])
def test_the_warm_path_answers_and_records_what_the_full_path_would(
        authority: tuple[Authority, dict[str, str], str], twin: str) -> None:
    a, minted, certificate = authority
    if twin == "native" and not _accel.NATIVE:
        pytest.skip("the daemon runs the pure twin (AGENTAUTHZ_NO_EXTENSIONS): its tokens are pure")
    hot = native_or_fail() if twin == "native" else _accel.pure()
    counting = {name: CountingVerifier(v) for name, v in a.verifiers.items()}
    warm = extauthz.CheckService(counting, a.audit, lambda: a.policy, a.clock, budgets=a.budgets, hot=hot)
    full = extauthz.CheckService(a.verifiers, a.audit, lambda: a.policy, a.clock, budgets=a.budgets, hot=hot)
    full.warm_path = Declines()  # the full path alone
    loop = asyncio.new_event_loop()
    seen: list[tuple[str, str, str]] = []  # (case, warm decision id, full decision id), every round
    try:
        for _ in range(3):  # the first allow of a token builds what the next ones reuse
            for name, raw in cases(minted, certificate).items():
                fields = extauthz.parse_check_request(raw)
                assert a.audit.flush()  # no denial's record queued ahead: an allow's can be written at once
                before = sum(v.decided for v in counting.values())
                got, got_id = answer(loop.run_until_complete(warm.check(fields, None)))
                assert sum(v.decided for v in counting.values()) - before <= 1, f"{name}: decided twice"
                want, want_id = answer(loop.run_until_complete(full.check(fields, None)))
                assert got == want, name
                seen.append((name, got_id, want_id))
    finally:
        loop.close()
    # A token with a budget or argument constraints is charged and checked by the full path only,
    # even for a request already allowed (the warm path would find its record prepared).
    metered = extauthz.parse_check_request(cases(minted, certificate)["metered"])
    # The policy budgets it too: decide answers the policy's constraints, with the token, for enforce.
    decided = warm.warm_path(metered)
    assert decided.__class__ is tuple and decided[0].__class__ is Constrained and decided[1] is not None
    assert a.audit.flush()
    records = {r["decision_id"]: r for r in audit_records(a.config.state_dir / "audit")
               if r["kind"] == "check"}
    for name, got_id, want_id in seen:
        assert record(records, got_id) == record(records, want_id), name
    warm_ids = {name: got_id for name, got_id, _ in seen}
    assert records[warm_ids["warm allow"]]["reason"] == reasons.ALLOW
    assert "eyJ" not in str(records[warm_ids["request id with a token"]])
    # The plain allows (three cases, three rounds) were all answered by the warm path itself, the
    # first too, which built the response and record the others reuse; counted with the rest.
    assert warm.warm_path.allowed == 3 * 3
    counts = warm.decision_counts()
    assert counts[reasons.ALLOW] == full.decision_counts()[reasons.ALLOW]
    assert counts[reasons.SCOPE_DENIED] == 3 and warm.decisions[reasons.ALLOW] < counts[reasons.ALLOW]


@pytest.mark.parametrize("twin", ["native", "pure"])
def test_decision_ids_are_unique_and_echoed_in_the_metadata(twin: str) -> None:
    hot = native_or_fail() if twin == "native" else _accel.pure()
    ids = extauthz.decision_ids(hot)
    made = [ids.next() for _ in range(1000)]
    assert len(set(made)) == 1000 and len({d[:16] for d in made}) == 1
    assert all(re.fullmatch(r"[0-9a-f]{32}", d) for d in made)
    assert int(made[-1][16:], 16) == int(made[0][16:], 16) + 999
    response = ext_authz.CheckResponse.FromString(ids.metadata(made[7]))
    assert response.dynamic_metadata.fields["decision_id"].string_value == made[7]
    for bad in ("", "abc", "ABCDEF0123456789", "abcdeg0123456789", "abcdef", "0123456789abcdef0", "é" * 16):
        with pytest.raises(ValueError):
            hot.DecisionIds(bad, b"", b"")


def test_twins_tell_processes_apart_and_count_alike() -> None:
    native, pure = native_or_fail(), _accel.pure()
    prefix = "0a1b2c3d4e5f6a7b"
    a, b = (hot.DecisionIds(prefix, b"<", b">") for hot in (native, pure))
    assert [a.next() for _ in range(3)] == [b.next() for _ in range(3)] == [
        f"{prefix}{n:016x}" for n in (1, 2, 3)]
    third = f"{prefix}{3:016x}"
    assert a.metadata(third) == b.metadata(third) == f"<{third}>".encode()


def test_decision_ids_of_two_processes_never_collide(
        authority: tuple[Authority, dict[str, str], str]) -> None:
    """Issue 16: each process start (a worker, a restart, a replica) draws a 64-bit prefix; the old
    24-bit one repeated. Two services of each twin, many ids each, the warm path's ids included."""
    a, minted, _ = authority
    twins = [_accel.pure()] + ([native_or_fail()] if _accel.NATIVE else [])
    services = [extauthz.CheckService(a.verifiers, a.audit, lambda: a.policy, a.clock, hot=hot)
                for hot in twins for _ in range(2)]
    made = [service._ids.next() for service in services for _ in range(20_000)]
    assert len(set(made)) == len(made)
    assert len({d[:16] for d in made}) == len(services)  # one prefix per process start
    loop = asyncio.new_event_loop()
    try:
        fields = extauthz.parse_check_request(request(f"Bearer {minted['plain']}"))
        warm = [answer(loop.run_until_complete(s.check(fields, None)))[1] for s in services for _ in range(3)]
    finally:
        loop.close()
    assert len(set(warm) | set(made)) == len(warm) + len(made)


@pytest.mark.parametrize("agent, task, token_id", [
    (ALPHA, "task-1", "0123456789abcdef0123456789abcdef"),
    ("", "", ""),  # proto3 leaves empty strings out
    ("a" * 127, "b" * 128, "c" * 16383),  # every one- to two-byte length boundary of a varint ...
    ("d" * 16384, "e" * 70000, "f"),  # ... and three bytes, and lengths that carry into the next level
    ("spiffe://dev.local/agent/é", "задача", "\U0001f600\u2028"),  # UTF-8 is what is counted
])
def test_the_twins_write_the_same_allow_response_as_protobuf(agent: str, task: str, token_id: str) -> None:
    """The native twin writes the allow response's bytes by hand; protobuf (the pure twin) is the
    reference, byte for byte, and the bytes say what the tool must see."""
    native, pure = native_or_fail(), _accel.pure()
    written = native.allow_response(agent, task, token_id)
    assert written == pure.allow_response(agent, task, token_id)
    response = ext_authz.CheckResponse.FromString(written)
    assert response.status.code == 0 and response.WhichOneof("http_response") == "ok_response"
    overwrite = 2  # HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    assert [(h.header.key, h.header.value, h.append_action) for h in response.ok_response.headers] == [
        ("x-agentauthz-agent", agent, overwrite), ("x-agentauthz-task", task, overwrite),
        ("x-agentauthz-token-id", token_id, overwrite)]
    assert list(response.ok_response.headers_to_remove) == ["authorization"]


def test_the_native_warm_path_leaves_a_pure_twins_token_to_the_full_path(tmp_path: Path) -> None:
    """Mixed twins never meet in the daemon; if they did, the native path must decline, not crash."""
    forge = Forge()
    pure_verifier = make_verifier(_accel.pure(), forge)
    audit = AuditLog.open(tmp_path / "audit", key=Ed25519PrivateKey.generate())
    audit.start()
    try:
        native = native_or_fail()
        policy = Policy.load(DEV_POLICY)
        ids = extauthz.decision_ids(native)
        warm = native.WarmAllow({"tools": pure_verifier}, lambda: policy, audit, ids, {}, time.time, b"",
                                collections.Counter(), lambda *fields: pytest.fail("not for a pure token"))
        fields = extauthz.parse_check_request(request(f"Bearer {forge.token()}", route(sensitivity="public")))
        decided = warm(fields)
        assert decided.__class__ is tuple and decided[0] == reasons.ALLOW and warm.allowed == 0
    finally:
        audit.stop()


@pytest.mark.parametrize("twin", ["native", "pure"])
def test_an_allow_is_not_answered_warm_once_the_audit_log_cannot_take_it(
        authority: tuple[Authority, dict[str, str], str], twin: str, tmp_path: Path) -> None:
    a, minted, _ = authority
    if twin == "native" and not _accel.NATIVE:
        pytest.skip("the daemon runs the pure twin (AGENTAUTHZ_NO_EXTENSIONS): its tokens are pure")
    hot = native_or_fail() if twin == "native" else _accel.pure()
    log = AuditLog.open(tmp_path / "audit", key=Ed25519PrivateKey.generate(), flush_interval=0.01)
    log.start()
    service = extauthz.CheckService(a.verifiers, log, lambda: a.policy, a.clock, budgets=a.budgets, hot=hot)
    fields = extauthz.parse_check_request(request(f"Bearer {minted['plain']}"))
    loop = asyncio.new_event_loop()
    try:
        log.record("start")
        assert log.flush()  # the writer has a file open: allows can be written at once
        for _ in range(3):
            assert "okResponse" in answer(loop.run_until_complete(service.check(fields, None)))[0]
        assert service.warm_path.allowed == 3
        log.stop()
        refused, _ = answer(loop.run_until_complete(service.check(fields, None)))
    finally:
        loop.close()
    assert refused["deniedResponse"]["status"]["code"] == "ServiceUnavailable"
    assert refused["status"]["message"] == reasons.AUDIT_UNAVAILABLE and service.warm_path.allowed == 3


def test_decision_ids_differ_across_daemon_starts(tmp_path: Path) -> None:
    """The audit log joins on decision ids: a restarted daemon must not reuse its last run's."""
    daemon = Daemon(tmp_path / "state")
    issue_svid(ensure_dev_pki(daemon.state_dir), ALPHA, tmp_path / "alpha")
    seen: list[str] = []
    for _ in range(2):
        daemon.start()
        try:
            client = Client(daemon.api_address, Identity.from_dir(tmp_path / "alpha"),
                            check_server=daemon.check_address)
            token = client.mint("ids", ["demo:*:read"]).token
            seen += [client.check(token, "demo", "r", "read").decision_id for _ in range(3)]
            seen.append(client.check(None, "demo", "r", "read").decision_id)
        finally:
            daemon.stop()
    assert all(re.fullmatch(r"[0-9a-f]{32}", d) for d in seen)
    assert len(set(seen)) == len(seen) and seen[0][:16] != seen[-1][:16]
    assert {d[:16] for d in seen[:4]} != {d[:16] for d in seen[4:]}
    logged = {r["decision_id"] for r in daemon.audit_records() if r["kind"] == "check"}
    assert set(seen) <= logged
