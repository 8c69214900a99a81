"""JWT-SVID bearer identities over real mTLS against the daemon process: only what the spec allows."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from processes import Daemon, wait_for

from agentauthz.client import Identity
from agentauthz.config import Config
from agentauthz.errors import ConfigError
from agentauthz.identity.devca import ensure_dev_pki, issue_svid
from agentauthz.identity.jwtsvid import MAX_JWT_BYTES, JwtIssuer, Verifier, bearer_token, load_keys
from agentauthz.identity.spiffe import IdentityError
from agentauthz.v1 import agentauthz_pb2 as pb
from agentauthz.v1 import agentauthz_pb2_grpc as pb_grpc

AUDIENCE = "https://agentauthz.dev.local"  # the daemon's default config.issuer
EC_ISS, RSA_ISS = "https://oidc.example/ec", "https://oidc.example/rsa"
RUNTIME = "spiffe://dev.local/runtime/r1"  # the transport SVID: the dev policy grants it nothing
AGENT = "spiffe://dev.local/agent/beta"
EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
SENT: list[str] = []  # every bearer sent, to prove none of them reaches the audit log or the log


def jwk_of(key: Any, kid: str, **extra: Any) -> dict[str, Any]:
    algorithm = ECAlgorithm if isinstance(key, ec.EllipticCurvePublicKey) else RSAAlgorithm
    return {**algorithm.to_jwk(key, as_dict=True), "kid": kid, **extra}


def write_jwks(path: Path, *keys: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"keys": list(keys)}))
    return path


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": EC_ISS, "sub": AGENT, "aud": [AUDIENCE], "exp": now + 120, "iat": now}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def es256(headers: dict[str, Any] | None = None, **changes: Any) -> str:
    return jwt.encode(claims(**changes), EC_KEY, algorithm="ES256", headers={"kid": "ec1", **(headers or {})})


def rsa_jwt(alg: str, **changes: Any) -> str:
    return jwt.encode(claims(**{"iss": RSA_ISS, **changes}), RSA_KEY, algorithm=alg, headers={"kid": "rsa1"})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw(header: dict[str, Any], body: dict[str, Any], sign: Any = None) -> str:
    """A compact JWS built by hand, for the tokens PyJWT (rightly) refuses to make."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()) if sign else b'')}"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("jwtsvid")
    ec_jwks = write_jwks(work / "ec.jwks", jwk_of(EC_KEY.public_key(), "ec1"))
    rsa_jwks = write_jwks(work / "rsa.jwks", jwk_of(RSA_KEY.public_key(), "rsa1"))
    d = Daemon(work / "state", {"jwt_issuers": [
        {"issuer": EC_ISS, "jwks_file": str(ec_jwks), "algorithms": ["ES256"]},
        {"issuer": RSA_ISS, "jwks_file": str(rsa_jwks), "algorithms": ["RS256", "PS256"]},
    ]}).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def runtime(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Identity:
    out = tmp_path_factory.mktemp("runtime")
    issue_svid(ensure_dev_pki(daemon.state_dir), RUNTIME, out)
    return Identity.from_dir(out)


def mint(d: Daemon, ident: Identity, *bearers: str, scheme: str = "Bearer") -> pb.MintResponse:
    SENT.extend(bearers)
    with grpc.secure_channel(d.api_address, ident.credentials()) as channel:
        return pb_grpc.AgentAuthzStub(channel).Mint(
            pb.MintRequest(task="t", grants=[pb.Grant(tool="demo", target="*", operations=["read"])]),
            metadata=tuple(("authorization", f"{scheme} {b}") for b in bearers), timeout=5)


def payload(token: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))


@pytest.mark.parametrize("make", [lambda: es256(), lambda: rsa_jwt("RS256"), lambda: rsa_jwt("PS256")],
                         ids=["ES256", "RS256", "PS256"])
def test_a_valid_jwt_svid_names_the_caller_and_bounds_the_token(daemon: Daemon, runtime: Identity,
                                                                 make: Any) -> None:
    bearer = make()
    minted = mint(daemon, runtime, bearer)
    token = payload(minted.token)
    assert minted.agent == token["sub"] == AGENT  # the JWT's subject, not the certificate's
    assert "cnf" not in token  # the bearer proved the identity, not the certificate
    assert token["exp"] <= payload(bearer)["exp"] < token["iat"] + 600  # the JWT, not policy, capped it


def test_without_a_bearer_the_certificate_is_the_caller(daemon: Daemon, runtime: Identity) -> None:
    with pytest.raises(grpc.RpcError) as err:
        mint(daemon, runtime)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED  # runtime/r1 has no grants


