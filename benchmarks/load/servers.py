"""The comparison servers for Check, each run as its own process.

    python -m benchmarks.load.servers floor --listen 127.0.0.1:PORT
    python -m benchmarks.load.servers parse --listen 127.0.0.1:PORT
    python -m benchmarks.load.servers naive --listen 127.0.0.1:PORT --jwks FILE

Both run on grpc.aio + uvloop, exactly like the daemon, so a difference in the
tables is the decision, not the framework:

* ``floor`` answers every Check with one constant, pre-serialized OK without
  deserializing the request: the most a Python gRPC server can do on this
  machine; nothing authorizing can be faster.
* ``parse`` is the floor plus parsing the CheckRequest and reading its
  bearer header: what any authorizer pays before it decides anything.
* ``naive`` is the ext_authz servicer a Python developer would write: the
  generated ``AuthorizationServicer``, PyJWT ``jwt.decode`` on every call, a
  Python set of revoked token ids, a grant check and a CheckResponse message
  built per call.
"""

from __future__ import annotations

import argparse
import base64
import json
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_authz_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

SERVICE = "envoy.service.auth.v3.Authorization"
OK_RESPONSE = ext_authz.CheckResponse(status=status_pb2.Status(code=code_pb2.OK),
                                      ok_response=ext_authz.OkHttpResponse()).SerializeToString()


async def serve_floor(listen: str, parse: bool = False) -> None:
    """Generic handler, no (de)serializers: the request bytes are never parsed.

    ``parse``: the request is parsed and its bearer header read, the least any authorizer must do
    before deciding anything; the bound on what a real decision can reach, measured.
    """
    async def check(request: bytes, context: Any) -> bytes:
        return OK_RESPONSE

    async def check_parsed(request: ext_authz.CheckRequest, context: Any) -> bytes:
        request.attributes.request.http.headers.get("authorization")
        return OK_RESPONSE

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        check_parsed if parse else check, response_serializer=None,
        request_deserializer=ext_authz.CheckRequest.FromString if parse else None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Check": handler}),))
    server.add_insecure_port(listen)
    await server.start()
    await server.wait_for_termination()


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_keys(jwks: dict[str, Any]) -> dict[str, Any]:
    """kid -> Ed25519 public key, from the daemon's published JWKS (RFC 8037 OKP keys)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    return {k["kid"]: Ed25519PublicKey.from_public_bytes(_b64url(k["x"]))
            for k in jwks["keys"] if k.get("kty") == "OKP" and k.get("crv") == "Ed25519"}


def _covers(grant: dict[str, Any], tool: str, target: str, operation: str) -> bool:
    pattern = grant.get("target", "")
    target_ok = pattern == "*" or pattern == target or (
        pattern.endswith("*") and target.startswith(pattern[:-1]))
    return grant.get("tool") == tool and target_ok and operation in grant.get("ops", ())


class NaiveAuthorization(ext_authz_grpc.AuthorizationServicer):
    """What a Python developer would write first: correct, readable, and slow in the obvious places."""

    def __init__(self, keys: dict[str, Any], issuer: str, audience: str) -> None:
        import jwt  # PyJWT
        self._jwt = jwt
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self.revoked: set[str] = set()  # the revocation list: token ids

    def _deny(self, http_status: int, reason: str) -> ext_authz.CheckResponse:
        code = code_pb2.UNAUTHENTICATED if http_status == 401 else code_pb2.PERMISSION_DENIED
        return ext_authz.CheckResponse(
            status=status_pb2.Status(code=code, message=reason),
            denied_response=ext_authz.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=http_status), body=json.dumps({"error": reason})))

    async def Check(self, request: ext_authz.CheckRequest, context: Any) -> ext_authz.CheckResponse:
        attrs = request.attributes
        value = attrs.request.http.headers.get("authorization", "")
        if not value.lower().startswith("bearer "):
            return self._deny(401, "token_missing")
        token = value[7:]
        try:
            kid = str(self._jwt.get_unverified_header(token).get("kid"))
            claims = self._jwt.decode(token, self._keys[kid], algorithms=["EdDSA"],
                                      audience=self._audience, issuer=self._issuer)
        except (KeyError, self._jwt.InvalidTokenError):
            return self._deny(401, "token_invalid")
        if claims.get("jti") in self.revoked:
            return self._deny(401, "token_revoked")
        ext = attrs.context_extensions
        if not any(_covers(g, ext.get("tool", ""), ext.get("target", ""), ext.get("operation", ""))
                   for g in claims.get("grants", ())):
            return self._deny(403, "scope_denied")
        headers = [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=str(v)))
                   for k, v in (("x-agent", claims["sub"]), ("x-task", claims.get("task", "")),
                                ("x-token-id", claims["jti"]))]
        return ext_authz.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=ext_authz.OkHttpResponse(headers=headers, headers_to_remove=["authorization"]))


async def serve_naive(listen: str, jwks_path: str, issuer: str, audience: str) -> None:
    with open(jwks_path) as f:
        keys = public_keys(json.load(f))
    server = grpc.aio.server()
    ext_authz_grpc.add_AuthorizationServicer_to_server(NaiveAuthorization(keys, issuer, audience), server)
    server.add_insecure_port(listen)
    await server.start()
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["floor", "parse", "naive"])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--jwks", help="naive: the daemon's JWKS as a file")
    parser.add_argument("--issuer", default="https://agentauthz.dev.local")
    parser.add_argument("--audience", default="tools")
    args = parser.parse_args(argv)
    import uvloop
    if args.kind in ("floor", "parse"):
        uvloop.run(serve_floor(args.listen, parse=args.kind == "parse"))
    else:
        if not args.jwks:
            parser.error("naive needs --jwks")
        uvloop.run(serve_naive(args.listen, args.jwks, args.issuer, args.audience))


if __name__ == "__main__":
    main()
