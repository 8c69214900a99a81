"""Human approvers: OIDC/JWT bearers from configured issuers, never an agent's identity.

Verification reuses ``jwtsvid.Verifier`` (per-issuer JWKS and algorithm allowlist, RS/ES/PS only: no
``none``, no HMAC); only the subject rule differs. In development the daemon trusts an approver issuer
of its own, whose key lives in the state directory beside the development CA.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from .. import durable
from ..errors import ConfigError, StateError
from ..identity.jwtsvid import JwtIssuer, Verifier, load_keys
from ..identity.spiffe import IdentityError, _show

DEV_ISSUER = "https://approvers.dev.local"
DEV_AUDIENCE = "agentauthz-approvals"
DEV_DIR = "approver"  # under the state directory
DEV_ALGORITHM = "ES256"
DEV_CREDENTIAL_TTL = 900  # a dev human credential is good for a quarter of an hour by default
MAX_DEV_CREDENTIAL_TTL = 12 * 3600
MAX_SUBJECT_CHARS = 256
_FIELDS = frozenset({"issuer", "jwks_file", "algorithms", "audience"})


@dataclass(frozen=True)
class Human:
    """A verified approver: the token's subject at its issuer."""

    subject: str
    issuer: str

    @property
    def name(self) -> str:
        """How the approver is shown in requests, tokens and audit: subject, then issuer."""
        return f"{self.subject} ({self.issuer})"


def approvers_from(value: Any) -> tuple[JwtIssuer, ...]:
    """Parse the ``approvers`` setting; every member names issuer, JWKS file, algorithms and audience."""
    if not isinstance(value, list) or not all(isinstance(i, Mapping) and set(i) == _FIELDS
                                              and isinstance(i["algorithms"], list) for i in value):
        raise ConfigError("approvers must be a list of {issuer, jwks_file, algorithms: [..], audience}, "
                          "exactly")
    return tuple(JwtIssuer(i["issuer"], Path(str(i["jwks_file"])), tuple(i["algorithms"]), i["audience"])
                 for i in value)


def approver_problems(approvers: Any, agent_issuers: Iterable[JwtIssuer], daemon_issuer: str,
                      development: bool) -> list[str]:
    """Why these approver issuers cannot be trusted next to the agents' issuers; empty when they can."""
    if not isinstance(approvers, tuple) or not all(isinstance(i, JwtIssuer) for i in approvers):
        return ["approvers must be a list of {issuer, jwks_file, algorithms, audience}"]
    out = []
    agents = {i.issuer for i in agent_issuers if isinstance(i, JwtIssuer)}
    names = [i.issuer for i in approvers] or ([DEV_ISSUER] if development else [])
    for issuer in approvers:
        if not isinstance(issuer.audience, str) or not issuer.audience.strip():
            out.append(f"approver {issuer.issuer}: audience must be a non-empty string")
        try:
            load_keys(issuer)  # now, so that a bad JWKS stops the start rather than the first human
        except ConfigError as exc:
            out.append(f"approvers: {exc}")
    for name in names:
        # One issuer for agents and humans would let an agent's JWT-SVID pass for a person's approval.
        if name in agents:
            out.append(f"approver issuer {name} is also an agent (jwt_issuers) issuer: agents could approve")
        if name == daemon_issuer:
            out.append(f"approver issuer {name} is this daemon's own token issuer")
    if any(names.count(n) > 1 for n in names):
        out.append("approvers names an issuer twice")
    return out


class HumanVerifier(Verifier):
    """Verifies approver bearers; an agent (a SPIFFE ID) is refused whatever its issuer."""

    kind = "approver token"
    types = ("JWT", "JOSE", "at+jwt")  # OIDC ID tokens, and OAuth access tokens in JWT form (RFC 9068)

    def __init__(self, issuers: Iterable[JwtIssuer], leeway: int) -> None:
        issuers = tuple(issuers)
        if not all(i.audience for i in issuers):  # the daemon's own audience belongs to agents
            raise ConfigError("every approver issuer needs its own audience")
        super().__init__(issuers, audience="", trust_domain="", leeway=leeway)

    def verify_human(self, token: str) -> Human:
        """The human ``token`` names, or IdentityError naming the first rule it breaks."""
        claims = self.verified_claims(token)
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub.strip() or len(sub) > MAX_SUBJECT_CHARS:
            raise IdentityError(f"approver sub must be a name of 1-{MAX_SUBJECT_CHARS} characters")
        if not sub.isprintable():
            raise IdentityError("approver sub has control characters")
        if sub.strip().lower().startswith("spiffe:"):  # a workload identity, whoever signed it
            raise IdentityError(f"approver sub {_show(sub)} is a SPIFFE ID: agents never approve")
        return Human(sub, claims["iss"])


