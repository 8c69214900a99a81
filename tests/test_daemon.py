"""The daemon process: HTTP endpoints, health, policy reload on SIGHUP, the client, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import threading
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from processes import Daemon, connects_as, http_get, wait_for

from agentauthz.audit.verify import verify_dir
from agentauthz.client import AsyncClient, Client, Identity
from agentauthz.decision._bitset_py import HEADER_BYTES
from agentauthz.decision.policy import DEV_POLICY
from agentauthz.identity.devca import ensure_dev_pki, issue_svid

AGENT = "spiffe://dev.local/agent/alpha"


def identity_for(daemon: Daemon, out: Path, agent: str = AGENT) -> Identity:
    issue_svid(ensure_dev_pki(daemon.state_dir), agent, out)
    return Identity.from_dir(out)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("daemon")
    d = Daemon(work / "state", {"leeway": 0}).start()
    yield d
    d.stop()


def test_http_endpoints(daemon: Daemon, tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{daemon.http_port}"
    assert http_get(base + "/healthz") == (200, b"ok\n")
    status, body = http_get(base + "/.well-known/jwks.json")
    keys = json.loads(body)["keys"]
    assert status == 200 and len(keys) >= 2  # the signer and the next key, published before it signs
    assert all(k["kty"] == "OKP" and k["crv"] == "Ed25519" and "d" not in k for k in keys)
    client = Client(daemon.api_address, identity_for(daemon, tmp_path), check_server=daemon.check_address)
    client.check(None, "demo", "x", "read")
    status, body = http_get(base + "/metrics")
    assert status == 200
    assert 'agentauthz_check_decisions_total{reason="token_missing"}' in body.decode()
    assert http_get(base + "/nope")[0] == 404


def test_metrics_show_the_revocation_window_at_one_bit_a_token(daemon: Daemon, tmp_path: Path) -> None:
    def gauge(name: str) -> float:
        body = http_get(f"http://127.0.0.1:{daemon.http_port}/metrics")[1].decode()
        return float(re.search(rf"^{name} (\S+)$", body, re.M).group(1))  # type: ignore[union-attr]
    client = Client(daemon.api_address, identity_for(daemon, tmp_path))
    window, in_use = gauge("agentauthz_revocation_window_slots"), gauge("agentauthz_revocation_slots_in_use")
    for n in range(5):
        client.mint(f"slots-{n}", ["demo:*:read"], ttl=60)
    assert gauge("agentauthz_revocation_slots_in_use") == in_use + 5  # one slot per token
    assert window == 1 << 24  # the default revocation_capacity
    # One bit a slot, plus a constant header (the window's base).
    assert gauge("agentauthz_revocation_bits_bytes") == window / 8 + HEADER_BYTES


def test_grpc_health_is_serving_on_the_check_listener(daemon: Daemon) -> None:
    with grpc.insecure_channel(daemon.check_address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "envoy.service.auth.v3.Authorization"):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_health_watch_and_reflection_are_served_on_the_check_listener(daemon: Daemon) -> None:
    """Both are served by generic handlers only (server.py ``_add_health_and_reflection``): the
    streaming Watch and reflection must work all the same."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    with grpc.insecure_channel(daemon.check_address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization"), timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services=""),
                  reflection_pb2.ServerReflectionRequest(
                      file_containing_symbol="envoy.service.auth.v3.Authorization")]), timeout=5)
        listed, described = list(answers)
    assert {s.name for s in listed.list_services_response.service} == {
        "envoy.service.auth.v3.Authorization", "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection"}
    assert described.file_descriptor_response.file_descriptor_proto  # the Check service's own proto


def test_task_context_manager_ends_the_task_even_on_error_and_renews(daemon: Daemon,
                                                                     tmp_path: Path) -> None:
    client = Client(daemon.api_address, identity_for(daemon, tmp_path), check_server=daemon.check_address)
    with pytest.raises(RuntimeError):
        with client.task("ctx", ["demo:*:read"], ttl=2) as task:
            first = task.token
            assert client.check(first, "demo", "a", "read").allowed
            wait_for(lambda: task.token != first, 5, "renewal before expiry")
            assert client.check(task.token, "demo", "a", "read").allowed
            raise RuntimeError("the agent failed mid-task")
    decision = client.check(task.token, "demo", "a", "read")
    assert (decision.allowed, decision.status, decision.reason) == (False, 401, "task_ended")


def test_async_client(daemon: Daemon, tmp_path: Path) -> None:
    async def scenario() -> tuple[bool, str]:
        client = AsyncClient(daemon.api_address, identity_for(daemon, tmp_path),
                             check_server=daemon.check_address)
        async with client.task("async", ["demo:*:write"]) as task:
            inside = await client.check(task.token, "demo", "a", "write")
            assert (await client.jwks())["keys"]
        after = await client.check(task.token, "demo", "a", "write")
        return inside.allowed, after.reason
    assert asyncio.run(scenario()) == (True, "task_ended")


