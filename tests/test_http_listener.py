"""The HTTP listener against a real daemon over raw sockets: slow and idle clients cannot hold it,
HEAD answers every GET route, and no header names a server version."""

from __future__ import annotations

import http.client
import json
import select
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from processes import ROOT, Daemon, free_port, http_get, wait_for
from prometheus_client import CONTENT_TYPE_LATEST

from agentauthz.config import Config
from agentauthz.state import statuslist

ROUTES = ("/healthz", "/.well-known/jwks.json", "/.well-known/agentauthz-audit-key", "/status-list",
          "/status-list/data", "/metrics", "/nope", "/status-list/nope")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """On the default HTTP timeout and connection bound."""
    d = Daemon(tmp_path_factory.mktemp("http") / "state", {"audiences": ["tools", "data"]}).start()
    yield d
    d.stop()


def call(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one request on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def closed_by_server(sock: socket.socket, wait: float = 0.0) -> bool:
    """The server has closed ``sock`` (end of stream or reset); an answer would be a failure."""
    if not select.select([sock], [], [], wait)[0]:
        return False
    try:
        data = sock.recv(4096)
    except ConnectionResetError:
        return True
    assert data == b"", f"answered instead of closed: {data[:200]!r}"
    return True


def test_every_route_answers_as_before(daemon: Daemon) -> None:
    expected = {
        "/healthz": (200, "text/plain"), "/.well-known/jwks.json": (200, "application/json"),
        "/.well-known/agentauthz-audit-key": (200, "application/json"),
        "/status-list": (200, statuslist.CONTENT_TYPE), "/status-list/data": (200, statuslist.CONTENT_TYPE),
        "/metrics": (200, CONTENT_TYPE_LATEST),
        "/nope": (404, "application/json"), "/status-list/nope": (404, "application/json")}
    for path in ROUTES:
        status, headers, body = call(daemon.http_port, path + "?ignored=1")
        assert (status, headers["content-type"]) == expected[path], path
        assert headers["cache-control"] == "no-store" and int(headers["content-length"]) == len(body)
    assert call(daemon.http_port, "/healthz")[2] == b"ok\n"
    assert call(daemon.http_port, "/nope")[2] == b'{"error":"not_found"}\n'
    assert {k["agentauthz_boundary"] for k in json.loads(call(daemon.http_port, "/.well-known/jwks.json")[2])[
        "keys"]} == {"tools", "data"}
    status, headers, body = call(daemon.http_port, "/healthz", "POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"


def test_head_answers_every_get_route_with_its_headers_and_no_body(daemon: Daemon) -> None:
    for path in ROUTES:
        get_status, get_headers, get_body = call(daemon.http_port, path)
        status, headers, body = call(daemon.http_port, path, "HEAD")
        assert (status, headers["content-type"], body) == (get_status, get_headers["content-type"], b""), path
        if path != "/metrics":  # its counters move between the two calls
            assert int(headers["content-length"]) == len(get_body), path


def test_no_header_names_a_server_version(daemon: Daemon) -> None:
    answers = [call(daemon.http_port, path, method) for path in ROUTES for method in ("GET", "HEAD")]
    answers.append(call(daemon.http_port, "/healthz", "DELETE"))
    with socket.create_connection(("127.0.0.1", daemon.http_port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n")  # malformed: aiohttp answers 400 itself
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = sock.recv(4096)
            assert chunk, raw
            raw += chunk
    head = raw.split(b"\r\n\r\n")[0].decode().split("\r\n")
    assert head[0].split()[1] == "400", head
    answers.append((400, dict(line.lower().split(": ", 1) for line in head[1:]), b""))
    for status, headers, _ in answers:
        assert headers.get("server", "agentauthz") == "agentauthz", (status, headers)
        assert not any(word in value.lower() for value in headers.values()
                       for word in ("aiohttp", "python", "uvloop")), (status, headers)


def test_a_slowloris_client_is_dropped_while_healthz_answers(daemon: Daemon) -> None:
    timeout = Config().http_timeout
    trickle = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * int(4 * timeout)
    sent = 0
    with socket.create_connection(("127.0.0.1", daemon.http_port), timeout=10) as slow:
        for byte in trickle:
            sent += 1
            try:
                slow.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            if closed_by_server(slow, wait=1.0):  # also the pace: a byte a second
                break
            assert daemon.healthz() == 200  # from another connection, meanwhile
        else:
            raise AssertionError(f"a client sending a byte a second was kept for {len(trickle)} s")
    assert sent <= 2 * timeout + 2  # closed within the timeout, give or take the pace
    assert daemon.healthz() == 200


def test_idle_connections_do_not_stop_healthz(tmp_path: Path) -> None:
    bound = 16
    # A long timeout: what closes the idle connections here is the bound, not their deadline.
    d = Daemon(tmp_path / "state", {"http_timeout": 600, "http_max_connections": bound}).start()
    idle: list[socket.socket] = []
    try:
        for _ in range(6 * bound):
            idle.append(socket.create_connection(("127.0.0.1", d.http_port), timeout=10))
        assert d.healthz() == 200
        # Each new connection past the bound closed the one idle the longest: the first ones.
        wait_for(lambda: sum(closed_by_server(s) for s in idle[:4 * bound]) == 4 * bound, 30,
                 "the oldest idle connections to be closed")
        assert d.healthz() == 200
        # A client that keeps its connection and asks again is answered too.
        conn = http.client.HTTPConnection("127.0.0.1", d.http_port, timeout=10)
        for _ in range(3):
            conn.request("GET", "/healthz")
            assert conn.getresponse().read() == b"ok\n"
        conn.close()
    finally:
        for s in idle:
            s.close()
        assert d.stop() == 0


def test_every_listener_serves_on_ipv6_loopback(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("check", "api", "http", "approval", "http-check")}
    args = [a for name, port in ports.items() for a in (f"--{name}-listen", f"[::1]:{port}")]
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agentauthz", "serve", "--state-dir",
                                 str(tmp_path / "s"), *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        def serving() -> bool:
            assert proc.poll() is None, log.read_text()  # exited: say why now
            return http_get(f"http://[::1]:{ports['http']}/healthz")[0] == 200
        wait_for(serving, 30, "/healthz on [::1]")
        for name in ("check", "api", "approval", "http-check"):
            socket.create_connection(("::1", ports[name]), timeout=10).close()
        conn = http.client.HTTPConnection("::1", ports["http-check"], timeout=10)
        conn.request("GET", "/demo/reports", headers={"x-agentauthz-path": "/demo/reports"})
        assert conn.getresponse().status == 401  # decided: no token
        conn.close()
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
