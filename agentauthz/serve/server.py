"""Assembles listeners, services and background threads; handles signals and graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from ..audit import metrics, top_agents
from ..audit.files import worker_log
from ..authority.core import Authority, open_audit
from ..cluster import replication
from ..config import Config
from ..errors import ConfigError
from ..identity.spiffe import load_bundle
from ..state.keys import RotationThread
from ..v1 import agentauthz_pb2, agentauthz_pb2_grpc
from . import approval_api, extauthz, http_check, listeners, workers
from .api import ApiService
from .http_listener import HttpListener, Routes
from .metrics import Metrics
from .tls_front import BACKEND_HOST, Peers, TlsFront

log = logging.getLogger("agentauthz.server")  # the name operators filter on, kept across the layout

API_SERVICE = agentauthz_pb2.DESCRIPTOR.services_by_name["AgentAuthz"].full_name
HOUSEKEEPING_INTERVAL = 5.0
AUDIT_HEALTH_INTERVAL = 0.1  # how soon gRPC health reports an audit log that cannot write (and recovery)
APPROVAL_MAX_CONNECTIONS = 256  # humans' listener: a few people, each a connection or two
DEV_HINT = """
agentauthz is running on development defaults. In another terminal:

  {cmd} dev-identity spiffe://dev.local/agent/alpha --state-dir {state} --out demo/alpha
  {cmd} mint --server {api} --identity demo/alpha --task demo-1 --grant 'demo:*:read' --json
  {cmd} check --server {check} --token TOKEN --tool demo --target reports --operation read

Grants that need a human (demo delete) wait for one; approve as a development human:

  {cmd} dev-human alice --state-dir {state} --out demo/alice.jwt
  {cmd} approvals --server {approvals} --credential demo/alice.jwt --state-dir {state}

README.md walks through calling a tool through Envoy. Ctrl-C drains and stops.
"""


def command_in_use() -> str:
    """The command that started this process, spelled so that it can be typed again from here."""
    def typed(path: str) -> str:
        full = os.path.abspath(path)
        inside = os.path.relpath(full)
        return shlex.quote(full if inside.startswith("..") else inside)
    argv0 = sys.argv[0]
    if os.path.basename(argv0) == "__main__.py":
        return f"{typed(sys.executable)} -m agentauthz"
    if not os.path.basename(argv0).startswith("agentauthz"):  # embedded (tests): nothing better to say
        return "agentauthz"
    on_path = shutil.which("agentauthz")
    return "agentauthz" if on_path and os.path.abspath(on_path) == os.path.abspath(argv0) else typed(argv0)


def freeze_startup_objects() -> None:
    """Exempt everything loaded at start from the cyclic GC: every Check allocates, and each full
    collection would otherwise walk the policy, keys and modules again (measured: ~10% of CPU/Check)."""
    gc.collect()
    gc.freeze()


class _GenericHandlersOnly:
    """A gRPC server as registration helpers see it, taking their generic handlers only."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        pass  # the generic handlers added alongside serve these methods too


class Housekeeping(threading.Thread):
    """Slides the revocation window, compacts the journal and drops expired cache entries."""

    def __init__(self, authority: Authority, interval: float = HOUSEKEEPING_INTERVAL) -> None:
        super().__init__(name="agentauthz-housekeeping", daemon=True)
        self._authority = authority
        self._interval = interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self._interval):
            try:
                self._authority.revocations.slide()
                for verifier in self._authority.verifiers.values():
                    verifier.purge_expired(self._authority.clock())
            except Exception:  # keep the thread alive; the next round retries
                log.exception("housekeeping failed")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop_event.set()
        self.join(timeout)


