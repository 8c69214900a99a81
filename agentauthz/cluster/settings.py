"""Cluster-mode settings (the config's ``cluster:`` section, ``serve --cluster --node-id``), validated."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit

from ..errors import ConfigError

_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


@dataclass(frozen=True)
class ClusterSettings:
    """Where the shared state lives and how stale a node may let its view grow before it denies."""

    redis: str  # redis://[:password@]HOST:PORT/DB or rediss:// (TLS)
    node_id: str
    # A node that has not completed a read of the revocation stream for this long denies
    # revocation_stale: the bound on how long a revoked token may still be honoured anywhere.
    max_staleness: float = 2.0
    # Redis replicas that must hold a revocation before it is acknowledged (WAIT), and how long to wait.
    wait_replicas: int = 0
    wait_timeout: float = 1.0
    password: str | None = None  # instead of in the URL, e.g. from a secret-mounted config file
    tls_ca: str | None = None  # rediss:// with this CA bundle
    sentinels: tuple[tuple[str, int], ...] = ()  # Sentinel HA: the sentinels, and the master's name
    sentinel_master: str = ""
    key_prefix: str = "agentauthz"  # several clusters may share one Redis under different prefixes

    def __post_init__(self) -> None:
        problems = list(_problems(self))
        if problems:
            raise ConfigError("invalid cluster settings: " + "; ".join(problems))

    @classmethod
    def from_mapping(cls, data: Any) -> ClusterSettings:
        if not isinstance(data, Mapping):
            raise ConfigError("cluster must be a mapping (redis, node_id, max_staleness, ...)")
        known = {"redis", "node_id", "max_staleness", "wait_replicas", "wait_timeout", "password", "tls_ca",
                 "sentinels", "sentinel_master", "key_prefix"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"cluster: unknown setting(s): {', '.join(map(str, unknown))}")
        values = dict(data)
        if "sentinels" in values:
            values["sentinels"] = _sentinels(values["sentinels"])
        if "redis" not in values and "sentinels" not in values:
            raise ConfigError("cluster needs redis (redis://HOST:PORT/DB), or sentinels and sentinel_master")
        values.setdefault("redis", "")  # with sentinels: the master they name
        # A pod's or host's name is unique where one node runs per host; --node-id names the others.
        values.setdefault("node_id", socket.gethostname().split(".")[0])
        return cls(**values)


def _sentinels(raw: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(raw, list):
        raise ConfigError("cluster.sentinels must be a list of HOST:PORT")
    out = []
    for item in raw:
        host, _, port = str(item).rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"cluster.sentinels: {item!r} is not HOST:PORT")
        out.append((host, int(port)))
    return tuple(out)


def _problems(s: ClusterSettings) -> list[str]:
    out = []
    url = urlsplit(s.redis) if isinstance(s.redis, str) else None
    if s.sentinels and s.redis == "":
        pass  # the sentinels name the master
    elif url is None or url.scheme not in ("redis", "rediss", "unix") or not (url.hostname or url.path):
        out.append(f"redis must be a redis://HOST:PORT/DB, rediss:// or unix:// URL, got {s.redis!r}")
    if not isinstance(s.node_id, str) or not _NODE_ID.fullmatch(s.node_id):
        out.append("node_id must be 1-63 characters of A-Z a-z 0-9 _ . - (unique in the cluster)")
    for name, low, high in (("max_staleness", 0.05, 3600.0), ("wait_timeout", 0.001, 60.0)):
        value = getattr(s, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            out.append(f"{name} must be a number of seconds in [{low}, {high}]")
    if type(s.wait_replicas) is not int or not 0 <= s.wait_replicas <= 16:
        out.append("wait_replicas must be an integer in [0, 16]")
    if s.sentinels and not s.sentinel_master:
        out.append("sentinels need sentinel_master, the name of the monitored master")
    if not isinstance(s.key_prefix, str) or not _PREFIX.fullmatch(s.key_prefix):
        out.append("key_prefix must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    return out
