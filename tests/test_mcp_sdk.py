"""Real agents: the official MCP SDK, both lines (1.x ``FastMCP``/``ClientSession``, 2.x
``MCPServer``/``mcp.Client``), server and agent in their own venvs, through the shipped Envoy config and
a real daemon: a session is one grant, a denial leaves the session alive and tells the agent why.

The two lines share a package name, so each has its own venv (.venv-mcp1/, .venv-mcp2/: ``make
mcp-venvs``, or built here on first use); the scripts in tests/mcp_agents/ run in them as subprocesses.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from limits_support import agent
from processes import Daemon, envoy, envoy_config, free_port, wait_for

from agentauthz import reasons
from agentauthz.errors import DaemonError
from agentauthz.serve.mcp_denials import DENIED_CODE
from agentauthz.v1 import agentauthz_pb2 as pb

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
AGENTS = Path(__file__).resolve().parent / "mcp_agents"
# The same requirements as the Makefile's mcp-venvs target: its stamps are these lines.
SDK_LINES = {"1": "mcp>=1.30,<2", "2": "mcp>=2.3,<3"}
AGENT = "spiffe://dev.local/agent/alpha"
POLICY = """
version: 1
defaults: {max_ttl: 600, max_sensitivity: internal}
rules:
  - {id: session, agents: ["spiffe://dev.local/agent/*"], tool: mcp, targets: [files],
     operations: [session, tools/list]}
  - {id: read-reports, agents: ["spiffe://dev.local/agent/*"], tool: read_file, targets: [files],
     operations: [call], arguments: [{name: path, prefix: /srv/reports, required: true}]}
  - {id: archive, agents: ["spiffe://dev.local/agent/*"], tool: archive, targets: [files], operations: [call],
     budget: {max_calls: 100}}
  - {id: delete, agents: ["spiffe://dev.local/agent/*"], tool: delete_file, targets: [files],
     operations: [call]}
"""
GRANTS = ["mcp:files:session,tools/list:internal", "read_file:files:call:internal",
          "archive:files:call:internal"]  # no delete_file: the policy would allow it, the task does not ask


def sdk_python(line: str) -> Path:
    """The interpreter of the venv holding SDK ``line``; built (once, stamped) when missing."""
    venv = ROOT / f".venv-mcp{line}"
    stamp, python = venv / ".installed-stamp", venv / "bin" / "python"
    if not stamp.exists() or stamp.read_text().strip() != SDK_LINES[line]:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", SDK_LINES[line]], check=True)
        stamp.write_text(SDK_LINES[line] + "\n")
    return python


class Stack:
    """One SDK line's MCP server behind the shipped Envoy config, in front of the shared daemon."""

    def __init__(self, line: str, daemon: Daemon, work: Path) -> None:
        self.line, self.daemon, self.work = line, daemon, work
        self.python = sdk_python(line)
        self.client = agent(daemon, work)
        self.proxy = free_port()
        self.url = f"http://127.0.0.1:{self.proxy}/mcp"
        self.server_log = work / f"server{line}.log"

    def mint(self, task: str) -> str:
        return self.mint_both(task)[0]

    def mint_both(self, task: str) -> tuple[str, str]:
        minted = self.client.mint(task, GRANTS)
        return minted.token, minted.token_id

    def requests_served(self) -> list[dict[str, Any]]:
        """What reached the MCP server: method, path, status of each HTTP request."""
        lines = self.server_log.read_text().splitlines()
        return [json.loads(x) for x in lines if x.startswith("{")]

    def run(self, *tokens: str, mode: str = "legacy", revoke: str = "") -> list[dict[str, Any]]:
        """The agent's transcript; the token ``revoke`` (an id) is revoked once the agent says ready."""
        proc = subprocess.Popen([str(self.python), str(AGENTS / "agent.py"), self.url, *tokens],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={"AGENT_MODE": mode, "PATH": "/usr/bin:/bin"})
        assert proc.stdin and proc.stdout
        steps = []
        try:
            for line in proc.stdout:
                steps.append(json.loads(line))
                if steps[-1]["step"] == "ready":
                    self.client.revoke(token_id=revoke)
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, (steps, proc.stderr.read() if proc.stderr else "")
        return steps


def by_step(steps: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["step"]: s for s in steps}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("mcp-sdk")
    (work / "policy.yaml").write_text(POLICY)
    d = Daemon(work / "state", {"policy_file": str(work / "policy.yaml")}).start()
    try:
        yield d
    finally:
        assert d.stop() == 0


