"""Envoy's HTTP ext_authz mode for the HTTP Check benchmark: what Envoy sends the Check, and its config."""

from __future__ import annotations

import json
from typing import Any

from . import envoy

HTTP_PATH = envoy.ROUTE_PATH  # GET /demo/reports: tool demo, target reports, operation read
EXAMPLE_HTTP = envoy.ROOT / "examples" / "envoy-http.yaml"


def http_headers(token: str) -> dict[str, str]:
    """What Envoy sends the HTTP Check for GET /demo/reports on a route naming what the gRPC rows'
    context_extensions name (agentauthz.client.check_request): the path and route headers Envoy's
    header_mutation sets (README "The HTTP Check"), and the bearer."""
    from agentauthz.client import DEFAULT_SENSITIVITY
    route = {"tool": "demo", "target": "reports", "operation": "read", "sensitivity": DEFAULT_SENSITIVITY}
    return {"authorization": f"Bearer {token}", "x-agentauthz-path": HTTP_PATH,
            **{f"x-agentauthz-route-{k}": v for k, v in route.items()}}



def _http2(cluster: dict[str, Any]) -> dict[str, Any]:
    cluster["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}
    return cluster


def http_mode(address: str) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any], str]:
    """(HTTP filters, the HTTP Check's cluster, the route, where they came from) for Envoy's HTTP mode:
    examples/envoy-http.yaml's filters, cluster and GET /demo/reports route when it is shipped, else a
    minimal one: header_mutation setting ``http_headers``' path and route headers (over any client copy),
    ``http_service`` on an HTTP/2 upstream, ``x-agentauthz-*`` copied upstream."""
    try:
        import yaml
        config = yaml.safe_load(EXAMPLE_HTTP.read_text())
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        filters = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.router"]
        ext = next(f for f in filters if f["name"] == "envoy.filters.http.ext_authz")
        name = ext["typed_config"]["http_service"]["server_uri"]["cluster"]
        cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == name)
        routes = [r for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]]
        route = next(r for r in routes if HTTP_PATH in json.dumps(r["match"]) and "route" in r)
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] = \
            envoy._address(address)
        cluster.pop("transport_socket", None)  # the benchmark's Check listens in plaintext
        source = str(EXAMPLE_HTTP.relative_to(envoy.ROOT))
        return filters, cluster, {**route, "route": {"cluster": "tool"}}, source
    except (OSError, KeyError, IndexError, StopIteration, TypeError):
        pass
    sets = {k: v for k, v in http_headers("").items() if k != "authorization"}
    sets["x-agentauthz-path"] = "%REQ(:PATH)%"
    mutation = {"name": "envoy.filters.http.header_mutation", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        "mutations": {"request_mutations": [
            {"append": {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}
            for k, v in sets.items()]}}}
    ext = {"name": "envoy.filters.http.ext_authz", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3", "failure_mode_allow": False,
        "http_service": {
            "server_uri": {"uri": f"http://{address}", "cluster": "agentauthz_http", "timeout": "0.5s"},
            "authorization_request": {"allowed_headers": {"patterns": [
                {"exact": "authorization"}, {"prefix": "x-agentauthz-"}]}},
            "authorization_response": {
                "allowed_upstream_headers": {"patterns": [{"prefix": "x-agentauthz-"}]}}}}}
    return ([mutation, ext], _http2(envoy._static_cluster("agentauthz_http", address)),
            {"match": {"prefix": "/"}, "route": {"cluster": "tool"}}, "minimal http_service (no example)")
