"""The CheckRequest scan: the native twin reads the wire bytes, the pure twin the protobuf runtime.

Where the native scan answers it must answer exactly as the pure one (same fields, same protobuf
semantics for repeated and merged fields, the same refusal of invalid UTF-8); where it does not
know the shape it defers (None) and the pure twin decides. The real request Envoy sends, and every
request shaped like one, must take the native path: otherwise the fast path is never used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from hypothesis import given
from hypothesis import strategies as st
from support import damaged, native_or_fail

from agentauthz.client import check_request
from agentauthz.decision import _request_py
from agentauthz.decision.mcp import EXTENSION
from agentauthz.serve import extauthz

ENVOY_REQUEST = Path(__file__).parent / "corpus" / "envoy-check-request.bin"  # captured from Envoy 1.40


@pytest.fixture(scope="module")
def native() -> Any:
    native_or_fail()
    from agentauthz.decision import _request_c  # type: ignore[attr-defined]
    return _request_c.scan


def pure(raw: bytes) -> tuple[Any, ...] | None:
    fields = _request_py.scan(raw)
    return None if fields is None else (*fields[:7], None)


def agree(native: Any, raw: bytes) -> tuple[Any, ...] | None:
    """The native answer, after checking it is the pure one (or a deferral)."""
    mine = native(raw)
    if mine is not None:
        assert mine == pure(raw), raw
    return mine


def test_the_request_envoy_sends_takes_the_native_path(native: Any) -> None:
    raw = ENVOY_REQUEST.read_bytes()
    fields = agree(native, raw)
    assert fields is not None
    authorization, request_id, method, path, extensions, principal, certificate, message = fields
    assert authorization.startswith("Bearer ey") and (method, path) == ("GET", "/demo/reports")
    assert extensions == {"tool": "demo", "target": "reports", "operation": "read", "sensitivity": "internal"}
    assert request_id and (principal, certificate, message) == ("", "", None)
    assert extauthz.parse_check_request(raw)[:7] == fields[:7]


def test_the_clients_request_takes_the_native_path(native: Any) -> None:
    assert agree(native, check_request("a.b.c", "demo", "reports", "read", "internal")) is not None


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
KEYS = st.one_of(st.sampled_from(["authorization", "Authorization", "x-request-id", ":path", "mcp",
                                  "tool", "target", "boundary"]), TEXT)


@st.composite
def requests(draw: st.DrawFn) -> ext_authz.CheckRequest:
    """Requests of the shape Envoy sends (and a few it does not: body, header_map, metadata)."""
    message = ext_authz.CheckRequest()
    a = message.attributes
    for peer in (a.source, a.destination):
        if draw(st.booleans()):
            peer.address.socket_address.address = draw(TEXT)
            peer.address.socket_address.port_value = draw(st.integers(0, 65535))
        elif draw(st.booleans()):
            peer.address.pipe.path = draw(TEXT)
        peer.principal, peer.certificate, peer.service = draw(TEXT), draw(TEXT), draw(TEXT)
        peer.labels.update(draw(st.dictionaries(TEXT, TEXT, max_size=2)))
    http = a.request.http
    http.id, http.method, http.path, http.host, http.scheme = (draw(TEXT) for _ in range(5))
    http.protocol, http.query, http.fragment = draw(TEXT), draw(TEXT), draw(TEXT)
    http.size = draw(st.integers(-1, 1 << 40))
    http.headers.update(draw(st.dictionaries(KEYS, TEXT, max_size=6)))
    a.request.time.seconds = draw(st.integers(0, 1 << 40))
    a.context_extensions.update(draw(st.dictionaries(KEYS, TEXT, max_size=5)))
    if draw(st.booleans()):
        a.tls_session.sni = draw(TEXT)
    rare = draw(st.integers(0, 9))
    if rare == 0:
        http.body = draw(TEXT)
    elif rare == 1:
        http.header_map.headers.add(key="authorization", value="Bearer x")
    elif rare == 2:
        a.metadata_context.filter_metadata["f"].fields["k"].string_value = "v"
    return message


@given(requests())
def test_native_and_pure_agree_and_envoy_shapes_stay_native(native: Any, message: Any) -> None:
    raw = message.SerializeToString()
    fields = agree(native, raw)
    a = message.attributes
    unusual = (a.request.http.body or a.request.http.HasField("header_map") or a.HasField("metadata_context")
               or "mcp" in a.context_extensions)
    assert (fields is None) == bool(unusual)


@given(requests(), requests())
def test_repeated_messages_merge_as_protobuf_merges(native: Any, first: Any, second: Any) -> None:
    """Two serialized requests back to back are one merged request: scalars last-wins, maps key by key."""
    agree(native, first.SerializeToString() + second.SerializeToString())


@given(requests(), st.data())
def test_damaged_bytes_are_never_read_differently(native: Any, message: Any, data: st.DataObject) -> None:
    raw = damaged(message.SerializeToString(), data, edits=3)
    fields = agree(native, raw)
    if pure(raw) is None:  # what protobuf refuses the native scan never reads
        assert fields is None


def _ext(key: bytes, value: bytes) -> bytes:
    entry = b"\x0a" + bytes([len(key)]) + key + b"\x12" + bytes([len(value)]) + value
    attributes = b"\x52" + bytes([len(entry)]) + entry  # context_extensions = 10, LEN
    return b"\x0a" + bytes([len(attributes)]) + attributes


@pytest.mark.parametrize("raw, why", [
    (b"", "empty: no attributes"),
    (b"\x12\x00", "an unknown field of CheckRequest"),
    (b"\x08\x01", "attributes as a varint (a wire type the schema does not give it)"),
    (b"\x0a\x05\x0a\x03\x0a\x01", "a length past the end"),
    (b"\x0a\x02\x18\x01", "an unknown field of AttributeContext"),
    (_ext(EXTENSION.encode(), b"true"), "an MCP route reads the body: the pure twin keeps the message"),
])
def test_native_defers_what_it_does_not_know(native: Any, raw: bytes, why: str) -> None:
    assert agree(native, raw) is None, why


def test_invalid_utf8_anywhere_is_refused_by_both(native: Any) -> None:
    for raw in (_ext(b"tool", b"\xff"), _ext(b"\xc0\xaf", b"x"), _ext(b"tool", b"\xed\xa0\x80")):
        assert native(raw) is None and pure(raw) is None
        assert extauthz.parse_check_request(raw) is None  # answered as a recorded request_invalid
