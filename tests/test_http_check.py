"""The HTTP Check (serve/http_check.py) answers what the gRPC Check answers, from the same decision: the
same request on both transports, both twins, one real Authority; and it refuses, recorded, a request
Envoy would never send (no x-agentauthz-path, forged or repeated route headers, two client certificates)."""

from __future__ import annotations

import _thread
import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import test_warm_allow
from processes import ROOT, Daemon, audit_records, free_port
from test_warm_allow import ALPHA, request

from agentauthz import reasons
from agentauthz.authority.core import Authority
from agentauthz.check_wire import decode_check_response
from agentauthz.client import Client, Identity
from agentauthz.decision import _accel, _http_py
from agentauthz.identity.devca import ensure_dev_pki, issue_svid
from agentauthz.serve import extauthz, http_check
from benchmarks.load.procs import process_tree

# The warm path's own module fixture: an Authority with tokens plain, constrained, revoked, and a certificate.
authority = test_warm_allow.authority

ROUTE = {"tool": "demo", "target": "reports", "operation": "read", "sensitivity": "internal"}


def cases(minted: dict[str, str], certificate: str) -> dict[str, tuple[dict[str, Any], bytes]]:
    """name -> (the HTTP request as Envoy sends it, the same request as a gRPC CheckRequest)."""
    plain, constrained = f"Bearer {minted['plain']}", f"Bearer {minted['constrained']}"
    body = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                       "params": {"name": "read_file", "arguments": {"path": "/etc/x"}}})

    def both(authorization: str | None, extensions: dict[str, str] | None = None, method: str = "GET",
             path: str = "/demo/reports", principal: str = "", cert: str = "", data: str = "",
             ) -> tuple[dict[str, Any], bytes]:
        route = ROUTE if extensions is None else extensions
        headers = [("x-agentauthz-path", path), ("x-request-id", "req-1")]
        headers += [(f"x-agentauthz-route-{k}", v) for k, v in route.items()]
        if authorization is not None:
            headers.append(("authorization", authorization))
        if principal:
            headers.append(("x-forwarded-client-cert", f'By=spiffe://dev.local/x;Cert="{cert}";URI={principal}'))
        if data:
            headers.append(("content-type", "application/json"))
        grpc = request(authorization, route, method=method, path=path, principal=principal,
                       certificate=cert, body=data)
        return {"method": method, "path": path, "headers": headers, "body": data.encode()}, grpc

    return {
        "warm allow": both(plain),
        "no token": both(None),
        "scope denied": both(plain, {**ROUTE, "operation": "write"}),
        "revoked": both(f"Bearer {minted['revoked']}"),
        "malformed": both("Bearer abc.def.ghi"),
        "route defaults": both(plain, {}, path="/demo/reports"),
        "abnormal path": both(plain, path="/demo/reports/%2e%2e/x"),
        "unknown boundary": both(plain, {**ROUTE, "boundary": "nowhere"}),
        "peer is the subject": both(plain, principal=ALPHA, cert=certificate),
        "peer is another": both(plain, principal="spiffe://dev.local/agent/mallory", cert=certificate),
        "mcp denied": both(constrained, {"target": "files", "mcp": "true"}, "POST", "/mcp", data=body),
    }


def send(port: int, method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"",
         ) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request, headers as given (repeats kept): (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def serve(service: extauthz.CheckService, calls: list[tuple[Any, ...]], hot: _accel.HotPath = _accel.ACTIVE,
          fresh: Any = None) -> list[tuple[int, dict[str, str], bytes]]:
    """``calls`` (``send``'s arguments but the port) to ``service`` behind a real HttpCheckServer."""
    async def run() -> list[tuple[int, dict[str, str], bytes]]:
        port = free_port()
        server = http_check.HttpCheckServer(f"127.0.0.1:{port}", http_check.HttpCheck(service, fresh, hot))
        await server.start()
        try:
            return [await asyncio.to_thread(send, port, *call) for call in calls]
        finally:
            await server.stop()
    return asyncio.run(run())


@pytest.mark.parametrize("twin", ["native", "pure"])
def test_the_http_check_answers_what_the_grpc_check_answers(
        authority: tuple[Authority, dict[str, str], str], twin: str) -> None:
    a, minted, certificate = authority
    if twin == "native" and not _accel.NATIVE:
        pytest.skip("the daemon runs the pure twin (AGENTAUTHZ_NO_EXTENSIONS): its tokens are pure")
    hot = _accel.ACTIVE if twin == "native" else _accel.pure()
    grpc = extauthz.CheckService(a.verifiers, a.audit, lambda: a.policy, a.clock, budgets=a.budgets, hot=hot)
    over_http = extauthz.CheckService(a.verifiers, a.audit, lambda: a.policy, a.clock, budgets=a.budgets,
                                      hot=hot)
    named = cases(minted, certificate)
    loop = asyncio.new_event_loop()
    assert a.audit.flush()
    try:
        wanted = {name: decode_check_response(loop.run_until_complete(grpc.check(
            extauthz.parse_check_request(raw), None))) for name, (_, raw) in named.items()}
    finally:
        loop.close()
    assert a.audit.flush()  # no record queued ahead of the warm allow's: it can be written at once
    answers = serve(over_http, [(h["method"], h["path"], h["headers"], h["body"]) for h, _ in named.values()],
                    hot)
    for (name, want), (status, headers, body) in zip(wanted.items(), answers, strict=True):
        decision_id = headers.pop("x-agentauthz-decision-id")
        assert len(decision_id) == 32, name
        if want.allowed:
            assert (status, body) == (200, b""), name
            assert headers["x-envoy-auth-headers-to-remove"] == "authorization"
            assert all(headers[k] == v for k, v in want.headers.items()), name
            continue
        reason = json.loads(body)["error"]
        if isinstance(reason, dict):  # the MCP route's JSON-RPC error: a plain status, since 200 allows
            assert (reason["data"]["reason"], reason["data"]["decision_id"]) == (want.reason, decision_id)
            assert status == extauthz.http_status_for(want.reason) != want.status == 200, name
            continue
        assert (status, reason) == (want.status, want.reason), name
        assert {k: headers.get(k) for k in want.headers} == want.headers, name
    assert over_http.warm_path.allowed == grpc.warm_path.allowed == 1  # the warm path answers over HTTP too


@pytest.mark.parametrize(("headers", "path"), [
    ([], "/demo/reports"),  # no x-agentauthz-path: an Envoy without the header_mutation filter
    ([("x-agentauthz-path", "/demo/notes")], "/demo/reports"),  # not the path Envoy sent
    ([("x-agentauthz-path", "/demo/reports"), ("x-agentauthz-path", "/demo/reports")], "/demo/reports"),
    ([("x-agentauthz-path", "/d/r"), ("x-agentauthz-route-tool", "d"), ("x-agentauthz-route-tool", "e")],
     "/d/r"),
    ([("x-agentauthz-path", "/d/r"), ("x-agentauthz-route-admin", "true")], "/d/r"),  # no such key
    ([("x-agentauthz-path", "/d/r"), ("x-forwarded-client-cert", f"URI={ALPHA},URI={ALPHA}")], "/d/r"),
    ([("x-agentauthz-path", "/d/r"), ("x-forwarded-client-cert", 'URI="unterminated')], "/d/r"),
])
def test_a_request_envoy_would_not_send_is_refused_and_recorded(
        authority: tuple[Authority, dict[str, str], str], headers: list[tuple[str, str]], path: str,
        hot: _accel.HotPath) -> None:
    a, minted, _ = authority
    service = extauthz.CheckService(a.verifiers, a.audit, lambda: a.policy, a.clock, budgets=a.budgets)
    headers = [*headers, ("authorization", f"Bearer {minted['plain']}")]
    [(status, answer, body)] = serve(service, [("GET", path, headers)], hot)
    assert (status, json.loads(body)) == (400, {"error": reasons.REQUEST_INVALID})
    decision_id = answer["x-agentauthz-decision-id"]
    assert a.audit.flush()
    records = [r for r in audit_records(a.config.state_dir / "audit") if r.get("decision_id") == decision_id]
    assert [r["reason"] for r in records] == [reasons.REQUEST_INVALID]


class _Faulty:
    """A warm path that breaks on every call."""
    started = 0.0

    def __call__(self, fields: Any) -> Any:
        raise RuntimeError("injected fault")


def _service(a: Authority, hot: _accel.HotPath) -> extauthz.CheckService:
    return extauthz.CheckService(a.verifiers, a.audit, lambda: a.policy, a.clock, budgets=a.budgets, hot=hot)


def _one_warm_allow(minted: dict[str, str]) -> list[tuple[str, str, list[tuple[str, str]]]]:
    headers = [("x-agentauthz-path", "/demo/reports"), ("authorization", f"Bearer {minted['plain']}"),
               *((f"x-agentauthz-route-{k}", v) for k, v in ROUTE.items())]
    return [("GET", "/demo/reports", headers)]


def test_a_fault_on_the_warm_path_is_a_recorded_internal_error_over_http_too(
        authority: tuple[Authority, dict[str, str], str], hot: _accel.HotPath) -> None:
    # The HTTP Check takes check's first step itself (warm_path, then warm_failed): a fault there must be
    # answered as check answers it, recorded, never a bare 500 with nothing in the log.
    a, minted, _ = authority
    service = _service(a, hot)
    service.warm_path = _Faulty()  # type: ignore[assignment]
    [(status, answer, body)] = serve(service, _one_warm_allow(minted), hot)
    assert status != 200 and json.loads(body) == {"error": reasons.INTERNAL_ERROR}
    assert a.audit.flush()
    records = [r for r in audit_records(a.config.state_dir / "audit")
               if r.get("decision_id") == answer["x-agentauthz-decision-id"]]
    assert [r["reason"] for r in records] == [reasons.INTERNAL_ERROR]


def test_a_node_that_is_not_fresh_answers_revocation_stale_before_the_warm_path(
        authority: tuple[Authority, dict[str, str], str], hot: _accel.HotPath) -> None:
    # Cluster mode: a warm token must not be allowed while a revocation may be unread (fresh_only).
    a, minted, _ = authority
    service = _service(a, hot)
    service.warm_path = _Faulty()  # type: ignore[assignment]  # reaching it would answer internal_error
    fresh = [False]
    [(status, _, body)] = serve(service, _one_warm_allow(minted), hot, fresh=lambda: fresh[0])
    assert (status, json.loads(body)) == (503, {"error": reasons.REVOCATION_STALE})
    fresh[0] = True
    service = _service(a, hot)
    assert a.audit.flush()  # nothing queued ahead: the allow is answered on the warm path
    [(status, _, _)] = serve(service, _one_warm_allow(minted), hot, fresh=lambda: fresh[0])
    assert status == 200 and service.warm_path.allowed == 1


def _abandoned_http2_request(port: int, request_id: str) -> None:
    """HTTP/2 with prior knowledge: one GET on an MCP route (the only one whose body is read) whose body
    never comes (no END_STREAM, no content-length), then the connection closed, as a load generator
    ending mid-request or a crashing client does."""
    def literal(index: int, value: str) -> bytes:  # HPACK literal, not indexed, its name from the table
        return bytes([index, len(value)]) + value.encode()

    def literal_name(name: str, value: str) -> bytes:  # HPACK literal, not indexed, its name given
        return bytes([0, len(name)]) + name.encode() + bytes([len(value)]) + value.encode()

    path = "/demo/reports"
    block = (b"\x82\x86" + literal(4, path) + literal(1, "localhost")  # GET, http
             + literal_name(_http_py.PATH_HEADER, path) + literal_name("x-request-id", request_id)
             + literal_name(_http_py.ROUTE_PREFIX + "mcp", "true"))
    headers = len(block).to_bytes(3, "big") + b"\x01\x04" + (1).to_bytes(4, "big") + block  # END_HEADERS
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + headers)
        conn.recv(1024)  # granian's SETTINGS: the connection is served, the request handed on


