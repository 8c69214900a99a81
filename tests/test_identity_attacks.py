"""Identity attacks on Mint, against a real daemon: every refusal is UNAUTHENTICATED and audited.

Extends tests/test_api_mtls.py (which checks that hostile certificates mint nothing) and
tests/test_jwtsvid.py (the JWT-SVID refusals and that no bearer reaches a log): here each hostile
certificate or JWT-SVID must be refused at a known layer, and every refusal the daemon can see
must leave an ``authn`` record naming why. Certificates are built with agentauthz.identity.devca.

The daemon terminates the API's TLS itself (agentauthz/serve/tls_front.py): the handshake completes
whatever certificate is presented, or none, so even a chain no TLS stack would verify (another CA,
an impostor CA with the CA's name, expiry, name constraints, a server-only EKU, a leaf used as a
CA, no certificate at all) reaches identity.py, and the caller gets UNAUTHENTICATED naming why,
with exactly one ``authn`` record of it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterator

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from processes import Daemon, wait_for

from agentauthz.audit.verify import verify_dir
from agentauthz.client import Identity
from agentauthz.identity.devca import CertAndKey, DevPki, ensure_dev_pki, issue_svid, make_ca, make_leaf
from agentauthz.v1 import agentauthz_pb2 as pb
from agentauthz.v1 import agentauthz_pb2_grpc as pb_grpc

AGENT = "spiffe://dev.local/agent/alpha"
RUNTIME = "spiffe://dev.local/runtime/r1"  # carries JWT-SVID bearers; the dev policy grants it nothing
AUDIENCE = "https://agentauthz.dev.local"  # the daemon's issuer name, the JWT-SVID audience
EC_ISS, RSA_ISS = "https://oidc.example/ec", "https://oidc.example/rsa"
EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
NOW = datetime.now(timezone.utc)
SENT: list[str] = []  # every bearer sent: none may reach the audit log or the daemon log


# -- the daemon, its audit log, and calling Mint ------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("identity-attacks")
    ec_jwks = work / "ec.jwks"
    ec_jwks.write_text(json.dumps({"keys": [{**ECAlgorithm.to_jwk(EC_KEY.public_key(), as_dict=True),
                                              "kid": "ec1"}]}))
    rsa_jwks = work / "rsa.jwks"
    rsa_jwks.write_text(json.dumps({"keys": [{**RSAAlgorithm.to_jwk(RSA_KEY.public_key(), as_dict=True),
                                               "kid": "rsa1"}]}))
    d = Daemon(work / "state", {"jwt_issuers": [
        {"issuer": EC_ISS, "jwks_file": str(ec_jwks), "algorithms": ["ES256"]},
        {"issuer": RSA_ISS, "jwks_file": str(rsa_jwks), "algorithms": ["RS256"]},
    ]}).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def pki(daemon: Daemon) -> DevPki:
    return ensure_dev_pki(daemon.state_dir)


@pytest.fixture(scope="module")
def runtime(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Identity:
    out = tmp_path_factory.mktemp("runtime")
    issue_svid(pki, RUNTIME, out)
    return Identity.from_dir(out)


def authn(d: Daemon, decision: bool | None = None) -> list[dict[str, Any]]:
    return [r for r in d.audit_records()
            if r.get("kind") == "authn" and (decision is None or r["decision"] is decision)]


def mint(d: Daemon, credentials: grpc.ChannelCredentials, *bearers: str) -> pb.MintResponse:
    SENT.extend(bearers)
    with grpc.secure_channel(d.api_address, credentials) as channel:
        return pb_grpc.AgentAuthzStub(channel).Mint(
            pb.MintRequest(task="attack", grants=[pb.Grant(tool="demo", target="*", operations=["read"])]),
            metadata=tuple(("authorization", f"Bearer {b}") for b in bearers), timeout=5)


def credentials(pki: DevPki, leaf: CertAndKey, chain: bytes = b"") -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(pki.ca_cert_pem, leaf.key_pem, leaf.cert_pem + chain)


def refused_and_audited(d: Daemon, call: Callable[[], Any], why: str, transport: str | None) -> None:
    """``call`` is refused UNAUTHENTICATED naming ``why``, and exactly that refusal is recorded."""
    before = len(authn(d, False))
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
    details = err.value.details()
    assert details.startswith("identity_invalid: ") and why in details, details
    wait_for(lambda: len(authn(d, False)) > before, 10, "the authn refusal record")
    new = authn(d, False)[before:]
    assert len(new) == 1, new
    record = new[0]
    assert record["reason"] == "identity_invalid"
    assert record["detail"] == details.removeprefix("identity_invalid: ")
    assert record["transport"] == transport
    assert "agent" not in record or record["agent"] is None  # nobody was authenticated


# -- X.509-SVIDs that reach the daemon: UNAUTHENTICATED and an authn record -----------------------------

DAY = timedelta(days=1)


def uri(spiffe_id: str) -> Callable[[DevPki], CertAndKey]:
    """A leaf from the right CA, everything right but its one URI SAN."""
    return lambda p: make_leaf(p.ca, [spiffe_id])


SVIDS: dict[str, tuple[Callable[[DevPki], CertAndKey], str]] = {
    # X509-SVID §2, §5.2 and SPIFFE-ID §2: one URI SAN, a valid SPIFFE ID, of this trust domain.
    "x509-svid-2:another-trust-domain": (uri("spiffe://evil.example/agent/alpha"),
                                         "not in trust domain 'dev.local'"),
    "x509-svid-2:look-alike-trust-domain": (uri("spiffe://dev.local.evil.example/agent/a"),
                                            "not in trust domain 'dev.local'"),
    "x509-svid-2:two-uri-sans": (lambda p: make_leaf(p.ca, [AGENT, "spiffe://dev.local/admin/root"]),
                                 "2 URI SANs"),
    "x509-svid-2:no-uri-san-only-dns": (lambda p: make_leaf(p.ca, [], hosts=["localhost"]), "0 URI SANs"),
    "x509-svid-2:no-san-at-all": (lambda p: make_leaf(p.ca, []), "0 URI SANs"),
    "x509-svid-3.1:trust-domain-id-as-leaf": (uri("spiffe://dev.local"), "has no path"),
    "spiffe-id-2.2:percent-encoded": (uri("spiffe://dev.local/agent/%61lpha"),
                                      "percent-encoding"),
    "spiffe-id-2.2:percent-encoded-slash": (uri("spiffe://dev.local/agent%2Falpha"),
                                            "percent-encoding"),
    "spiffe-id-2.2:dot-dot-segment": (uri("spiffe://dev.local/agent/../admin/root"),
                                      "dot segment"),
    "spiffe-id-2.2:dot-segment": (uri("spiffe://dev.local/agent/./alpha"), "dot segment"),
    "spiffe-id-2.2:empty-segment": (uri("spiffe://dev.local/agent//alpha"),
                                    "empty segment"),
    "spiffe-id-2.2:trailing-slash": (uri("spiffe://dev.local/agent/alpha/"),
                                     "must not end with '/'"),
    "spiffe-id-2.2:character-outside-the-set": (uri("spiffe://dev.local/agent/al*pha"),
                                                "character outside"),
    "spiffe-id-2.1:upper-case-trust-domain": (uri("spiffe://DEV.local/agent/alpha"),
                                              "must be lowercase"),
    "spiffe-id-2.1:port": (uri("spiffe://dev.local:443/agent/alpha"), "port"),
    "spiffe-id-2.1:userinfo": (uri("spiffe://admin@dev.local/agent/alpha"), "userinfo"),
    "spiffe-id-2:query": (uri("spiffe://dev.local/agent/alpha?role=admin"), "a query"),
    "spiffe-id-2:fragment": (uri("spiffe://dev.local/agent/alpha#admin"), "a fragment"),
    "spiffe-id-2:upper-case-scheme": (uri("SPIFFE://dev.local/agent/alpha"), "scheme"),
    "spiffe-id-2:https-scheme": (uri("https://dev.local/agent/alpha"), "scheme"),
    "spiffe-id-2:no-authority": (uri("spiffe:dev.local/agent/alpha"), "is not of the form"),
    "spiffe-id-2.3:longer-than-2048-bytes": (lambda p: make_leaf(p.ca, ["spiffe://dev.local/" + "a" * 2048]),
                                             "longer than 2048"),
    # X509-SVID §4.1, §4.3, §5.2: a CA never authenticates as a workload; key usage is checked.
    "x509-svid-4.1:ca-certificate-as-leaf": (lambda p: make_leaf(p.ca, [AGENT], is_ca=True),
                                             "is a CA certificate"),
    "x509-svid-4.1:ca-with-key-cert-sign-as-leaf": (
        lambda p: make_leaf(p.ca, [AGENT], is_ca=True, key_usage=("digital_signature", "key_cert_sign")),
        "is a CA certificate"),
    "x509-svid-4.3:key-cert-sign-on-a-leaf": (
        lambda p: make_leaf(p.ca, [AGENT], key_usage=("digital_signature", "key_cert_sign")), "keyCertSign"),
    "x509-svid-4.3:crl-sign-on-a-leaf": (
        lambda p: make_leaf(p.ca, [AGENT], key_usage=("digital_signature", "crl_sign")), "cRLSign"),
    "x509-svid-4.3:no-key-usage": (lambda p: make_leaf(p.ca, [AGENT], key_usage=None), "no keyUsage"),
    # X509-SVID §3.2 / RFC 5280 §4.2.1.9: the dev CA allows no intermediate below it.
    "rfc5280-4.2.1.9:intermediate-beyond-the-path-length": (
        lambda p: make_leaf(_intermediate(p), [AGENT]), "allows 0 intermediates"),
}
_INTERMEDIATES: dict[int, CertAndKey] = {}


def _intermediate(p: DevPki) -> CertAndKey:
    return _INTERMEDIATES.setdefault(id(p), make_ca("rogue intermediate", issuer=p.ca, path_length=0))


@pytest.mark.parametrize("name", sorted(SVIDS))
def test_hostile_svid_is_unauthenticated_and_audited(daemon: Daemon, pki: DevPki, name: str) -> None:
    make, why = SVIDS[name]
    leaf = make(pki)
    chain = _intermediate(pki).cert_pem if "intermediate" in name else b""
    refused_and_audited(daemon, lambda: mint(daemon, credentials(pki, leaf, chain)), why, None)


# -- X.509 chains a TLS stack would refuse in the handshake: the daemon's own TLS front lets them reach it --


def _with_chain(ca: CertAndKey) -> tuple[CertAndKey, bytes]:
    return make_leaf(ca, [AGENT]), ca.cert_pem


def _signed_by_a_leaf(p: DevPki) -> tuple[CertAndKey, bytes]:
    holder = make_leaf(p.ca, ["spiffe://dev.local/agent/beta"])  # a genuine SVID, used as if it were a CA
    return make_leaf(holder, [AGENT]), holder.cert_pem


HANDSHAKE: dict[str, tuple[Callable[[DevPki], tuple[CertAndKey, bytes]], str]] = {
    "x509-svid-5.1:another-ca": (lambda p: (make_leaf(make_ca("evil CA"), [AGENT]), b""),
                                 "is not in the trust bundle"),
    "x509-svid-5.1:impostor-ca-with-the-same-name": (lambda p: (make_leaf(make_ca(), [AGENT]), b""),
                                                     "is not signed by trust bundle CA"),
    # The impostor signed the leaf, but the real CA did not sign the impostor.
    "x509-svid-5.1:impostor-ca-sent-along": (lambda p: _with_chain(make_ca()),
                                             "is not signed by trust bundle CA"),
    "rfc5280-4.1.2.5:expired": (lambda p: (make_leaf(p.ca, [AGENT], not_before=NOW - 2 * DAY,
                                                     not_after=NOW - DAY), b""), "expired at"),
    "rfc5280-4.1.2.5:not-yet-valid": (lambda p: (
        make_leaf(p.ca, [AGENT], not_before=NOW + timedelta(hours=1)), b""), "is not valid before"),
    "rfc5280-4.2.1.10:dns-name-outside-the-ca-constraint": (lambda p: (
        make_leaf(p.ca, [AGENT], hosts=["bank.example"]), b""),
        "DNS name 'bank.example' is outside the name constraints of trust bundle CA"),
    "x509-svid-4.4:server-auth-only-eku": (lambda p: (
        make_leaf(p.ca, [AGENT], extended_key_usage=[ExtendedKeyUsageOID.SERVER_AUTH]), b""),
        "does not include clientAuth"),
    "rfc5280-4.2.1.9:leaf-used-as-a-ca": (_signed_by_a_leaf, "intermediate 'O=agentauthz development' "
                                                             "is not a CA certificate"),
}


@pytest.mark.parametrize("name", sorted(HANDSHAKE))
def test_chains_a_tls_stack_refuses_are_unauthenticated_and_audited(daemon: Daemon, pki: DevPki,
                                                                     name: str) -> None:
    make, why = HANDSHAKE[name]
    leaf, chain = make(pki)
    refused_and_audited(daemon, lambda: mint(daemon, credentials(pki, leaf, chain)), why, None)


def test_a_genuine_svid_is_the_control(daemon: Daemon, pki: DevPki) -> None:
    minted = mint(daemon, credentials(pki, make_leaf(pki.ca, [AGENT])))
    assert minted.agent == AGENT and minted.token
    wait_for(lambda: any(r["kind"] == "mint" and r.get("token_id") == minted.token_id
                         for r in daemon.audit_records()), 10, "the mint record")


def test_no_client_certificate_is_unauthenticated_and_audited(daemon: Daemon, pki: DevPki) -> None:
    refused_and_audited(daemon, lambda: mint(daemon, grpc.ssl_channel_credentials(pki.ca_cert_pem)),
                        "the caller presented no client certificate", None)


# -- JWT-SVID bearers: each refusal UNAUTHENTICATED, audited with the transport SVID ---------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": EC_ISS, "sub": "spiffe://dev.local/agent/beta", "aud": [AUDIENCE], "exp": now + 120,
            "iat": now}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def compact(header: dict[str, Any], body: dict[str, Any], sign: Callable[[bytes], bytes] | None) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()) if sign else b'')}"


def es256_sig(message: bytes) -> bytes:
    """RFC 7518 §3.4: R || S, 32 bytes each."""
    r, s = decode_dss_signature(EC_KEY.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def es256(header: dict[str, Any] | None = None, **changes: Any) -> str:
    head = {"alg": "ES256", "kid": "ec1", "typ": "JWT", **(header or {})}
    return compact(head, claims(**changes), es256_sig)


def hs(alg: str, secret: bytes, **header: Any) -> str:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    return compact({"alg": alg, "kid": "ec1", "typ": "JWT", **header}, claims(),
                   lambda m: hmac.new(secret, m, digest).digest())


def ec_public(form: str) -> bytes:
    public, enc, fmt = EC_KEY.public_key(), serialization.Encoding, serialization.PublicFormat
    return {
        "pem": public.public_bytes(enc.PEM, fmt.SubjectPublicKeyInfo),
        "der": public.public_bytes(enc.DER, fmt.SubjectPublicKeyInfo),
        "openssh": public.public_bytes(enc.OpenSSH, fmt.OpenSSH),
        "jwk": json.dumps({**ECAlgorithm.to_jwk(public, as_dict=True), "kid": "ec1"}).encode(),
        "point": public.public_bytes(enc.X962, fmt.UncompressedPoint),
    }[form]


def attacker_jwk() -> str:
    """Signed by the attacker's own key, which the header carries (CVE-2018-0114)."""
    mine = ec.generate_private_key(ec.SECP256R1())
    head = {"alg": "ES256", "kid": "ec1", "jwk": ECAlgorithm.to_jwk(mine.public_key(), as_dict=True)}

    def sign(message: bytes) -> bytes:
        r, s = decode_dss_signature(mine.sign(message, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return compact(head, claims(), sign)


def der_signature() -> str:
    """The right key and claims, but the signature DER-encoded (RFC 7518 §3.4 requires R || S)."""
    head, body = json.dumps({"alg": "ES256", "kid": "ec1"}).encode(), json.dumps(claims()).encode()
    signing_input = f"{b64(head)}.{b64(body)}"
    return f"{signing_input}.{b64(EC_KEY.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))}"


BEARERS: dict[str, tuple[Callable[[], str], str]] = {
    # RFC 8725 §3.1, JWT-SVID §2.1; CVE-2015-9235 (alg none in other spellings).
    **{f"rfc8725-3.1:alg-{alg}": ((lambda a=alg: compact({"alg": a, "kid": "ec1"}, claims(), None)), "alg")
       for alg in ("None", "NONE", "nOnE", "none ")},
    # CVE-2016-10555, CVE-2022-29217, CVE-2024-33663, CVE-2024-37568: HMAC keyed with the public key.
    **{f"cve-2022-29217:{alg}-keyed-with-the-public-key-{form}": (
        (lambda a=alg, f=form: hs(a, ec_public(f))), "alg")
       for alg in ("HS256", "HS384", "HS512") for form in ("pem", "der", "openssh", "jwk", "point")},
    "cve-2015-9235:hs256-keyed-with-the-rsa-public-pem": (
        lambda: compact({"alg": "HS256", "kid": "rsa1"}, claims(iss=RSA_ISS), lambda m: hmac.new(
            RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo),
            m, hashlib.sha256).digest()), "alg"),
    "rfc8725-3.1:es256-header-rs256-key": (lambda: compact({"alg": "RS256", "kid": "ec1"}, claims(),
                                                           es256_sig), "does not allow RS256"),
    # JWT-SVID §2 (alg, kid, typ only), RFC 8725 §3.10: no key material, URLs or crit.
    "cve-2018-0114:attacker-jwk-signed-by-the-attacker": (attacker_jwk, "'jwk'"),
    "rfc7515-4.1.2:jku": (lambda: es256({"jku": "https://evil.example/jwks"}), "'jku'"),
    "rfc7515-4.1.5:x5u": (lambda: es256({"x5u": "https://evil.example/cert"}), "'x5u'"),
    "rfc7515-4.1.6:x5c": (lambda: es256({"x5c": ["MIIB"]}), "'x5c'"),
    "rfc7515-4.1.11:crit": (lambda: es256({"crit": ["exp"]}), "critical extension"),  # PyJWT refuses first
    "rfc7516:zip": (lambda: es256({"zip": "DEF"}), "'zip'"),
    "rfc7519-5.2:cty": (lambda: es256({"cty": "JWT"}), "'cty'"),
    "rfc8725-3.10:kid-path-traversal": (lambda: es256({"kid": "../../../../dev/null"}), "not a key of"),
    "rfc8725-3.10:kid-of-the-right-issuer-plus-nul": (lambda: es256({"kid": "ec1\x00"}), "not a key of"),
    "rfc8725-3.10:kid-missing": (lambda: compact({"alg": "ES256"}, claims(), es256_sig), "has no kid"),
    "rfc8725-3.11:typ-at+jwt": (lambda: es256({"typ": "at+jwt"}), "typ"),
    "rfc8725-3.11:typ-agentauthz+jwt": (lambda: es256({"typ": "agentauthz+jwt"}), "typ"),
    # RFC 8725 §3.8 (iss selects the keys; an unconfigured one is refused, never matched loosely).
    "rfc8725-3.8:iss-prefix": (lambda: es256(iss=EC_ISS[:-1]), "is not configured"),
    "rfc8725-3.8:iss-suffix": (lambda: es256(iss=EC_ISS + ".evil.example"), "is not configured"),
    "rfc8725-3.8:iss-trailing-slash": (lambda: es256(iss=EC_ISS + "/"), "is not configured"),
    "rfc8725-3.8:iss-list": (lambda: es256(iss=[EC_ISS]), "is not configured"),
    # RFC 8725 §3.9, JWT-SVID §3.2: aud must contain this daemon, exactly.
    "jwt-svid-3.2:aud-another-service": (lambda: es256(aud=["https://billing.example"]), "aud"),
    "jwt-svid-3.2:aud-prefix": (lambda: es256(aud=[AUDIENCE[:-1]]), "aud"),
    "jwt-svid-3.2:aud-suffix": (lambda: es256(aud=[AUDIENCE + ".evil.example"]), "aud"),
    "jwt-svid-3.2:aud-trailing-slash": (lambda: es256(aud=[AUDIENCE + "/"]), "aud"),
    "jwt-svid-3.2:aud-upper-case": (lambda: es256(aud=[AUDIENCE.upper()]), "aud"),
    "jwt-svid-3.2:aud-in-a-longer-string": (lambda: es256(aud=f"{AUDIENCE} https://evil.example"), "aud"),
    "jwt-svid-3.2:aud-empty-list": (lambda: es256(aud=[]), "aud"),
    "jwt-svid-3.2:aud-nested-list": (lambda: es256(aud=[[AUDIENCE]]), "aud"),
    # JWT-SVID §3.1, SPIFFE-ID §2: sub is one workload of this trust domain, in its one spelling.
    "jwt-svid-3.1:sub-percent-encoded": (lambda: es256(sub="spiffe://dev.local/agent/%61dmin"), "sub"),
    "jwt-svid-3.1:sub-dot-dot": (lambda: es256(sub="spiffe://dev.local/agent/../admin/root"), "sub"),
    "jwt-svid-3.1:sub-trailing-slash": (lambda: es256(sub="spiffe://dev.local/agent/beta/"), "sub"),
    "jwt-svid-3.1:sub-upper-case-trust-domain": (lambda: es256(sub="spiffe://DEV.local/agent/beta"), "sub"),
    "jwt-svid-3.1:sub-homoglyph": (lambda: es256(sub="spiffe://dev.local/agent/b\u0435ta"), "sub"),
    "jwt-svid-3.1:sub-userinfo": (lambda: es256(sub="spiffe://admin@dev.local/agent/beta"), "sub"),
    "jwt-svid-3.1:sub-look-alike-trust-domain": (lambda: es256(sub="spiffe://dev.local.evil.example/a/b"),
                                                 "sub"),
    "jwt-svid-3.1:sub-missing": (lambda: es256(sub=None), "sub"),
    # RFC 7519 §4.1.4-§4.1.6, JWT-SVID §3.3.
    "jwt-svid-3.3:exp-2**64": (lambda: es256(exp=2**64), "exp"),
    "jwt-svid-3.3:exp-string": (lambda: es256(exp=str(int(time.time()) + 120)), "exp"),
    "jwt-svid-3.3:exp-bool": (lambda: es256(exp=True), "exp"),
    "jwt-svid-3.3:exp-missing": (lambda: es256(exp=None), "exp"),
    "rfc7519-4.1.5:nbf-in-the-future": (lambda: es256(nbf=int(time.time()) + 600), "not yet valid"),
    "rfc7519-4.1.4:expired": (lambda: es256(exp=int(time.time()) - 600), "expired"),
    # RFC 7515 §7 and RFC 7518 §3.4: the shape and the signature encoding.
    "rfc7516-9:five-segment-jwe-shape": (lambda: ".".join([b64(b'{"alg":"dir","enc":"A256GCM"}'), "", "AAAA",
                                                           "AAAA", "AAAA"]), "not a JWT"),
    "rfc7515-7.2:json-serialization": (lambda: json.dumps({"payload": "e30", "signatures": []}), "not a JWT"),
    "rfc7518-3.4:der-encoded-ecdsa-signature": (der_signature, "refused"),
    "rfc7515-5.2:signature-of-other-claims": (
        lambda: ".".join(es256(sub="spiffe://dev.local/agent/admin").split(".")[:2]
                         + es256().split(".")[2:]), "refused"),
    # An agentauthz token is no JWT-SVID (RFC 8725 §3.12, mutually exclusive validation).
    "rfc8725-3.12:an-agentauthz-token-as-bearer": (
        lambda: compact({"alg": "EdDSA", "typ": "agentauthz+jwt", "kid": "k"}, claims(), lambda m: bytes(64)),
        "alg"),
}


@pytest.mark.parametrize("name", sorted(BEARERS))
def test_hostile_jwt_svid_is_unauthenticated_and_audited(daemon: Daemon, runtime: Identity,
                                                         name: str) -> None:
    make, why = BEARERS[name]
    bearer = make()
    refused_and_audited(daemon, lambda: mint(daemon, runtime.credentials(), bearer), why, RUNTIME)


def test_a_genuine_jwt_svid_is_the_control(daemon: Daemon, runtime: Identity) -> None:
    minted = mint(daemon, runtime.credentials(), es256())
    assert minted.agent == "spiffe://dev.local/agent/beta" and minted.token


def test_the_daemon_survives_every_attack_and_its_audit_log_verifies(daemon: Daemon, pki: DevPki) -> None:
    """Runs last: still serving, no traceback, no bearer in any log, the audit chain intact."""
    assert daemon.healthz() == 200
    assert mint(daemon, credentials(pki, make_leaf(pki.ca, [AGENT]))).token
    log = daemon.log()
    assert "Traceback" not in log, log[-4000:]
    audit = b"".join(p.read_bytes() for p in (daemon.state_dir / "audit").rglob("*.jsonl"))
    for bearer in SENT:
        for part in bearer.split(".")[1:]:
            if len(part) >= 24:
                assert part.encode() not in audit and part not in log, part[:40]
    refusals = authn(daemon, False)
    assert len(refusals) >= len(SVIDS) + len(BEARERS) + len(HANDSHAKE) + 1  # + no certificate at all
    pinned = (daemon.state_dir / "audit-key" / "public.pem").read_bytes()
    wait_for(lambda: verify_dir(daemon.state_dir / "audit", pinned).ok, 10, "a verifiable audit log")
