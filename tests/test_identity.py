"""SPIFFE IDs, X.509-SVID validation, the development CA, and a real mTLS handshake through gRPC."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import os
import re
from concurrent import futures
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agentauthz.errors import AgentAuthzError, StateError
from agentauthz.identity import devca, spiffe
from agentauthz.identity.spiffe import (
    IdentityError,
    SpiffeId,
    load_bundle,
    parse_spiffe_id,
    svid_from_pem,
)

TD = "dev.local"
AGENT = "spiffe://dev.local/agent/alpha"
NOW = datetime.now(timezone.utc)
DAY = timedelta(days=1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> devca.DevPki:
    return devca.ensure_dev_pki(tmp_path_factory.mktemp("state"))


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# --- SPIFFE ID parsing (SPIFFE-ID §2) ---

@pytest.mark.parametrize("text, domain, path", [
    (AGENT, TD, "/agent/alpha"),
    ("spiffe://example.org", "example.org", ""),
    ("spiffe://a_b-c.9/A.b-C_9/..x/x..", "a_b-c.9", "/A.b-C_9/..x/x.."),
    ("spiffe://" + "d" * 255 + "/a", "d" * 255, "/a"),
    ("spiffe://dev.local/" + "a" * (2048 - 19), TD, "/" + "a" * (2048 - 19)),
])
def test_valid_spiffe_ids(text: str, domain: str, path: str) -> None:
    parsed = parse_spiffe_id(text)
    assert parsed == SpiffeId(domain, path) and str(parsed) == text


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("dev.local/agent", "not of the form"),
    ("spiffe:dev.local/agent", "not of the form"),
    ("https://dev.local/agent", "scheme"),
    ("SPIFFE://dev.local/agent", "scheme"),
    ("spiffe:///agent", "trust domain is empty"),
    ("spiffe://", "trust domain is empty"),
    ("spiffe://Dev.Local/agent", "lowercase"),
    ("spiffe://dev local/agent", "outside [a-z0-9._-]"),
    ("spiffe://dév.local/agent", "outside [a-z0-9._-]"),
    ("spiffe://dev.local:8443/agent", "port"),
    ("spiffe://admin@dev.local/agent", "userinfo"),
    ("spiffe://dev.local/agent?x=1", "query"),
    ("spiffe://dev.local/agent#frag", "fragment"),
    ("spiffe://dev.local/agent%2Fadmin", "percent-encoding"),
    ("spiffe://dev.local/", "end with '/'"),
    ("spiffe://dev.local/agent/", "end with '/'"),
    ("spiffe://dev.local//agent", "empty segment"),
    ("spiffe://dev.local/agent/./alpha", "dot segment"),
    ("spiffe://dev.local/agent/../admin", "dot segment"),
    ("spiffe://dev.local/..", "dot segment"),
    ("spiffe://dev.local/agent alpha", "outside [A-Za-z0-9._-]"),
    ("spiffe://dev.local/agent\n", "outside [A-Za-z0-9._-]"),
    ("spiffe://dev.local/ägent", "outside [A-Za-z0-9._-]"),
    ("spiffe://dev.local/a+b", "outside [A-Za-z0-9._-]"),
    ("spiffe://" + "d" * 256 + "/a", "longer than 255 bytes"),
    ("spiffe://dev.local/" + "a" * (2049 - 19), "longer than 2048 bytes"),
    (b"spiffe://dev.local/agent", "must be a string"),
])
def test_invalid_spiffe_ids(text: str, message: str) -> None:
    with pytest.raises(IdentityError) as caught:
        parse_spiffe_id(text)
    assert message in str(caught.value)
    assert isinstance(caught.value, AgentAuthzError) and caught.value.reason == "identity_invalid"


# --- X.509-SVID validation (X509-SVID §5) ---

def test_dev_svid_accepted(pki: devca.DevPki, tmp_path: Path) -> None:
    issued = datetime.now(timezone.utc)  # not NOW: the module may have been imported minutes ago
    out = devca.issue_svid(pki, AGENT, tmp_path / "svid")
    bundle = load_bundle((out / "bundle.pem").read_bytes())
    svid = svid_from_pem((out / "svid.pem").read_bytes(), TD, bundle)
    der = x509.load_pem_x509_certificate((out / "svid.pem").read_bytes()).public_bytes(Encoding.DER)
    assert svid.spiffe_id == AGENT
    assert svid.certificate_sha256 == hashlib.sha256(der).digest()
    assert svid.x5t_s256 == spiffe.certificate_thumbprint(der) and len(svid.x5t_s256) == 43
    assert "=" not in svid.x5t_s256 and "+" not in svid.x5t_s256 and "/" not in svid.x5t_s256
    assert timedelta(hours=23) < svid.not_after - issued <= timedelta(hours=24, minutes=1)
    assert spiffe.peer_from_der_chain([der], TD, bundle).spiffe_id == AGENT
    with pytest.raises(IdentityError, match="expired"):
        svid_from_pem((out / "svid.pem").read_bytes(), TD, bundle, now=NOW + timedelta(days=2))


def _hostile(pki: devca.DevPki, case: str) -> devca.CertAndKey:
    ca, leaf = pki.ca, devca.make_leaf
    return {
        "impostor CA with the same name": lambda: leaf(devca.make_ca(), [AGENT]),
        "another CA": lambda: leaf(devca.make_ca("evil CA"), [AGENT]),
        "another trust domain": lambda: leaf(ca, ["spiffe://evil.example/agent/alpha"]),
        "two URI SANs": lambda: leaf(ca, [AGENT, "spiffe://dev.local/agent/admin"]),
        "no URI SAN": lambda: leaf(ca, [], hosts=["alpha.localhost"]),
        "no SAN at all": lambda: leaf(ca, []),
        "a CA as leaf": lambda: leaf(ca, [AGENT], is_ca=True),
        "expired": lambda: leaf(ca, [AGENT], not_before=NOW - 2 * DAY, not_after=NOW - DAY),
        "not yet valid": lambda: leaf(ca, [AGENT], not_before=NOW + timedelta(hours=1)),
        "keyCertSign on a leaf": lambda: leaf(ca, [AGENT], key_usage=["digital_signature", "key_cert_sign"]),
        "cRLSign on a leaf": lambda: leaf(ca, [AGENT], key_usage=["digital_signature", "crl_sign"]),
        "no digitalSignature": lambda: leaf(ca, [AGENT], key_usage=["key_agreement"]),
        "no keyUsage": lambda: leaf(ca, [AGENT], key_usage=None),
        "server-only EKU": lambda: leaf(ca, [AGENT], extended_key_usage=[ExtendedKeyUsageOID.SERVER_AUTH]),
        "percent-encoded path": lambda: leaf(ca, ["spiffe://dev.local/agent%2Falpha"]),
        "trust domain ID as leaf": lambda: leaf(ca, ["spiffe://dev.local"]),
        "not a spiffe URI": lambda: leaf(ca, ["https://dev.local/agent/alpha"]),
    }[case]()


@pytest.mark.parametrize("case, message", [
    ("impostor CA with the same name", "not signed by trust bundle CA"),
    ("another CA", "not in the trust bundle"),
    ("another trust domain", "not in trust domain 'dev.local'"),
    ("two URI SANs", "2 URI SANs"),
    ("no URI SAN", "0 URI SANs"),
    ("no SAN at all", "0 URI SANs"),
    ("a CA as leaf", "is a CA certificate"),
    ("expired", "expired at"),
    ("not yet valid", "not valid before"),
    ("keyCertSign on a leaf", "keyCertSign or cRLSign"),
    ("cRLSign on a leaf", "keyCertSign or cRLSign"),
    ("no digitalSignature", "lacks digitalSignature"),
    ("no keyUsage", "no keyUsage"),
    ("server-only EKU", "clientAuth"),
    ("percent-encoded path", "percent-encoding"),
    ("trust domain ID as leaf", "has no path"),
    ("not a spiffe URI", "scheme"),
])
def test_hostile_svids_refused(pki: devca.DevPki, case: str, message: str) -> None:
    with pytest.raises(IdentityError) as caught:
        svid_from_pem(_hostile(pki, case).cert_pem, TD, pki.bundle)
    assert message in str(caught.value)


def test_bundle_checks(pki: devca.DevPki) -> None:
    stranger = devca.make_leaf(devca.make_ca(), [AGENT]).cert_pem
    assert svid_from_pem(stranger, TD).spiffe_id == AGENT  # no bundle: gRPC has checked the chain
    with pytest.raises(IdentityError, match="bundle is empty"):
        svid_from_pem(stranger, TD, [])
    old = devca.make_ca(not_before=NOW - timedelta(days=3), not_after=NOW - timedelta(days=1))
    late = devca.make_leaf(old, [AGENT], not_before=NOW - timedelta(hours=1))
    with pytest.raises(IdentityError, match="trust bundle CA .* expired"):
        svid_from_pem(late.cert_pem, TD, [old.certificate])
    with pytest.raises(IdentityError, match="not a CA"):
        load_bundle(devca.make_leaf(pki.ca, [AGENT]).cert_pem)
    with pytest.raises(IdentityError, match="not valid PEM"):
        svid_from_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", TD)
    with pytest.raises(IdentityError, match="no certificate"):
        spiffe.peer_from_der_chain([], TD)


def test_intermediates() -> None:
    root = devca.make_ca("root", path_length=1)
    inter = devca.make_ca("intermediate", issuer=root, path_length=0)
    leaf = devca.make_leaf(inter, [AGENT])
    assert svid_from_pem(leaf.cert_pem + inter.cert_pem, TD, [root.certificate]).spiffe_id == AGENT
    # A peer may send the root too; a chain missing its intermediate does not verify.
    assert svid_from_pem(leaf.cert_pem + inter.cert_pem + root.cert_pem, TD, [root.certificate])
    with pytest.raises(IdentityError, match="not in the trust bundle"):
        svid_from_pem(leaf.cert_pem, TD, [root.certificate])
    tight = devca.make_ca("tight root", path_length=0)
    sub = devca.make_ca("sub", issuer=tight)
    with pytest.raises(IdentityError, match="allows 0 intermediates"):
        svid_from_pem(devca.make_leaf(sub, [AGENT]).cert_pem + sub.cert_pem, TD, [tight.certificate])


def _ca_with(*extensions: x509.ExtensionType, issuer: devca.CertAndKey | None = None) -> devca.CertAndKey:
    """make_ca's CA (or intermediate under ``issuer``) re-signed with ``extensions`` added."""
    base = devca.make_ca("constrained", issuer=issuer)
    builder = (x509.CertificateBuilder().subject_name(base.certificate.subject)
               .issuer_name(base.certificate.issuer).public_key(base.key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(base.certificate.not_valid_before_utc)
               .not_valid_after(base.certificate.not_valid_after_utc))
    for ext in base.certificate.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    for value in extensions:
        builder = builder.add_extension(value, critical=isinstance(value, x509.NameConstraints))
    return devca.CertAndKey(builder.sign((issuer or base).key, hashes.SHA256()), base.key)


TEN = x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))