def test_a_request_abandoned_before_its_body_is_decided_and_let_go(
        authority: tuple[Authority, dict[str, str], str]) -> None:
    # granian yields b"" forever, never ending the iteration, for a stream whose client went away:
    # reading on spun a core per abandoned stream for the process's life (issue 21's low-load cost).
    a, _, _ = authority
    service = extauthz.CheckService(a.verifiers, a.audit, lambda: a.policy, a.clock, budgets=a.budgets)
    request_id = "abandoned-before-its-body"

    def recorded() -> list[dict[str, Any]]:
        assert a.audit.flush()
        return [r for r in audit_records(a.config.state_dir / "audit") if r.get("request_id") == request_id]

    async def run() -> list[dict[str, Any]]:
        port = free_port()
        server = http_check.HttpCheckServer(f"127.0.0.1:{port}", http_check.HttpCheck(service))
        await server.start()
        try:
            await asyncio.to_thread(_abandoned_http2_request, port, request_id)
            for _ in range(400):  # the handler reads an empty body, decides and returns
                found = await asyncio.to_thread(recorded)
                if found:
                    return found
                await asyncio.sleep(0.025)
            return []
        finally:
            await server.stop()

    assert [r["reason"] for r in asyncio.run(run())] == [reasons.TOKEN_MISSING]


