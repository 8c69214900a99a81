"""Pure twin of ``native/_request_c.pyx``: the fields of an ext_authz CheckRequest a decision reads.

The protobuf runtime (upb) parses the whole message; the native twin scans the wire bytes for the
same fields and defers to this one for anything outside the part of the schema Envoy sends.
"""

from __future__ import annotations

from typing import Any

from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from google.protobuf.message import DecodeError

# (authorization header or None, request id, method, path, context_extensions, source principal,
#  source certificate, the parsed message: what an MCP route reads its body from)
Fields = tuple[str | None, str, str, str, dict[str, str], str, str, Any]


def scan(raw: bytes) -> Fields | None:
    """The fields of the CheckRequest in ``raw``; None when it is none (malformed, not UTF-8...)."""
    try:
        message = ext_authz.CheckRequest.FromString(raw)
    except DecodeError:
        return None
    attributes = message.attributes
    http, source = attributes.request.http, attributes.source
    return (http.headers.get("authorization"), http.id, http.method, http.path,
            dict(attributes.context_extensions), source.principal, source.certificate, message)
