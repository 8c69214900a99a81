"""The comparison servers for Check, each run as its own process.

    python -m benchmarks.load.servers floor --listen 127.0.0.1:PORT
    python -m benchmarks.load.servers parse --listen 127.0.0.1:PORT
    python -m benchmarks.load.servers answer --listen 127.0.0.1:PORT
    python -m benchmarks.load.servers record --listen 127.0.0.1:PORT
    python -m benchmarks.load.servers verify --listen 127.0.0.1:PORT --jwks FILE
    python -m benchmarks.load.servers naive --listen 127.0.0.1:PORT --jwks FILE

All run on grpc.aio + uvloop, exactly like the daemon, so a difference in the
tables is the decision, not the framework:

* ``floor`` answers every Check with one constant, pre-serialized OK without
  deserializing the request: the most a Python gRPC server can do on this
  machine; nothing authorizing can be faster.
* ``answer`` is the floor answering, instead of a bare OK, the bytes agentauthz
  allows with: three headers for the tool, the bearer removed, a decision id in
  Envoy's dynamic metadata (README "Check"; DESIGN §5). Envoy spends time on
  each, so through Envoy this is the hop's cost with the answer the design asks for.
* ``parse`` is the floor plus parsing the CheckRequest and reading its
  bearer header: what any authorizer pays before it decides anything.
* ``record`` is ``parse`` plus what an allow that is audited before it is
  answered cannot skip: one hash-chained record of ~400 bytes appended to a
  file with write(2) per Check, answered with agentauthz's allow (``answer``'s
  bytes). The bound on warm Check, measured.
* ``verify`` is ``record`` plus one bare PyNaCl Ed25519 verify of the token's
  signature: the bound on a Check whose token is not cached (cold).
* ``naive`` is the ext_authz servicer a Python developer would write: the
  generated ``AuthorizationServicer``, PyJWT ``jwt.decode`` on every call, a
  Python set of revoked token ids, a grant check and a CheckResponse message
  built per call.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from envoy.service.auth.v3 import external_auth_pb2_grpc as ext_authz_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from agentauthz.serve.extauthz import bearer_token, parse_check_request

from .bound import ChainedLog, b64url, verify_keys, verify_token

SERVICE = "envoy.service.auth.v3.Authorization"
OK_RESPONSE = ext_authz.CheckResponse(status=status_pb2.Status(code=code_pb2.OK),
                                      ok_response=ext_authz.OkHttpResponse()).SerializeToString()


def allow_answer() -> bytes:
    """agentauthz's allow for one token and one decision id, as the daemon serializes it."""
    from agentauthz.decision import _accel
    from agentauthz.decision.tokens import new_token_id
    from agentauthz.serve import extauthz

    from .daemon import AGENT
    ids = extauthz.decision_ids(_accel.ACTIVE)
    return _accel.ACTIVE.allow_response(AGENT, "bench-warm", new_token_id()) + ids.metadata(ids.next())


async def serve_floor(listen: str, parse: bool = False, answer: bytes = OK_RESPONSE) -> None:
    """Generic handler, no (de)serializers: the request bytes are never parsed.

    ``parse``: the request is parsed and its bearer header read, the least any authorizer must do
    before deciding anything, with agentauthz's own parser (the native wire scan), the fastest this
    project has; the bound on what a real decision can reach, measured.
    """
    async def check(request: bytes, context: Any) -> bytes:
        return answer

    async def check_parsed(request: Any, context: Any) -> bytes:
        bearer_token(request[0])  # request: extauthz.parse_check_request's fields
        return OK_RESPONSE

    await _serve(listen, check_parsed if parse else check, parse)


async def _serve(listen: str, check: Any, parse: bool) -> None:
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        check, response_serializer=None,
        request_deserializer=parse_check_request if parse else None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Check": handler}),))
    server.add_insecure_port(listen)
    await server.start()
    await server.wait_for_termination()


async def serve_bound(listen: str, jwks_path: str | None) -> None:
    """``record`` (no ``jwks_path``) or ``verify``: the unavoidable work of an audited allow."""
    keys = {}
    if jwks_path:
        with open(jwks_path) as f:
            keys = verify_keys(json.load(f))
    await _serve(listen, bound_handler(keys, allow_answer()), True)


def bound_handler(keys: dict[str, Any], answer: bytes = OK_RESPONSE) -> Any:
    """The bound's Check handler over parsed fields: one hash-chained record appended to a file of its
    own with write(2) (``bound.ChainedLog``), after, when ``keys`` (kid -> VerifyKey) are given, one bare
    PyNaCl verify of the token's signature and a plain ``json.loads`` of its claims
    (``bound.verify_token``); then ``answer``."""
    log = ChainedLog()

    async def check(request: Any, context: Any) -> bytes:
        token = bearer_token(request[0]) or ""
        if keys:
            verify_token(keys, token)
        log.append()
        return answer

    return check


def public_keys(jwks: dict[str, Any]) -> dict[str, Any]:
    """kid -> Ed25519 public key, from the daemon's published JWKS (RFC 8037 OKP keys)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    return {k["kid"]: Ed25519PublicKey.from_public_bytes(b64url(k["x"]))
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
    parser.add_argument("kind", choices=["floor", "answer", "parse", "record", "verify", "naive"])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--jwks", help="naive, verify: the daemon's JWKS as a file")
    parser.add_argument("--issuer", default="https://agentauthz.dev.local")
    parser.add_argument("--audience", default="tools")
    args = parser.parse_args(argv)
    import uvloop
    if args.kind in ("verify", "naive") and not args.jwks:
        parser.error(f"{args.kind} needs --jwks")
    if args.kind in ("floor", "parse"):
        uvloop.run(serve_floor(args.listen, parse=args.kind == "parse"))
    elif args.kind == "answer":
        uvloop.run(serve_floor(args.listen, answer=allow_answer()))
    elif args.kind in ("record", "verify"):
        uvloop.run(serve_bound(args.listen, args.jwks if args.kind == "verify" else None))
    else:
        uvloop.run(serve_naive(args.listen, args.jwks, args.issuer, args.audience))


if __name__ == "__main__":
    main()