def _hs256_with_the_public_key() -> str:
    pem = EC_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return raw({"alg": "HS256", "kid": "ec1", "typ": "JWT"}, claims(),
               lambda m: hmac.new(pem, m, hashlib.sha256).digest())


def _tampered() -> str:
    head, body, sig = es256().split(".")
    forged = claims(sub="spiffe://dev.local/agent/admin")
    return f"{head}.{b64(json.dumps(forged).encode())}.{sig}"


def _attacker_key_in_header() -> str:
    mine = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(claims(), mine, algorithm="ES256",
                      headers={"kid": "ec1", "jwk": jwk_of(mine.public_key(), "ec1")})


REFUSED = {
    "alg-none": (lambda: raw({"alg": "none", "kid": "ec1"}, claims()), "alg"),
    "hs256-public-key": (_hs256_with_the_public_key, "alg"),
    "eddsa": (lambda: jwt.encode(claims(), ed25519.Ed25519PrivateKey.generate(), algorithm="EdDSA",
                                 headers={"kid": "ec1"}), "alg"),
    "alg-not-allowed-for-issuer": (lambda: rsa_jwt("RS512"), "does not allow RS512"),
    "wrong-aud": (lambda: es256(aud=["https://elsewhere"]), "aud"),
    "missing-aud": (lambda: es256(aud=None), "aud"),
    "expired": (lambda: es256(exp=int(time.time()) - 300), "expired"),
    "no-exp": (lambda: es256(exp=None), "exp"),
    "unknown-issuer": (lambda: es256(iss="https://evil.example"), "not configured"),
    "unknown-kid": (lambda: es256(headers={"kid": "nope"}), "kid"),
    "kid-of-another-issuer": (lambda: rsa_jwt("RS256", iss=EC_ISS), "kid"),
    "jwk-in-header": (_attacker_key_in_header, "jwk"),
    "bad-typ": (lambda: es256(headers={"typ": "at+jwt"}), "typ"),
    "sub-not-spiffe": (lambda: es256(sub="agent-beta"), "sub"),
    "sub-other-trust-domain": (lambda: es256(sub="spiffe://other.example/agent/beta"), "sub"),
    "sub-empty-path": (lambda: es256(sub="spiffe://dev.local"), "sub"),
    "tampered-signature": (_tampered, "Signature"),
    "oversized": (lambda: es256(pad="x" * MAX_JWT_BYTES), "larger"),
    "not-a-jwt": (lambda: "not.a.jwt", "not a JWT"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_bearers_are_unauthenticated(daemon: Daemon, runtime: Identity, name: str) -> None:
    make, why = REFUSED[name]
    with pytest.raises(grpc.RpcError) as err:
        mint(daemon, runtime, make())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
    assert err.value.details().startswith("identity_invalid: ") and why in err.value.details()


def test_an_authorization_that_is_not_one_bearer_is_refused_not_ignored(daemon: Daemon,
                                                                          runtime: Identity) -> None:
    for bearers, scheme in (([es256()], "Basic"), ([es256(), es256()], "Bearer")):
        with pytest.raises(grpc.RpcError) as err:
            mint(daemon, runtime, *bearers, scheme=scheme)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "identity_invalid" in err.value.details()


def test_no_bearer_reaches_the_audit_log_or_the_daemon_log(daemon: Daemon, runtime: Identity) -> None:
    mint(daemon, runtime, es256())
    for make, _ in REFUSED.values():
        with pytest.raises(grpc.RpcError):
            mint(daemon, runtime, make())

    def authn() -> list[dict[str, Any]]:
        lines = b"".join(p.read_bytes() for p in audit_files(daemon)).splitlines()
        return [json.loads(line) for line in lines if b'"authn"' in line]
    # Each refusal is audited (the API raises gRPC's metadata limit so even an oversized bearer reaches us).
    wait_for(lambda: sum(not r["decision"] for r in authn()) >= len(REFUSED), 10, "authn audit records")
    assert any(r["decision"] and r["agent"] == AGENT and r["transport"] == RUNTIME for r in authn())
    text = b"".join(p.read_bytes() for p in audit_files(daemon)) + daemon.log().encode()
    for bearer in SENT:
        for segment in bearer.split(".")[1:]:  # the payload and signature are unique to each token
            assert len(segment) < 8 or segment.encode() not in text


def audit_files(d: Daemon) -> list[Path]:
    return [p for p in (d.state_dir / "audit").rglob("*") if p.is_file()]


def test_a_bearer_without_configured_issuers_is_refused(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "state").start()
    try:
        issue_svid(ensure_dev_pki(d.state_dir), AGENT, tmp_path / "id")
        with pytest.raises(grpc.RpcError) as err:
            mint(d, Identity.from_dir(tmp_path / "id"), es256())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "no JWT-SVID issuer is configured" in err.value.details()
    finally:
        d.stop()


# -- configuration: refused before anything starts --------------------------------------------------


def issuer(tmp_path: Path, algorithms: tuple[str, ...] = ("ES256",), *keys: dict[str, Any]) -> JwtIssuer:
    jwks = write_jwks(tmp_path / "k.jwks", *(keys or (jwk_of(EC_KEY.public_key(), "ec1"),)))
    return JwtIssuer(EC_ISS, jwks, algorithms)


def test_config_loads_issuers_from_a_file(tmp_path: Path) -> None:
    jwks = issuer(tmp_path).jwks_file
    config = Config.from_mapping({"jwt_issuers": [
        {"issuer": EC_ISS, "jwks_file": str(jwks), "algorithms": ["ES256"]}]})
    assert config.jwt_issuers == (JwtIssuer(EC_ISS, jwks, ("ES256",)),)
    assert set(load_keys(config.jwt_issuers[0])) == {("ec1", "ES256")}


@pytest.mark.parametrize("alg", ["HS256", "none", "EdDSA", "ES256K"])
def test_config_refuses_algorithms_outside_the_jwt_svid_set(tmp_path: Path, alg: str) -> None:
    with pytest.raises(ConfigError, match="algorithms must be among"):
        Config(jwt_issuers=(issuer(tmp_path, ("ES256", alg)),))


@pytest.mark.parametrize("key, message", [
    ({"kty": "oct", "k": b64(b"s" * 32), "kid": "h"}, "not RSA or EC"),
    ({**jwk_of(EC_KEY.public_key(), "ec1"), "d": "AAAA"}, "private key"),
    (jwk_of(rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key(), "r"), "2048"),
    ({**jwk_of(EC_KEY.public_key(), "ec1"), "alg": "ES384"}, "has no key"),
], ids=["hmac-key", "private-key", "short-rsa", "alg-mismatch"])
def test_config_refuses_unusable_keys(tmp_path: Path, key: dict[str, Any], message: str) -> None:
    algorithms = ("RS256",) if key.get("kty") == "RSA" else ("ES256",)
    with pytest.raises(ConfigError, match=message):
        Config(jwt_issuers=(issuer(tmp_path, algorithms, key),))


def test_config_refuses_a_missing_or_invalid_jwks_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read JWKS"):
        Config(jwt_issuers=(JwtIssuer(EC_ISS, tmp_path / "missing.jwks", ("ES256",)),))
    (tmp_path / "bad.jwks").write_text('{"keys": {}}')
    with pytest.raises(ConfigError, match="not a JWKS"):
        Config(jwt_issuers=(JwtIssuer(EC_ISS, tmp_path / "bad.jwks", ("ES256",)),))
    with pytest.raises(ConfigError, match="jwt_issuers must be a list"):
        Config.from_mapping({"jwt_issuers": [{"issuer": EC_ISS, "jwks_url": "https://x"}]})


def test_the_daemon_does_not_start_with_a_missing_jwks(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "state", {"jwt_issuers": [
        {"issuer": EC_ISS, "jwks_file": str(tmp_path / "missing.jwks"), "algorithms": ["ES256"]}]})
    with pytest.raises(RuntimeError, match="cannot read JWKS"):
        d.start()


# -- the verifier and the metadata parser, without a daemon ------------------------------------------


def test_verifier_size_cap_comes_before_any_parsing(tmp_path: Path) -> None:
    v = Verifier([issuer(tmp_path)], AUDIENCE, "dev.local", 30)
    assert v.verify(es256()).spiffe_id == AGENT
    with pytest.raises(IdentityError, match="larger than"):
        v.verify("A" * (MAX_JWT_BYTES + 1))


def test_bearer_token_from_metadata() -> None:
    assert bearer_token([("x-other", "v")]) is None
    assert bearer_token([("authorization", "bearer abc")]) == "abc"  # RFC 7235 §2.1: scheme is case-blind
    for bad in ([("authorization", "Basic abc")], [("authorization", "Bearer ")],
                [("authorization", "Bearer a"), ("authorization", "Bearer b")]):
        with pytest.raises(IdentityError):
            bearer_token(bad)
