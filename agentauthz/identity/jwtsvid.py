"""JWT-SVID bearer identities for API callers, verified as the JWT-SVID spec and RFC 8725 require."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import jwt

from ..errors import ConfigError
from .spiffe import IdentityError, _show, parse_spiffe_id

# JWT-SVID §2.1: RFC 7518 §3.3-3.5 only; never "none", HMAC (a public key is no secret) or EdDSA.
ALGORITHMS = frozenset(f"{f}{n}" for f in ("RS", "ES", "PS") for n in (256, 384, 512))
_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
# JWT-SVID §2: no other header may appear, so jwk/jku/x5u/x5c key material and crit are refused.
_HEADER = frozenset({"alg", "kid", "typ"})
MAX_JWT_BYTES = 8192  # unauthenticated input: bound the parsing work before any signature check


@dataclass(frozen=True)
class JwtIssuer:
    """One trusted issuer: its ``iss``, the JWKS file of its keys, the algorithms it may use."""

    issuer: str
    jwks_file: Path
    algorithms: tuple[str, ...]
    audience: str | None = None  # None: the verifier's own (this daemon); approvers name their client id


@dataclass(frozen=True)
class JwtSvid:
    """A verified JWT-SVID: who it names, who issued it, and until when."""

    spiffe_id: str
    issuer: str
    not_after: datetime


def issuers_from(value: Any) -> tuple[JwtIssuer, ...]:
    """Parse the ``jwt_issuers`` setting; unknown or missing members are errors."""
    fields = {"issuer", "jwks_file", "algorithms"}
    if not isinstance(value, list) or not all(isinstance(i, Mapping) and set(i) == fields
                                              and isinstance(i["algorithms"], list) for i in value):
        raise ConfigError("jwt_issuers must be a list of {issuer, jwks_file, algorithms: [..]}, exactly")
    return tuple(JwtIssuer(i["issuer"], Path(str(i["jwks_file"])), tuple(i["algorithms"])) for i in value)


def load_keys(issuer: JwtIssuer) -> dict[tuple[str, str], jwt.PyJWK]:
    """(kid, alg) -> verification key of one issuer, from its JWKS file; ConfigError says why not."""
    name, algorithms = issuer.issuer, issuer.algorithms
    if not isinstance(name, str) or not name:
        raise ConfigError("jwt_issuers issuer must be a non-empty string")
    if not algorithms or not all(isinstance(a, str) and a in ALGORITHMS for a in algorithms):
        raise ConfigError(f"issuer {name}: algorithms must be among {sorted(ALGORITHMS)} (JWT-SVID §2.1), "
                          f"got {list(algorithms)}")
    try:
        keys = json.loads(Path(issuer.jwks_file).read_text(encoding="utf-8")).get("keys")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError) as exc:
        raise ConfigError(f"issuer {name}: cannot read JWKS {issuer.jwks_file}: {exc}") from None
    if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
        raise ConfigError(f"issuer {name}: {issuer.jwks_file} is not a JWKS (RFC 7517 §5)")
    out: dict[tuple[str, str], jwt.PyJWK] = {}
    kids = [k.get("kid") for k in keys]
    for jwk in keys:
        kid, kty = jwk.get("kid"), jwk.get("kty")
        if not isinstance(kid, str) or not kid or kids.count(kid) > 1:
            raise ConfigError(f"issuer {name}: every key needs its own non-empty kid, got {kid!r}")
        if "d" in jwk:  # a published private key is a leaked one
            raise ConfigError(f"issuer {name}: key {kid} is a private key")
        if kty not in ("RSA", "EC"):  # "oct" would be HMAC, "OKP" EdDSA
            raise ConfigError(f"issuer {name}: key {kid} has kty {kty!r}, not RSA or EC")
        for alg in (a for a in algorithms if _fits(jwk, a)):
            try:
                key = out[(kid, alg)] = jwt.PyJWK(jwk, alg)
            except jwt.PyJWTError as exc:
                raise ConfigError(f"issuer {name}: key {kid} is not a valid {alg} key: {exc}") from None
            if kty == "RSA" and key.key.key_size < 2048:  # RFC 7518 §3.3, §3.5
                raise ConfigError(f"issuer {name}: key {kid} is RSA-{key.key.key_size}; RS/PS need 2048 bits")
    if not out:
        raise ConfigError(f"issuer {name}: {issuer.jwks_file} has no key for {list(algorithms)}")
    return out


def _fits(jwk: dict[str, Any], alg: str) -> bool:
    """Whether ``jwk`` may verify ``alg``: RSA for RS/PS, the algorithm's own curve for ES."""
    # RFC 7517 §4.2, §4.4: a key not for signing serves nothing; one naming its algorithm serves that one.
    if jwk.get("use", "sig") != "sig" or jwk.get("alg", alg) != alg:
        return False
    return jwk.get("crv") == _CURVES[alg] if alg in _CURVES else jwk["kty"] == "RSA"