def test_sighup_reloads_policy_and_keeps_the_old_one_when_the_new_is_bad(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(DEV_POLICY.read_text())
    daemon = Daemon(tmp_path / "state", {"policy_file": str(policy)}).start()
    try:
        client = Client(daemon.api_address, identity_for(daemon, tmp_path / "id"),
                        check_server=daemon.check_address)
        token = client.mint("reload", ["demo:*:read"]).token
        assert client.check(token, "demo", "secrets/key", "read").allowed
        # Tighten: a deny rule for secrets. Policy at the moment of action applies to live tokens.
        policy.write_text(DEV_POLICY.read_text() + """
  - id: no-secrets
    effect: deny
    agents: ["spiffe://dev.local/agent/*"]
    tool: demo
    targets: ["secrets/*"]
    operations: ["*"]
""")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: client.check(token, "demo", "secrets/key", "read").reason == "policy_denied", 10,
                 "policy reload")
        assert client.check(token, "demo", "public/doc", "read").allowed
        policy.write_text("version: 1\nrules: [{id: broken, tool: demo}\n")  # YAML syntax error
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "policy reload refused" in daemon.log(), 10, "refusal logged")
        assert client.check(token, "demo", "secrets/key", "read").reason == "policy_denied"
        assert client.check(token, "demo", "public/doc", "read").allowed
    finally:
        assert daemon.stop() == 0


def test_sigterm_under_load_drains_flushes_audit_and_exits_zero(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "state").start()
    client = Client(daemon.api_address, identity_for(daemon, tmp_path / "id"),
                    check_server=daemon.check_address)
    token = client.mint("load", ["demo:*:read"]).token
    allowed = [0] * 4
    errors: list[grpc.StatusCode] = []
    stop = threading.Event()

    def hammer(i: int) -> None:
        checker = Client(daemon.api_address, check_server=daemon.check_address)
        while not stop.is_set():
            try:
                if checker.check(token, "demo", "a", "read").allowed:
                    allowed[i] += 1
            except grpc.RpcError as exc:
                errors.append(exc.code())
                return

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: sum(allowed) > 200, 30, "load")
    assert daemon.stop(signal.SIGTERM) == 0
    stop.set()
    for t in threads:
        t.join(10)
    # Calls after shutdown began may be refused by the transport, but never answered wrongly.
    assert set(errors) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    state = tmp_path / "state"
    report = verify_dir(state / "audit", (state / "audit-key" / "public.pem").read_bytes())
    assert report.ok, report.first_bad
    audited_allows = 0
    for file in sorted((tmp_path / "state" / "audit").glob("audit-*.jsonl")):
        for line in file.read_text().splitlines():
            record = json.loads(line)
            audited_allows += record["kind"] == "check" and record.get("decision") is True
    # Every allow a client saw was recorded before the daemon exited.
    assert audited_allows >= sum(allowed) > 200
    assert "stop" in (tmp_path / "state" / "audit").joinpath(
        sorted(p.name for p in (tmp_path / "state" / "audit").glob("audit-*.jsonl"))[-1]).read_text()
    # The final checkpoint signs the very last record ("stop"), in the chain and in the exported file.
    audit_dir = tmp_path / "state" / "audit"
    tail = sorted(audit_dir.glob("audit-*.jsonl"))[-1].read_text().splitlines()
    stop_record, final = json.loads(tail[-2]), json.loads(tail[-1])
    assert (stop_record["kind"], final["kind"]) == ("stop", "checkpoint")
    assert final["checkpoint"]["seq"] == stop_record["seq"]
    exported = json.loads((audit_dir / "checkpoints.jsonl").read_text().splitlines()[-1])
    assert (exported["seq"], exported["sig"]) == (stop_record["seq"], final["sig"])


def test_check_over_a_unix_socket_and_with_mtls(tmp_path: Path, socket_dir: Path) -> None:
    socket_path = socket_dir / "check.sock"
    umask = os.umask(0)  # the daemon inherits it; the Check socket's mode must not follow it
    try:
        daemon = Daemon(tmp_path / "state", {"check_mtls": False}, check_listen=f"unix:{socket_path}").start()
    finally:
        os.umask(umask)
    try:
        # Check believes the peer Envoy reports: its owner and group (Envoy's) only, as the HTTP Check's.
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o660
        if os.geteuid() == 0:  # root connects anyway: ask as another user, in the socket's group or not
            assert connects_as(65534, 65534, socket_path) == "PermissionError"
            assert connects_as(65534, socket_path.stat().st_gid, socket_path) == "connected"
        ident = identity_for(daemon, tmp_path / "id")
        client = Client(daemon.api_address, ident, check_server=f"unix:{socket_path}")
        token = client.mint("uds", ["demo:*:read"]).token
        assert client.check(token, "demo", "a", "read").allowed
    finally:
        assert daemon.stop() == 0
    daemon = Daemon(tmp_path / "state2", {"check_mtls": True}).start()
    try:
        # Envoy's development identity: check_clients' default (tests/test_check_mtls.py refuses others).
        ident = identity_for(daemon, tmp_path / "id2", "spiffe://dev.local/envoy")
        with grpc.insecure_channel(daemon.check_address) as plain:
            with pytest.raises(grpc.RpcError) as err:
                plain.unary_unary("/envoy.service.auth.v3.Authorization/Check")(b"", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # no TLS, no answer
        target = f"localhost:{daemon.check_port}"
        with grpc.secure_channel(target, ident.credentials()) as channel:
            from agentauthz.client import check_request, decision_from
            raw = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")(
                check_request(None, "demo", "a", "read"), timeout=5)
            assert decision_from(raw).reason == "token_missing"
    finally:
        assert daemon.stop() == 0
