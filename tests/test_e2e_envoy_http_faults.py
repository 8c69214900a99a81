"""The HTTP Check's 503 denials through a real Envoy on examples/envoy-http.yaml: a cluster node whose
Redis stopped (revocation_stale) and an audit disk that cannot write (audit_unavailable). Over HTTP
ext_authz a 5xx from the authorizer is an error to Envoy, answered as status_on_error (503, no body):
it must never become an allow, and the tool must never see the call; the daemon's own answer names
the reason, and the audit log records it."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from cluster_support import Cluster
from processes import Daemon, audit_records, free_port, wait_for
from test_e2e_envoy import READ
from test_e2e_envoy_http import HttpStack, http_stack
from test_faults import FAST_AUDIT, audit_disk, verify_cli
from test_http_check import ROUTE, send

from agentauthz import reasons

CALLS = 10  # calls through Envoy while the daemon denies 503


def direct(port: int, token: str) -> tuple[int, Any]:
    """(status, JSON body) of the HTTP Check asked directly, as Envoy asks it for GET /demo/reports."""
    headers = [("x-agentauthz-path", "/demo/reports"), ("authorization", f"Bearer {token}"),
               *((f"x-agentauthz-route-{k}", v) for k, v in ROUTE.items())]
    status, _, body = send(port, "GET", "/demo/reports", headers)
    return status, json.loads(body) if body else {}


def denied_503_and_never_through(s: HttpStack, port: int, token: str, reason: str) -> None:
    """While the daemon denies ``reason`` (503): every call through Envoy is Envoy's status_on_error,
    none reaches the tool, and the daemon asked directly names the reason.

    Had the daemon answered 200 instead, Envoy would have sent the call on: the echo tool's 200 and
    JSON body, and one more request on the tool's cluster. Had it answered its 503 as a plain denial,
    the body would be agentauthz's; Envoy's own error answer has none, and counts as an ext_authz error.
    """
    reached, errors = s.stat("cluster.tool.upstream_rq_total"), s.stat("http.tools.ext_authz.error")
    for _ in range(CALLS):
        status, body, _ = s.call(token)
        assert (status, body) == (503, {}), body
    assert s.stat("cluster.tool.upstream_rq_total") == reached
    assert s.stat("http.tools.ext_authz.error") == errors + CALLS
    assert direct(port, token) == (503, {"error": reason})


def recorded(daemon: Daemon, reason: str) -> int:
    return sum(r["kind"] == "check" and r["reason"] == reason and r["decision"] is False
               for r in daemon.audit_records())


def test_a_stopped_redis_is_503_through_envoy_and_the_tool_never_sees_a_call(tmp_path: Path) -> None:
    # The cluster's shipped settings (max_staleness 2 s): only the HTTP Check is added to the node.
    port = free_port()
    cluster = Cluster(tmp_path, config={"http_check_listen": f"127.0.0.1:{port}"})
    try:
        node = cluster.add("a")
        with http_stack(tmp_path, {}, node, port) as s:
            token = s.mint("stale-http", READ).token
            assert s.call(token)[0] == 200
            cluster.redis.signal(signal.SIGSTOP)
            try:
                # Asked directly, so that no call through Envoy is made before the node turns stale.
                wait_for(lambda: direct(port, token)[0] == 503, 15, "the node to turn stale")
                denied_503_and_never_through(s, port, token, reasons.REVOCATION_STALE)
            finally:
                cluster.redis.signal(signal.SIGCONT)
            reached = s.stat("cluster.tool.upstream_rq_total")
            wait_for(lambda: s.call(token)[0] == 200, 15, "calls allowed again once Redis runs")
            assert s.stat("cluster.tool.upstream_rq_total") == reached + 1  # only the allowed call
            # What the client could not see, the audit log says.
            wait_for(lambda: recorded(node, reasons.REVOCATION_STALE) >= CALLS + 1, 10,
                     "the revocation_stale records")
    finally:
        cluster.stop()


@pytest.mark.parametrize("kind", ["disk_full", "fsync_fails"])
def test_an_audit_that_cannot_write_is_503_through_envoy_and_the_tool_never_sees_a_call(
        tmp_path: Path, kind: str) -> None:
    port = free_port()
    with audit_disk(kind, tmp_path, tmp_path / "state") as disk:
        daemon = Daemon(tmp_path / "state", {**FAST_AUDIT, "http_check_listen": f"127.0.0.1:{port}"}).start()
        with http_stack(tmp_path, {}, daemon, port) as s:
            token = s.mint("disk-http", READ).token
            assert s.call(token)[0] == 200
            disk.exhaust()
            wait_for(lambda: direct(port, token)[0] == 503, 10, "the first audit_unavailable")
            denied_503_and_never_through(s, port, token, reasons.AUDIT_UNAVAILABLE)
            disk.restore()
            reached = s.stat("cluster.tool.upstream_rq_total")
            wait_for(lambda: s.call(token)[0] == 200, 10, "calls allowed again once the disk takes writes")
            assert s.stat("cluster.tool.upstream_rq_total") == reached + 1  # only the allowed call
        verify_cli(daemon)  # one chain, continuous across the failure
        # The denials were held and written once the disk came back.
        denials = [r for r in audit_records(disk.directory)
                   if r["kind"] == "check" and r["reason"] == reasons.AUDIT_UNAVAILABLE]
        assert len(denials) >= CALLS + 1