@pytest.mark.parametrize("constraints, sans, message", [
    (x509.NameConstraints([x509.DNSName("localhost")], None), {"hosts": ["a.localhost"]}, None),
    (x509.NameConstraints([x509.DNSName("localhost")], None), {"hosts": ["bank.example"]},
     "DNS name 'bank.example' is outside the name constraints"),
    (x509.NameConstraints(None, [x509.DNSName("example")]), {"hosts": ["bank.example"]},
     "DNS name 'bank.example' is excluded by the name constraints"),
    (x509.NameConstraints([x509.UniformResourceIdentifier("dev.local")], None), {}, None),
    (x509.NameConstraints([x509.UniformResourceIdentifier("prod.example")], None), {},
     "URI 'spiffe://dev.local/agent/alpha' is outside the name constraints"),
    (x509.NameConstraints([x509.UniformResourceIdentifier(".local")], None), {}, None),
    (x509.NameConstraints([TEN], None), {"hosts": ["10.1.2.3"]}, None),
    (x509.NameConstraints([TEN], None), {"hosts": ["127.0.0.1"]},
     "IP address '127.0.0.1' is outside the name constraints"),
    (x509.NameConstraints(None, [x509.DirectoryName(x509.Name([x509.NameAttribute(
        NameOID.ORGANIZATION_NAME, "agentauthz development")]))]), {}, "subject 'O=agentauthz development'"),
], ids=["dns-inside", "dns-outside", "dns-excluded", "uri-inside", "uri-outside", "uri-subdomain",
        "ip-inside", "ip-outside", "directory-excluded"])
def test_name_constraints_of_a_bundle_ca(constraints: x509.NameConstraints, sans: dict[str, list[str]],
                                         message: str | None) -> None:
    ca = _ca_with(constraints)
    pem = devca.make_leaf(ca, [AGENT], **sans).cert_pem  # type: ignore[arg-type]
    if message is None:
        assert svid_from_pem(pem, TD, [ca.certificate]).spiffe_id == AGENT
    else:
        with pytest.raises(IdentityError, match=re.escape(message)):
            svid_from_pem(pem, TD, [ca.certificate])


def test_an_intermediates_constraints_and_extended_key_usage_bind_what_it_issues() -> None:
    root = devca.make_ca("root", path_length=1)
    prod = x509.UniformResourceIdentifier("prod.example")
    narrow = _ca_with(x509.NameConstraints([prod], None), issuer=root)
    with pytest.raises(IdentityError, match="URI .* is outside the name constraints of intermediate"):
        svid_from_pem(devca.make_leaf(narrow, [AGENT]).cert_pem + narrow.cert_pem, TD, [root.certificate])
    servers_only = _ca_with(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), issuer=root)
    with pytest.raises(IdentityError, match="may not issue client certificates"):
        svid_from_pem(devca.make_leaf(servers_only, [AGENT]).cert_pem + servers_only.cert_pem, TD,
                      [root.certificate])
    clients = _ca_with(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), issuer=root)
    chain = devca.make_leaf(clients, [AGENT]).cert_pem + clients.cert_pem
    assert svid_from_pem(chain, TD, [root.certificate]).spiffe_id == AGENT


