"""The development trust domain: a local CA, the daemon's server certificate and workload SVIDs."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .. import durable
from ..errors import StateError
from .spiffe import IdentityError, parse_spiffe_id, validate_trust_domain

DEV_TRUST_DOMAIN = "dev.local"
SERVER_PATH = "/agentauthz"
MARKER = "DEVELOPMENT"
# In a state dir whose development PKI lives elsewhere (serve --pki-dir, shared by several daemons on
# one machine): that directory's absolute path, so every command given only the state dir finds it.
POINTER = "pki-dir"
CA_TTL = timedelta(days=365)
SERVER_TTL = timedelta(days=30)
SVID_TTL = timedelta(hours=24)  # SVIDs are short-lived: a leaked one is useful for a day at most
SKEW = timedelta(minutes=5)  # backdate not_before: a peer whose clock runs behind still accepts it
RENEW_BEFORE = timedelta(days=1)  # reissue the server certificate when less than this is left
LEAF_USAGE = ("digital_signature",)  # X509-SVID §4.3
CLIENT_AND_SERVER = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)  # X509-SVID §4.4
E = TypeVar("E", bound=x509.ExtensionType)
_ORG = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "agentauthz development")


@dataclass(frozen=True)
class CertAndKey:
    """A certificate and its private key (P-256: what gRPC's BoringSSL and Envoy both accept)."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


@dataclass(frozen=True)
class DevPki:
    """The development CA and the daemon's server certificate, as loaded from ``<state>/pki`` or --pki-dir."""

    state_dir: Path
    trust_domain: str
    ca: CertAndKey
    server: CertAndKey
    location: Path | None = None  # where they were loaded from, when not <state_dir>/pki

    @property
    def pki_dir(self) -> Path:
        return self.location or self.state_dir / "pki"

    @property
    def bundle(self) -> list[x509.Certificate]:
        return [self.ca.certificate]

    # What grpc.ssl_server_credentials / ssl_channel_credentials take.
    ca_cert_pem = property(lambda self: self.ca.cert_pem)
    server_cert_pem = property(lambda self: self.server.cert_pem)
    server_key_pem = property(lambda self: self.server.key_pem)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _host(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
             not_before: datetime, not_after: datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))


def make_ca(name: str = "agentauthz development CA", trust_domain: str = DEV_TRUST_DOMAIN, *,
            permitted_hosts: Sequence[str] = (), issuer: CertAndKey | None = None,
            path_length: int | None = 0, not_before: datetime | None = None,
            not_after: datetime | None = None) -> CertAndKey:
    """A signing certificate for ``trust_domain``: self-signed, or an intermediate under ``issuer``."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - SKEW
    subject = x509.Name([_ORG, x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = _builder(subject, issuer.certificate.subject if issuer else subject, key,
                       start, not_after or start + CA_TTL)
    builder = (builder
               .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
               .add_extension(_usage(("key_cert_sign", "crl_sign")), critical=True)  # X509-SVID §4.3
               # X509-SVID §3.2: a signing certificate SHOULD be an SVID whose ID has no path.
               .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                   f"spiffe://{validate_trust_domain(trust_domain)}")]), critical=False))
    if issuer:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer.key.public_key()), critical=False)
    dns = [h for h in permitted_hosts if isinstance(_host(h), x509.DNSName)]
    if dns:
        # Confine the CA to the listed DNS names, so its key on disk cannot vouch for a real host.
        # BoringSSL (in gRPC and Envoy) fails every handshake under a URI or IP constraint
        # ("unsupported name constraint type"; measured with grpcio 1.85), so the trust domain is
        # not constrained here (X509-SVID §4.2 allows that): spiffe.py checks it on every SVID.
        builder = builder.add_extension(x509.NameConstraints([x509.DNSName(h) for h in dns], None),
                                        critical=True)
    return CertAndKey(builder.sign(issuer.key if issuer else key, hashes.SHA256()), key)


def _usage(names: Iterable[str]) -> x509.KeyUsage:
    flags = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                           "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
                          False)
    for name in names:
        if name not in flags:
            raise ValueError(f"unknown key usage {name!r}")
        flags[name] = True
    return x509.KeyUsage(**flags)


def make_leaf(ca: CertAndKey, uri_sans: Sequence[str] = (), *, hosts: Sequence[str] = (),
              is_ca: bool = False, not_before: datetime | None = None, not_after: datetime | None = None,
              ttl: timedelta = SVID_TTL, key_usage: Sequence[str] | None = LEAF_USAGE,
              extended_key_usage: Sequence[x509.ObjectIdentifier] | None = CLIENT_AND_SERVER) -> CertAndKey:
    """A certificate signed by ``ca``; every property is a parameter so tests can craft hostile ones."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - SKEW
    # No common name: the URI SAN is the identity (X509-SVID §2); nothing should read the subject.
    builder = _builder(x509.Name([_ORG]), ca.certificate.subject, key, start, not_after or start + SKEW + ttl)
    builder = (builder
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                              critical=False))
    names = [x509.UniformResourceIdentifier(u) for u in uri_sans] + [_host(h) for h in hosts]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if key_usage is not None:
        builder = builder.add_extension(_usage(key_usage), critical=True)  # X509-SVID §4.3: critical
    if extended_key_usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(extended_key_usage)), critical=False)
    return CertAndKey(builder.sign(ca.key, hashes.SHA256()), key)


