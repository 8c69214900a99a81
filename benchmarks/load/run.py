"""The load half of ``make bench``: every comparison side by side, rounds interleaved.

    python -m benchmarks.load [--duration 5] [--rounds 3] [--out benchmarks/results/load.json]

Each table loads its targets in turn, A B C D A B C D ..., so slow drift of a
noisy machine (other tenants, thermal, page cache) falls on every target alike
instead of on whichever ran last. Per run we keep requests/s, p50/p90/p99 and
the CPU seconds each server process spent per request (utime + stime from
/proc); the summary is the median over rounds. Every run is bounded by time
(h2load ``-D``, the Python client's ``--duration``) and by a subprocess
timeout, and everything started here is stopped here.

A run counts as valid only if every response was an allow: h2load only sees
HTTP status (gRPC status lives in trailers), so gRPC targets are checked with a
full parse before they are loaded and agentauthz's own decision counters
(/metrics) are compared before and after each run. Here: which tables, what
each loads; ``bench`` runs a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import grpc

from . import envoy, loadgen, profile, scaling
from .bench import ROOT, Bench, Settings, Target
from .daemon import Daemon


def check_allowed(address: str, frames: Path, what: str) -> None:
    """A full parse of the response to the first and last body: the target must allow them."""
    from agentauthz.client import decision_from
    messages = loadgen.read_frames(frames)
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(loadgen.CHECK_PATH)
        for message in {messages[0], messages[-1]}:
            raw = call(message, timeout=10)
            decision = decision_from(raw)
            if not (decision.allowed and raw.startswith(loadgen.ALLOW_PREFIX)):
                raise RuntimeError(f"{what} does not allow the benchmark request: {decision}")


def check_envoy_allows(url: str, token: str, what: str) -> None:
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        if response.status != 200:
            raise RuntimeError(f"{what} answered {response.status}")


def profiles(bench: Bench, warm: Daemon, warm_body: Path, cold: Daemon, cold_body: Path,
             out_dir: Path) -> dict[str, Any]:
    """py-spy on the warm daemon (h2load) and the cold one (Python client), outside measured runs."""
    seconds = bench.s.profile_seconds
    if seconds <= 0:
        return {"skipped": "disabled (--profile-seconds 0)"}
    if profile.pyspy() is None:
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    out: dict[str, Any] = {"seconds": seconds, "commands": []}
    h2_warm = ["h2load", "-D", f"{round((seconds + 4) * 1000)}ms", "-c", str(bench.s.h2_clients),
               "-m", str(bench.s.h2_streams), "-d", str(warm_body),
               *[arg for h in loadgen.GRPC_HEADERS for arg in ("-H", h)],
               f"http://{warm.check_address}{loadgen.CHECK_PATH}"]
    py_cold = [sys.executable, "-m", "benchmarks.load.loadgen", "check", "--target", cold.check_address,
               "--bodies", str(cold_body), "--concurrency", str(bench.s.py_concurrency),
               "--duration", f"{seconds + 4:g}"]
    plan = (("warm", warm.pid, h2_warm, "raw", True), ("warm", warm.pid, h2_warm, "flamegraph", False),
            ("cold", cold.pid, py_cold, "raw", False))
    for name, pid, load, fmt, gil in plan:
        path = out_dir / f"profile-{name}{'-gil' if gil else ''}.{'txt' if fmt == 'raw' else 'svg'}"
        loader = subprocess.Popen(load, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        try:
            time.sleep(1.5)
            out["commands"].append(" ".join(profile.record(pid, seconds, path, fmt=fmt, gil=gil)))
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            return {"skipped": f"py-spy failed: {exc}"}
        finally:
            loader.wait(seconds + 60)
        if fmt == "raw":
            out[f"{name}{'_gil' if gil else ''}"] = {"file": path.name,
                                                     "summary": profile.summarize(path.read_text(), gil=gil),
                                                     "gil_only": gil}
        else:
            out[f"{name}_svg"] = path.name
    return out


def versions() -> dict[str, str]:
    import google.protobuf
    import uvloop
    v = {"python": platform.python_version(), "grpcio": grpc.__version__,
         "protobuf": google.protobuf.__version__, "uvloop": uvloop.__version__,
         "h2load": loadgen.h2load_version(), "envoy": envoy.envoy_version()}
    try:
        import jwt
        v["pyjwt"] = jwt.__version__
    except ImportError:
        v["pyjwt"] = "missing"
    agentauthz = subprocess.run([sys.executable, "-m", "agentauthz", "version", "--json"], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
    v["agentauthz"] = agentauthz.stdout.strip() or agentauthz.stderr.strip()[-300:]
    return v


def run_all(s: Settings, work: Path, out_dir: Path) -> dict[str, Any]:
    bench = Bench(s, work)
    started = time.time()
    with contextlib.ExitStack() as stack:
        # -- the four Check servers ------------------------------------------------------------
        warm = bench.start_daemon(stack, "agentauthz-warm")
        cold = bench.start_daemon(stack, "agentauthz-cold", config={"verified_cache_size": s.cold_cache})
        jwks = warm.jwks()
        jwks_path = work / "jwks.json"
        jwks_path.write_text(json.dumps(jwks))
        floor, floor_addr = bench.start_server(stack, "floor")
        parse, parse_addr = bench.start_server(stack, "parse")
        record, record_addr = bench.start_server(stack, "record")
        naive, naive_addr = bench.start_server(stack, "naive", "--jwks", str(jwks_path))

        def direct_targets(drive: Callable[[str], Callable[[float], dict[str, Any]]],
                           body: Path, with_parse: bool = False) -> list[Target]:
            for address, what in ((floor_addr, "floor"), (warm.check_address, "agentauthz"),
                                  (naive_addr, "naive peer")):
                check_allowed(address, body, what)
            parse_row = [Target("parse", "floor + parse the CheckRequest (the least any authorizer does)",
                                drive(parse_addr), {"server": parse.pid}),
                         Target("record", "parse + one chained audit write (the least an audited allow does)",
                                drive(record_addr), {"server": record.pid})] if with_parse else []
            return [Target("floor", "floor: grpc.aio constant OK", drive(floor_addr), {"server": floor.pid}),
                    *parse_row,
                    Target("warm", "agentauthz, one token (warm)", drive(warm.check_address),
                           {"server": warm.pid}, warm),
                    Target("naive", "naive peer: PyJWT + set", drive(naive_addr), {"server": naive.pid})]

        h2_settings = {"clients": s.h2_clients, "streams_per_client": s.h2_streams,
                       "in_flight": s.h2_clients * s.h2_streams}
        for key, title, pinned in (
                ("direct_h2load", "Check direct over gRPC (h2load)", False),
                ("direct_h2load_pinned", "Check direct over gRPC (h2load), server on one core", True)):
            body = bench.bodies(f"warm-{key}", [warm.mint()])

            def h2(address: str, b: Path = body, p: bool = pinned) -> Callable[[float], dict[str, Any]]:
                return bench.h2load_grpc(address, b, s.h2_clients, s.h2_streams, p)
            bench.table(key, title, "h2load", direct_targets(h2, body, with_parse=True), pinned=pinned,
                        settings=h2_settings,
                note="Same request bytes (one CheckRequest, one token) for every server.")

        body = bench.bodies("warm-latency", [warm.mint()])
        bench.table("direct_h2load_1", "Check direct over gRPC, one call in flight (h2load)", "h2load",
                    direct_targets(lambda a: bench.h2load_grpc(a, body, 1, 1, False), body), pinned=False,
                    settings={"clients": 1, "streams_per_client": 1, "in_flight": 1},
                    note="Latency with no queueing: one connection, one call at a time.")

        body = bench.bodies("warm-python", [warm.mint()])
        t0 = time.monotonic()
        window = ("agentauthz_revocation_slots_in_use", "agentauthz_revocation_window_slots",
                  "agentauthz_revocation_bits_bytes")
        before = cold.gauges(*window)
        cold_tokens = cold.mint_many(s.cold_tokens)
        mint_setup = {"tokens": len(cold_tokens), "seconds": time.monotonic() - t0}
        after = cold.gauges(*window)
        revocation_memory = {  # what the cold tokens took of the revocation window, read from /metrics
            "tokens": len(cold_tokens), "slots": after[window[0]] - before[window[0]],
            "window_slots": after[window[1]], "bits_bytes": after[window[2]]}
        cold_body = bench.bodies("cold", cold_tokens)
        check_allowed(cold.check_address, cold_body, "agentauthz (cold)")
        targets = direct_targets(lambda a: bench.python_check(a, body, True), body)
        targets.insert(2, Target(
            "cold", f"agentauthz, {s.cold_tokens} tokens, cache {s.cold_cache} (cold)",
            bench.python_check(cold.check_address, cold_body, True), {"server": cold.pid}, cold,
            notes=[f"{s.cold_tokens} distinct tokens cycled in order through a FIFO verified-token cache "
                   f"of {s.cold_cache}: every Check verifies a signature (a cache miss)."]))
        cold_jwks = work / "cold-jwks.json"
        cold_jwks.write_text(json.dumps(cold.jwks()))
        verify, verify_addr = bench.start_server(stack, "verify", "--jwks", str(cold_jwks))
        check_allowed(verify_addr, cold_body, "verify bound")
        targets.insert(3, Target(
            "verify", "audit write + bare PyNaCl verify + claims json.loads per Check "
                      "(the least a cold allow does)",
            bench.python_check(verify_addr, cold_body, True), {"server": verify.pid}))
        targets.insert(1, Target(
            "record", "parse + one chained audit write (the least an audited allow does)",
            bench.python_check(record_addr, body, True), {"server": record.pid}))
        bench.table("direct_python", "Check direct over gRPC (Python grpc.aio client)", "python-grpc.aio",
                    targets, pinned=True, settings={"in_flight": s.py_concurrency, "channels": 1},
                    note="Our asyncio client, because h2load sends one body and the cold case needs "
                         "many tokens; the floor, warm and naive rows use the warm body.")
        prof = profiles(bench, warm, body, cold, cold_body, out_dir)
        cold.stop()
        naive.stop()
        verify.stop()

        # -- transport: TCP loopback vs Unix domain socket ------------------------------------
        uds = bench.start_daemon(stack, "agentauthz-uds", check_listen=f"unix:{work / 'check.sock'}")
        tcp_body = bench.bodies("tcp", [warm.mint()])
        uds_body = bench.bodies("uds", [uds.mint()])
        check_allowed(warm.check_address, tcp_body, "agentauthz (tcp)")
        check_allowed(uds.check_address, uds_body, "agentauthz (uds)")
        bench.table("transport", "Check over TCP loopback vs Unix domain socket (Python client)",
                    "python-grpc.aio",
                    [Target("tcp", "agentauthz, TCP 127.0.0.1", bench.python_check(
                        warm.check_address, tcp_body, True), {"server": warm.pid}, warm),
                     Target("uds", "agentauthz, unix socket",
                            bench.python_check(uds.check_address, uds_body, True), {"server": uds.pid}, uds)],
                    pinned=True, settings={"in_flight": s.py_concurrency},
                    note="h2load cannot dial a Unix socket, so both rows use the Python client.")
        uds.stop()

        # -- mint over mTLS --------------------------------------------------------------------
        def mint(d: float) -> dict[str, Any]:
            return loadgen.python_client(
                ["mint", "--api", warm.api_address, "--identity", str(warm.identity_dir),
                 "--threads", str(s.mint_threads), "--duration", f"{d:g}"], d, bench.client_cpus, ROOT)
        bench.table("mint", "Mint over mTLS (Python client, threads)", "python-grpc",
                    [Target("mint", f"Mint, {s.mint_threads} threads", mint, {"server": warm.pid})],
                    pinned=True, settings={"threads": s.mint_threads, "channels": s.mint_threads},
                    note=f"Setup minted {mint_setup['tokens']} cold tokens in {mint_setup['seconds']:.1f} s "
                         "(4 threads).")

        # -- worker scaling --------------------------------------------------------------------
        scaling_result = worker_scaling(bench, stack, warm)

        # -- through Envoy ---------------------------------------------------------------------
        _, answer_addr = bench.start_server(stack, "answer")
        configs = through_envoy(bench, stack, warm, floor_addr, answer_addr, record_addr, jwks)

    return {"settings": asdict(s), "started": started, "elapsed_s": time.time() - started,
            "tables": bench.tables, "processes": bench.processes, "envoy_configs": configs,
            "profile": prof, "workers": scaling_result, "versions": versions(),
            "revocation_memory": revocation_memory,
            "cpus": {"server": sorted(bench.server_cpus or []), "client": sorted(bench.client_cpus or [])}}


def worker_scaling(bench: Bench, stack: contextlib.ExitStack, one: Daemon) -> dict[str, Any]:
    """``serve --workers 2`` against one process, and revocation reaching every worker."""
    s = bench.s
    if not scaling.workers_supported(ROOT):
        return {"skipped": "this agentauthz has no `serve --workers`"}
    two = bench.start_daemon(stack, "agentauthz-workers2", workers=2)
    clients, streams = 16, 4  # many connections: SO_REUSEPORT spreads connections, not calls
    targets = []
    for name, daemon in (("workers1", one), ("workers2", two)):
        body = bench.bodies(f"{name}", [daemon.mint()])
        check_allowed(daemon.check_address, body, name)
        targets.append(Target(name, f"agentauthz --workers {1 if daemon is one else 2}",
                              bench.h2load_grpc(daemon.check_address, body, clients, streams, False),
                              {"server": daemon.pid}, daemon))
    bench.table("workers", "Worker scaling (h2load, 16 connections)", "h2load", targets, pinned=False,
                settings={"clients": clients, "streams_per_client": streams, "in_flight": clients * streams},
                note="CPU is the whole process tree. The load generator shares the 2 cores.")
    trials = [scaling.propagation(two, 2, kind, i) for kind in ("token", "task") for i in range(s.rounds)]
    for t in trials:
        print(f"  revoke by {t['kind']}: call {t['revoke_call_ms']:.1f} ms, every worker denying "
              f"{t['all_denied_after_ms']} ms after the ack, stale allows {t['stale_allows']}", flush=True)
    two.stop()
    return {"propagation": trials}


def through_envoy(bench: Bench, stack: contextlib.ExitStack, warm: Daemon, floor_addr: str,
                  answer_addr: str, record_addr: str, jwks: dict[str, Any]) -> dict[str, str]:
    """Three front Envoys (and ext_authz -> the floor, answer and record bound servers) before one
    direct_response upstream."""
    token = warm.mint()
    upstream = envoy.start("envoy-upstream", envoy.upstream_config, bench.work)
    stack.callback(upstream.stop)
    bench.processes["envoy-upstream"] = upstream.argv
    modes = {"floor": ("Envoy, no authorization", None),
             "jwt_authn": ("Envoy jwt_authn (EdDSA, local JWKS)", None),
             "ext_authz": ("Envoy ext_authz -> agentauthz", warm.check_address),
             "ext_authz_floor": ("Envoy ext_authz -> floor server (constant OK)", floor_addr),
             "ext_authz_answer": ("Envoy ext_authz -> floor server answering agentauthz's allow "
                                  "(headers, dynamic metadata)", answer_addr),
             "ext_authz_record": ("Envoy ext_authz -> parse + one chained audit write server", record_addr)}
    fronts = {}
    for mode, (_, check) in modes.items():
        fronts[mode] = envoy.start(f"envoy-{mode}", lambda listen, admin, m=mode, c=check: envoy.front_config(
            "ext_authz" if m.startswith("ext_authz") else m, listen, admin, upstream.listen_port,
            check_address=c, jwks=jwks), bench.work)
        stack.callback(fronts[mode].stop)
        check_envoy_allows(fronts[mode].url, token, f"Envoy {mode}")
        bench.processes[f"envoy-{mode}"] = fronts[mode].argv

    def targets(clients: int, modes_here: tuple[str, ...] = tuple(modes)) -> list[Target]:
        out = []
        for mode in modes_here:
            front = fronts[mode]
            cpu = {"envoy": front.pid, "upstream": upstream.pid}
            if mode == "ext_authz":
                cpu["daemon"] = warm.pid
            out.append(Target(mode, modes[mode][0], bench.h2load_http(front.url, token, clients), cpu,
                              warm if mode == "ext_authz" else None))
        return out

    bench.table("envoy_1", "Through Envoy, one connection (h2load --h1)", "h2load", targets(1),
                pinned=False, settings={"clients": 1, "protocol": "http/1.1"},
                note="Added latency = p50 here minus the floor's p50. ext_authz -> floor server shows what "
                     "the gRPC hop costs with no decision at all; ext_authz -> the floor server answering "
                     "agentauthz's allow, what Envoy adds for acting on that answer (setting three headers, "
                     "removing the bearer, keeping the decision id); ext_authz -> the parse + audit write "
                     "server, what the hop costs with the least an audited allow does.")
    bench.table("envoy_n", f"Through Envoy, {bench.s.envoy_clients} connections (h2load --h1)", "h2load",
                targets(bench.s.envoy_clients, ("floor", "jwt_authn", "ext_authz", "ext_authz_floor")),
                pinned=False,
                settings={"clients": bench.s.envoy_clients, "protocol": "http/1.1"})
    return {m: f.config_path.read_text() for m, f in fronts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "load.json")
    args = parser.parse_args(argv)
    settings = Settings(**{k: getattr(args, k) for k in asdict(defaults)})
    if settings.rounds < 1 or settings.duration <= 0:
        parser.error("--rounds must be at least 1 and --duration positive")
    if not shutil.which("h2load"):
        parser.error("h2load not found: apt-get install -y nghttp2-client (make bench does this)")
    work = Path(settings.work) if settings.work else Path(tempfile.mkdtemp(prefix="agentauthz-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        results = run_all(settings, work, args.out.parent)
    finally:
        if not settings.work:
            shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nload results: {args.out} ({results['elapsed_s']:.0f} s)")
    return 0

