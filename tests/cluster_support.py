"""Shared by test_cluster.py and test_cluster_faults.py: daemons of one cluster on a real redis-server."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import grpc
from processes import ROOT, Daemon, http_get
from redis_proc import RedisServer

from agentauthz.client import CHECK_METHOD, Client, Decision, Identity, check_request, decision_from
from agentauthz.identity.devca import ensure_dev_pki, issue_svid

AGENT = "spiffe://dev.local/agent/alpha"
READ = ["demo:*:read"]
ENVOY_CLUSTER_EXAMPLE = ROOT / "examples" / "envoy-cluster.yaml"
# Reconnect at once: a node restarting must be asked the moment it listens, not after gRPC's backoff.
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.min_reconnect_backoff_ms", 20),
                  ("grpc.max_reconnect_backoff_ms", 50), ("grpc.use_local_subchannel_pool", 1)]


class Node(Daemon):
    """A daemon of the cluster; ``flags`` go to every (re)start, e.g. ``--cluster URL --node-id N``."""

    def __init__(self, name: str, state_dir: Path, config: dict[str, Any], flags: tuple[str, ...]) -> None:
        super().__init__(state_dir, config)
        self.name = name
        self.flags = flags

    def start(self, timeout: float = 60.0, *extra: str) -> Node:
        super().start(timeout, *self.flags, *extra)
        return self

    def start_in_background(self) -> threading.Thread:
        """Start without waiting for /healthz (the caller probes Check meanwhile); join() the thread."""
        failures: list[BaseException] = []

        def run() -> None:
            try:
                self.start()
            except BaseException as exc:  # surfaced by join_start
                failures.append(exc)
        thread = threading.Thread(target=run, daemon=True)
        thread.failures = failures  # type: ignore[attr-defined]
        thread.start()
        return thread

    def metrics(self) -> dict[str, float]:
        """This node's /metrics samples, by ``name{labels}``."""
        status, body = http_get(f"http://127.0.0.1:{self.http_port}/metrics")
        assert status == 200, body
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def decisions(self, reason: str) -> float:
        return self.metrics().get(f'agentauthz_check_decisions_total{{reason="{reason}"}}', 0.0)


class Cluster:
    """One redis-server (appendfsync always, unless not ``persistent``), one shared development CA, and the
    nodes added to it."""

    def __init__(self, work: Path, *, cluster: dict[str, Any] | None = None,
                 config: dict[str, Any] | None = None, persistent: bool = True) -> None:
        self.work = work
        # Not persistent: snapshots only (SAVE), as Debian's default redis.conf has it.
        self.redis = RedisServer(work / "redis", persistent=persistent).start()
        self.pki = work / "pki"
        self.cluster_settings = dict(cluster or {})  # overrides of the cluster: section (none: the defaults)
        self.config = dict(config or {})
        self.nodes: dict[str, Node] = {}
        self._clients: dict[tuple[str, str], Client] = {}

    def add(self, name: str, *, flags: bool = False, start: bool = True) -> Node:
        """Node ``name``: its cluster settings in its config file, or (``flags``) only on its command line."""
        config: dict[str, Any] = {"pki_dir": str(self.pki), **self.config}
        extra: tuple[str, ...] = ()
        if flags:
            extra = ("--cluster", self.redis.url, "--node-id", name)
        else:
            config["cluster"] = {"redis": self.redis.url, "node_id": name, **self.cluster_settings}
        node = self.nodes[name] = Node(name, self.work / name, config, extra)
        return node.start() if start else node

    def start_all(self, *names: str, flags: bool = False) -> list[Node]:
        """Several nodes started at once (the first joins found the epoch; the others race it)."""
        nodes = [self.add(n, flags=flags, start=False) for n in names]
        threads = [n.start_in_background() for n in nodes]
        for t in threads:
            join_start(t)
        return nodes

    def identity(self, agent: str = AGENT) -> Identity:
        out = self.work / "agents" / agent.rsplit("/", 1)[1]
        if not (out / "svid.pem").exists():
            any_node = next(iter(self.nodes.values()))
            issue_svid(ensure_dev_pki(any_node.state_dir, pki_dir=self.pki), agent, out)
        return Identity.from_dir(out)

    def client(self, name: str, agent: str = AGENT, timeout: float = 5.0) -> Client:
        """An agent's client of node ``name`` (API over mTLS, Check in the clear as Envoy asks)."""
        key = (name, agent)
        if key not in self._clients:
            node = self.nodes[name]
            self._clients[key] = Client(node.api_address, self.identity(agent),
                                        check_server=node.check_address, timeout=timeout)
        return self._clients[key]

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.proc is not None and node.proc.poll() is None:
                try:
                    node.stop()
                except Exception:  # a node stuck on a stopped Redis: gone either way
                    node.kill()
        self.redis.stop()