@pytest.fixture(scope="module", params=sorted(SDK_LINES))
def stack(request: pytest.FixtureRequest, daemon: Daemon,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(request.param, daemon, tmp_path_factory.mktemp(f"sdk{request.param}"))
    upstream, admin = free_port(), free_port()
    with open(s.server_log, "w") as log:
        server = subprocess.Popen([str(s.python), str(AGENTS / "server.py"), str(upstream)],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _listening(upstream), 30, f"MCP server ({request.param}.x)")
        with envoy(envoy_config(daemon.check_port, upstream, s.proxy, admin), s.work, admin):
            yield s
    finally:
        server.terminate()
        server.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def session(stack: Stack) -> dict[str, dict[str, Any]]:
    """One scripted session (the legacy protocol on 2.x: the handshake, the GET stream, DELETE), and a
    second whose token is revoked midway."""
    revoked, revoked_id = stack.mint_both(f"revoked-{stack.line}")
    steps = stack.run(stack.mint(f"session-{stack.line}"), revoked, revoke=revoked_id)
    print(f"\nMCP {stack.line}.x transcript:\n" + "\n".join(json.dumps(s) for s in steps))
    return by_step([s for s in steps if s["step"] not in ("closed", "elicited")]) | {
        "elicited": next((s for s in steps if s["step"] == "elicited"), {}),
        "closed": {"count": sum(s["step"] == "closed" for s in steps)}}


def test_a_session_initializes_and_lists_under_the_session_grant(session: dict[str, Any]) -> None:
    assert session["initialize"]["server"] == "files"
    assert session["list"]["tools"] == ["archive", "delete_file", "read_file"]
    assert session["allowed"] == {**session["allowed"], "result": ["contents of /srv/reports/q1"],
                                  "is_error": False}


def denial(step: dict[str, Any], reason: str) -> dict[str, Any]:
    """The JSON-RPC error the agent read for a denied call, checked to name ``reason``."""
    assert "error" in step, step
    error = step["error"]
    assert error["code"] == DENIED_CODE and reason in error["message"], error
    assert error["data"]["reason"] == reason and error["data"]["decision_id"]
    return error  # type: ignore[no-any-return]


def test_an_argument_denial_tells_the_agent_why_and_the_session_goes_on(session: dict[str, Any]) -> None:
    error = denial(session["argument_denied"], reasons.ARGUMENT_OUTSIDE_PREFIX)
    assert error["data"]["status"] == 403 and "path under /srv/reports" in error["data"]["needed"]
    assert session["after_denials"]["result"] == ["contents of /srv/reports/q2"]


def test_a_scope_denial_names_the_grant_needed_and_the_session_goes_on(session: dict[str, Any]) -> None:
    error = denial(session["scope_denied"], reasons.SCOPE_DENIED)
    assert "delete_file:files:call:internal" in error["data"]["needed"]
    assert session["after_denials"]["result"] == ["contents of /srv/reports/q2"]
    assert "died" not in session


def test_an_elicitation_round_trip_passes_as_session_traffic(session: dict[str, Any]) -> None:
    # The agent's response to the server's elicitation/create is a JSON-RPC response: mcp:files:session.
    assert session["elicited"]["message"] == "archive /srv/reports/q1?"
    assert session["elicitation"]["result"] == ["archived /srv/reports/q1"]


def test_a_revoked_task_is_denied_mid_session_with_the_reason(session: dict[str, Any]) -> None:
    assert session["before_revoke"]["result"] == ["contents of /srv/reports/q1"]
    error = denial(session["after_revoke"], reasons.TOKEN_REVOKED)
    assert error["data"]["status"] == 401 and "new task" in error["data"]["needed"]
    assert session["closed"]["count"] == 2


def test_the_event_stream_and_the_session_end_reach_the_server(stack: Stack,
                                                                session: dict[str, Any]) -> None:
    served = stack.requests_served()
    assert {"method": "GET", "path": "/mcp", "status": 200} in served  # the event stream, opened
    # The first session's DELETE (the second's is denied: its task was revoked).
    assert {"method": "DELETE", "path": "/mcp", "status": 200} in served
    assert [r for r in served if r["method"] == "POST" and r["status"] == 202]  # notifications, the
    # elicitation response


def test_the_2x_default_mode_discovers_then_calls(stack: Stack) -> None:
    if stack.line != "2":
        pytest.skip("server/discover is 2.x's")
    steps = by_step(stack.run(stack.mint("auto-2"), mode="auto"))
    assert steps["list"]["tools"] == ["archive", "delete_file", "read_file"]
    assert steps["allowed"]["result"] == ["contents of /srv/reports/q1"]
    denial(steps["scope_denied"], reasons.SCOPE_DENIED)
    assert steps["after_denials"]["result"] == ["contents of /srv/reports/q2"]


def test_the_event_stream_outlives_envoys_default_route_timeout(stack: Stack) -> None:
    """The shipped route sets no timeout: a GET stream is still open after Envoy's default 15 s."""
    if stack.line != "1":
        pytest.skip("one SDK line's server is enough for a route setting")
    token = stack.mint("stream-1")
    headers = {"authorization": f"Bearer {token}", "accept": "application/json, text/event-stream"}
    session_id = _initialize(stack.proxy, headers)
    with socket.create_connection(("127.0.0.1", stack.proxy), timeout=10) as sock:
        sock.sendall(f"GET /mcp HTTP/1.1\r\nhost: 127.0.0.1:{stack.proxy}\r\nauthorization: Bearer {token}"
                     f"\r\naccept: text/event-stream\r\nmcp-session-id: {session_id}\r\n\r\n".encode())
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200"), head
        sock.settimeout(1)
        received, until = b"", time.monotonic() + 17  # the server's SSE pings may arrive meanwhile
        while time.monotonic() < until:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            assert chunk, f"Envoy closed the stream after {received!r}"
            received += chunk
        assert b"\r\n0\r\n\r\n" not in received  # nor did the stream end


def _initialize(port: int, headers: dict[str, str]) -> str:
    """An initialize and notifications/initialized through Envoy; the session id."""
    def post(message: dict[str, Any], **extra: str) -> http.client.HTTPResponse:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("POST", "/mcp", json.dumps(message).encode(),
                           {**headers, "content-type": "application/json", **extra})
        answer = connection.getresponse()
        answer.read()
        connection.close()
        assert answer.status in (200, 202), answer.status
        return answer
    answer = post({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}})
    session_id = answer.headers["mcp-session-id"]
    post({"jsonrpc": "2.0", "method": "notifications/initialized"}, **{"mcp-session-id": session_id})
    return session_id  # type: ignore[no-any-return]