def pki_dir_of(state_dir: Path, pki_dir: Path | None = None) -> Path:
    """The development PKI directory: ``pki_dir``, else the one ``state_dir`` names, else its ``pki``."""
    if pki_dir is not None:
        return Path(os.path.abspath(pki_dir))  # the lock and the temporary directory go beside it
    pointer = Path(state_dir) / POINTER
    try:
        named = pointer.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return Path(state_dir) / "pki"
    except (OSError, UnicodeDecodeError) as exc:
        raise StateError(f"{pointer}: cannot read the development PKI's directory: {exc}") from None
    if not named or "\n" in named or not os.path.isabs(named):
        raise StateError(f"{pointer}: does not hold the absolute path of a development PKI directory; "
                         "start the daemon with --pki-dir to write it again")
    return Path(named)


def is_development(state_dir: Path) -> bool:
    """Whether ``state_dir`` holds, or names, a development PKI (made by ``ensure_dev_pki``)."""
    return (pki_dir_of(state_dir) / MARKER).is_file()


def ensure_dev_pki(state_dir: Path, trust_domain: str = DEV_TRUST_DOMAIN,
                   server_names: Sequence[str] = ("localhost", "127.0.0.1"),
                   pki_dir: Path | None = None) -> DevPki:
    """Create the development CA and server certificate on first use; load (and renew) them later.

    ``pki_dir`` (default: the one ``state_dir`` names, else ``<state_dir>/pki``) may be shared by the
    state dirs of several daemons; ``state_dir`` then names it for later commands.
    """
    state_dir = Path(state_dir)
    validate_trust_domain(trust_domain)
    explicit, pki_dir = pki_dir is not None, pki_dir_of(state_dir, pki_dir)
    if not pki_dir.name:
        raise StateError(f"{pki_dir}: name a directory of its own for the development PKI")
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pki_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Worker processes, and daemons sharing one pki_dir, may start together: one creates, the
        # others wait and then load. The lock sits beside pki_dir, so every sharer takes the same one.
        with _locked(pki_dir.with_name(pki_dir.name + ".lock")):
            if not pki_dir.exists() or (pki_dir.is_dir() and not any(pki_dir.iterdir())):
                _create(pki_dir, trust_domain, server_names)  # an empty directory: made for us
            pki = _load(state_dir, pki_dir, trust_domain)
            if _server_stale(pki, server_names):
                server = _server_cert(pki.ca, trust_domain, server_names)
                durable.replace(pki_dir / "server.key", server.key_pem, 0o600)
                durable.replace(pki_dir / "server.pem", server.cert_pem, 0o644)
                pki = DevPki(state_dir, trust_domain, pki.ca, server, pki_dir)
        if explicit:
            _name_pki_dir(state_dir, pki_dir)
    except OSError as exc:
        raise StateError(f"{pki_dir}: cannot create or renew the development PKI: {exc}") from exc
    return pki


def _name_pki_dir(state_dir: Path, pki_dir: Path) -> None:
    """Record ``pki_dir`` in ``state_dir`` (none when it is the default ``<state_dir>/pki``)."""
    pointer, where = state_dir / POINTER, pki_dir.resolve()
    if where == (state_dir / "pki").resolve():
        pointer.unlink(missing_ok=True)
    elif not pointer.is_file() or pointer.read_text(encoding="utf-8", errors="replace").strip() != str(where):
        durable.replace(pointer, f"{where}\n".encode(), 0o644)


def _server_cert(ca: CertAndKey, trust_domain: str, server_names: Sequence[str]) -> CertAndKey:
    not_after = min(_now() + SERVER_TTL, ca.certificate.not_valid_after_utc)
    return make_leaf(ca, [f"spiffe://{trust_domain}{SERVER_PATH}"], hosts=server_names, not_after=not_after)


