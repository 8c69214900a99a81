"""Path traversal on routes that name their target (issue 16, item 2), through the shipped Envoy config.

A token for ``demo:reports:read`` must reach the tool only at ``/demo/reports`` or under
``/demo/reports/``, in the one normal spelling the route matched and Check saw: never ``/billing``,
never a sibling like ``/demo/reportsSECRET``, never a path the tool could resolve elsewhere
(CVE-2019-9901 dot segments, CVE-2021-29492 escaped slashes, backslashes, ``;`` parameters).
Envoy normalizes (examples/envoy.yaml: normalize_path, merge_slashes, escaped slashes refused,
anchored matches); the daemon refuses any path still not in normal form on every route, the warm
allow included (both twins).
"""

from __future__ import annotations

import asyncio
import http.client
import json
from pathlib import Path
from typing import Any, Iterator

import pytest
from envoy.service.auth.v3 import attribute_context_pb2 as attrs
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from processes import Daemon, echo_upstream, envoy, envoy_config, free_port
from support import daemon_twin, native_or_fail

from agentauthz import reasons
from agentauthz.authority.core import Authority
from agentauthz.client import Client, Identity, decision_from
from agentauthz.config import Config
from agentauthz.decision import _accel, tokens
from agentauthz.decision._check_py import ABNORMAL_PATH
from agentauthz.identity.devca import ensure_dev_pki, issue_svid
from agentauthz.serve import extauthz

AGENT = "spiffe://dev.local/agent/alpha"
REPORTS = ["demo:reports:read:internal"]  # what the example's GET /demo/reports route asks for

# Each spelling, sent as is on the request line: none may reach anything but /demo/reports[/...].
TRAVERSALS = [
    "/demo/reports/../../billing/invoices",  # the issue's repro
    "/demo/reportsSECRET",  # the issue's repro: an unanchored prefix
    "/demo/reports../billing",
    "/demo/reports/../billing",
    "/demo/reports/./../../billing/invoices",
    "/demo/reports/%2e%2e/%2e%2e/billing/invoices",
    "/demo/reports/%2E%2E/%2E%2E/billing/invoices",
    "/demo/reports/.%2e/%2E./billing/invoices",
    "/demo/reports/%2e%2E/%2E%2e/billing/invoices",
    "/demo/reports/%252e%252e/%252e%252e/billing/invoices",  # double-encoded
    "/demo/reports/..%2f..%2fbilling%2finvoices",
    "/demo/reports/..%2F..%2Fbilling%2Finvoices",
    "/demo/reports%2f..%2f..%2fbilling",
    "/demo/reports/..%5c..%5cbilling%5cinvoices",
    "/demo/reports/..%5C..%5Cbilling%5Cinvoices",
    "/demo/reports/..\\..\\billing\\invoices",
    "/demo/reports\\..\\..\\billing",
    "/demo/reports//../../billing/invoices",
    "//billing/invoices",
    "/demo//reports/../../billing",
    "/demo/reports/..;/..;/billing/invoices",
    "/demo/reports;/../../billing",
    "/demo/reports;x=1",
    "/demo/reports/q3;jsessionid=1/../../../billing",
    "/demo/reports/%00/../../billing",
    "/demo/reports/q3#/../../billing",
    "/DEMO/reports/../../billing/invoices",
    "/demo/REPORTS",
    "/demo/reports%2F",
    "/demo/reports%20",
    "/demo/reports.json",
    "/demo/reports-old/x",
    "/billing/invoices",
    "/billing",
]


