"""The HTTP Check (Envoy's HTTP ext_authz on granian) beside its floor, the gRPC Check and Cerbos (issue 21).

    python -m benchmarks.load.http_check --out DIR [--rounds 9] [--duration 1.5] [--cold-tokens 2000]

Direct, every server pinned to one core and the load generator on the other, rounds interleaved:
granian's constant-answer floor, the HTTP Check warm (one token) and cold (every Check verifies a
signature), each beside its bound (rsgi_bound.py: what any audited RSGI Check must do at least, the gRPC
bound's work on granian), the bare grpc.aio floor, the gRPC Check, and Cerbos CheckResources (one CEL
rule); the warm granian rows also split their server CPU by thread (rsgi_servers.per_thread). h2load
drives every row it can (HTTP/2, 4 connections x 16 streams); the cold row needs a token per request,
which h2load cannot send, so our HTTP/1.1 client (h1load.py) drives it, and drives the granian floor and
the warm HTTP Check too, to show the client is not what bounds it. Through Envoy (one worker), one
connection and then N: added latency over the proxy floor for HTTP mode, gRPC mode and jwt_authn, with
each ext_authz mode also pointed at its constant-answer floor (the hop alone) and HTTP mode at the warm
bound (an audited allow's hop), and HTTP mode once more over a Unix socket (a daemon of its own on
``unix:PATH``, Envoy's pipe address). Every granian server here runs on the daemon's scheduling (its I/O
threads SCHED_BATCH, ``rsgi_servers.batch_io_threads``) but one stock granian floor, issue 21's, which
its warm target is measured against. Writes DIR/http_check.json, DIR/http_check.md and
DIR/http-check.png; http_figures.py makes the figures. Without the HTTP transport (no
``http_check_listen`` in this build) the HTTP Check rows are left out and say so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from . import cerbos, envoy, loadgen
from .bench import ROOT, Bench, Settings, Target, in_scratch
from .daemon import Daemon
from .h1load import http_request
from .http_envoy import HTTP_PATH, http_headers, http_mode
from .http_figures import chart, figures, markdown
from .procs import free_port, http_get, run_bounded, wait_for
from .rsgi_servers import per_thread, start_granian_bound, start_granian_floor
from .run import check_allowed, check_envoy_allows


def http_check_supported() -> bool:
    from agentauthz.config import Config
    return "http_check_listen" in Config.__dataclass_fields__


class HttpDaemon(Daemon):
    """The daemon with its HTTP Check listener (when this build has one) beside the gRPC Check."""

    def __init__(self, name: str, work: Path, config: dict[str, Any], listen: str | None = None) -> None:
        """On ``listen`` (a free loopback port unless given; unix:PATH is Envoy's pipe address)."""
        self.http_check = (listen or f"127.0.0.1:{free_port()}") if http_check_supported() else None
        extra = {"http_check_listen": self.http_check} if self.http_check else {}
        super().__init__(name, work, ROOT, config={**config, **extra})
        if self.http_check:
            wait_for(lambda: self.process.alive() and accepting(self.http_check or ""), 30,
                     f"{name} HTTP Check")


def accepting(address: str) -> bool:
    """Whether a listener accepts connections on HOST:PORT or unix:PATH."""
    if not address.startswith("unix:"):
        return http_get(f"http://{address}/")[0] > 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(address[5:]) == 0


def http_allows(address: str, token: str, what: str) -> None:
    request = urllib.request.Request(f"http://{address}{HTTP_PATH}", headers=http_headers(token))
    status, body = 0, b""
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    if status != 200:
        raise RuntimeError(f"{what} answered {status}: {body[:300]!r}")


def h2load_get(bench: Bench, address: str, token: str) -> Callable[[float], dict[str, Any]]:
    """h2load over HTTP/2 (prior knowledge), GET /demo/reports with ``http_headers``; pinned."""
    s, headers = bench.s, [f"{k}: {v}" for k, v in http_headers(token).items()]
    return lambda d: loadgen.h2load(f"http://{address}{HTTP_PATH}", duration=d, clients=s.h2_clients,
                                    streams=s.h2_streams, log_file=bench.work / "h2load.log", headers=headers,
                                    cpus=bench.client_cpus)


def h1load(bench: Bench, address: str, tokens: list[str], name: str) -> Callable[[float], dict[str, Any]]:
    """Our HTTP/1.1 client, one connection per call in flight, cycling ``tokens`` in order; pinned."""
    path = bench.work / f"{name}.requests"
    path.write_text("\n".join(json.dumps(http_request("GET", address, HTTP_PATH, http_headers(t)))
                              for t in tokens))
    argv = [sys.executable, "-m", "benchmarks.load.h1load", "--target", address, "--requests", str(path),
            "--connections", str(bench.s.py_concurrency)]

    def drive(d: float) -> dict[str, Any]:
        stdout, client_cpu = run_bounded([*argv, "--duration", f"{d:g}"], d + 60, bench.client_cpus, ROOT)
        return {**json.loads(stdout), "client_cpu_s": client_cpu, "command": " ".join(argv[1:])}
    return drive


def direct(bench: Bench, stack: contextlib.ExitStack, warm: HttpDaemon, grpc: Daemon, cold: HttpDaemon | None,
           cold_tokens: list[str]) -> dict[str, str]:
    """The one-core table, every row interleaved with every other so each ratio pairs rounds; the floors."""
    s = bench.s
    granian, granian_addr = start_granian_floor(bench, stack)
    stock, stock_addr = start_granian_floor(bench, stack, batch=False)
    grpc_floor, grpc_floor_addr = bench.start_server(stack, "floor")
    anchor = cerbos.Cerbos(bench.work, bench.server_cpus)
    stack.callback(anchor.stop)
    bench.processes["cerbos"] = anchor.argv
    if not cerbos.allows(anchor.address, cerbos.request()):
        raise RuntimeError("cerbos does not allow the benchmark request")
    token = warm.mint()
    body = bench.bodies("grpc-warm", [grpc.mint()])
    check_allowed(grpc.check_address, body, "agentauthz gRPC Check")
    check_allowed(grpc_floor_addr, body, "grpc.aio floor")
    cerbos_body = loadgen.write_frames(bench.work / "cerbos.bin", [cerbos.request()])
    stock_floor = Target("granian_floor", "granian floor: RSGI constant 200, stock granian (issue 21's; "
                         "h2load)", per_thread(stock.pid, h2load_get(bench, stock_addr, token)),
                         {"server": stock.pid})
    rows = [Target("granian_floor_batch", "granian floor on the daemon's scheduling: I/O threads SCHED_BATCH "
                   "(h2load)", per_thread(granian.pid, h2load_get(bench, granian_addr, token)),
                   {"server": granian.pid}),
            Target("granian_floor_h1", "granian floor, our HTTP/1.1 client (the client's ceiling)",
                   h1load(bench, granian_addr, [token], "granian-h1"), {"server": granian.pid})]
    bound_warm, bound_warm_addr = start_granian_bound(bench, stack, None)
    http_allows(bound_warm_addr, token, "granian bound (warm)")
    warm_bound = Target("granian_bound_warm", "granian bound: every header read, one chained record, the "
                        "allow's headers (warm, h2load)",
                        per_thread(bound_warm.pid, h2load_get(bench, bound_warm_addr, token)),
                        {"server": bound_warm.pid})
    # The warm target's ratios pair runs next to each other in every round (floor, Check, bound, and
    # the reverse): this machine's speed drifts over seconds, and a pair seconds apart reads the drift.
    if warm.http_check:
        http_allows(warm.http_check, token, "HTTP Check (warm)")
        rows += [stock_floor,
                 Target("http_warm", "agentauthz HTTP Check, one token (warm, h2load)",
                        per_thread(warm.pid, h2load_get(bench, warm.http_check, token)), {"server": warm.pid},
                        warm),
                 warm_bound,
                 Target("http_warm_h1", "agentauthz HTTP Check, warm, our HTTP/1.1 client",
                        h1load(bench, warm.http_check, [token], "http-warm-h1"), {"server": warm.pid}, warm)]
    else:
        rows += [stock_floor, warm_bound]
    bound_cold = None
    if cold and cold.http_check:
        for t in {cold_tokens[0], cold_tokens[-1]}:
            http_allows(cold.http_check, t, "HTTP Check (cold)")
        label = (f"agentauthz HTTP Check, {len(cold_tokens)} tokens through a cache of {s.cold_cache} "
                 "(cold, our HTTP/1.1 client)")
        rows.append(Target("http_cold", label, h1load(bench, cold.http_check, cold_tokens, "http-cold"),
                           {"server": cold.pid}, cold))
        bound_cold, bound_cold_addr = start_granian_bound(bench, stack, cold.jwks())
        for t in {cold_tokens[0], cold_tokens[-1]}:
            http_allows(bound_cold_addr, t, "granian bound (cold)")
        label = (f"granian bound, cold: the same + a bare PyNaCl verify and a claims read, "
                 f"{len(cold_tokens)} tokens (our HTTP/1.1 client)")
        drive = h1load(bench, bound_cold_addr, cold_tokens, "bound-cold")
        rows.append(Target("granian_bound_cold", label, drive, {"server": bound_cold.pid}))
    rows += [Target("grpc_floor", "grpc.aio floor: constant OK (h2load)",
                    bench.h2load_grpc(grpc_floor_addr, body, s.h2_clients, s.h2_streams, True),
                    {"server": grpc_floor.pid}),
             Target("grpc_warm", "agentauthz gRPC Check, one token (warm, h2load)",
                    bench.h2load_grpc(grpc.check_address, body, s.h2_clients, s.h2_streams, True),
                    {"server": grpc.pid}, grpc),
             Target("cerbos", f"Cerbos {cerbos.VERSION} CheckResources, one CEL rule (gRPC, h2load)",
                    lambda d: loadgen.h2load(f"http://{anchor.address}{cerbos.METHOD}", duration=d,
                                             clients=s.h2_clients, streams=s.h2_streams, body=cerbos_body,
                                             log_file=bench.work / "h2load.log", headers=loadgen.GRPC_HEADERS,
                                             cpus=bench.client_cpus), {"server": anchor.pid})]
    bench.table("direct", "HTTP Check vs its floor, the gRPC Check and Cerbos, server on one core", "mixed",
                rows, pinned=True, settings={"h2load": f"{s.h2_clients} connections x {s.h2_streams} streams",
                                             "h1load": f"{s.py_concurrency} connections"},
                note="h2load drives every row it can; the cold row needs a token per request, so our "
                     "HTTP/1.1 client drives it (and the floor and the warm HTTP Check: its own ceiling).")
    if not cerbos.allows(anchor.address, cerbos.request()):
        raise RuntimeError("cerbos stopped allowing the benchmark request")
    anchor.stop()
    if bound_cold is not None:  # the warm bound stays: Envoy's audited-allow hop points at it
        bound_cold.stop()
    stock.stop()
    return {"granian": granian_addr, "grpc": grpc_floor_addr, "granian_bound": bound_warm_addr}


# -- through Envoy ---------------------------------------------------------------------------------

def through_envoy(bench: Bench, stack: contextlib.ExitStack, warm: HttpDaemon, grpc: Daemon,
                  floors: dict[str, str], clients: int) -> dict[str, Any]:
    """One direct_response upstream; a front Envoy per mode; one connection, then ``clients``."""
    token, grpc_token = warm.mint(), grpc.mint()
    tokens = {"grpc": grpc_token}
    jwks = warm.jwks()
    unix = None
    if warm.http_check:  # the same Check on a Unix socket (Envoy's pipe address): no TCP either side
        unix = HttpDaemon("agentauthz-unix", bench.work, {}, listen=f"unix:{bench.work / 'http-check.sock'}")
        stack.callback(unix.stop)
        bench.processes["agentauthz-unix"] = unix.argv
        tokens["http_unix"] = unix.mint()
    upstream = envoy.start("envoy-upstream", envoy.upstream_config, bench.work)
    stack.callback(upstream.stop)
    bench.processes["envoy-upstream"] = upstream.argv
    modes: dict[str, tuple[str, Callable[[int, int], dict[str, Any]], Daemon | None]] = {}
    sources = {}

    def grpc_front(check: str) -> Callable[[int, int], dict[str, Any]]:
        return lambda listen, admin: envoy.front_config("ext_authz", listen, admin, upstream.listen_port,
                                                        check_address=check)

    def http_front(check: str, key: str) -> Callable[[int, int], dict[str, Any]]:
        filters, cluster, route, sources[key] = http_mode(check)
        return lambda listen, admin: envoy._bootstrap(listen, admin, [route], filters, [
            cluster, envoy._static_cluster("tool", f"127.0.0.1:{upstream.listen_port}")])

    modes["floor"] = ("Envoy, no authorization", lambda listen, admin: envoy.front_config(
        "floor", listen, admin, upstream.listen_port), None)
    modes["jwt_authn"] = ("Envoy jwt_authn (EdDSA, local JWKS)", lambda listen, admin: envoy.front_config(
        "jwt_authn", listen, admin, upstream.listen_port, jwks=jwks), None)
    modes["grpc"] = ("ext_authz gRPC -> agentauthz", grpc_front(grpc.check_address), grpc)
    if warm.http_check:
        modes["http"] = ("ext_authz HTTP -> agentauthz (granian)", http_front(warm.http_check, "http"), warm)
    if unix and unix.http_check:
        modes["http_unix"] = ("ext_authz HTTP over a Unix socket -> agentauthz (granian)",
                              http_front(unix.http_check, "http_unix"), unix)
    modes["grpc_floor"] = ("ext_authz gRPC -> grpc.aio floor (the hop alone)", grpc_front(floors["grpc"]),
                           None)
    modes["http_floor"] = ("ext_authz HTTP -> granian floor (the hop alone)",
                           http_front(floors["granian"], "http_floor"), None)
    modes["http_bound"] = ("ext_authz HTTP -> granian bound: headers read, one chained record, the allow's "
                           "headers (an audited allow's hop)",
                           http_front(floors["granian_bound"], "http_bound"), None)
    fronts = {}
    for mode, (_, config_for, _) in modes.items():
        fronts[mode] = envoy.start(f"envoy-{mode}", config_for, bench.work)
        stack.callback(fronts[mode].stop)
        check_envoy_allows(fronts[mode].url, tokens.get(mode, token), f"Envoy {mode}")
        bench.processes[f"envoy-{mode}"] = fronts[mode].argv

    def targets(n: int, names: tuple[str, ...]) -> list[Target]:
        out = []
        for m in (m for m in names if m in modes):
            daemon = modes[m][2]
            cpu = {"envoy": fronts[m].pid, "upstream": upstream.pid}
            cpu.update({"daemon": daemon.pid} if daemon else {})
            drive = bench.h2load_http(fronts[m].url, tokens.get(m, token), n)
            out.append(Target(m, modes[m][0], drive, cpu, daemon))
        return out

    # As in the direct table, each target's two rows run next to each other in every round (and in the
    # reverse order the next): the one-connection target pairs the HTTP mode with the no-authorization
    # row, the N-connection target pairs it with jwt_authn.
    bench.table("envoy_1", "Through Envoy, one connection (h2load --h1)", "h2load",
                targets(1, ("jwt_authn", "grpc", "grpc_floor", "http_floor", "floor", "http", "http_unix",
                            "http_bound")),
                pinned=False, settings={"clients": 1, "protocol": "http/1.1"},
                note="Added latency = a row's p50 minus the no-authorization row's p50, paired per round.")
    bench.table("envoy_n", f"Through Envoy, {clients} connections (h2load --h1)", "h2load",
                targets(clients, ("floor", "grpc", "http_bound", "http_floor", "jwt_authn", "http",
                                  "http_unix")),
                pinned=False,
                settings={"clients": clients, "protocol": "http/1.1"})
    return {"http_config_source": sources,
            "configs": {m: f.config_path.read_text() for m, f in fronts.items()}}


# -- the run ---------------------------------------------------------------------------------------

def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    s = Settings(duration=args.duration, warmup=1.0, rounds=args.rounds, pin=True,
                 cold_cache=args.cold_tokens // 2, envoy_clients=args.envoy_clients)
    bench = Bench(s, work)
    started = time.time()
    with contextlib.ExitStack() as stack:
        # The gRPC Check on a daemon of its own: an audit writer's lag is never charged to the other row.
        grpc = bench.start_daemon(stack, "agentauthz-grpc")
        warm = HttpDaemon("agentauthz-warm", work, {})
        stack.callback(warm.stop)
        bench.processes["agentauthz-warm"] = warm.argv
        cold, cold_tokens = None, []
        if warm.http_check:  # the cold row is the HTTP Check's only
            cold = HttpDaemon("agentauthz-cold", work, {"verified_cache_size": s.cold_cache})
            stack.callback(cold.stop)
            bench.processes["agentauthz-cold"] = cold.argv
            cold_tokens = cold.mint_many(args.cold_tokens)
        floors = direct(bench, stack, warm, grpc, cold, cold_tokens)
        if cold:
            cold.stop()
        envoy_part = through_envoy(bench, stack, warm, grpc, floors, args.envoy_clients)
    versions = {"cerbos": cerbos.version(), "h2load": loadgen.h2load_version(),
                "envoy": envoy.envoy_version(), "granian": _granian()}
    results = {"started": started, "elapsed_s": time.time() - started,
               "settings": {**vars(args), "out": str(args.out)}, "http_transport": http_check_supported(),
               "tables": bench.tables, "processes": bench.processes, "versions": versions,
               "cpus": {"server": sorted(bench.server_cpus or []), "client": sorted(bench.client_cpus or [])},
               **envoy_part}
    results["figures"] = figures(bench.tables)
    return results


def _granian() -> str:
    import granian
    return str(granian.__version__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True,
                        help="directory for http_check.json, http_check.md, http-check.png")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--duration", type=float, default=1.5, help="seconds per run")
    parser.add_argument("--cold-tokens", type=int, default=2000,
                        help="cycled in order through a verified-token cache of half as many")
    parser.add_argument("--envoy-clients", type=int, default=16)
    args = parser.parse_args(argv)
    if not shutil.which("h2load"):
        parser.error("h2load not found: apt-get install -y nghttp2-client (make bench does this)")
    cerbos.install()
    args.out.mkdir(parents=True, exist_ok=True)
    results = in_scratch("agentauthz-http-check-", lambda work: run(args, work))
    (args.out / "http_check.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "http_check.md").write_text(markdown(results))
    chart(results, args.out / "http-check.png")
    print("\n" + markdown(results))
    print(f"HTTP Check results: {args.out}/http_check.json, http_check.md, http-check.png "
          f"({results['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
