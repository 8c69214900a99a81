"""MCP tool calls: strict JSON-RPC bodies, argument constraints that cannot be escaped, both twins alike,
policy copying constraints into tokens, and the whole path through a real daemon and a real Envoy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
from envoy.service.auth.v3 import attribute_context_pb2 as attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from limits_support import (
    AGENT,
    Checker,
    agent,
    check_request,
    grant,
    plain,
    rpc,
    start,
    tool_call,
)
from processes import echo_upstream, envoy, envoy_config, free_port, post, request
from support import Forge, make_verifier, native_or_fail

from agentauthz import errors, reasons
from agentauthz.decision import _accel, mcp, tokens
from agentauthz.decision.constraints import Argument, compile_arguments, path_unsafe
from agentauthz.decision.policy import Policy
from agentauthz.serve.api import grant_to_dict, grant_to_proto
from agentauthz.serve.extauthz import http_status_for
from agentauthz.serve.mcp_denials import DENIED_CODE
from agentauthz.v1 import agentauthz_pb2 as pb

READ_REPORTS = [{"name": "path", "prefix": "/srv/reports", "required": True},
                {"name": "encoding", "one_of": ["utf-8", "ascii"]}, {"name": "max_bytes", "max": 65536}]


def http(body: bytes, method: str = "POST", **headers: str) -> attrs.AttributeContext.HttpRequest:
    h = {"content-type": "application/json", "content-length": str(len(body))} if body else {}
    h.update({k.replace("_", "-"): v for k, v in headers.items()})
    return attrs.AttributeContext.HttpRequest(method=method, path="/mcp/files", headers=h, raw_body=body)


# -- the body: one strict JSON-RPC request or a specific refusal ------------------------------------


def test_tools_call_names_tool_operation_and_arguments() -> None:
    call = mcp.read_call(http(tool_call("read_file", {"path": "/srv/reports/q1"})))
    assert isinstance(call, mcp.Call)
    assert (call.tool, call.operation, call.arguments) == ("read_file", "call", {"path": "/srv/reports/q1"})
    no_arguments = mcp.read_call(http(tool_call("ping_tool")))
    assert isinstance(no_arguments, mcp.Call) and no_arguments.arguments == {}


def test_the_transports_own_messages_are_one_session_operation_and_other_methods_their_own() -> None:
    for method, expected in (("initialize", "session"), ("notifications/initialized", "session"),
                             ("notifications/cancelled", "session"), ("ping", "session"),
                             ("server/discover", "session"), ("tools/list", "tools/list"),
                             ("resources/read", "resources/read"), ("prompts/get", "prompts/get"),
                             ("notifications/roots/list_changed", "notifications/roots/list_changed")):
        request_id = None if method.startswith("notif") else 7
        call = mcp.read_call(http(rpc(method, {}, id=request_id)))
        assert isinstance(call, mcp.Call)
        assert (call.tool, call.operation, call.arguments, call.method, call.id) == (
            "mcp", expected, None, method, request_id)
    assert mcp.read_call(http(b"", method="GET")) is mcp.SESSION  # the event stream
    assert mcp.read_call(http(b"", method="DELETE")) is mcp.SESSION  # the session's end


RESPONSES = {  # a client's answers to the server's own requests (elicitation, sampling, roots)
    "elicitation": {"jsonrpc": "2.0", "id": 0, "result": {"action": "accept", "content": {"ok": True}}},
    "string id": {"jsonrpc": "2.0", "id": "s-1", "result": {}},
    "error": {"jsonrpc": "2.0", "id": 3, "error": {"code": -32601, "message": "no roots"}},
    "error with data": {"jsonrpc": "2.0", "id": 3, "error": {"code": -1, "message": "x", "data": [1]}},
}
BAD_RESPONSES = {
    "result and error": {"jsonrpc": "2.0", "id": 1, "result": {}, "error": {"code": 1, "message": "x"}},
    "result not an object": {"jsonrpc": "2.0", "id": 1, "result": "ok"},
    "null id": {"jsonrpc": "2.0", "id": None, "result": {}},
    "no id": {"jsonrpc": "2.0", "result": {}},
    "bool id": {"jsonrpc": "2.0", "id": True, "result": {}},
    "unknown member": {"jsonrpc": "2.0", "id": 1, "result": {}, "params": {"name": "delete_file"}},
    "jsonrpc 1.0": {"jsonrpc": "1.0", "id": 1, "result": {}},
    "error not an object": {"jsonrpc": "2.0", "id": 1, "error": "denied"},
    "error code not an integer": {"jsonrpc": "2.0", "id": 1, "error": {"code": "1", "message": "x"}},
    "error without message": {"jsonrpc": "2.0", "id": 1, "error": {"code": 1}},
    "error unknown member": {"jsonrpc": "2.0", "id": 1, "error": {"code": 1, "message": "x", "tool": "y"}},
    "method and result": {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "result": {}},
}


@pytest.mark.parametrize("message", RESPONSES.values(), ids=RESPONSES.keys())
def test_responses_to_the_servers_requests_are_session_traffic(message: dict[str, Any]) -> None:
    assert mcp.read_call(http(json.dumps(message).encode())) is mcp.SESSION


@pytest.mark.parametrize("message", BAD_RESPONSES.values(), ids=BAD_RESPONSES.keys())
def test_anything_else_shaped_like_a_response_is_refused(message: dict[str, Any]) -> None:
    assert mcp.read_call(http(json.dumps(message).encode())) == reasons.MCP_BODY_INVALID


def test_responses_are_held_to_the_same_strictness() -> None:
    duplicate = b'{"jsonrpc":"2.0","id":1,"result":{"action":"accept","action":"decline"}}'
    assert mcp.read_call(http(duplicate)) == reasons.MCP_BODY_INVALID
    huge = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"n": 10 ** 30}}).encode()
    assert mcp.read_call(http(huge)) == reasons.MCP_BODY_INVALID
    padded = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"p": "a" * mcp.MAX_BODY_BYTES}}).encode()
    assert mcp.read_call(http(padded)) == reasons.MCP_BODY_TOO_LARGE
    batch = b"[" + json.dumps({"jsonrpc": "2.0", "id": 1, "result": {}}).encode() + b"]"
    assert mcp.read_call(http(batch)) == reasons.MCP_BATCH_REFUSED


def test_the_body_envoy_sent_as_a_string_is_read_too() -> None:
    body = tool_call("read_file", {"path": "/srv/reports/é"})
    request = attrs.AttributeContext.HttpRequest(
        method="POST", headers={"content-type": "application/json; charset=utf-8"}, body=body.decode())
    call = mcp.read_call(request)
    assert isinstance(call, mcp.Call) and call.arguments == {"path": "/srv/reports/é"}


def test_only_a_post_carries_a_message_and_other_body_less_requests_are_decided_like_any_route() -> None:
    assert mcp.read_call(http(b"", method="POST")) == reasons.MCP_BODY_INVALID
    for method in ("GET", "DELETE", "PUT"):  # what would the upstream make of a GET's body?
        assert mcp.read_call(http(tool_call("read_file"), method=method)) == reasons.MCP_BODY_INVALID
    assert mcp.read_call(http(b"", method="HEAD")) is None
    assert mcp.read_call(http(b"", method="OPTIONS")) is None


BAD_BODIES = {
    "not json": b"{nope",
    "trailing garbage": tool_call("x") + b"x",
    "duplicate key": b'{"jsonrpc":"2.0","id":1,"method":"tools/call","method":"ping","params":{"name":"x"}}',
    "duplicate argument": b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x",'
                          b'"arguments":{"path":"/srv/reports","path":"/etc"}}}',
    "NaN": b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"n":NaN}}}',
    "Infinity": b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x",'
                b'"arguments":{"n":1e999}}}',
    "huge int": b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"n":'
                + b"9" * 30 + b"}}}",
    "lone surrogate": b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x",'
                      b'"arguments":{"p":"\\ud800"}}}',
    "too deep": rpc("tools/call", {"name": "x", "arguments": {"a": json.loads("[" * 100 + "]" * 100)}}),
    "not an object": b'"tools/call"',
    "null": b"null",
    "not utf-8": b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\xff"}}',
    "byte order mark": b"\xef\xbb\xbf" + tool_call("x"),
    "jsonrpc 1.0": json.dumps({"jsonrpc": "1.0", "id": 1, "method": "tools/call",
                               "params": {"name": "x"}}).encode(),
    "jsonrpc missing": json.dumps({"id": 1, "method": "tools/call", "params": {"name": "x"}}).encode(),
    "unknown member": json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                  "params": {"name": "x"}, "extra": 1}).encode(),
    "bool id": rpc("tools/call", {"name": "x"}, id=True),
    "null id": rpc("tools/call", {"name": "x"}, id=None)[:-1] + b',"id":null}',
    "float id": rpc("tools/call", {"name": "x"}, id=1.5),
    "call without id": rpc("tools/call", {"name": "x"}, id=None),
    "params array": rpc("tools/call", ["x"]),
    "name missing": rpc("tools/call", {"arguments": {}}),
    "name not a string": rpc("tools/call", {"name": 5}),
    "name with spaces": rpc("tools/call", {"name": "rm -rf"}),
    "name empty": rpc("tools/call", {"name": ""}),
    "arguments a list": rpc("tools/call", {"name": "x", "arguments": ["/srv/reports"]}),
    "method not a string": json.dumps({"jsonrpc": "2.0", "id": 1, "method": 5}).encode(),
    "method with spaces": rpc("tools call", {"name": "x"}),
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_malformed_bodies_are_refused_never_guessed_at(body: bytes) -> None:
    assert mcp.read_call(http(body)) == reasons.MCP_BODY_INVALID


def test_batches_are_refused() -> None:
    assert mcp.read_call(http(b"[" + tool_call("x") + b"]")) == reasons.MCP_BATCH_REFUSED
    assert mcp.read_call(http(b" \n [" + tool_call("x") + b"]")) == reasons.MCP_BATCH_REFUSED
    assert mcp.read_call(http(b"[]")) == reasons.MCP_BATCH_REFUSED


def test_oversized_truncated_and_disguised_bodies_are_refused() -> None:
    padding = "a" * mcp.MAX_BODY_BYTES
    big = tool_call("x", {"pad": padding})
    assert mcp.read_call(http(big)) == reasons.MCP_BODY_TOO_LARGE
    whole = tool_call("x", {"path": "/srv/reports"})
    # Envoy flags a body it cut at max_request_bytes; what the tool reads differs from what we read.
    assert mcp.read_call(http(whole, x_envoy_auth_partial_body="true")) == reasons.MCP_BODY_TRUNCATED
    assert mcp.read_call(http(whole, content_length=str(len(whole) + 10))) == reasons.MCP_BODY_TRUNCATED
    assert mcp.read_call(http(whole, content_type="text/plain")) == reasons.MCP_BODY_INVALID
    assert mcp.read_call(http(whole, content_type="application/x-www-form-urlencoded")) == \
        reasons.MCP_BODY_INVALID
    assert mcp.read_call(http(whole, content_encoding="gzip")) == reasons.MCP_BODY_INVALID
    assert isinstance(mcp.read_call(http(whole, x_envoy_auth_partial_body="false")), mcp.Call)


def test_body_refusals_are_400_and_constraint_refusals_403() -> None:
    for reason in reasons.MCP_REFUSED:
        assert http_status_for(reason) == 400
    for reason in reasons.CONSTRAINT_DENIED:
        assert http_status_for(reason) == 403
    assert http_status_for(reasons.RATE_LIMITED) == 429


# -- argument constraints ---------------------------------------------------------------------------


ESCAPES = ["/srv/reports/../secrets", "/srv/reports/..", "/srv/reports/a/../../etc/passwd",
           "/srv/reports/%2e%2e/secrets", "/srv/reports%2f..%2fsecrets", "/srv/reports/\x00/../x",
           "/srv/reports/..\\..\\secrets", "/srv/reports\\..\\x", "/srv/reports/\uff0e\uff0e/secrets",
           "/srv/reports\uff0f..", "/srv/reports/.../x", "/srv/reports/q1\n", "/srv/reports/\u212a"]


@pytest.mark.parametrize("value", ESCAPES)
def test_prefix_escapes_are_refused_not_normalised(value: str) -> None:
    (path, *_) = compile_arguments(READ_REPORTS)
    assert path_unsafe(value)
    assert path.problem({"path": value}) == reasons.ARGUMENT_PATH_UNSAFE


@pytest.mark.parametrize("value", ["/srv/reportsX", "/srv/report", "/srv", "srv/reports/q1", "/etc/passwd",
                                   "/SRV/reports/q1", " /srv/reports/q1", "//srv/reports/q1"])
def test_values_outside_the_prefix_are_refused(value: str) -> None:
    (path, *_) = compile_arguments(READ_REPORTS)
    assert path.problem({"path": value}) == reasons.ARGUMENT_OUTSIDE_PREFIX


@pytest.mark.parametrize("value", ["/srv/reports", "/srv/reports/", "/srv/reports/q1.txt",
                                   "/srv/reports/2024/q1", "/srv/reports/.hidden", "/srv/reports/a.b..c",
                                   "/srv/reports/./q1", "/srv/reports/café"])
def test_values_under_the_prefix_hold(value: str) -> None:
    (path, *_) = compile_arguments(READ_REPORTS)
    assert path.problem({"path": value}) is None


def test_one_of_max_required_and_types() -> None:
    path, encoding, size = compile_arguments(READ_REPORTS)
    assert encoding.problem({"encoding": "utf-8"}) is None
    assert encoding.problem({}) is None  # not required: absent passes nothing on
    assert encoding.problem({"encoding": "latin-1"}) == reasons.ARGUMENT_NOT_ALLOWED
    assert encoding.problem({"encoding": "UTF-8"}) == reasons.ARGUMENT_NOT_ALLOWED
    assert encoding.problem({"encoding": ["utf-8"]}) == reasons.ARGUMENT_TYPE
    assert size.problem({"max_bytes": 65536}) is None
    assert size.problem({"max_bytes": 65536.0}) is None
    assert size.problem({"max_bytes": -5}) is None
    assert size.problem({"max_bytes": 65537}) == reasons.ARGUMENT_ABOVE_MAX
    assert size.problem({"max_bytes": 65536.5}) == reasons.ARGUMENT_ABOVE_MAX
    assert size.problem({"max_bytes": True}) == reasons.ARGUMENT_TYPE  # a bool is no number here
    assert size.problem({"max_bytes": "10"}) == reasons.ARGUMENT_TYPE
    assert size.problem({"max_bytes": 1 << 60}) == reasons.ARGUMENT_TYPE
    assert size.problem({"max_bytes": float("inf")}) == reasons.ARGUMENT_TYPE
    assert path.problem({}) == reasons.ARGUMENT_MISSING
    assert path.problem({"path": None}) == reasons.ARGUMENT_MISSING
    assert path.problem({"path": 7}) == reasons.ARGUMENT_TYPE
    assert path.problem({"path": {"startswith": "/srv/reports"}}) == reasons.ARGUMENT_TYPE


BAD_CONSTRAINTS: list[tuple[str, Any]] = [
    ("arguments", []), ("arguments", {}), ("arguments", [{"prefix": "/x"}]), ("arguments", [{"name": "p"}]),
    ("arguments", [{"name": "p", "prefix": "/x", "glob": "*"}]), ("arguments", [{"name": "", "max": 1}]),
    ("arguments", [{"name": "p", "prefix": ""}]), ("arguments", [{"name": "p", "prefix": "/x/../y"}]),
    ("arguments", [{"name": "p", "one_of": []}]), ("arguments", [{"name": "p", "one_of": ["a", "a"]}]),
    ("arguments", [{"name": "p", "one_of": [1]}]), ("arguments", [{"name": "p", "max": True}]),
    ("arguments", [{"name": "p", "max": "5"}]), ("arguments", [{"name": "p", "max": 1 << 60}]),
    ("arguments", [{"name": "p", "required": 1}]), ("arguments", [{"name": "p", "max": 1, "prefix": "/x"}]),
    ("arguments", [{"name": "p", "max": 1}] * 33), ("arguments", None),
    ("budget", {}), ("budget", None), ("budget", {"max_calls": 0}), ("budget", {"max_calls": True}),
    ("budget", {"max_calls": 1.5}), ("budget", {"rate_per_second": 0}), ("budget", {"rate_per_second": -1}),
    ("budget", {"burst": 3}), ("budget", {"rate_per_second": 1, "burst": 0}), ("budget", {"calls": 1}),
    ("budget", {"max_calls": 1 << 60}), ("budget", [5]),
]


@pytest.mark.parametrize(("key", "value"), BAD_CONSTRAINTS)
def test_both_twins_refuse_malformed_constraints_alike(key: str, value: Any) -> None:
    raw = {**tokens.grant("read_file", "files", ["call"]), key: value}
    outcomes = []
    for hot in (native_or_fail(), _accel.pure()):
        with pytest.raises(errors.TokenClaimsInvalid) as err:
            hot.compile_grant(raw)  # type: ignore[operator]
        outcomes.append(str(err.value))
    assert outcomes[0] == outcomes[1]


def test_both_twins_compile_constraints_alike_and_mark_the_token() -> None:
    forge = Forge()
    constrained = forge.token(grants=[tokens.grant("demo", "*", ["read"]),
                                      tokens.grant("read_file", "files", ["call"], arguments=READ_REPORTS,
                                                   budget={"max_calls": 3, "rate_per_second": 0.5,
                                                           "burst": 2})])
    plain_token = forge.token()
    for hot in (native_or_fail(), _accel.pure()):
        verifier = make_verifier(hot, forge)
        entry = verifier.verify(constrained, forge.now)
        assert entry.constrained and not verifier.verify(plain_token, forge.now).constrained
        free, limited = entry.grants
        assert free.extras is None
        expected = [repr(a) for a in compile_arguments(READ_REPORTS)]
        assert [repr(a) for a in limited.extras.arguments] == expected
        budget = limited.extras.budget
        assert (budget.max_calls, budget.rate, budget.burst) == (3, 0.5, 2)


_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(1 << 52, 1 << 54),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6),
                    st.lists(st.text(max_size=3), max_size=3))
_constraint = st.dictionaries(st.sampled_from(["name", "prefix", "one_of", "max", "required", "x"]),
                              _values, max_size=4)


@settings(max_examples=300, deadline=None)
@given(arguments=st.one_of(_values, st.lists(_constraint, max_size=3)),
       budget=st.one_of(st.none(), _values, st.dictionaries(
           st.sampled_from(["max_calls", "rate_per_second", "burst", "x"]), _values, max_size=3)))
def test_differential_random_constraints(arguments: Any, budget: Any) -> None:
    raw = {**tokens.grant("t", "*", ["call"]), "arguments": arguments}
    if budget is not None:
        raw["budget"] = budget
    outcomes = []
    for hot in (native_or_fail(), _accel.pure()):
        try:
            extras = hot.compile_grant(raw).extras  # type: ignore[operator]
            outcomes.append(("ok", repr(extras)))
        except errors.TokenClaimsInvalid as exc:
            outcomes.append(("refused", str(exc)))
    assert outcomes[0] == outcomes[1]


# -- policy copies constraints into what it grants; a request may only tighten ---------------------------


def test_narrow_copies_the_rules_constraints_and_requests_only_tighten() -> None:
    from limits_support import POLICY
    policy = Policy.from_text(POLICY)
    asked = tokens.grant("read_file", "files", ["call"], "internal")
    (granted,) = policy.narrow(AGENT, [asked], 300).granted
    assert granted["arguments"] == READ_REPORTS and "budget" not in granted
    tighter = {**asked, "arguments": [{"name": "path", "prefix": "/srv/reports/q1"}],
               "budget": {"max_calls": 2}}
    (granted,) = policy.narrow(AGENT, [tighter], 300).granted
    assert granted["arguments"] == READ_REPORTS + [{"name": "path", "prefix": "/srv/reports/q1"}]
    assert granted["budget"] == {"max_calls": 2}
    looser = {**tokens.grant("search", "files", ["call"], "internal"), "budget": {"max_calls": 500}}
    (granted,) = policy.narrow(AGENT, [looser], 300).granted
    assert granted["budget"] == {"max_calls": 5}  # the policy's lower limit wins
    rated = {**tokens.grant("ticker", "x", ["read"], "internal"), "budget": {"rate_per_second": 9, "burst": 1,
                                                                           "max_calls": 7}}
    (granted,) = policy.narrow(AGENT, [rated], 300).granted
    assert granted["budget"] == {"rate_per_second": 0.25, "burst": 1, "max_calls": 7}
    broken = {**asked, "arguments": [{"name": "path"}]}
    narrowed = policy.narrow(AGENT, [broken], 300)
    assert not narrowed.granted and narrowed.denied


def test_policy_refuses_malformed_constraints_naming_the_rule() -> None:
    from agentauthz.errors import PolicyError
    base = ("version: 1\nrules:\n  - {id: r1, agents: ['spiffe://dev.local/agent/*'], tool: t, "
            "targets: ['*'], operations: [call], %s}\n")
    for bad in ("arguments: [{name: p, prefix: /a/../b}]", "budget: {max_calls: 0}",
                "arguments: [{name: p, max: .inf}]", "effect: deny, arguments: [{name: p, required: true}]"):
        with pytest.raises(PolicyError, match="r1"):
            Policy.from_text(base % bad)


def test_api_carries_constraints_both_ways() -> None:
    g = grant("read_file", arguments=[
        pb.ArgumentConstraint(name="path", prefix="/srv/reports", required=True),
        pb.ArgumentConstraint(name="n", max=5), pb.ArgumentConstraint(name="mode", one_of=["r", "w"])],
              budget=pb.Budget(max_calls=3, rate_per_second=0.5, burst=2))
    as_dict = grant_to_dict(g)
    assert as_dict["arguments"] == [{"name": "path", "prefix": "/srv/reports", "required": True},
                                    {"name": "n", "max": 5.0}, {"name": "mode", "one_of": ["r", "w"]}]
    assert as_dict["budget"] == {"max_calls": 3, "rate_per_second": 0.5, "burst": 2}
    assert grant_to_proto(as_dict) == g
    assert "budget" not in grant_to_dict(grant("x", budget=pb.Budget()))  # all zero: no budget
    assert not grant_to_proto(grant_to_dict(grant("x"))).HasField("budget")
    assert Argument("n", None, None, 0, False).problem({"n": 0}) is None


# -- end to end through the daemon ------------------------------------------------------------------


class Stack:
    def __init__(self, work: Path) -> None:
        self.daemon = start(work)
        self.client = agent(self.daemon, work)
        self.check = Checker(self.daemon.check_address)
        minted = self.client.mint("mcp-task", [grant("read_file"), grant("echo"),
                                               grant("mcp", ops=("session", "tools/list"))])
        self.token = minted.token
        self.minted = minted
        self.minted_without_session = self.client.mint("no-session", [grant("echo")]).token


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("mcp"))
    try:
        yield s
    finally:
        s.check.close()
        assert s.daemon.stop() == 0


def test_minted_grants_carry_the_policys_constraints(stack: Stack) -> None:
    read_file = next(g for g in stack.minted.grants if g.tool == "read_file")
    assert grant_to_dict(read_file)["arguments"] == [{**c, "max": 65536.0} if "max" in c else c
                                                     for c in READ_REPORTS]


def test_a_call_within_the_constraints_is_allowed(stack: Stack) -> None:
    arguments = {"path": "/srv/reports/q1.csv", "encoding": "ascii", "max_bytes": 10}
    d = stack.check(check_request(stack.token, tool_call("read_file", arguments)))
    assert d.allowed, d
    assert d.headers["x-agentauthz-task"] == "mcp-task"
    assert stack.check(check_request(stack.token, tool_call("echo", {"anything": ["at", "all"]}))).allowed
    initialize = rpc("initialize", {"protocolVersion": "2025-06-18"})
    assert stack.check(check_request(stack.token, initialize)).allowed


@pytest.mark.parametrize(("arguments", "reason"), [
    ({"path": "/srv/reports/../../etc/shadow"}, reasons.ARGUMENT_PATH_UNSAFE),
    ({"path": "/srv/reports/%2e%2e/x"}, reasons.ARGUMENT_PATH_UNSAFE),
    ({"path": "/srv/reports/\u0000x"}, reasons.ARGUMENT_PATH_UNSAFE),
    ({"path": "/srv/reportsadmin/x"}, reasons.ARGUMENT_OUTSIDE_PREFIX),
    ({"path": "/etc/passwd"}, reasons.ARGUMENT_OUTSIDE_PREFIX),
    ({}, reasons.ARGUMENT_MISSING),
    ({"path": None}, reasons.ARGUMENT_MISSING),
    ({"path": ["/srv/reports/q1"]}, reasons.ARGUMENT_TYPE),
    ({"path": "/srv/reports/q1", "encoding": "utf-16"}, reasons.ARGUMENT_NOT_ALLOWED),
    ({"path": "/srv/reports/q1", "max_bytes": 10 ** 6}, reasons.ARGUMENT_ABOVE_MAX),
    ({"path": "/srv/reports/q1", "max_bytes": False}, reasons.ARGUMENT_TYPE),
])
def test_calls_outside_the_constraints_are_json_rpc_errors_with_the_reason(
        stack: Stack, arguments: dict[str, Any], reason: str) -> None:
    d = stack.check(check_request(stack.token, tool_call("read_file", arguments)))
    assert (d.allowed, d.status, d.reason) == (False, 200, reason)  # 200: the agent's session goes on
    assert d.headers["content-type"] == "application/json" and "www-authenticate" not in d.headers


def test_tools_and_methods_the_token_lacks_are_scope_denied(stack: Stack) -> None:
    assert stack.check(check_request(stack.token, tool_call("delete_file", {"path": "/srv/reports/q1"}))
                       ).reason == reasons.SCOPE_DENIED
    assert stack.check(check_request(stack.token, rpc("resources/read", {"uri": "file:///etc"}))
                       ).reason == reasons.SCOPE_DENIED
    # A notification or a response answers nothing: denied with the plain route's status.
    for body in (rpc("notifications/roots/list_changed", id=None), rpc("ping", id=None)):
        d = stack.check(check_request(stack.minted_without_session, body))
        assert (d.status, d.reason) == (403, reasons.SCOPE_DENIED)
    response = json.dumps({"jsonrpc": "2.0", "id": 4, "result": {"action": "accept"}}).encode()
    assert stack.check(check_request(stack.token, response)).allowed  # the session grant covers it
    d = stack.check(check_request(stack.minted_without_session, response))
    assert (d.status, d.reason) == (403, reasons.SCOPE_DENIED)
    # The event stream and the session's end: the session grant, nothing else.
    for method in ("GET", "DELETE"):
        assert stack.check(check_request(stack.token, method=method)).allowed
        assert stack.check(check_request(stack.minted_without_session, method=method)).reason == \
            reasons.SCOPE_DENIED


def test_a_constrained_grant_does_not_cover_a_request_without_arguments(stack: Stack) -> None:
    # The same tool/target/operation through a route that sends no body: nothing to check, so no.
    d = stack.check(check_request(stack.token, extensions={"tool": "read_file", "target": "files",
                                                           "operation": "call", "sensitivity": "internal"}))
    assert (d.status, d.reason) == (403, reasons.ARGUMENTS_UNAVAILABLE)


def test_malformed_bodies_are_400_through_the_daemon_and_no_token_is_still_401(stack: Stack) -> None:
    for body in (b"[" + tool_call("echo") + b"]", b"{", BAD_BODIES["duplicate argument"]):
        d = stack.check(check_request(stack.token, body))
        assert (d.allowed, d.status) == (False, 400) and d.reason.startswith("mcp_")
        assert "www-authenticate" not in d.headers
    assert stack.check(check_request(None, b"[]")).reason == reasons.TOKEN_MISSING
    truncated = check_request(stack.token, tool_call("echo"), headers={"x-envoy-auth-partial-body": "true"})
    assert stack.check(truncated).reason == reasons.MCP_BODY_TRUNCATED


def test_a_body_on_a_route_not_marked_mcp_is_ignored(stack: Stack) -> None:
    request = check_request(stack.token, tool_call("read_file", {"path": "/etc/shadow"}),
                            extensions={"tool": "echo", "target": "files", "operation": "call",
                                        "sensitivity": "internal"})
    assert stack.check(request).allowed  # decided from the route: the echo grant, no arguments involved
    assert stack.check(plain(stack.token, "echo", "files", "call")).allowed


# -- through a real Envoy ------------------------------------------------------------------------------


def test_through_envoy(stack: Stack, tmp_path: Path) -> None:
    proxy, admin = free_port(), free_port()
    budgeted = stack.client.mint("envoy-budget", [grant("search")]).token
    demo = stack.client.mint("demo", [grant("demo", "*", ("read", "write"))]).token
    ticker = stack.client.mint("ticker", [grant("ticker", "*", ("read",))]).token
    with echo_upstream() as upstream, \
            envoy(envoy_config(stack.daemon.check_port, upstream, proxy, admin), tmp_path, admin):
        status, body, _ = post(proxy, tool_call("read_file", {"path": "/srv/reports/q1"}), stack.token)
        assert status == 200, body
        assert body["path"] == "/mcp" and "authorization" not in body["headers"]
        assert body["headers"]["x-agentauthz-agent"] == AGENT
        # A denied request: a JSON-RPC error answering its id, at 200 (the agent's session goes on).
        status, body, headers = post(proxy, rpc("tools/call", {"name": "read_file", "arguments": {
            "path": "/srv/reports/../../etc"}}, id="call-7"), stack.token)
        assert (status, headers["content-type"], body["jsonrpc"], body["id"]) == (
            200, "application/json", "2.0", "call-7")
        assert body["error"]["code"] == DENIED_CODE and "www-authenticate" not in headers
        assert body["error"]["data"]["reason"] == reasons.ARGUMENT_PATH_UNSAFE
        assert body["error"]["data"]["status"] == 403
        assert "argument path: a path under /srv/reports" in body["error"]["message"]
        status, body, _ = post(proxy, b"[" + tool_call("echo") + b"]", stack.token)
        assert (status, body) == (400, {"error": reasons.MCP_BATCH_REFUSED})
        status, body, _ = post(proxy, tool_call("echo"), stack.token, content_type="text/plain")
        assert (status, body) == (400, {"error": reasons.MCP_BODY_INVALID})
        # Over Envoy's max_request_bytes: cut and flagged, then refused here.
        huge = tool_call("echo", {"pad": "a" * (mcp.MAX_BODY_BYTES + 10)})
        status, body, _ = post(proxy, huge, stack.token)
        assert (status, body) == (400, {"error": reasons.MCP_BODY_TRUNCATED})
        status, body, _ = post(proxy, tool_call("echo"), None)
        assert (status, body) == (401, {"error": reasons.TOKEN_MISSING})
        for _ in range(5):
            assert "error" not in post(proxy, tool_call("search", {"q": "x"}), budgeted)[1]
        status, body, _ = post(proxy, tool_call("search", {"q": "x"}), budgeted)
        assert (status, body["error"]["data"]["reason"]) == (200, reasons.BUDGET_EXHAUSTED)
        # The example's other routes are untouched: no body goes to agentauthz there.
        status, body, _ = post(proxy, b"[not json", demo, path="/demo/reports")
        assert status == 200, body
        # A rate-limited budget on a plain route: Envoy passes 429 and Retry-After on.
        assert [request(proxy, "/ticker/x", token=ticker)[0] for _ in range(2)] == [200, 200]
        status, body, headers = request(proxy, "/ticker/x", token=ticker)
        assert (status, body) == (429, {"error": reasons.RATE_LIMITED})
        assert 1 <= int(headers["retry-after"]) <= 4