def api_tls(config: Config) -> tuple[bytes, bytes, bytes]:
    """(server key, server certificate, trust bundle) PEMs: configured, or the dev PKI."""
    if config.tls_cert and config.tls_key and config.trust_bundle:
        try:
            return (config.tls_key.read_bytes(), config.tls_cert.read_bytes(),
                    config.trust_bundle.read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read TLS material: {exc}") from None
    from ..identity.devca import ensure_dev_pki
    pki = ensure_dev_pki(config.state_dir, trust_domain=config.trust_domain, pki_dir=config.pki_dir)
    return pki.server_key_pem, pki.server_cert_pem, pki.ca_cert_pem


class Daemon:
    """One running agentauthz: Check, API and HTTP listeners over one Authority."""

    def __init__(self, config: Config, reserved: listeners.Reserved | None = None) -> None:
        self.config = config
        # The listeners' addresses, held until they are bound (listeners.reserve): none held, none kept.
        self.reserved = reserved or listeners.Reserved([])
        # TLS first: in development this creates the dev PKI and marks the state dir as such.
        self.tls_key, self.tls_cert, self.trust_bundle = api_tls(config)
        self.authority = Authority(config)
        self.serving = threading.Event()
        self.health = health.aio.HealthServicer()
        self.check_server: Any = None
        self.api_server: Any = None
        self.api_front: TlsFront | None = None
        self.approval_server: Any = None
        self.http: HttpListener | None = None
        self.http_check: http_check.HttpCheckServer | None = None
        self._threads: list[Any] = []
        self.fleet: workers.Fleet | None = None
        self._audit_health: asyncio.Task[None] | None = None
        self._cluster_follower: asyncio.Task[None] | None = None
        self._cluster_stop = asyncio.Event()
        # Every Check process's counters, made before any worker is forked: row 0 is this process's.
        self.meters = metrics.MeterTable(max(1, config.workers))
        self.denials = top_agents.DenialTable(max(1, config.workers), top_agents.slots_for(
            config.metrics_top_agents)) if config.metrics_top_agents else None

    def fork_workers(self) -> None:
        """With ``workers > 1``, fork the extra Check workers; before any gRPC object exists."""
        if self.config.workers > 1:
            self.fleet = workers.Fleet(self.config.workers - 1, self.serve_worker, self.authority.index,
                                       self._worker_restarted)
            self.authority.replicate_to(self.fleet)
            self.fleet.start()

    def _worker_restarted(self, **fields: Any) -> None:
        """Audit a worker's restart: which one, why, and whether its replacement took the state."""
        self.authority.audit.record("worker_restart", decision=fields["started"], **fields)

    def _credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.tls_key, self.tls_cert)],
                                           root_certificates=self.trust_bundle, require_client_auth=True)

    def _add_health_and_reflection(self, server: Any, service: str) -> None:
        """gRPC health and reflection for ``service`` on ``server``, served by generic handlers only.

        The generated ``add_*_to_server`` helpers also register each method as a registered method.
        grpc.aio keeps one pending request per registered method and, after every call the server
        takes, waits on all of them again: the four of health and reflection made every Check ~24,000
        instructions (7%) dearer (``benchmarks/load/instructions.py``). Generic handlers serve the
        same methods at no cost to other calls.
        """
        generic_only = _GenericHandlersOnly(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, generic_only)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer((service, health.SERVICE_NAME, reflection.SERVICE_NAME)),
            generic_only)

    def _check_server(self, service: extauthz.CheckService) -> Any:
        server = grpc.aio.server(maximum_concurrent_rpcs=self.config.check_max_concurrent_rpcs)
        # With mTLS the trust bundle admits every workload's certificate: only check_clients are answered.
        mtls = self.config.check_mtls
        fresh = self.authority.freshness
        extauthz.add_to_server(server, service, self.config.check_client_ids if mtls else None,
                               None if fresh is None else fresh.fresh)
        self._add_health_and_reflection(server, extauthz.SERVICE)
        # gRPC sets SO_REUSEPORT on Linux, so every worker can bind the same address.
        try:
            if self.config.check_mtls:
                server.add_secure_port(self.config.check_listen, self._credentials())
            else:
                server.add_insecure_port(self.config.check_listen)
        except RuntimeError as exc:  # gRPC's "Failed to bind": say which listener and option
            raise listeners.taken("check_listen", self.config.check_listen, exc) from None
        if self.config.check_listen.startswith("unix:"):  # gRPC has no mode option: its file follows umask
            os.chmod(self.config.check_listen[5:], listeners.UNIX_SOCKET_MODE)
        return server

    async def _http_check(self, service: extauthz.CheckService) -> http_check.HttpCheckServer | None:
        """The HTTP Check on http_check_listen, if configured: the same service behind another transport."""
        if not self.config.http_check_listen:
            return None
        fresh = self.authority.freshness
        server = http_check.HttpCheckServer(self.config.http_check_listen, http_check.HttpCheck(
            service, None if fresh is None else fresh.fresh))
        try:
            await server.start()
        except OSError as exc:
            raise listeners.taken("http_check_listen", self.config.http_check_listen, exc) from None
        return server

    def _approval_server(self) -> Any:
        """Humans' own listener: server-authenticated TLS, no client certificate (that is the point:
        grpc cannot make one optional on the agents' listener), an approver bearer on every call."""
        # No SO_REUSEPORT: one process listens here, and a second daemon must fail to bind, not share it.
        # Anyone may connect before any credential is asked for: connections are capped, slow handshakes
        # and idle connections closed, so that no one can take the process's file descriptors (each
        # connection held one, without end) from the Check, the API and the audit log.
        server = grpc.aio.server(options=[
            ("grpc.max_metadata_size", 32 * 1024), ("grpc.so_reuseport", 0),
            ("grpc.max_allowed_incoming_connections", APPROVAL_MAX_CONNECTIONS),
            ("grpc.server_handshake_timeout_ms", 10_000), ("grpc.max_connection_idle_ms", 60_000)])
        approval_api.add_to_server(server, approval_api.ApprovalsService(self.authority))
        self._add_health_and_reflection(server, approval_api.SERVICE)
        try:
            server.add_secure_port(self.config.approval_listen, grpc.ssl_server_credentials(
                [(self.tls_key, self.tls_cert)], require_client_auth=False))
        except RuntimeError as exc:
            raise listeners.taken("approval_listen", self.config.approval_listen, exc) from None
        return server

    async def _set_health(self, status: int, names: tuple[str, ...] = ("", extauthz.SERVICE, API_SERVICE,
                                                                       approval_api.SERVICE)) -> None:
        for name in names:
            await self.health.set(name, status)

    async def _follow_audit(self, audit: Any, serving: Callable[[], bool], names: tuple[str, ...],
                            meters: Any = None) -> None:
        """gRPC health follows the audit log, as /healthz does: NOT_SERVING while it cannot write
        (every Check is denied audit_unavailable then), SERVING again once it can. A worker says so in
        its ``meters`` row too, for the primary's /healthz."""
        reported = True
        while True:
            await asyncio.sleep(AUDIT_HEALTH_INTERVAL)
            if not serving():
                return  # shutting down: stop() owns health from here
            if audit.healthy != reported:
                reported = not reported
                if meters is not None:
                    meters[metrics.AUDIT_FAILING] = 0 if reported else 1
                log.warning("audit log %s: health %s", "writable again" if reported else "cannot write",
                            "SERVING" if reported else "NOT_SERVING")
                await self._set_health(health_pb2.HealthCheckResponse.SERVING if reported
                                       else health_pb2.HealthCheckResponse.NOT_SERVING, names)

    async def start(self) -> None:
        a = self.authority
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        # The workers fork_workers started have each fsynced a start record in their own log: name them.
        a.start([worker_log(w.number) for w in self.fleet.workers if w.alive] if self.fleet else [])
        if a.cluster is not None:  # every revocation the cluster acknowledged is applied before we serve
            await asyncio.to_thread(a.cluster.join)
            self._cluster_follower = asyncio.create_task(a.cluster.follow(self._cluster_stop))
            log.info("cluster: node %s joined at stream id %s", a.cluster.settings.node_id, a.cluster.last_id)
        self._threads = [*(RotationThread(ring) for ring in a.keyrings.values()), Housekeeping(a)]
        for t in self._threads:
            t.start()

        check_service = extauthz.CheckService(a.verifiers, a.audit, lambda: a.policy, a.clock,
                                               budgets=a.budgets, meters=self.meters.row(0),
                                               denials=self.denials and self.denials.counter(0))
        check = self.check_server = self._check_server(check_service)
        # Above gRPC's soft 8 KiB metadata limit, so our own 8 KiB JWT-SVID cap answers, not a random
        # RESOURCE_EXHAUSTED.
        api = self.api_server = grpc.aio.server(options=[("grpc.max_metadata_size", 32 * 1024)])
        peers = Peers(self.config.trust_domain, load_bundle(self.trust_bundle))
        agentauthz_pb2_grpc.add_AgentAuthzServicer_to_server(ApiService(a, peers), api)
        self._add_health_and_reflection(api, API_SERVICE)
        approvals = self.approval_server = self._approval_server()
        self.api_front = TlsFront(self.config.api_listen, self.tls_key, self.tls_cert, peers)
        await self.api_front.bind()
        await check.start()
        await approvals.start()
        self.http_check = await self._http_check(check_service)

        from prometheus_client import CollectorRegistry
        registry = CollectorRegistry()
        registry.register(Metrics(a, self.meters, self.api_front, self.fleet, self.denials))
        self.http = HttpListener(self.config.http_listen, Routes(a, self.serving, registry,
                                                                 self.meters.audit_failing),
                                 timeout=self.config.http_timeout,
                                 max_connections=self.config.http_max_connections)
        await self.http.start()

        # The API's gRPC server speaks plaintext on loopback only; agents reach it through the TLS front,
        # which completes every handshake so that a refused identity is answered and audited. Its port is
        # the kernel's pick, so it is bound once every configured listener is: picked earlier, it could
        # be one of theirs (a configured port in the ephemeral range) and stop the daemon at start.
        backend_port = api.add_insecure_port(f"{BACKEND_HOST}:0")
        self.reserved.release()  # every listener is bound: nothing else can take their ports now
        await api.start()
        self.api_front.start(backend_port)

        # Keys, revocations and policy loaded, listeners up: now we serve.
        freeze_startup_objects()
        self.serving.set()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._audit_health = asyncio.create_task(self._follow_audit(a.audit, self.serving.is_set, (
            "", extauthz.SERVICE, API_SERVICE, approval_api.SERVICE)))
        log.info("serving: check %s, api %s (mTLS, terminated here; gRPC behind it on %s:%d), approvals %s "
                 "(TLS), http %s%s", self.config.check_listen, self.config.api_listen, BACKEND_HOST,
                 backend_port, self.config.approval_listen, self.config.http_listen,
                 f", http check {self.config.http_check_listen}" if self.http_check else "")
        if self.config.development:
            print(DEV_HINT.format(cmd=command_in_use(), state=self.config.state_dir,
                                  api=self.config.api_listen, check=self.config.check_listen,
                                  approvals=self.config.approval_listen),
                  flush=True)

    async def stop(self, grace: float = 10.0) -> None:
        """NOT_SERVING first, so load balancers move on; then drain, flush audit, exit."""
        self.serving.clear()
        if self._audit_health is not None:
            self._audit_health.cancel()
        self._cluster_stop.set()
        if self._cluster_follower is not None:
            try:
                await asyncio.wait_for(self._cluster_follower, 5.0)
            except Exception:  # stopping: the follower logged what went wrong
                self._cluster_follower.cancel()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.api_front is not None:
            self.api_front.close()  # no new agents; open connections drain through the gRPC server's grace
        # A start that failed part way (a listener's address taken) stops only what it had made.
        await asyncio.gather(*(server.stop(grace) for server in (self.check_server, self.api_server,
                                                                 self.approval_server) if server is not None))
        if self.api_front is not None:
            await self.api_front.abort()
        if self.http is not None:
            await self.http.stop()
        if self.http_check is not None:
            await self.http_check.stop()
        if self.fleet is not None:
            await asyncio.to_thread(self.fleet.stop)
        for t in self._threads:
            t.stop()
        self.authority.stop()

    def serve_worker(self, number: int, conn: Any) -> int:
        """A forked Check worker: its own gRPC server and audit log; state changes come from the primary."""
        self.reserved.release()  # the primary's to hold: its copies here would outlive its release
        stopping = threading.Event()
        audit = open_audit(self.config, self.config.state_dir / "audit" / worker_log(number),
                           self.authority.audit_key)
        audit.start()
        # Fsynced before the state is acknowledged: once it is, the primary's log names this log, and
        # `audit verify` requires a log it names to have records (a deleted one is caught).
        audit.record("start", worker=number, pid=os.getpid())
        written = audit.flush(workers.ACK_TIMEOUT / 2)  # within the time the primary waits for the ack
        # A replacement clears what a worker that died failing left; one that cannot start leaves it set.
        self.meters.row(number)[metrics.AUDIT_FAILING] = 0 if written else 1
        if not written:
            log.error("worker %d cannot write its audit log: not starting", number)
        if not written or not replication.adopt_state(conn, self.authority):
            audit.stop()
            return 1
        replication.listen_for_changes(conn, self.authority, stopping.set)
        asyncio.run(self._worker(number, stopping, audit))
        return 0

    async def _worker(self, number: int, stopping: threading.Event, audit: Any) -> None:
        a = self.authority
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the primary reloads, then tells us
        service = extauthz.CheckService(a.verifiers, audit, lambda: a.policy, a.clock, budgets=a.budgets,
                                        meters=self.meters.row(number),
                                        denials=self.denials and self.denials.counter(number))
        server = self._check_server(service)
        await server.start()
        http = await self._http_check(service)
        freeze_startup_objects()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(extauthz.SERVICE, health_pb2.HealthCheckResponse.SERVING)
        log.info("worker %d serving check %s", number, self.config.check_listen)
        follow = asyncio.create_task(self._follow_audit(audit, lambda: not stopping.is_set(),
                                                        ("", extauthz.SERVICE), self.meters.row(number)))
        await loop.run_in_executor(None, stopping.wait)
        follow.cancel()
        await self.health.set(extauthz.SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(10.0)
        if http is not None:
            await http.stop()
        audit.stop()

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(
            None, self.authority.reload_policy))
        try:
            await self.start()
        except BaseException:
            await self.stop(grace=0)  # close what did start, flush the audit log, end the workers
            raise
        await stop.wait()
        log.info("signal received: draining")
        await self.stop()


def run(config: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit code."""
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # measured ~2x throughput with uvloop; still correct without it
        log.warning("uvloop not installed; using the default asyncio loop")
    reserved = listeners.reserve(config)  # before the state directory is made or touched
    daemon = Daemon(config, reserved)
    daemon.fork_workers()
    started = time.monotonic()
    asyncio.run(daemon.run_until_signalled())
    log.info("stopped after %.1f s", time.monotonic() - started)
    return 0