def join_start(thread: threading.Thread, timeout: float = 90.0) -> None:
    thread.join(timeout)
    assert not thread.is_alive(), "a node did not start in time"
    failures = thread.failures  # type: ignore[attr-defined]
    if failures:
        raise failures[0]


class Probe:
    """Check calls to one node on a channel of their own that reconnects at once."""

    def __init__(self, address: str, timeout: float = 2.0) -> None:
        self.channel = grpc.insecure_channel(address, options=FAST_RECONNECT)
        self._call = self.channel.unary_unary(CHECK_METHOD)
        self.timeout = timeout

    def __call__(self, token: str, operation: str = "read") -> Decision:
        return decision_from(self._call(check_request(token, "demo", "reports", operation),
                                        timeout=self.timeout))

    def close(self) -> None:
        self.channel.close()


def slot_of(token_id: str) -> int:
    """The revocation slot a token id names (``<slot>.<exp>.<mac>``)."""
    return int(token_id.split(".", 1)[0])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` (errors are "not yet"); the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            if predicate():
                return time.monotonic() - started
        except (grpc.RpcError, OSError):
            pass
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def wait_for_a_recovery(nodes: list[Node], what: str, timeout: float = 30.0) -> None:
    """Wait until one of ``nodes`` has recovered. When Redis goes back under the same epoch, the first
    node to notice raises the numbering and re-publishes its journal; one that looks after it finds the
    numbering past what it applied and reads that journal instead (it recovers only if it had applied
    more, which the re-published numbers then show it)."""
    wait_until(lambda: sum(n.metrics()["agentauthz_cluster_recoveries_total"] for n in nodes) >= 1,
               timeout, what)


def envoy_cluster_config(check_ports: list[int], upstream_port: int, listen_port: int,
                         admin_port: int) -> str:
    """The shipped one-Envoy-three-daemons example with its fixed ports swapped for the test's."""
    ports = {9191: check_ports[0], 9291: check_ports[1], 9391: check_ports[2], 8080: upstream_port,
             10000: listen_port, 9901: admin_port}
    text = ENVOY_CLUSTER_EXAMPLE.read_text()
    return re.sub(r"port_value: (\d+)",
                  lambda m: f"port_value: {ports.get(int(m.group(1)), m.group(1))}", text)


def mint_many(cluster: Cluster, names: str, count: int, prefix: str, agent: str = AGENT) -> list[Any]:
    """``count`` tokens (one task each), minted round robin on the nodes ``names``, 8 at a time."""
    clients = [cluster.client(n, agent) for n in names]  # made here: the client cache is not threaded
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda i: clients[i % len(clients)].mint(f"{prefix}-{i}", READ), range(count)))


def reasons_on(nodes: list[Node], token: str) -> list[str]:
    """What each node answers a read of ``token`` (fresh probes: a node may have restarted)."""
    out = []
    for node in nodes:
        probe = Probe(node.check_address)
        try:
            out.append(probe(token).reason)
        finally:
            probe.close()
    return out


class Watch:
    """Asks every node about revoked tokens, over and over, in the background; notes every allow."""

    def __init__(self, nodes: list[Node], tokens: list[str]) -> None:
        self.allows: list[tuple[float, str]] = []  # (monotonic time, node) of each allow answered
        self.answers: set[str] = set()
        self._stop = threading.Event()
        self._probes = [(n.name, Probe(n.check_address, timeout=1.0)) for n in nodes]
        self._tokens = tokens
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for token in self._tokens:
                for name, probe in self._probes:
                    try:
                        decision = probe(token)
                    except grpc.RpcError:
                        continue
                    self.answers.add(decision.reason)
                    if decision.allowed:
                        self.allows.append((time.monotonic(), name))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for _, probe in self._probes:
            probe.close()
