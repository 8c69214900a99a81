"""The HTTP Check's hot-path twins (decision/_http_py.py, native/_http_c.pyx) agree: the fields of any header
list, refused or not, and the HTTP answer of any CheckResponse bytes, decision id or none."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import native_or_fail

from agentauthz.decision import _accel, _http_py
from agentauthz.decision._check_py import DECISION_ID_CHARS
from agentauthz.serve import extauthz, http_check

NAMES = ["authorization", "x-request-id", "content-length", "x-forwarded-client-cert", _http_py.PATH_HEADER,
         *(_http_py.ROUTE_PREFIX + k for k in _http_py.ROUTE_KEYS), _http_py.ROUTE_PREFIX + "admin",
         _http_py.ROUTE_PREFIX, "x-agentauthz-routes", "x-agentauthz-route", "host", "X-Agentauthz-Path"]
VALUES = ["", "/demo/reports", "/demo/reports?q=1", "/demo/%2e%2e/x", "Bearer abc", "true", "read",
          'URI=spiffe://dev.local/a;Cert="pem"', "URI=a,URI=b", 'URI="unterminated', "é✓"]


def twins() -> tuple[_accel.HotPath, _accel.HotPath]:
    return native_or_fail(), _accel.pure()


def name_count(items: list[tuple[str, str]], *unread: str) -> int:
    """What granian's ``len(headers)`` gives for ``items``: each name once; with ``unread``, counting the
    names of headers whose values it left out of ``items`` (not visible ASCII)."""
    return len(dict.fromkeys([*(name for name, _ in items), *unread]))


@given(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)), max_size=12),
       st.lists(st.sampled_from(NAMES), max_size=2),
       st.sampled_from(["/demo/reports", "/demo/%2e%2e/x", "/other"]), st.sampled_from(["GET", "POST"]))
def test_both_scans_read_any_header_list_alike(items: list[tuple[str, str]], unread: list[str], path: str,
                                               method: str) -> None:
    native, pure = twins()
    seen = name_count(items, *unread)
    assert native.scan_http(method, path, items, seen, http_check.peer_of) == \
        pure.scan_http(method, path, items, seen, http_check.peer_of)


def test_what_each_scan_reads_and_refuses(hot: _accel.HotPath) -> None:
    route = [(_http_py.ROUTE_PREFIX + k, v) for k, v in (("tool", "demo"), ("operation", "read"))]
    base = [(_http_py.PATH_HEADER, "/demo/reports"), ("authorization", "Bearer t"), ("x-request-id", "r"),
            *route]
    fields = hot.scan_http("GET", "/demo/reports", base, name_count(base), http_check.peer_of)
    assert fields == ("Bearer t", "r", "GET", "/demo/reports", {"tool": "demo", "operation": "read"}, "", "",
                      None)
    items = [*base, (_http_py.ROUTE_PREFIX + "mcp", "true"), ("accept", "a"), ("accept", "b")]
    mcp = hot.scan_http("POST", "/demo/reports", items, name_count(items), http_check.peer_of)
    assert mcp is not None and mcp[7] == {_http_py.PATH_HEADER: "/demo/reports", "authorization": "Bearer t",
                                          "x-request-id": "r", "accept": "a,b"}  # joined, as Envoy joins
    items = [*base, ("x-forwarded-client-cert", 'URI=spiffe://d/a;Cert="p"')]
    xfcc = hot.scan_http("GET", "/demo/reports", items, name_count(items), http_check.peer_of)
    assert xfcc is not None and xfcc[5:7] == ("spiffe://d/a", "p")
    for refused in ([*base, route[0]], [*base, (_http_py.ROUTE_PREFIX + "admin", "1")], base[1:],
                    [*base, (_http_py.PATH_HEADER, "/demo/reports")],
                    [*base, ("x-forwarded-client-cert", "URI=a"), ("x-forwarded-client-cert", "URI=a")]):
        scanned = hot.scan_http("GET", "/demo/reports", refused, name_count(refused), http_check.peer_of)
        assert scanned is None, refused
    assert hot.scan_http("GET", "/elsewhere", base, name_count(base), http_check.peer_of) is None
    # A header granian named but gave no value of (one not visible ASCII): a route's target, which would
    # fall back to the path's, an MCP body's content-encoding, which would read as identity.
    for unread in (_http_py.ROUTE_PREFIX + "target", "content-encoding", "authorization"):
        items = [item for item in base if item[0] != unread]
        scanned = hot.scan_http("GET", "/demo/reports", items, name_count(items, unread), http_check.peer_of)
        assert scanned is None, unread


def responses() -> list[bytes]:
    """A warm allow, a denial, an MCP denial (answered 200 over gRPC), each with and without a decision id."""
    head, tail = extauthz.decision_id_frame()
    allow = _accel.pure().allow_response("spiffe://dev.local/agent/a", "task", "0.1.x")
    denied, mcp = extauthz.denied_response("scope_denied"), extauthz.denied_response("budget_exhausted")
    from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
    message = ext_authz.CheckResponse.FromString(mcp)
    message.denied_response.status.code = 200  # what mcp_denials answers over gRPC
    mcp = message.SerializeToString()
    framed = [r + head + b"0123456789abcdef0123456789abcdef" + tail for r in (allow, denied, mcp)]
    return [allow, denied, mcp, *framed, framed[0][:-1]]


@pytest.mark.parametrize("response", responses())
def test_both_answers_turn_any_response_into_the_same_http_answer(response: bytes) -> None:
    head, tail = extauthz.decision_id_frame()
    seen: list[bytes] = []

    def convert(raw: bytes) -> Any:
        seen.append(raw)
        try:
            return http_check.convert(raw)
        except Exception:  # the handler answers 500 (Envoy's status_on_error); here: a mark, kept
            return (500, [], b"unreadable"), True

    native, pure = (hot.HttpAnswers(head, tail, DECISION_ID_CHARS, convert, 2) for hot in twins())
    for _ in range(3):  # converted once when it may be kept, every time when not (an MCP denial's body)
        assert native(response) == pure(response)
    assert len(set(seen)) == 1 and len(seen) in (2, 6)


def test_an_empty_or_unreadable_response_is_never_an_allow() -> None:
    for raw in (b"", b"\x08\x00"):  # protobuf's empty CheckResponse reads as status OK
        with pytest.raises(ValueError):
            http_check.convert(raw)