def _extension(cert: x509.Certificate, kind: type[E]) -> E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _server_stale(pki: DevPki, server_names: Sequence[str]) -> bool:
    cert = pki.server.certificate
    san: Iterable[x509.GeneralName] = _extension(cert, x509.SubjectAlternativeName) or []
    constraints = _extension(pki.ca.certificate, x509.NameConstraints)
    subtrees = (constraints.permitted_subtrees or []) if constraints else []
    allowed = [n.value for n in subtrees if isinstance(n, x509.DNSName)]
    wanted = {_host(n) for n in server_names}
    if {n for n in san if not isinstance(n, x509.UniformResourceIdentifier)} == wanted:
        return cert.not_valid_after_utc - _now() < RENEW_BEFORE
    for name in wanted:  # RFC 5280 §4.2.1.10: a DNS constraint also permits its subdomains
        if allowed and isinstance(name, x509.DNSName) and not any(
                name.value == a or name.value.endswith("." + a) for a in allowed):
            raise StateError(f"{pki.pki_dir}: the development CA is constrained to other server names; "
                             f"delete the directory to create a new CA for {name.value}")
    return True


def _create(pki_dir: Path, trust_domain: str, server_names: Sequence[str]) -> None:
    # Build everything in a private temporary directory and rename it into place, so a crash
    # never leaves a half-made PKI that later loads as "corrupt".
    tmp = pki_dir.with_name(f".pki-{secrets.token_hex(4)}.tmp")
    tmp.mkdir(mode=0o700)
    try:
        ca = make_ca("agentauthz development CA", trust_domain, permitted_hosts=server_names)
        server = _server_cert(ca, trust_domain, server_names)
        durable.write_new(tmp / "ca.key", ca.key_pem, 0o600)
        durable.write_new(tmp / "ca.pem", ca.cert_pem, 0o644)
        durable.write_new(tmp / "server.key", server.key_pem, 0o600)
        durable.write_new(tmp / "server.pem", server.cert_pem, 0o644)
        marker = {"trust_domain": trust_domain, "note": "development only: never trust this CA elsewhere"}
        durable.write_new(tmp / MARKER, json.dumps(marker).encode() + b"\n", 0o644)
        os.rename(tmp, pki_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(state_dir: Path, pki_dir: Path, trust_domain: str) -> DevPki:
    try:
        marker = json.loads((pki_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StateError(f"{pki_dir}: not a development PKI (no readable {MARKER} marker)") from exc
    if not isinstance(marker, dict) or marker.get("trust_domain") != trust_domain:
        raise StateError(f"{pki_dir}: development PKI is not for trust domain {trust_domain!r}")
    ca = _load_pair(pki_dir, "ca")
    if _now() > ca.certificate.not_valid_after_utc:
        raise StateError(f"{pki_dir}: the development CA has expired; delete the directory to make a new one")
    return DevPki(state_dir, trust_domain, ca, _load_pair(pki_dir, "server"), pki_dir)


def _load_pair(pki_dir: Path, stem: str) -> CertAndKey:
    key_path, cert_path = pki_dir / f"{stem}.key", pki_dir / f"{stem}.pem"
    where = key_path  # the file to name if one cannot be parsed
    try:
        fd = os.open(key_path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            if os.fstat(f.fileno()).st_mode & 0o077:
                raise StateError(f"{key_path}: private key must be accessible by its owner only (0600)")
            data = f.read()
        key = serialization.load_pem_private_key(data, password=None)
        where = cert_path
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except OSError as exc:
        raise StateError(f"{exc.filename or pki_dir}: cannot read {stem} certificate or key: "
                         f"{exc.strerror}") from exc
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # TypeError: an encrypted key
        raise StateError(f"{where}: unreadable {stem} {'key' if where == key_path else 'certificate'}: "
                         f"{exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise StateError(f"{key_path}: key does not match {cert_path.name}")
    return CertAndKey(cert, key)


def issue_svid(pki: DevPki, spiffe_id: str, out_dir: Path, ttl: timedelta = SVID_TTL) -> Path:
    """Write ``svid.pem``, ``svid.key`` and ``bundle.pem`` for a development workload into ``out_dir``."""
    if not is_development(pki.state_dir):
        raise IdentityError(f"{pki.state_dir} is not a development state directory: refusing to issue SVIDs")
    parsed = parse_spiffe_id(spiffe_id)
    if not parsed.member_of(pki.trust_domain):
        raise IdentityError(f"{spiffe_id} is not in the development trust domain {pki.trust_domain!r}")
    if not parsed.path:  # X509-SVID §3.1
        raise IdentityError(f"{spiffe_id} has no path; a workload SVID must name a workload")
    if ttl <= timedelta(0):
        raise IdentityError("SVID lifetime must be positive")
    # A leaf must not outlive its CA: it would fail path validation after the CA expires anyway.
    not_after = min(_now() + ttl, pki.ca.certificate.not_valid_after_utc)
    svid = make_leaf(pki.ca, [str(parsed)], not_after=not_after)
    out_dir = Path(out_dir)
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    durable.replace(out_dir / "svid.key", svid.key_pem, 0o600)
    durable.replace(out_dir / "svid.pem", svid.cert_pem, 0o644)
    durable.replace(out_dir / "bundle.pem", pki.ca.cert_pem, 0o644)
    return out_dir


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock

