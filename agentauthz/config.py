"""One frozen configuration object, validated completely before anything starts."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .authority.approvers import approver_problems, approvers_from
from .cluster.settings import ClusterSettings
from .decision.tokens import MAX_TOKEN_BYTES, TOKEN_TYPE
from .errors import ConfigError
from .identity.jwtsvid import JwtIssuer, issuers_from, load_keys
from .identity.spiffe import IdentityError, parse_spiffe_id

DEV_TRUST_DOMAIN = "dev.local"
DEV_CHECK_CLIENT = "spiffe://dev.local/envoy"  # Envoy's identity on a development Check listener with mTLS
_PATHS = ("state_dir", "pki_dir", "policy_file", "tls_cert", "tls_key", "trust_bundle")


@dataclass(frozen=True)
class Config:
    """Everything the daemon needs to know; built-in values are the development defaults."""

    state_dir: Path = Path(".agentauthz")
    # The development CA's directory, which several development daemons (each with its own state_dir)
    # may share; None: the one state_dir already names, else state_dir/pki. See dev_pki_dir.
    pki_dir: Path | None = None
    trust_domain: str = DEV_TRUST_DOMAIN
    issuer: str = "https://agentauthz.dev.local"
    audiences: tuple[str, ...] = ("tools",)
    token_type: str = TOKEN_TYPE
    policy_file: Path | None = None  # None: the built-in development policy

    # Tokens: RFC 7519 §4.1.4 allows "a small leeway"; we bound it.
    leeway: int = 30
    max_token_lifetime: int = 3600
    max_token_bytes: int = MAX_TOKEN_BYTES
    verified_cache_size: int = 100_000

    rotation_interval: float = 24 * 3600.0
    # 2^24 bits = 2 MiB: sixteen million tokens live at once.
    revocation_capacity: int = 1 << 24
    # Budgets: (agent, tool, window) counters shared by the workers; a full table denies budgeted calls.
    budget_capacity: int = 1 << 16

    audit_flush_interval: float = 0.05
    audit_batch_size: int = 512
    audit_queue_max: int = 65536

    check_listen: str = "127.0.0.1:9191"  # HOST:PORT, or unix:PATH (Envoy's `pipe` address)
    # Plaintext suits loopback and Unix sockets; across hosts require Envoy's client certificate
    # (chained to trust_bundle) on the Check listener too.
    check_mtls: bool = False
    # With check_mtls, the SPIFFE IDs whose client certificates Check answers (Envoy's); any other
    # workload of trust_bundle (an agent) is refused check_client_refused. Development: DEV_CHECK_CLIENT.
    check_clients: tuple[str, ...] = ()
    # Checks in progress at once per worker (an allow waits for its audit fsync); past it a Check is
    # refused at once (RESOURCE_EXHAUSTED, which Envoy turns into a denial) instead of queuing without
    # bound: load is shed fast and memory stays bounded.
    check_max_concurrent_rpcs: int = 1024
    # Envoy's HTTP ext_authz (http_service) on granian, beside the gRPC Check, deciding alike: HOST:PORT
    # or unix:PATH; "": off. Envoy must set its headers as examples/envoy-http.yaml does (README
    # "The HTTP Check").
    http_check_listen: str = ""
    # Check worker processes sharing the listener (SO_REUSEPORT); measure before raising past cores.
    workers: int = 1
    # /metrics: denials by reason of this many agents (the most denied), the rest summed under
    # agent="other" (audit/top_agents.py); 0: no per-agent series.
    metrics_top_agents: int = 20
    api_listen: str = "127.0.0.1:9190"
    http_listen: str = "127.0.0.1:9192"
    # The HTTP listener closes a connection that has not sent a whole request, or taken its answer,
    # within http_timeout seconds; past http_max_connections open, a new one closes the longest idle.
    http_timeout: float = 10.0
    http_max_connections: int = 256
    admins: tuple[str, ...] = field(default_factory=tuple)
    # The API's mTLS material; in development these default to the dev PKI under state_dir/pki.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    trust_bundle: Path | None = None
    # API callers may name themselves with a JWT-SVID from these issuers (DESIGN §4); none: refused.
    jwt_issuers: tuple[JwtIssuer, ...] = ()
    # Humans approve gated grants on a listener of their own (server TLS, no client certificate) with
    # a bearer from one of these OIDC issuers; never an agent issuer. None in development: the daemon's
    # own development approver issuer (``agentauthz dev-human``).
    approvers: tuple[JwtIssuer, ...] = ()
    approval_listen: str = "127.0.0.1:9193"
    approval_request_ttl: int = 900  # a pending request expires unless a human decides by then
    approval_ttl: int = 900  # an approval can be minted under for this long after the decision
    # Cluster mode (DESIGN §8): several daemons share revocations, keys, approvals and budgets through
    # Redis. None: one daemon, embedded state, exactly as without it.
    cluster: ClusterSettings | None = None

    def __post_init__(self) -> None:
        problems = list(_problems(self))
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))

    @property
    def development(self) -> bool:
        return self.trust_domain == DEV_TRUST_DOMAIN

    @property
    def dev_pki_dir(self) -> Path:
        """Where the development CA lives: pki_dir, else the one state_dir names, else state_dir/pki."""
        from .identity.devca import pki_dir_of
        return pki_dir_of(self.state_dir, self.pki_dir)

    @property
    def check_client_ids(self) -> frozenset[str]:
        """Who may call Check over mTLS: ``check_clients``, else (development only) DEV_CHECK_CLIENT."""
        return frozenset(self.check_clients or ((DEV_CHECK_CLIENT,) if self.development else ()))

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied and validated again."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "<config>") -> Config:
        """Build from a parsed file; unknown keys are errors, not ignored typos."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: the configuration must be a mapping")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s): {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key in _PATHS and value is not None:
                if not isinstance(value, str) or not value:  # Path(5) would raise TypeError
                    raise ConfigError(f"{source}: {key} must be a path")
                value = Path(value)
            elif key in ("audiences", "admins", "check_clients"):
                if isinstance(value, str) or not isinstance(value, list):
                    raise ConfigError(f"{source}: {key} must be a list")
                value = tuple(value)
            elif key == "cluster" and value is not None:
                try:
                    value = ClusterSettings.from_mapping(value)
                except ConfigError as exc:
                    raise ConfigError(f"{source}: {exc}") from None
            elif key in ("jwt_issuers", "approvers"):
                try:
                    value = issuers_from(value) if key == "jwt_issuers" else approvers_from(value)
                except ConfigError as exc:
                    raise ConfigError(f"{source}: {exc}") from None
            values[key] = value
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> Config:
        try:
            text = Path(path).read_text(encoding="utf-8")
            data = yaml.safe_load(text) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read configuration: {exc}") from None
        return cls.from_mapping(data, str(path))


# The Config fields that are listen addresses.
LISTENERS = ("check_listen", "api_listen", "http_listen", "approval_listen", "http_check_listen")


def listen_host(address: str) -> str:
    """A TCP listen address's host: an IPv6 literal without its brackets, "" for every interface."""
    return address.rpartition(":")[0].strip("[]")


def host_port(address: str) -> tuple[str, int]:
    """``listen_host`` and the port; ValueError unless the address is HOST:PORT with a port of 0-65535."""
    host, colon, port = address.rpartition(":")
    if not (colon and port.isascii() and port.isdigit() and int(port) <= 65535):
        raise ValueError(f"not HOST:PORT: {address!r}")
    return host.strip("[]"), int(port)


def _loopback(host: str) -> bool:
    """Whether ``host`` (a listen address's host part) can only be reached from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_client_problems(c: Config) -> list[str]:
    """check_clients: SPIFFE IDs, only with check_mtls, and required with it outside development."""
    if not isinstance(c.check_clients, tuple):
        return ["check_clients must be a list of SPIFFE IDs"]
    out = []
    for client in c.check_clients:
        try:
            if not parse_spiffe_id(client).path:
                out.append(f"check_clients: {client!r} names no workload (a SPIFFE ID with a path)")
        except IdentityError as exc:
            out.append(f"check_clients: {exc}")
    if c.check_clients and c.check_mtls is not True:
        out.append("check_clients needs check_mtls: true (without it no client certificate is checked)")
    if c.check_mtls is True and not c.check_clients and c.trust_domain != DEV_TRUST_DOMAIN:
        out.append("check_mtls needs check_clients, the SPIFFE IDs of the Envoys that may call Check "
                   "(any other workload of trust_bundle could otherwise act as Envoy)")
    return out


# Each audience is a trust boundary with a key directory of its own: a name, never a path.
_BOUNDARY_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


def _problems(c: Config) -> list[str]:
    out = []
    ints = {
        "leeway": (c.leeway, 0, 300),
        "max_token_lifetime": (c.max_token_lifetime, 1, 7 * 24 * 3600),
        "max_token_bytes": (c.max_token_bytes, 512, 65536),
        "verified_cache_size": (c.verified_cache_size, 1, 10_000_000),
        "revocation_capacity": (c.revocation_capacity, 64, 1 << 32),
        "budget_capacity": (c.budget_capacity, 1, 1 << 24),
        "audit_batch_size": (c.audit_batch_size, 1, 1 << 20),
        "audit_queue_max": (c.audit_queue_max, 1, 1 << 24),
        "check_max_concurrent_rpcs": (c.check_max_concurrent_rpcs, 1, 1 << 20),
        "workers": (c.workers, 1, 64),
        "metrics_top_agents": (c.metrics_top_agents, 0, 1000),
        "http_max_connections": (c.http_max_connections, 1, 65536),
        "approval_request_ttl": (c.approval_request_ttl, 1, 7 * 24 * 3600),
        "approval_ttl": (c.approval_ttl, 1, 24 * 3600),
    }
    for name, (value, low, high) in ints.items():
        if type(value) is not int or not low <= value <= high:
            out.append(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    if type(c.revocation_capacity) is int and c.revocation_capacity % 64:
        out.append("revocation_capacity must be a multiple of 64")
    for name in ("rotation_interval", "audit_flush_interval", "http_timeout"):
        value = getattr(c, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            out.append(f"{name} must be a positive number of seconds")
    if isinstance(c.rotation_interval, (int, float)) and c.rotation_interval < 60:
        out.append("rotation_interval below 60 s would rotate faster than relying parties refresh JWKS")
    for name in ("issuer", "token_type", "trust_domain", "check_listen", "api_listen", "http_listen",
                 "approval_listen"):
        value = getattr(c, name)
        if not isinstance(value, str) or not value.strip():
            out.append(f"{name} must be a non-empty string")
    for name in LISTENERS:
        value = getattr(c, name)
        # The HTTP listener is TCP only; the gRPC listeners, TLS front and HTTP Check take unix:PATH too.
        unix = name != "http_listen"
        if isinstance(value, str) and value.strip() and not (unix and value.startswith("unix:")):
            try:
                host_port(value)
            except ValueError:
                out.append(f"{name} must be HOST:PORT (a port of 0-65535){' or unix:PATH' if unix else ''}, "
                           f"got {value!r}")
    if not c.audiences or not all(isinstance(a, str) and _BOUNDARY_NAME.fullmatch(a) for a in c.audiences):
        out.append("audiences (trust boundaries) must be a non-empty list of names of a-z 0-9 _ . -")
    elif len(set(c.audiences)) != len(c.audiences):
        out.append("audiences must not repeat")
    if not all(isinstance(a, str) and a.startswith("spiffe://") for a in c.admins):
        out.append("admins must be SPIFFE IDs")
    if isinstance(c.check_listen, str) and c.check_listen.startswith("unix:") and c.workers != 1:
        out.append("several workers need a TCP check_listen (SO_REUSEPORT does not share Unix sockets)")
    if not isinstance(c.http_check_listen, str):
        out.append("http_check_listen must be HOST:PORT, unix:PATH, or empty (off)")
    elif c.http_check_listen.startswith("unix:") and c.workers != 1:
        out.append("several workers need a TCP http_check_listen (SO_REUSEPORT does not share Unix sockets)")
    elif c.http_check_listen and not c.http_check_listen.startswith("unix:") \
            and not _loopback(listen_host(c.http_check_listen)):
        # It has no TLS and believes the headers Envoy sets (a forwarded certificate among them):
        # another host reaching it could present any. Across hosts, the gRPC Check with check_mtls.
        out.append(f"http_check_listen {c.http_check_listen!r} is not loopback: the HTTP Check has no TLS "
                   "and trusts Envoy's headers; listen on 127.0.0.1, ::1 or unix:PATH next to Envoy, or use "
                   "the gRPC Check with check_mtls across hosts (README \"The HTTP Check\")")
    if not isinstance(c.check_mtls, bool):
        out.append("check_mtls must be true or false")
    out += _check_client_problems(c)
    tls = (c.tls_cert, c.tls_key, c.trust_bundle)
    if any(tls) and not all(tls):
        out.append("tls_cert, tls_key and trust_bundle go together")
    if c.pki_dir is not None and not isinstance(c.pki_dir, Path):
        out.append("pki_dir must be a path")
    elif c.pki_dir is not None and any(tls):
        out.append("pki_dir is the development CA's directory, unused with tls_cert, tls_key and "
                   "trust_bundle: name one or the other")
    if not any(tls) and c.trust_domain != DEV_TRUST_DOMAIN:
        out.append(f"trust domain {c.trust_domain!r} needs tls_cert, tls_key and trust_bundle "
                   "(only the development trust domain has a built-in CA)")
    issuers = c.jwt_issuers
    if not isinstance(issuers, tuple) or not all(isinstance(i, JwtIssuer) for i in issuers):
        out.append("jwt_issuers must be a list of {issuer, jwks_file, algorithms}")
    else:
        for issuer in issuers:  # loaded now so that a bad JWKS stops the start, not the first caller
            try:
                load_keys(issuer)
            except ConfigError as exc:
                out.append(str(exc))
        names = [i.issuer for i in issuers]
        if any(names.count(n) > 1 for n in names):
            out.append("jwt_issuers names an issuer twice")
    out += approver_problems(c.approvers, issuers if isinstance(issuers, tuple) else (), c.issuer,
                             c.development)
    return out