# -- minting a session's token -------------------------------------------------------------------------


def mint_cli(daemon: Daemon, work: Path, *grants: str) -> subprocess.CompletedProcess[str]:
    agent(daemon, work)  # the identity in work/alpha
    command = [sys.executable, "-m", "agentauthz", "mint", "--server", daemon.api_address,
               "--identity", str(work / "alpha"), "--task", f"cli-{len(grants)}-{work.name}", "--json"]
    return subprocess.run(command + [f"--grant={g}" for g in grants], capture_output=True, text=True,
                          timeout=60)


def test_mint_json_lists_grants_with_their_argument_constraints_and_budget(daemon: Daemon,
                                                                           tmp_path: Path) -> None:
    done = mint_cli(daemon, tmp_path, *GRANTS)
    assert done.returncode == 0, done.stderr
    grants = {g["tool"]: g for g in json.loads(done.stdout)["grants"]}
    assert grants["read_file"]["arguments"] == [{"name": "path", "prefix": "/srv/reports", "required": True}]
    assert grants["archive"]["budget"] == {"max_calls": 100}
    assert grants["mcp"]["ops"] == ["session", "tools/list"] and "arguments" not in grants["mcp"]


def test_a_star_operation_is_refused_at_mint_with_the_reason(daemon: Daemon, tmp_path: Path) -> None:
    # Before: policy.narrow took '*' for a malformed grant and left it out of the token, silently.
    done = mint_cli(daemon, tmp_path, "mcp:files:*:internal", "read_file:files:call:internal")
    assert done.returncode != 0 and "'*' is no operation" in done.stderr and "session" in done.stderr
    client = agent(daemon, tmp_path)
    with pytest.raises(DaemonError, match="is no operation") as refused:
        client.mint("star", [pb.Grant(tool="mcp", target="files", operations=["*"], sensitivity="internal"),
                             pb.Grant(tool="read_file", target="files", operations=["call"],
                                      sensitivity="internal")])
    assert refused.value.reason == reasons.REQUEST_INVALID