# -- the development approver issuer ------------------------------------------------------------------


def dev_issuer(state_dir: Path) -> JwtIssuer:
    """The development approver issuer of ``state_dir``, created on first use.

    Daemons that share one development CA (``--pki-dir``: several nodes of a development cluster) share
    it too, inside that CA's directory, so a development human approves on any of them.
    """
    from ..identity.devca import pki_dir_of
    pki = pki_dir_of(Path(state_dir))
    directory = pki / DEV_DIR if pki != Path(state_dir) / "pki" else Path(state_dir) / DEV_DIR
    if not (directory / "jwks.json").is_file():
        _create(directory)
    return JwtIssuer(DEV_ISSUER, directory / "jwks.json", (DEV_ALGORITHM,), DEV_AUDIENCE)


def approver_issuers(approvers: tuple[JwtIssuer, ...], state_dir: Path,
                     development: bool) -> tuple[JwtIssuer, ...]:
    """Whom the daemon trusts to approve: the configured issuers, else (in development) its own."""
    return approvers or ((dev_issuer(state_dir),) if development else ())


def _create(directory: Path) -> None:
    # Built in a private temporary directory and renamed into place: a crash never leaves half an
    # issuer, and a racing creator (the daemon and `dev-human` at once) simply loses the rename.
    tmp = directory.with_name(f".{directory.name}-{secrets.token_hex(4)}.tmp")
    tmp.mkdir(mode=0o700, parents=True)
    try:
        key = ec.generate_private_key(ec.SECP256R1())
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        kid = hashlib.sha256(public).hexdigest()[:16]
        jwk = {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "alg": DEV_ALGORITHM,
               "use": "sig"}
        durable.write_new(tmp / "key.pem", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        durable.write_new(tmp / "jwks.json", json.dumps({"keys": [jwk]}).encode(), 0o644)
        try:
            os.rename(tmp, directory)
        except OSError:
            if not (directory / "jwks.json").is_file():
                raise
        durable.fsync_dir(directory.parent)
    except OSError as exc:
        raise StateError(f"{directory}: cannot create the development approver issuer: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def issue_dev_credential(state_dir: Path, name: str, ttl: int = DEV_CREDENTIAL_TTL,
                         now: float | None = None) -> str:
    """A short-lived JWT naming the human ``name``, signed by the development approver issuer."""
    if (not isinstance(name, str) or not name.strip() or len(name) > MAX_SUBJECT_CHARS
            or not name.isprintable()):
        raise IdentityError(f"a human's name must be 1-{MAX_SUBJECT_CHARS} printable characters")
    if name.strip().lower().startswith("spiffe:"):
        raise IdentityError("a SPIFFE ID names a workload, not a human: agents never approve")
    if type(ttl) is not int or not 0 < ttl <= MAX_DEV_CREDENTIAL_TTL:
        raise IdentityError(f"ttl must be 1-{MAX_DEV_CREDENTIAL_TTL} seconds")
    issuer = dev_issuer(state_dir)
    key_path = issuer.jwks_file.with_name("key.pem")
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        kid = json.loads(issuer.jwks_file.read_text())["keys"][0]["kid"]
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the key is not an EC key")
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise StateError(f"{key_path.parent}: development approver issuer is unreadable: {exc}") from exc
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"iss": DEV_ISSUER, "sub": name, "aud": DEV_AUDIENCE, "iat": issued,
                              "exp": issued + ttl, "jti": secrets.token_urlsafe(12)}
    return jwt.encode(claims, key, algorithm=DEV_ALGORITHM, headers={"kid": kid, "typ": "JWT"})