def send(port: int, path: str, token: str) -> tuple[int, Any]:
    """GET ``path`` exactly as written on the request line; (status, JSON body or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.putheader("authorization", f"Bearer {token}")
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(body)
    except ValueError:
        return response.status, body.decode(errors="replace")


class Stack:
    def __init__(self, daemon: Daemon, port: int, client: Client) -> None:
        self.daemon, self.port, self.client = daemon, port, client


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The daemon on its defaults, the echo tool, and the SHIPPED examples/envoy.yaml in front."""
    work = tmp_path_factory.mktemp("traversal")
    daemon = Daemon(work / "state").start()
    proxy_port, admin_port = free_port(), free_port()
    try:
        issue_svid(ensure_dev_pki(daemon.state_dir), AGENT, work / "alpha")
        client = Client(daemon.api_address, Identity.from_dir(work / "alpha"),
                        check_server=daemon.check_address)
        with echo_upstream() as upstream_port:
            config = envoy_config(daemon.check_port, upstream_port, proxy_port, admin_port)  # as shipped
            with envoy(config, work, admin_port):
                yield Stack(daemon, proxy_port, client)
    finally:
        daemon.stop()


def reached_only_reports(status: int, body: Any) -> bool:
    """Whether the call either never reached the tool or reached it at /demo/reports[/...], normal."""
    if not (isinstance(body, dict) and "method" in body and "path" in body):
        return status != 200  # Envoy's or agentauthz's own answer
    path = body["path"].partition("?")[0]
    return (path == "/demo/reports" or path.startswith("/demo/reports/")) and not ABNORMAL_PATH.match(path)


def test_the_reports_token_reaches_its_route(stack: Stack) -> None:
    token = stack.client.mint("controls", REPORTS).token
    for path in ("/demo/reports", "/demo/reports/", "/demo/reports?next=/../../billing"):
        status, body = send(stack.port, path, token)
        assert status == 200 and body["path"] == path, (path, body)
    # What Envoy normalizes reaches the tool as the normal form the route and Check saw.
    for sent, seen in (("/demo/reports/./", "/demo/reports/"), ("/demo//reports", "/demo/reports"),
                       ("/demo/x/../reports", "/demo/reports")):
        status, body = send(stack.port, sent, token)
        assert (status, body["path"]) == (200, seen), (sent, body)


@pytest.mark.parametrize("path", TRAVERSALS)
def test_no_traversal_spelling_reaches_another_path(stack: Stack, path: str) -> None:
    token = stack.client.mint("traversal", REPORTS).token
    status, body = send(stack.port, path, token)
    assert reached_only_reports(status, body), (path, status, body)
    assert status in (400, 403, 404), (path, status, body)


def test_the_issue_repros_are_denied_by_the_daemon(stack: Stack) -> None:
    token = stack.client.mint("repro", REPORTS).token
    # Normalized to /billing/invoices: the billing route, which the token does not cover.
    assert send(stack.port, "/demo/reports/../../billing/invoices", token) == (403, {"error": "scope_denied"})
    # Not the /demo/reports route any more: the default one reads tool demo, target reportsSECRET.
    assert send(stack.port, "/demo/reportsSECRET", token) == (403, {"error": "scope_denied"})
    # An escaped slash is refused by Envoy itself (REJECT_REQUEST), before any Check.
    assert send(stack.port, "/demo/reports/..%2f..%2fbilling", token)[0] == 400
    # Left in the path by Envoy, refused by the daemon on the named route: 400 request_invalid.
    assert send(stack.port, "/demo/reports;x=1", token) == (400, {"error": "request_invalid"})
    assert send(stack.port, "/demo/reports/q3;x", token) == (400, {"error": "request_invalid"})


# -- Check directly: a route naming its tool and target, a non-normal path -----------------------

ABNORMAL = ["/demo/reports/../../billing", "/demo/reports/./q3", "/demo/reports/%2e%2e/x", "/demo//reports",
            "/demo/reports\\..\\billing", "/demo/reports;x", "/demo/reports/q3#x", "/demo/reports/..",
            "/demo/reports/.?q=1", "/demo/reports%2Fx"]
NAMED = {"tool": "demo", "target": "reports", "operation": "read", "sensitivity": "internal"}


def check_request_bytes(authorization: str, extensions: dict[str, str], *, path: str, method: str = "GET",
                        body: str = "") -> bytes:
    """The CheckRequest Envoy sends for a route with these context_extensions, serialized."""
    headers = {"authorization": authorization, **({"content-type": "application/json"} if body else {})}
    return ext_authz.CheckRequest(attributes=attrs.AttributeContext(
        request=attrs.AttributeContext.Request(http=attrs.AttributeContext.HttpRequest(
            method=method, path=path, headers=headers, body=body)),
        context_extensions=extensions)).SerializeToString()