# --- the development CA ---

def test_dev_pki_files_and_reload(tmp_path: Path) -> None:
    state = tmp_path / "state"
    pki = devca.ensure_dev_pki(state)
    assert devca.is_development(state) and not devca.is_development(tmp_path)
    assert json.loads((state / "pki" / "DEVELOPMENT").read_text())["trust_domain"] == TD
    assert _mode(state) == 0o700 and _mode(state / "pki") == 0o700
    assert _mode(state / "pki" / "ca.key") == 0o600 and _mode(state / "pki" / "server.key") == 0o600
    again = devca.ensure_dev_pki(state)
    assert again.ca.cert_pem == pki.ca.cert_pem and again.server.cert_pem == pki.server.cert_pem
    ca = pki.ca.certificate
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert ca.not_valid_after_utc - ca.not_valid_before_utc <= timedelta(days=366)
    server = pki.server.certificate
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in names} == {"localhost", "127.0.0.1", "spiffe://dev.local/agentauthz"}
    left = server.not_valid_after_utc - datetime.now(timezone.utc)  # the fixture made it moments ago
    assert timedelta(days=29) < left <= timedelta(days=30, minutes=1)
    assert svid_from_pem(pki.server.cert_pem, TD, pki.bundle).spiffe_id == "spiffe://dev.local/agentauthz"


def test_dev_pki_refusals(tmp_path: Path) -> None:
    state = tmp_path / "state"
    devca.ensure_dev_pki(state)
    with pytest.raises(StateError, match="not for trust domain"):
        devca.ensure_dev_pki(state, trust_domain="other.local")
    with pytest.raises(StateError, match="constrained to other server names"):
        devca.ensure_dev_pki(state, server_names=("example.com",))
    renamed = devca.ensure_dev_pki(state, server_names=("api.localhost",))  # within the constraint
    assert "api.localhost" in str(renamed.server.certificate.extensions)
    os.chmod(state / "pki" / "ca.key", 0o644)
    with pytest.raises(StateError, match="owner only"):
        devca.ensure_dev_pki(state)


