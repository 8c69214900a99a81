"""The client's hand-written ext_authz wire format, held to the protobuf runtime on Envoy's own messages.

The client encodes the CheckRequest and decodes the CheckResponse itself (agentauthz/check_wire.py) so
it needs no Envoy protos; here xds-protos is the oracle: the request is byte-for-byte what protobuf
writes, and every response, the daemon's own included, decodes as protobuf reads it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2 as attrs
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2
from hypothesis import example, given
from hypothesis import strategies as st

from agentauthz import reasons
from agentauthz.check_wire import Answer, CheckResponseMalformed, decode_check_response
from agentauthz.client import check_request, decision_from
from agentauthz.decision import _accel
from agentauthz.serve import extauthz

text = st.text(max_size=40)


def protobuf_request(token: str | None, tool: str, target: str, operation: str, sensitivity: str,
                     method: str, path: str, boundary: str) -> bytes:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    extensions = {"tool": tool, "target": target, "operation": operation, "sensitivity": sensitivity}
    if boundary:
        extensions["boundary"] = boundary
    return ext_authz.CheckRequest(attributes=attrs.AttributeContext(
        request=attrs.AttributeContext.Request(http=attrs.AttributeContext.HttpRequest(
            method=method, path=path, headers=headers)),
        context_extensions=extensions)).SerializeToString(deterministic=True)


@given(st.none() | text, text, text, text, text, text, text, text)
@example("a.b.c", "demo", "reports", "read", "internal", "POST", "/", "")
@example(None, "", "", "", "", "", "", "")
def test_the_check_request_is_what_protobuf_writes(token: str | None, tool: str, target: str,
                                                   operation: str, sensitivity: str, method: str, path: str,
                                                   boundary: str) -> None:
    mine = check_request(token, tool, target, operation, sensitivity, method=method, path=path,
                         boundary=boundary)
    assert mine == protobuf_request(token, tool, target, operation, sensitivity, method, path, boundary)


def oracle(raw: bytes) -> Answer:
    """What the client answered when it parsed with xds-protos (its code before check_wire)."""
    response = ext_authz.CheckResponse.FromString(raw)
    decision_id = response.dynamic_metadata.fields["decision_id"].string_value
    if response.HasField("ok_response") or (response.status.code == 0 and response.HasField("status")):
        headers = {h.header.key: h.header.value for h in response.ok_response.headers}
        return Answer(True, 200, "allow", headers, decision_id)
    denied = response.denied_response
    headers = {h.header.key: h.header.value for h in denied.headers}
    reason = json.loads(denied.body)["error"] if denied.body else response.status.message
    return Answer(False, int(denied.status.code), reason, headers, decision_id)


def options(pairs: list[tuple[str, str]]) -> list[base_pb2.HeaderValueOption]:
    return [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v)) for k, v in pairs]


int32 = st.integers(-(2**31), 2**31 - 1)
headers = st.lists(st.tuples(st.sampled_from(["content-type", "x-a", ""]), text), max_size=3)
values = st.one_of(text.map(lambda s: struct_pb2.Value(string_value=s)),
                   st.floats(allow_nan=False).map(lambda f: struct_pb2.Value(number_value=f)),
                   st.booleans().map(lambda b: struct_pb2.Value(bool_value=b)),
                   st.just(struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)))


@st.composite
def responses(draw: Any) -> ext_authz.CheckResponse:
    response = ext_authz.CheckResponse()
    if draw(st.booleans()):
        response.status.CopyFrom(status_pb2.Status(code=draw(st.sampled_from([0, 7, 16]) | int32),
                                                   message=draw(text)))
    if draw(st.booleans()):
        body = draw(st.just("") | text.map(lambda s: json.dumps({"error": s})))
        response.denied_response.CopyFrom(ext_authz.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=draw(st.sampled_from([401, 403, 429, 503]) | int32)),
            headers=options(draw(headers)), body=body))
    if draw(st.booleans()):
        response.ok_response.CopyFrom(ext_authz.OkHttpResponse(headers=options(draw(headers))))
    for key in draw(st.lists(st.sampled_from(["decision_id", "other"]), max_size=2)):
        response.dynamic_metadata.fields[key].CopyFrom(draw(values))
    return response


@given(st.lists(responses(), min_size=1, max_size=3))
def test_a_check_response_decodes_as_protobuf_reads_it(parts: list[ext_authz.CheckResponse]) -> None:
    # Concatenated messages are one merged message to protobuf: singular fields last-wins, messages merge.
    raw = b"".join(part.SerializeToString() for part in parts)
    assert decode_check_response(raw) == oracle(raw)


def test_the_daemons_own_responses_decode_as_protobuf_reads_them(hot: _accel.HotPath) -> None:
    ids = extauthz.decision_ids(hot)
    decision_id = ids.next()
    allow = hot.allow_response("spiffe://example.org/agent/a", "t1", "jti-1") + ids.metadata(decision_id)
    assert decision_from(allow) == decision_from(allow)
    assert decode_check_response(allow) == oracle(allow)
    assert decode_check_response(allow)[::4] == (True, decision_id)
    for reason in (reasons.TOKEN_MISSING, reasons.TOKEN_EXPIRED, reasons.RATE_LIMITED,
                   reasons.INTERNAL_ERROR):
        for raw in (extauthz.denied_response(reason), extauthz.denied_response(reason, retry_after=3)):
            raw += ids.metadata(decision_id)
            assert decode_check_response(raw) == oracle(raw)
            assert decode_check_response(raw)[:3] == (False, extauthz.http_status_for(reason), reason)


def test_a_truncated_denial_never_reads_as_an_allow() -> None:
    raw = extauthz.denied_response(reasons.TOKEN_EXPIRED)
    for cut in range(len(raw)):
        try:
            answer = decode_check_response(raw[:cut])
        except CheckResponseMalformed:
            continue
        assert not answer.allowed, cut


@pytest.mark.parametrize("raw, says", [
    (b"\x0a\x05\x08", "truncated"),
    (b"\x0a", "varint"),
    (b"\x0b", "wire type 3"),
    (b"\x12\x05\x1a\x03\xff\xfe\xfd", "not UTF-8"),
    (b"\x12\x05\x1a\x03abc", "body is not"),
    (b"\x00", "field number 0"),
], ids=["truncated", "key-cut", "group", "utf8", "body", "zero"])
def test_a_malformed_response_is_a_specific_error(raw: bytes, says: str) -> None:
    with pytest.raises(CheckResponseMalformed, match=says):
        decision_from(raw)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_allow_only_where_protobuf_reads_an_allow(raw: bytes) -> None:
    try:
        answer = decode_check_response(raw)
    except CheckResponseMalformed:
        return
    if answer.allowed:
        assert ext_authz.CheckResponse.FromString(raw) and oracle(raw).allowed


# The daemon's own dependencies (grpc_health and grpc_reflection are left out: grpc itself imports them
# when they are installed).
DAEMON_ONLY = {"envoy", "xds", "udpa", "validate", "aiohttp", "prometheus_client", "uvloop", "yaml", "jwt",
               "OpenSSL", "orjson"}


def test_the_client_imports_none_of_the_daemons_dependencies() -> None:
    probe = ("import sys\nimport agentauthz.client\n"
             f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {DAEMON_ONLY!r}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         check=True)
    assert out.stdout.split() == ["[]"], out.stdout