@pytest.fixture(scope="module", params=["native", "pure"])
def twin_daemon(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    work = tmp_path_factory.mktemp(f"traversal-{request.param}")
    with daemon_twin(request.param):
        daemon = Daemon(work / "state").start()
    try:
        issue_svid(ensure_dev_pki(daemon.state_dir), AGENT, work / "alpha")
        yield Client(daemon.api_address, Identity.from_dir(work / "alpha"), check_server=daemon.check_address)
    finally:
        daemon.stop()


def test_a_named_route_with_a_non_normal_path_is_request_invalid_over_grpc(twin_daemon: Client) -> None:
    client = twin_daemon
    token = client.mint("named", REPORTS).token
    call = client._check
    assert call is not None
    for _ in range(3):  # the warm allow answers the repeats: it must check the path too
        raw = check_request_bytes(f"Bearer {token}", NAMED, path="/demo/reports/q3")
        assert decision_from(call(raw, timeout=5)).allowed
        for path in ABNORMAL:
            raw = check_request_bytes(f"Bearer {token}", NAMED, path=path)
            decision = decision_from(call(raw, timeout=5))
            assert (decision.allowed, decision.status, decision.reason) == \
                (False, 400, reasons.REQUEST_INVALID), path
    # An MCP route's body names the tool, but the path still names nothing.
    mcp = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "demo"}})
    route = {"mcp": "true", "target": "reports", "sensitivity": "internal"}
    raw = check_request_bytes(f"Bearer {token}", route, method="POST", path="/mcp/files/../x", body=mcp)
    assert decision_from(call(raw, timeout=5)).reason == reasons.REQUEST_INVALID


@pytest.mark.parametrize("twin", ["native", "pure"])
def test_the_warm_allow_declines_a_non_normal_path(tmp_path: Path, twin: str) -> None:
    """Each WarmAllow twin leaves such a request to the full path, which denies it request_invalid."""
    hot = native_or_fail() if twin == "native" else _accel.pure()
    a = Authority(Config(state_dir=tmp_path / "state", revocation_capacity=1 << 12))
    a.start()
    loop = asyncio.new_event_loop()
    try:
        service = extauthz.CheckService(a.verifiers, a.audit, lambda: a.policy, a.clock, hot=hot)
        token = a.mint(AGENT, "warm", [tokens.grant("demo", "reports", ["read"], "internal")]).token
        normal = extauthz.parse_check_request(
            check_request_bytes(f"Bearer {token}", NAMED, path="/demo/reports"))
        assert a.audit.flush()
        assert decision_from(loop.run_until_complete(service.check(normal, None))).allowed
        assert service.warm_path(normal).__class__ is bytes  # the warm allow answers this one itself
        for path in ABNORMAL:
            fields = extauthz.parse_check_request(check_request_bytes(f"Bearer {token}", NAMED, path=path))
            assert service.warm_path(fields) is None, path
            decision = decision_from(loop.run_until_complete(service.check(fields, None)))
            assert (decision.allowed, decision.reason) == (False, reasons.REQUEST_INVALID), path
    finally:
        loop.close()
        a.stop()


def test_the_twins_agree_on_what_is_normal() -> None:
    from agentauthz.decision._check_c import abnormal_path  # type: ignore[attr-defined]
    native_or_fail()
    samples = ["", "/", "/a", "/a/", "/a/b?c=/../", "/a/...", "/a/..b", "/a/.b", "/a/..", "/a/.", "/a/./",
               "/a/..?x", "/a//b", "//", "/a%20b", "/a\\b", "/a;b", "/a#b", "/é/..", "/é/ü", "a/../b",
               "/a/?%", "/a/..\n", "/\U0001f600/./"] + ABNORMAL + TRAVERSALS
    for path in samples:
        assert abnormal_path(path) == bool(ABNORMAL_PATH.match(path)), path