def test_issue_svid(pki: devca.DevPki, tmp_path: Path) -> None:
    out = devca.issue_svid(pki, AGENT, tmp_path / "id", ttl=timedelta(hours=1))
    assert sorted(p.name for p in out.iterdir()) == ["bundle.pem", "svid.key", "svid.pem"]
    assert _mode(out) == 0o700 and _mode(out / "svid.key") == 0o600
    assert (out / "svid.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert (out / "bundle.pem").read_bytes() == pki.ca.cert_pem
    first = (out / "svid.pem").read_bytes()
    devca.issue_svid(pki, AGENT, out)  # renewing into the same directory replaces the files
    assert (out / "svid.pem").read_bytes() != first
    for bad, message in [("spiffe://prod.example/agent", "not in the development trust domain"),
                         ("spiffe://dev.local", "has no path"), ("spiffe://dev.local/a/../b", "dot segment")]:
        with pytest.raises(IdentityError, match=message):
            devca.issue_svid(pki, bad, tmp_path / "bad")
    production = dataclasses.replace(pki, state_dir=tmp_path / "production")
    with pytest.raises(IdentityError, match="not a development state directory"):
        devca.issue_svid(production, AGENT, tmp_path / "bad")


# --- a real mTLS handshake through gRPC ---

def _echo_identity(bundle: list[x509.Certificate]) -> grpc.GenericRpcHandler:
    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return spiffe.svid_from_grpc_context(context, TD, bundle).spiffe_id.encode()
        except IdentityError as exc:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            raise

    same = lambda b: b  # noqa: E731  # raw bytes in and out: no protobuf needed
    handler = grpc.unary_unary_rpc_method_handler(who, request_deserializer=same, response_serializer=same)
    return grpc.method_handlers_generic_handler("agentauthz.test.Identity", {"Who": handler})


@contextlib.contextmanager
def _server(ca: devca.CertAndKey, server: devca.CertAndKey) -> Iterator[int]:
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    srv.add_generic_rpc_handlers([_echo_identity([ca.certificate])])
    creds = grpc.ssl_server_credentials([(server.key_pem, server.cert_pem)], root_certificates=ca.cert_pem,
                                        require_client_auth=True)
    port = srv.add_secure_port("127.0.0.1:0", creds)
    srv.start()
    try:
        yield port
    finally:
        srv.stop(None)


def _call(port: int, ca_pem: bytes, client: devca.CertAndKey | None, chain: bytes = b"") -> str:
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=client and client.key_pem,
                                         certificate_chain=client and client.cert_pem + chain)
    with grpc.secure_channel(f"localhost:{port}", creds) as channel:
        same = lambda b: b  # noqa: E731
        who = channel.unary_unary("/agentauthz.test.Identity/Who", request_serializer=same,
                                  response_deserializer=same)
        return who(b"", timeout=10).decode()


@pytest.fixture(scope="module")
def port(pki: devca.DevPki) -> Iterator[int]:
    with _server(pki.ca, pki.server) as bound:
        yield bound


def test_mtls_returns_caller_identity(pki: devca.DevPki, port: int) -> None:
    assert _call(port, pki.ca.cert_pem, devca.make_leaf(pki.ca, [AGENT])) == AGENT


@pytest.mark.parametrize("client", ["none", "another CA", "DNS name outside the CA's constraint"])
def test_mtls_handshake_refused(pki: devca.DevPki, port: int, client: str) -> None:
    cert = {"none": None, "another CA": devca.make_leaf(devca.make_ca(), [AGENT]),
            "DNS name outside the CA's constraint": devca.make_leaf(pki.ca, [AGENT], hosts=["example.com"])}
    with pytest.raises(grpc.RpcError) as caught:
        _call(port, pki.ca.cert_pem, cert[client])
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("uris, message", [
    ([AGENT, "spiffe://dev.local/agent/admin"], "2 URI SANs"),
    # BoringSSL cannot enforce URI name constraints, so the trust domain is checked here.
    (["spiffe://evil.example/agent/alpha"], "not in trust domain"),
])
def test_mtls_peer_refused_by_identity(pki: devca.DevPki, port: int, uris: list[str], message: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _call(port, pki.ca.cert_pem, devca.make_leaf(pki.ca, uris))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED and message in caught.value.details()


def test_caller_without_mtls_refused(pki: devca.DevPki) -> None:
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    srv.add_generic_rpc_handlers([_echo_identity(pki.bundle)])
    plain = srv.add_insecure_port("127.0.0.1:0")
    creds = grpc.ssl_server_credentials([(pki.server.key_pem, pki.server.cert_pem)])  # client cert optional
    tls = srv.add_secure_port("127.0.0.1:0", creds)
    srv.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{plain}") as channel, pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/agentauthz.test.Identity/Who")(b"", timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED and "not TLS" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            _call(tls, pki.ca.cert_pem, None)
        assert "no client certificate" in caught.value.details()
    finally:
        srv.stop(None)


def test_mtls_with_intermediate() -> None:
    root = devca.make_ca("root", permitted_hosts=["localhost"], path_length=1)
    inter = devca.make_ca("intermediate", issuer=root)
    with _server(root, devca.make_leaf(root, hosts=["localhost"])) as bound:
        assert _call(bound, root.cert_pem, devca.make_leaf(inter, [AGENT]), inter.cert_pem) == AGENT