def test_peer_of_reads_one_element_as_envoys_source_does() -> None:
    cert = urllib.parse.quote("-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n", safe="")
    xfcc = f'By=spiffe://dev.local/envoy;Hash=ab;Cert="{cert}";Subject="CN=a,O=\\"b\\"";URI={ALPHA};DNS=x'
    assert http_check.peer_of(xfcc) == (ALPHA, cert)
    assert http_check.peer_of('Subject="CN=a,O=\\"b\\"";DNS=one;DNS=two') == ("one", "")
    assert http_check.peer_of('Subject="CN=a,O=\\"b\\""') == ('CN=a,O="b"', "")
    for bad in (f"URI={ALPHA},URI={ALPHA}", 'URI="x', "URI=a;;", "=x", 'URI=a"b'):
        assert http_check.peer_of(bad) is None, bad


def test_every_worker_answers_over_http_and_applies_a_revocation(tmp_path: Path) -> None:
    port = free_port()
    daemon = Daemon(tmp_path / "state", {"workers": 2, "http_check_listen": f"127.0.0.1:{port}"}).start()
    try:
        alpha = issue_svid(ensure_dev_pki(daemon.state_dir), ALPHA, tmp_path / "alpha")
        client = Client(daemon.api_address, Identity.from_dir(alpha))
        minted = client.mint("workers", ["demo:*:read:internal"])
        headers = [("x-agentauthz-path", "/demo/reports"), ("authorization", f"Bearer {minted.token}"),
                   *((f"x-agentauthz-route-{k}", v) for k, v in ROUTE.items())]
        assert {send(port, "GET", "/demo/reports", headers)[0] for _ in range(20)} == {200}
        client.revoke(token_id=minted.token_id)  # acknowledged once every worker applied it
        answers = {send(port, "GET", "/demo/reports", headers)[2] for _ in range(20)}
        assert answers == {json.dumps({"error": reasons.TOKEN_REVOKED}).encode() + b"\n"}
        # In the primary and the worker (the single-threaded process between them forks workers),
        # granian's threads are SCHED_BATCH; the event loop and gRPC's threads are not.
        serving = [p for p in process_tree(daemon.proc.pid) if len(os.listdir(f"/proc/{p}/task")) > 1]
        assert len(serving) == 2
        for pid in serving:
            policies = thread_policies(pid)
            assert policies[pid][0] == os.SCHED_OTHER  # the event loop
            assert any(policy == os.SCHED_BATCH for policy, _ in policies.values())
            assert all(policy == os.SCHED_OTHER for policy, name in policies.values() if "grpc" in name
                       or "event_engine" in name)
    finally:
        assert daemon.stop() == 0
    # Each connection went to one process or the other (SO_REUSEPORT): both decided, both recorded.
    workers = audit_records(tmp_path / "state" / "audit" / "worker-1")
    assert any(r.get("reason") == reasons.TOKEN_REVOKED for r in workers)
    assert any(r.get("reason") == reasons.TOKEN_REVOKED for r in daemon.audit_records())


def thread_policies(pid: int) -> dict[int, tuple[int, str]]:
    """Each thread of ``pid``: its scheduling policy and name."""
    tasks = Path(f"/proc/{pid}/task")
    return {int(tid): (os.sched_getscheduler(int(tid)), (tasks / tid / "comm").read_text().strip())
            for tid in os.listdir(tasks)}


