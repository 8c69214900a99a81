"""Shared by test_mcp.py and test_budgets.py: a policy with constrained and budgeted rules, an agent
identity against a real daemon, and CheckRequests as Envoy sends them (bodies included)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Callable

import grpc
from envoy.service.auth.v3 import attribute_context_pb2 as attrs
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from processes import Daemon

from agentauthz import reasons
from agentauthz.client import CHECK_METHOD, Client, Decision, Identity, decision_from
from agentauthz.identity.devca import ensure_dev_pki, issue_svid
from agentauthz.v1 import agentauthz_pb2 as pb

AGENT = "spiffe://dev.local/agent/alpha"
MCP_ROUTE = {"mcp": "true", "target": "files", "sensitivity": "internal"}

POLICY = """
version: 1
defaults: {max_ttl: 600, max_sensitivity: internal, max_delegation_depth: 2}
rules:
  - id: mcp-session            # initialize, tools/list, ping ... on the files server
    agents: ["spiffe://dev.local/agent/*"]
    tool: mcp
    targets: [files]
    operations: ["*"]
  - id: read-reports
    agents: ["spiffe://dev.local/agent/*"]
    tool: read_file
    targets: [files]
    operations: [call]
    arguments:
      - {name: path, prefix: /srv/reports, required: true}
      - {name: encoding, one_of: [utf-8, ascii]}
      - {name: max_bytes, max: 65536}
  - id: search-five-times
    agents: ["spiffe://dev.local/agent/*"]
    tool: search
    targets: [files]
    operations: [call]
    budget: {max_calls: 5}
  - id: echo-unconstrained
    agents: ["spiffe://dev.local/agent/*"]
    tool: echo
    targets: [files]
    operations: [call]
  - id: counted
    agents: ["spiffe://dev.local/agent/*"]
    tool: counted
    targets: ["*"]
    operations: [read]
    budget: {max_calls: 40}
  - id: ticker
    agents: ["spiffe://dev.local/agent/*"]
    tool: ticker
    targets: ["*"]
    operations: [read]
    budget: {rate_per_second: 0.25, burst: 2}
  - id: demo
    agents: ["spiffe://dev.local/agent/*"]
    tool: demo
    targets: ["*"]
    operations: [read, write]
"""


def start(work: Path, config: dict[str, Any] | None = None) -> Daemon:
    policy = work / "policy.yaml"
    policy.write_text(POLICY)
    return Daemon(work / "state", {"policy_file": str(policy), "leeway": 0, **(config or {})}).start()


def agent(daemon: Daemon, work: Path, spiffe_id: str = AGENT) -> Client:
    """A client holding an X.509-SVID for ``spiffe_id`` (issued once per work directory)."""
    out = work / spiffe_id.rsplit("/", 1)[1]
    if not (out / "svid.pem").exists():
        issue_svid(ensure_dev_pki(daemon.state_dir), spiffe_id, out)
    return Client(daemon.api_address, Identity.from_dir(out), check_server=daemon.check_address)


def grant(tool: str, target: str = "files", ops: tuple[str, ...] = ("call",), sensitivity: str = "internal",
          **extra: Any) -> pb.Grant:
    return pb.Grant(tool=tool, target=target, operations=list(ops), sensitivity=sensitivity, **extra)


def rpc(method: str, params: Any = None, id: Any = 1) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if id is not None:
        message["id"] = id
    if params is not None:
        message["params"] = params
    return json.dumps(message).encode()


def tool_call(name: str, arguments: Any = None) -> bytes:
    return rpc("tools/call", {"name": name, **({} if arguments is None else {"arguments": arguments})})


def check_request(token: str | None, body: bytes = b"", extensions: dict[str, str] | None = None,
                  method: str = "POST", path: str = "/mcp/files", headers: dict[str, str] | None = None,
                  ) -> ext_authz.CheckRequest:
    """A CheckRequest as Envoy sends it for an MCP route with ``pack_as_bytes``."""
    h = {"content-type": "application/json", **({"content-length": str(len(body))} if body else {})}
    if token:
        h["authorization"] = f"Bearer {token}"
    h.update(headers or {})
    return ext_authz.CheckRequest(attributes=attrs.AttributeContext(
        request=attrs.AttributeContext.Request(http=attrs.AttributeContext.HttpRequest(
            method=method, path=path, headers=h, raw_body=body)),
        context_extensions=MCP_ROUTE if extensions is None else extensions))


class Checker:
    """Check calls on one channel; ``fresh=True`` gives the channel its own connection."""

    def __init__(self, address: str, fresh: bool = False) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)] if fresh else []
        self.channel = grpc.insecure_channel(address, options=options)
        self._call = self.channel.unary_unary(CHECK_METHOD)

    def __call__(self, request: ext_authz.CheckRequest) -> Decision:
        return decision_from(self._call(request.SerializeToString(), timeout=10))

    def close(self) -> None:
        self.channel.close()


def plain(token: str, tool: str, target: str = "a", operation: str = "read") -> ext_authz.CheckRequest:
    """A non-MCP request naming tool/target/operation through the route, as most routes do."""
    return check_request(token, extensions={"tool": tool, "target": target, "operation": operation},
                         method="GET", path=f"/{tool}/{target}")


def allowed_from_processes_and_threads(charge_in: Callable[[int], Callable[[], str]],
                                       charge_here: Callable[[], str]) -> int:
    """Calls allowed out of 200 from each of 3 forked processes (``charge_in(i)`` makes child i's
    charger, after the fork) and 100 from each of 3 threads of this one: a budget's exactness under
    concurrency, whatever keeps the count."""
    readers, pids = [], []
    for i in range(3):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            os.close(r)
            charge = charge_in(i)
            os.write(w, str(sum(charge() == reasons.ALLOW for _ in range(200))).encode())
            os._exit(0)
        os.close(w)
        readers.append(r)
        pids.append(pid)
    counts: list[int] = []

    def here() -> None:
        counts.append(sum(charge_here() == reasons.ALLOW for _ in range(100)))
    threads = [threading.Thread(target=here) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, pid in zip(readers, pids, strict=True):
        counts.append(int(os.read(r, 64)))
        os.close(r)
        assert os.waitpid(pid, 0)[1] == 0
    return sum(counts)