def bearer_token(metadata: Iterable[Any] | None) -> str | None:
    """The JWT of the ``authorization: Bearer`` metadata entry (JWT-SVID §5.3), None when absent."""
    values = [v for k, v in metadata or () if k == "authorization"]
    if not values:
        return None
    if len(values) > 1:  # two credentials: which one would the caller believe it used?
        raise IdentityError("more than one authorization metadata entry")
    scheme, _, token = str(values[0]).partition(" ")
    if scheme.lower() != "bearer" or not token.strip():  # RFC 6750 §2.1; anything else is refused
        raise IdentityError("authorization metadata must be 'Bearer <JWT-SVID>'")
    return token.strip()


class Verifier:
    """Verifies JWT-SVIDs presented to this daemon (its ``issuer`` is the audience)."""

    kind = "JWT-SVID"  # names the credential in refusals
    types: tuple[str, ...] = ("JWT", "JOSE")  # JWT-SVID §2.3

    def __init__(self, issuers: Iterable[JwtIssuer], audience: str, trust_domain: str, leeway: int) -> None:
        issuers = tuple(issuers)
        self._keys = {i.issuer: load_keys(i) for i in issuers}
        self._audiences = {i.issuer: i.audience or audience for i in issuers}
        self._audience, self._trust_domain, self._leeway = audience, trust_domain, leeway

    def verify(self, token: str) -> JwtSvid:
        """The identity ``token`` proves, or IdentityError naming the first rule it breaks."""
        claims = self.verified_claims(token)
        try:
            sub = parse_spiffe_id(claims["sub"])  # JWT-SVID §3.1
        except IdentityError as exc:
            raise IdentityError(f"JWT-SVID sub is not a SPIFFE ID: {exc}") from None
        if not sub.member_of(self._trust_domain) or not sub.path:
            raise IdentityError(f"JWT-SVID sub {sub} is not a workload of {self._trust_domain!r}")
        return JwtSvid(str(sub), claims["iss"], datetime.fromtimestamp(int(claims["exp"]), timezone.utc))

    def verified_claims(self, token: str) -> dict[str, Any]:
        """The claims of ``token`` once its issuer's key, algorithm, audience and times check out."""
        kind = self.kind
        if len(token.encode("utf-8")) > MAX_JWT_BYTES:
            raise IdentityError(f"bearer token is larger than {MAX_JWT_BYTES} bytes")
        if not self._keys:  # never fall back to the certificate's identity behind the caller's back
            raise IdentityError(f"a bearer token was sent but no {kind} issuer is configured")
        try:  # PyJWT's messages are fixed text (plus at most a header name): they never echo the token
            unverified = jwt.decode_complete(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise IdentityError(f"bearer token is not a JWT: {_show(str(exc), 120)}") from None
        header, claims = unverified["header"], unverified["payload"]
        extra = sorted(set(header) - _HEADER)
        if extra:
            raise IdentityError(f"{kind} header must not carry {_show(extra[0])} (JWT-SVID §2)")
        alg, typ, kid, iss = header.get("alg"), header.get("typ", "JWT"), header.get("kid"), claims.get("iss")
        if not isinstance(alg, str) or alg not in ALGORITHMS:  # JWT-SVID §2.1, RFC 8725 §3.1
            raise IdentityError(f"{kind} alg {_show(str(alg))} is not RS/ES/PS (JWT-SVID §2.1)")
        if typ not in self.types:
            raise IdentityError(f"{kind} typ {_show(str(typ))} is not one of {', '.join(self.types)}")
        # The unverified iss only chooses whose keys and algorithms to verify with (RFC 8725 §3.8).
        keys = self._keys.get(iss) if isinstance(iss, str) else None
        if keys is None:
            raise IdentityError(f"{kind} issuer {_show(str(iss))} is not configured")
        if kid is None:  # JWT-SVID §2.2 makes kid optional; we select keys only by it
            raise IdentityError(f"{kind} has no kid")
        key = keys.get((kid, alg))
        if key is None:
            known = any(k == kid for k, _ in keys)
            raise IdentityError(f"issuer {_show(iss)} does not allow {alg} with key {_show(kid)}" if known
                                else f"kid {_show(kid)} is not a key of issuer {_show(iss)}")
        audience = self._audiences[iss]
        try:
            claims = jwt.decode(token, key, algorithms=[alg], audience=audience, issuer=iss,
                                leeway=self._leeway, options={"require": ["exp", "aud", "sub"]})
        except jwt.ExpiredSignatureError:
            raise IdentityError(f"{kind} has expired") from None
        except jwt.InvalidAudienceError:  # JWT-SVID §3.2
            raise IdentityError(f"{kind} aud does not contain {audience!r}") from None
        except jwt.PyJWTError as exc:
            raise IdentityError(f"{kind} refused: {_show(str(exc), 120)}") from None
        exp = claims["exp"]  # JWT-SVID §3.3; PyJWT would also take the string "123"
        if not isinstance(exp, (int, float)) or isinstance(exp, bool) or not exp < 1 << 40:
            raise IdentityError(f"{kind} exp is not a NumericDate in range (RFC 7519 §2)")
        return claims
