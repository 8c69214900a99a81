"""Workload identity: SPIFFE IDs and X.509-SVID peers, checked as the SPIFFE specifications require."""

from __future__ import annotations

import base64
import hashlib
import string
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence, TypeVar
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..errors import AgentAuthzError

# JWT-SVID / OIDC bearer identities (DESIGN §4) are verified elsewhere; this module is X.509 only.


class IdentityError(AgentAuthzError):
    """A workload identity (SPIFFE ID or X.509-SVID) was refused; the message says why."""

    reason = "identity_invalid"


SCHEME = "spiffe"
MAX_ID_BYTES = 2048  # SPIFFE-ID §2.3
MAX_TRUST_DOMAIN_BYTES = 255  # SPIFFE-ID §2.3: the RFC 3986 host limit
MAX_INTERMEDIATES = 8  # a peer chain longer than this is refused before any signature is checked

_TRUST_DOMAIN_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")  # SPIFFE-ID §2.1
_PATH_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")  # SPIFFE-ID §2.2


def _show(text: str, limit: int = 64) -> str:
    """Quote caller-supplied text for a message, bounded so errors cannot flood logs."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


@dataclass(frozen=True)
class SpiffeId:
    """A parsed SPIFFE ID; ``path`` is empty or starts with ``/``."""

    trust_domain: str
    path: str

    def __str__(self) -> str:
        return f"{SCHEME}://{self.trust_domain}{self.path}"

    def member_of(self, trust_domain: str) -> bool:
        return self.trust_domain == trust_domain


def validate_trust_domain(name: str) -> str:
    """Return ``name`` if it is a valid trust domain name (SPIFFE-ID §2.1), else raise IdentityError."""
    if not isinstance(name, str) or not name:
        raise IdentityError("trust domain is empty")
    if len(name.encode("utf-8")) > MAX_TRUST_DOMAIN_BYTES:
        raise IdentityError(f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    bad = sorted(set(name) - _TRUST_DOMAIN_CHARS)
    if bad:
        if not set(name.lower()) - _TRUST_DOMAIN_CHARS:
            raise IdentityError(f"trust domain {_show(name)} must be lowercase")
        raise IdentityError(f"trust domain {_show(name)} has a character outside [a-z0-9._-]: {bad[0]!r}")
    return name


def parse_spiffe_id(text: str) -> SpiffeId:
    """Parse ``spiffe://<trust-domain>[/<path>]`` strictly, so that one identity has one spelling."""
    if not isinstance(text, str):
        raise IdentityError("a SPIFFE ID must be a string")
    if not text:
        raise IdentityError("SPIFFE ID is empty")
    if len(text.encode("utf-8")) > MAX_ID_BYTES:
        raise IdentityError(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes")
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise IdentityError(f"{_show(text)} is not of the form spiffe://<trust-domain>/<path>")
    if scheme != SCHEME:
        raise IdentityError(f"SPIFFE ID scheme must be exactly {SCHEME!r}, got {_show(scheme)}")
    # SPIFFE-ID §2: no query or fragment. §2.2 allows only unreserved characters, so there is no
    # percent-encoding: "a%2Fb" and "a/b" must never both name (or appear to name) a workload.
    for char, what in (("?", "a query"), ("#", "a fragment"), ("%", "percent-encoding")):
        if char in rest:
            raise IdentityError(f"SPIFFE ID must not contain {what}: {_show(text)}")
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        raise IdentityError("SPIFFE ID must not contain userinfo (SPIFFE-ID §2.1)")
    if ":" in authority:
        raise IdentityError("SPIFFE ID must not contain a port (SPIFFE-ID §2.1)")
    validate_trust_domain(authority)
    path = slash + tail
    if path:
        _check_path(path)
    return SpiffeId(authority, path)


def _check_path(path: str) -> None:
    # SPIFFE-ID §2.2: empty, "." and ".." segments and a trailing "/" would let two strings
    # that normalise to one path pass an exact-match authorization check differently.
    if path.endswith("/"):
        raise IdentityError(f"SPIFFE ID path must not end with '/': {_show(path)}")
    for segment in path[1:].split("/"):
        if not segment:
            raise IdentityError(f"SPIFFE ID path has an empty segment: {_show(path)}")
        if segment in (".", ".."):
            raise IdentityError(f"SPIFFE ID path has a dot segment {segment!r}")
        bad = sorted(set(segment) - _PATH_CHARS)
        if bad:
            raise IdentityError(f"SPIFFE ID path has a character outside [A-Za-z0-9._-]: {bad[0]!r}")


def certificate_thumbprint(der: bytes) -> str:
    """The RFC 8705 §3.1 ``x5t#S256`` value of a DER certificate: base64url SHA-256, no padding."""
    return _b64url(hashlib.sha256(der).digest())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class Svid:
    """A verified X.509-SVID peer: who it is, which certificate (for ``cnf``), and until when."""

    spiffe_id: str
    certificate_sha256: bytes
    not_after: datetime

    @property
    def x5t_s256(self) -> str:
        """The ``cnf`` member value for a token bound to this certificate (RFC 8705 §3.1)."""
        return _b64url(self.certificate_sha256)


def svid_from_pem(leaf_pem: bytes | str, trust_domain: str,
                  bundle: Sequence[x509.Certificate] | None = None, now: datetime | None = None) -> Svid:
    """Validate a PEM X.509-SVID (the leaf, optionally followed by intermediates) of ``trust_domain``."""
    return _svid(_load_pem(leaf_pem), trust_domain, bundle, now)


def _load_pem(pem: bytes | str) -> list[x509.Certificate]:
    data = pem.encode("ascii", "replace") if isinstance(pem, str) else bytes(pem)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise IdentityError(f"peer certificate is not valid PEM: {exc}") from None


def peer_from_der_chain(chain: Sequence[bytes], trust_domain: str,
                        bundle: Sequence[x509.Certificate] | None = None,
                        now: datetime | None = None) -> Svid:
    """Validate a DER chain in TLS order (leaf first, then intermediates) as an X.509-SVID."""
    if len(chain) > 1 + MAX_INTERMEDIATES:
        raise IdentityError(f"peer chain has more than {MAX_INTERMEDIATES} intermediates")
    try:
        certs = [x509.load_der_x509_certificate(bytes(der)) for der in chain]
    except ValueError as exc:
        raise IdentityError(f"peer certificate is not valid DER: {exc}") from None
    return _svid(certs, trust_domain, bundle, now)


def svid_from_grpc_context(context: Any, trust_domain: str,
                           bundle: Sequence[x509.Certificate] | None = None,
                           now: datetime | None = None) -> Svid:
    """The caller's X.509-SVID from a gRPC (sync or aio) servicer context on an mTLS connection."""
    auth = context.auth_context() or {}
    if auth.get("transport_security_type") != [b"ssl"]:
        raise IdentityError("the connection is not TLS: workload identity needs mTLS")
    leaf = auth.get("x509_pem_cert") or []
    if len(leaf) != 1 or not leaf[0]:
        raise IdentityError("the caller presented no client certificate")
    certs = _load_pem(leaf[0])
    if len(certs) != 1:
        raise IdentityError("x509_pem_cert must hold exactly one certificate")
    # Intermediates (SPIRE often signs with one) come separately: on the server side gRPC reports
    # the chain the client sent without its leaf (OpenSSL semantics; measured with grpcio 1.85).
    for pem in auth.get("x509_pem_cert_chain") or []:
        certs.extend(c for c in _load_pem(pem) if c != certs[0])
    return _svid(certs, trust_domain, bundle, now)


def _svid(certs: list[x509.Certificate], trust_domain: str,
          bundle: Sequence[x509.Certificate] | None, now: datetime | None) -> Svid:
    if not certs:
        raise IdentityError("the peer presented no certificate")
    if len(certs) > 1 + MAX_INTERMEDIATES:
        raise IdentityError(f"peer chain has more than {MAX_INTERMEDIATES} intermediates")
    domain = validate_trust_domain(trust_domain)
    moment = now or datetime.now(timezone.utc)
    if moment.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    leaf = certs[0]
    spiffe_id = _check_leaf(leaf, domain, moment)
    if bundle is not None:
        _check_chain(certs, bundle, moment)
    digest = hashlib.sha256(leaf.public_bytes(Encoding.DER)).digest()
    return Svid(str(spiffe_id), digest, leaf.not_valid_after_utc)


E = TypeVar("E", bound=x509.ExtensionType)


def _ext(cert: x509.Certificate, kind: type[E]) -> E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except (x509.DuplicateExtension, ValueError) as exc:  # RFC 5280 §4.2: each extension at most once
        raise IdentityError(f"certificate extensions are malformed: {exc}") from None


def _check_validity(cert: x509.Certificate, now: datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise IdentityError(f"{what} is not valid before {cert.not_valid_before_utc.isoformat()}")
    if now > cert.not_valid_after_utc:
        raise IdentityError(f"{what} expired at {cert.not_valid_after_utc.isoformat()}")


def _check_leaf(leaf: x509.Certificate, trust_domain: str, now: datetime) -> SpiffeId:
    _check_validity(leaf, now, "certificate")
    try:
        extensions = list(leaf.extensions)
    except (x509.DuplicateExtension, ValueError) as exc:
        raise IdentityError(f"certificate extensions are malformed: {exc}") from None
    for ext in extensions:  # RFC 5280 §4.2: an unrecognised critical extension means "refuse"
        if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
            raise IdentityError(f"certificate has an unrecognised critical extension {ext.oid.dotted_string}")
    san = _ext(leaf, x509.SubjectAlternativeName)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier) if san else []
    if len(uris) != 1:  # X509-SVID §2 and §5.2: exactly one URI SAN, else reject
        raise IdentityError(f"certificate has {len(uris)} URI SANs; an X.509-SVID has exactly one")
    try:
        spiffe_id = parse_spiffe_id(uris[0])
    except IdentityError as exc:
        raise IdentityError(f"URI SAN is not a valid SPIFFE ID: {exc}") from None
    if not spiffe_id.member_of(trust_domain):
        raise IdentityError(f"{spiffe_id} is not in trust domain {trust_domain!r}")
    if not spiffe_id.path:  # X509-SVID §3.1: a bare trust domain ID names a signing authority
        raise IdentityError(f"{spiffe_id} has no path; a leaf SVID must name a workload")
    constraints = _ext(leaf, x509.BasicConstraints)
    if constraints is not None and constraints.ca:  # X509-SVID §4.1, §5.2
        raise IdentityError("certificate is a CA certificate; a CA never authenticates as a workload")
    usage = _ext(leaf, x509.KeyUsage)
    if usage is None:  # X509-SVID §4.3: key usage MUST be set on every SVID
        raise IdentityError("certificate has no keyUsage extension")
    if usage.key_cert_sign or usage.crl_sign:  # X509-SVID §5.2
        raise IdentityError("leaf certificate has keyCertSign or cRLSign set")
    if not usage.digital_signature:  # X509-SVID §4.3
        raise IdentityError("leaf certificate lacks digitalSignature key usage")
    extended = _ext(leaf, x509.ExtendedKeyUsage)
    # X509-SVID §4.4: EKU is optional, but when present it must allow authenticating as a client.
    if extended is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in extended:
        raise IdentityError("certificate extended key usage does not include clientAuth")
    return spiffe_id


def _check_chain(certs: list[x509.Certificate], bundle: Sequence[x509.Certificate], now: datetime) -> None:
    """Walk leaf -> intermediates -> a bundle CA, checking each signature (X509-SVID §5.1)."""
    anchors = list(bundle)
    if not anchors:
        raise IdentityError("the trust bundle is empty: no certificate can be trusted")
    path = certs[:1]  # the certificates below the next issuer, leaf first
    for parent in certs[1:]:
        if parent in anchors:  # the peer also sent a trusted CA: stop there and anchor on it
            break
        _check_issuer(path, parent, now, "intermediate")
        path.append(parent)
    problems = []
    for ca in anchors:
        if ca.subject != path[-1].issuer:
            continue
        try:
            _check_issuer(path, ca, now, "trust bundle CA")
            return
        except IdentityError as exc:
            problems.append(str(exc))
    raise IdentityError("; ".join(problems)
                        or f"issuer {_show(path[-1].issuer.rfc4514_string())} is not in the trust bundle")


def _check_issuer(below: list[x509.Certificate], ca: x509.Certificate, now: datetime, what: str) -> None:
    """``ca`` may have issued ``below[-1]`` and vouch for every certificate in ``below`` (leaf first)."""
    child = below[-1]
    name = _show(ca.subject.rfc4514_string())
    _check_validity(ca, now, f"{what} {name}")
    constraints = _ext(ca, x509.BasicConstraints)
    if constraints is None or not constraints.ca:  # RFC 5280 §4.2.1.9
        raise IdentityError(f"{what} {name} is not a CA certificate")
    # The signature before the CA's limits: an impostor named like a real CA is refused as not its issuer.
    try:
        child.verify_directly_issued_by(ca)  # issuer name, signature algorithm and signature
    except (ValueError, TypeError, InvalidSignature):
        raise IdentityError(f"certificate is not signed by {what} {name}") from None
    if constraints.path_length is not None and len(below) - 1 > constraints.path_length:
        raise IdentityError(f"{what} {name} allows {constraints.path_length} intermediates below it")
    usage = _ext(ca, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:  # RFC 5280 §4.2.1.3, X509-SVID §3.2
        raise IdentityError(f"{what} {name} may not sign certificates (no keyCertSign)")
    # RFC 5280 leaves EKU on a CA undefined; OpenSSL (and so gRPC before the TLS front) reads it as
    # a limit on what the CA may issue. Keep that limit, or a CA meant for servers could vouch for agents.
    extended = _ext(ca, x509.ExtendedKeyUsage)
    if extended is not None and not {ExtendedKeyUsageOID.CLIENT_AUTH,
                                     ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE} & set(extended):
        raise IdentityError(f"{what} {name} may not issue client certificates (its extended key usage "
                            "lacks clientAuth)")
    names = _ext(ca, x509.NameConstraints)
    if names is not None:
        for cert in below:
            _check_names(cert, names, f"{what} {name}")


# -- RFC 5280 §4.2.1.10 name constraints: every name of a constrained type, in every certificate below ------


def _check_names(cert: x509.Certificate, constraints: x509.NameConstraints, ca: str) -> None:
    san = _ext(cert, x509.SubjectAlternativeName)
    names: list[x509.GeneralName] = list(san) if san else []
    if len(cert.subject):  # a subject DN is a directoryName (§4.2.1.10)
        names.append(x509.DirectoryName(cert.subject))
    permitted = list(constraints.permitted_subtrees or ())
    excluded = list(constraints.excluded_subtrees or ())
    for general in names:
        kind = type(general)
        allowed = [c for c in permitted if type(c) is kind]
        if kind not in _COMPARABLE and (allowed or any(type(c) is kind for c in excluded)):
            raise IdentityError(f"{ca} constrains {kind.__name__} names, which cannot be checked here")
        if any(_within(general, c) for c in excluded if type(c) is kind):
            raise IdentityError(f"{_describe(general)} is excluded by the name constraints of {ca}")
        if allowed and not any(_within(general, c) for c in allowed):
            raise IdentityError(f"{_describe(general)} is outside the name constraints of {ca}")


_COMPARABLE = (x509.DNSName, x509.UniformResourceIdentifier, x509.RFC822Name, x509.IPAddress,
               x509.DirectoryName)


def _describe(name: x509.GeneralName) -> str:
    kind = {x509.DNSName: "DNS name", x509.UniformResourceIdentifier: "URI", x509.IPAddress: "IP address",
            x509.RFC822Name: "email address", x509.DirectoryName: "subject"}.get(type(name), "name")
    value = name.value.rfc4514_string() if isinstance(name, x509.DirectoryName) else str(name.value)
    return f"{kind} {_show(value)}"


def _domain_within(host: str, base: str) -> bool:
    """A DNS-style name inside a constraint: equal, or below it ("." first: strictly below)."""
    host, base = host.lower().rstrip("."), base.lower()
    if base.startswith("."):
        return host.endswith(base)
    return not base or host == base or host.endswith("." + base)


def _within(name: x509.GeneralName, subtree: x509.GeneralName) -> bool:
    if isinstance(name, x509.DNSName):
        return _domain_within(name.value, subtree.value)
    if isinstance(name, x509.UniformResourceIdentifier):  # the constraint names the URI's host
        try:
            host = urlsplit(name.value).hostname
        except ValueError:  # e.g. an unclosed IPv6 bracket: a URI with no host is never inside
            host = None
        return host is not None and _domain_within(host, subtree.value)
    if isinstance(name, x509.RFC822Name):
        base = subtree.value.lower()
        if "@" in base:
            return name.value.lower() == base
        return _domain_within(name.value.rpartition("@")[2], base)
    if isinstance(name, x509.IPAddress):
        return name.value in subtree.value  # an address in the network (no match across IPv4/IPv6)
    if isinstance(name, x509.DirectoryName):
        return name.value.rdns[:len(subtree.value.rdns)] == subtree.value.rdns
    return False  # not reached: _check_names refuses types it cannot compare


def load_bundle(pem: bytes) -> list[x509.Certificate]:
    """Parse a PEM trust bundle; every entry must be a CA certificate."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise IdentityError(f"trust bundle is not valid PEM: {exc}") from None
    for cert in certs:
        constraints = _ext(cert, x509.BasicConstraints)
        if constraints is None or not constraints.ca:
            raise IdentityError(f"trust bundle entry {_show(cert.subject.rfc4514_string())} is not a CA")
    return certs