def test_without_the_http_check_no_thread_is_batch(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "state").start()
    try:
        assert {policy for policy, _ in thread_policies(daemon.proc.pid).values()} == {os.SCHED_OTHER}
    finally:
        assert daemon.stop() == 0


def raw_thread() -> tuple[int, Any]:
    """A thread ``threading`` does not know, as granian's are (started by ``_thread``): its id, and the
    lock that ends it once released."""
    started, stop = _thread.allocate_lock(), _thread.allocate_lock()
    started.acquire()
    stop.acquire()
    ids = []

    def run() -> None:
        ids.append(threading.get_native_id())
        started.release()
        stop.acquire()
    _thread.start_new_thread(run, ())
    started.acquire()
    return ids[0], stop


def test_native_threads_started_in_the_block_are_batch_python_threads_and_this_one_are_not() -> None:
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    python = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True)
    with http_check.native_threads_batch():
        native, stop = raw_thread()
        python.start()
        assert os.sched_getscheduler(native) == os.SCHED_OTHER  # not yet: when the block ends
    try:
        assert os.sched_getscheduler(native) == os.SCHED_BATCH
        assert os.sched_getscheduler(python.native_id) == os.SCHED_OTHER
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
        later, stop_later = raw_thread()  # outside the block: untouched
        assert os.sched_getscheduler(later) == os.SCHED_OTHER
        stop_later.release()
    finally:
        stop.release()
    with pytest.raises(OSError), http_check.native_threads_batch():  # granian did not listen: nothing set
        failed, stop_failed = raw_thread()
        raise OSError("not listening")
    assert os.sched_getscheduler(failed) == os.SCHED_OTHER
    stop_failed.release()


def test_a_policy_the_operator_chose_is_left_as_it_is() -> None:
    # As under `chrt --idle 0 agentauthz serve`: granian's threads inherit the operator's choice.
    script = (
        "import _thread, os, threading, time\n"
        "from agentauthz.serve.http_check import native_threads_batch\n"
        "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
        "ids = []\n"
        "with native_threads_batch():\n"
        "    _thread.start_new_thread(lambda: (ids.append(threading.get_native_id()), time.sleep(5)), ())\n"
        "    while not ids: time.sleep(0.01)\n"
        "print(os.sched_getscheduler(ids[0]) == os.SCHED_IDLE, os.sched_getscheduler(0) == os.SCHED_IDLE)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert done.stdout.split() == ["True", "True"], done.stderr


def test_an_http_check_address_in_use_is_named_with_its_option(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = f"127.0.0.1:{squatter.getsockname()[1]}"
        flags = ("--check-listen", "--api-listen", "--http-listen", "--approval-listen")
        args = [a for f in flags for a in (f, f"127.0.0.1:{free_port()}")]
        args += ["--state-dir", str(tmp_path / "s"), "--http-check-listen", taken]
        done = subprocess.run([sys.executable, "-m", "agentauthz", "serve", *args], capture_output=True,
                              text=True, timeout=30)
    assert done.returncode != 0
    assert (f"cannot listen on {taken} (--http-check-listen, or http_check_listen in the config): address "
            "already in use") in done.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("listen", ["0.0.0.0:9194", "[::]:9194", "10.1.2.3:9194", "agentauthz.svc:9194"])
def test_an_http_check_other_hosts_could_reach_is_refused_at_start(tmp_path: Path, listen: str) -> None:
    # It believes the x-forwarded-client-cert and route headers Envoy sets, over plaintext.
    done = subprocess.run([sys.executable, "-m", "agentauthz", "serve", "--state-dir", str(tmp_path / "s"),
                           "--http-check-listen", listen], capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert f"http_check_listen {listen!r} is not loopback" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "s").exists()


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "localhost:0", "[::1]:0", "unix:/tmp/x.sock"])
def test_loopback_and_unix_http_check_addresses_are_accepted(tmp_path: Path, listen: str) -> None:
    from agentauthz.config import Config
    assert Config(state_dir=tmp_path, http_check_listen=listen).http_check_listen == listen  # no ConfigError
