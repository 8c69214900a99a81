"""examples/envoy-http.yaml with its HTTP Check on a Unix socket, as its cluster's comment says: the
daemon on ``http_check_listen: unix:PATH``, Envoy's endpoint ``{pipe: {path: PATH}}``, through a real
Envoy. The decisions are the TCP listener's; the socket file admits its owner and group only, under
any umask, since whoever connects is believed about the route and certificate headers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import yaml
from processes import Daemon, connects_as, echo_upstream, envoy, free_port, request
from test_e2e_envoy import AGENT, OTHER_AGENT
from test_e2e_envoy_http import HttpStack, http_envoy_config

from agentauthz import reasons
from benchmarks.load.http_check import accepting


def test_the_example_over_a_unix_socket_decides_as_over_tcp(socket_dir: Path) -> None:
    sock = socket_dir / "check.sock"
    umask = os.umask(0)  # the daemon inherits it; the socket's mode must not follow it
    try:
        daemon = Daemon(socket_dir / "state", {"leeway": 0, "http_check_listen": f"unix:{sock}"}).start()
    finally:
        os.umask(umask)
    proxy_port, admin_port = free_port(), free_port()
    try:
        assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o660
        if os.geteuid() == 0:  # root connects anyway: ask as another user, in the socket's group or not
            assert connects_as(65534, 65534, sock) == "PermissionError"
            assert connects_as(65534, sock.stat().st_gid, sock) == "connected"
        with echo_upstream() as upstream_port:
            config = yaml.safe_load(http_envoy_config(1, upstream_port, proxy_port, admin_port))
            cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "agentauthz")
            cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] = {
                "pipe": {"path": str(sock)}}
            with envoy(yaml.safe_dump(config), socket_dir, admin_port):
                s = HttpStack(daemon, proxy_port, socket_dir, admin_port)
                minted = s.mint("unix", ["demo:reports:read:internal"])
                token = minted.token
                status, body, headers = s.call(token)
                assert status == 200, body
                assert body["headers"]["x-agentauthz-task"] == "unix"
                assert "authorization" not in body["headers"]
                # A route's own headers replace a client's copies: DELETE stays delete.
                forged = {"x-agentauthz-route-operation": "read", "x-agentauthz-route-bogus": "1"}
                assert request(proxy_port, "/demo/reports", "DELETE", token, headers=forged)[:2] == (
                    403, {"error": reasons.SCOPE_DENIED})
                forged = {"x-forwarded-client-cert": f"By=spiffe://dev.local/agentauthz;URI={OTHER_AGENT}"}
                assert request(proxy_port, "/demo/reports", "GET", token, headers=forged)[0] == 200
                assert s.call(None)[0] == 401
                assert s.call(token[:-4] + "AAAA")[0] == 401
                s.clients[AGENT].revoke(token_id=minted.token_id)
                assert s.call(token)[0] == 401
    finally:
        assert daemon.stop() == 0
    assert not sock.exists() or not accepting(f"unix:{sock}")  # nothing listens once the daemon stopped
