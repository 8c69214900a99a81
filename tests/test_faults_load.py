"""Faults under load: a key rotation storm, a Check slower than Envoy's timeout, more Checks than capacity.

Each runs the real daemon (and a real Envoy where Envoy decides what a failure means) and asserts
what must hold: no valid token refused, nothing accepted after its key is retired, and a daemon that
is slow or overloaded is never a reason to let a call through.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest
import yaml
from faults_support import AGENT, StalledChecks
from processes import (
    ENVOY_EXAMPLE,
    Daemon,
    echo_upstream,
    envoy,
    envoy_config,
    free_port,
    http_get,
    request,
    wait_for,
)

from agentauthz.client import CHECK_METHOD, Client, Identity, check_request, decision_from
from agentauthz.identity.devca import ensure_dev_pki, issue_svid
from agentauthz.v1 import agentauthz_pb2 as pb

ADMIN = "spiffe://dev.local/admin/ops"


def client_for(daemon: Daemon, work: Path, spiffe_id: str) -> Client:
    issue_svid(ensure_dev_pki(daemon.state_dir), spiffe_id, work)
    return Client(daemon.api_address, Identity.from_dir(work), check_server=daemon.check_address)


def test_key_rotation_storm_under_load(tmp_path: Path) -> None:
    """Rotations as fast as the API takes them while tokens are minted and checked: every token of a
    live key is allowed every time; once a key's retirement is acknowledged, its tokens never are."""
    daemon = Daemon(tmp_path / "state", {"admins": [ADMIN]}).start()
    try:
        agent = client_for(daemon, tmp_path / "agent", AGENT)
        admin = client_for(daemon, tmp_path / "admin", ADMIN)
        tokens: list[tuple[str, str]] = []  # (token, kid)
        answers: list[tuple[str, float, str]] = []  # (kid, when the Check was sent, reason)
        retired: dict[str, float] = {}  # kid -> when its retirement was acknowledged
        victims: list[tuple[str, str]] = []
        stop = threading.Event()
        failures: list[BaseException] = []

        def guarded(fn: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                try:
                    fn()
                except BaseException as exc:  # surfaced by the main thread
                    failures.append(exc)
                    stop.set()
            return run

        @guarded
        def mint() -> None:
            while not stop.is_set():
                m = agent.mint(f"t{len(tokens)}", ["demo:*:read"], ttl=120)
                tokens.append((m.token, m.key_id))

        @guarded
        def rotate() -> None:
            while not stop.is_set():
                admin._stub().RotateKeys(pb.RotateKeysRequest(), timeout=10)

        @guarded
        def check() -> None:
            with grpc.insecure_channel(daemon.check_address) as channel:
                call = channel.unary_unary(CHECK_METHOD)
                while not stop.is_set():
                    if not tokens:
                        time.sleep(0.001)
                        continue
                    pick = random.random()
                    if retired and pick < 0.3:  # the retired key's tokens, again and again
                        token, kid = random.choice(victims)
                    else:
                        token, kid = tokens[-1] if pick < 0.6 else random.choice(tokens)
                    sent = time.monotonic()
                    reason = decision_from(call(check_request(token, "demo", "a", "read"), timeout=10)).reason
                    answers.append((kid, sent, reason))

        threads = [threading.Thread(target=f) for f in (mint, rotate, check, check)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: len(tokens) > 30 or bool(failures), 30, "tokens under a rotation storm")
            victim = tokens[len(tokens) // 2][1]
            victims += [t for t in tokens if t[1] == victim]
            admin.revoke(key_id=victim)
            retired[victim] = time.monotonic()
            wait_for(lambda: sum(sent > retired[victim] for _, sent, _ in answers) > 300 or bool(failures),
                     30, "Checks after the retirement")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not failures, failures
        keys = [k for k in admin.jwks()["keys"]]
        assert len(keys) > 10, "the storm rotated keys many times"
        assert victim not in {k["kid"] for k in keys}
        false_denials = [(kid, r) for kid, _, r in answers if kid not in retired and r != "allow"]
        assert not false_denials, false_denials[:5]
        after = [r for kid, sent, r in answers if kid == victim and sent > retired[victim]]
        assert len(after) > 30 and set(after) <= {"key_revoked", "token_key_unknown"}, set(after)
    finally:
        assert daemon.stop() == 0


class Edge:
    """The daemon behind a real Envoy running examples/envoy.yaml, in front of the echo tool."""

    def __init__(self, daemon: Daemon, proxy_port: int, admin_port: int, token: str) -> None:
        self.daemon, self.port, self.admin_port, self.token = daemon, proxy_port, admin_port, token

    def call(self) -> tuple[int, float]:
        """(HTTP status, seconds) of one tool call through Envoy."""
        started = time.monotonic()
        status = request(self.port, "/demo/reports", "GET", self.token)[0]
        return status, time.monotonic() - started

    def stat(self, name: str) -> int:
        body = http_get(f"http://127.0.0.1:{self.admin_port}/stats?filter=^{name}$")[1].decode()
        return int(body.split(":")[1]) if ":" in body else 0


@contextmanager
def edge(work: Path, config: dict[str, object] | None = None) -> Iterator[Edge]:
    daemon = Daemon(work / "state", config).start()
    try:
        token = client_for(daemon, work / "agent", AGENT).mint("edge", ["demo:*:read:internal"]).token
        proxy_port, admin_port = free_port(), free_port()
        with echo_upstream() as upstream_port:
            config_text = envoy_config(daemon.check_port, upstream_port, proxy_port, admin_port)
            with envoy(config_text, work, admin_port):
                yield Edge(daemon, proxy_port, admin_port, token)
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGCONT)
        assert daemon.stop() == 0


def test_the_example_envoy_config_fails_closed() -> None:
    """What the tests below rely on, in the file users copy: a failed or late Check is a denial."""
    config = yaml.safe_load(ENVOY_EXAMPLE.read_text())
    filters = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    settings = next(f["typed_config"] for f in filters["typed_config"]["http_filters"]
                    if f["name"] == "envoy.filters.http.ext_authz")
    assert settings["failure_mode_allow"] is False
    assert settings["status_on_error"] == {"code": "ServiceUnavailable"}
    assert float(settings["grpc_service"]["timeout"].rstrip("s")) <= 1.0


def test_a_check_slower_than_envoys_timeout_is_a_denial(tmp_path: Path) -> None:
    """The daemon frozen (SIGSTOP: a stall, a swap storm, a debugger): Envoy answers 503 at its
    timeout, the tool never sees the call, and the late answers, when they come, change nothing."""
    with edge(tmp_path) as e:
        assert e.call()[0] == 200
        reached = e.stat("cluster.tool.upstream_rq_total")
        e.daemon.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:
            with ThreadPoolExecutor(8) as pool:
                results = list(pool.map(lambda _: e.call(), range(8)))
        finally:
            e.daemon.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        assert {status for status, _ in results} == {503}
        assert all(0.4 < seconds < 3 for _, seconds in results), results  # Envoy's 0.5 s timeout
        wait_for(lambda: e.call()[0] == 200, 10, "calls allowed again once the daemon runs")
        time.sleep(0.3)  # the frozen daemon's late allows have reached Envoy by now
        assert e.stat("cluster.tool.upstream_rq_total") == reached + 1  # only the call just above
        assert e.stat("http.tools.ext_authz.error") >= 8


def test_overload_is_shed_at_once_and_never_allowed(tmp_path: Path) -> None:
    """More Checks in progress than ``check_max_concurrent_rpcs``: the next one is refused at once
    (RESOURCE_EXHAUSTED; Envoy: 503 well before its timeout) rather than queued, however many come."""
    limit = 8
    with edge(tmp_path, {"check_max_concurrent_rpcs": limit}) as e:
        stalled = StalledChecks(e.daemon.check_address)
        try:
            holders = stalled.open(limit)
            check = Client(e.daemon.api_address, check_server=e.daemon.check_address)
            wait_for(lambda: _refused(check, e.token), 10, "the daemon to be at capacity")
            assert stalled.codes(holders) == [None] * limit, "the calls holding the slots wait on"
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                check.check(e.token, "demo", "reports", "read", "internal")
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Envoy's timeout is 0.5 s: anything queued until then would take at least that long.
            assert time.monotonic() - started < 0.45, "shed at once, not queued"
            reached = e.stat("cluster.tool.upstream_rq_total")
            for _ in range(5):
                status, seconds = e.call()
                assert status == 503 and seconds < 0.45, (status, seconds)  # refused, not timed out
            flood = stalled.open(1000)
            wait_for(lambda: None not in stalled.codes(flood), 10, "every call past the limit refused")
            assert set(stalled.codes(flood)) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert stalled.codes(holders) == [None] * limit
            assert e.stat("cluster.tool.upstream_rq_total") == reached
        finally:
            stalled.close()
        wait_for(lambda: e.call()[0] == 200, 10, "calls allowed again once the load is gone")


def _refused(client: Client, token: str) -> bool:
    try:
        client.check(token, "demo", "reports", "read", "internal")
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return False
