"""Each Check handler's own CPU per call, all under one shared load: the steady figure behind the tables.

    python -m benchmarks.load.handlers [--rounds 5] [--duration 4] [--out FILE]

Requests/s ratios between separate servers move by 0.1-0.2 from round to round
on a shared 2-core VM, too much to see a 10 µs change. Here one process serves,
on one gRPC server configured like the daemon's Check listener, the real Check
(on a real Authority) next to the comparison handlers: the floor, parse only,
and the bound's parse + one chained record (``servers.bound_handler``). One
h2load run spreads its calls over all of them round robin, so every handler
runs under the same load at the same moments, and each handler's thread CPU
per call is summed around its body. Parsing (the deserializer) and the gRPC
framework are outside the figure, and the same for every handler but the floor.
Under load a step costs several times its isolated price (cold caches between
requests), which is why this is measured under load at all.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
HANDLERS = ("floor", "parse", "bound", "check")
STATS = "/bench.Handlers/Stats"


async def serve(state: Path, port: int, frame: Path) -> None:
    import grpc

    from agentauthz import extauthz
    from agentauthz.authority import Authority
    from agentauthz.client import check_request
    from agentauthz.config import Config

    from .loadgen import write_frames
    from .servers import OK_RESPONSE, bound_handler

    config = Config(state_dir=state)
    authority = Authority(config)
    authority.start()
    service = extauthz.CheckService(authority.verifiers, authority.audit, lambda: authority.policy,
                                    authority.clock, budgets=authority.budgets)
    spent: collections.Counter[str] = collections.Counter()  # handler -> ns; handler + "_n" -> calls

    async def floor(request: Any, context: Any) -> bytes:
        return OK_RESPONSE

    bodies: dict[str, Callable[..., Any]] = {"floor": floor, "parse": floor, "bound": bound_handler({}),
                                             "check": service.check}
    server = grpc.aio.server(maximum_concurrent_rpcs=config.check_max_concurrent_rpcs)
    for name in HANDLERS:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(f"bench.{name}", {
            "Check": grpc.unary_unary_rpc_method_handler(
                _timed(name, bodies[name], spent), response_serializer=None,
                request_deserializer=None if name == "floor" else extauthz.parse_check_request)}),))

    async def take(request: Any, context: Any) -> bytes:
        figures = json.dumps({**spent, "decisions": service.decision_counts()}).encode()
        spent.clear()
        return figures

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Handlers", {
        "Stats": grpc.unary_unary_rpc_method_handler(take, response_serializer=None)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    minted = authority.mint("spiffe://dev.local/agent/bench", "bench", [
        {"tool": "demo", "target": "*", "ops": ["read"], "sensitivity": "internal"}], ttl=600)
    staged = write_frames(frame.with_suffix(".staged"), [
        check_request(minted.token, "demo", "reports", "read", "internal")])
    os.replace(staged, frame)  # the driver starts once the file exists: never half written
    await server.wait_for_termination()


def _timed(name: str, body: Callable[..., Any], spent: collections.Counter[str]) -> Callable[..., Any]:
    """``body`` with its thread CPU summed per call; a call that suspends (an allow waiting for the
    audit writer, while the loop runs other calls) is counted apart, not timed."""
    clock = time.thread_time_ns

    async def handler(request: Any, context: Any) -> Any:
        began = clock()
        call = body(request, context)
        try:
            waits_on = call.send(None)
        except StopIteration as done:
            spent[name] += clock() - began
            spent[name + "_n"] += 1
            return done.value
        spent[name + "_waited"] += 1
        return await _finish(call, waits_on)

    return handler


async def _finish(call: Any, waits_on: Any) -> Any:
    """Run a suspended coroutine to its end as its task would: resume it each time what it awaits is
    done (it reads the outcome, or the error, from that future itself)."""
    while True:
        try:
            await waits_on
        except BaseException:  # noqa: S110 - re-raised inside ``call`` when it resumes
            pass
        try:
            waits_on = call.send(None)
        except StopIteration as done:
            return done.value


def measure(rounds: int, duration: float) -> dict[str, Any]:
    import grpc

    from .loadgen import h2load_version, parse_h2load
    from .procs import Process, free_port, wait_for

    work = Path(tempfile.mkdtemp(prefix="agentauthz-handlers-"))
    port, frame = free_port(), work / "check.frames"
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus = {cpus[-1]} if len(cpus) > 1 else None
    server = Process("handlers", [sys.executable, "-m", "benchmarks.load.handlers", "--serve", str(port),
                                  "--state", str(work / "state"), "--frame", str(frame)],
                     work, cwd=ROOT, cpus=server_cpus)
    per_round: list[dict[str, float]] = []
    waited: list[float] = []  # share of the real Check's calls that waited for the audit writer
    try:
        wait_for(lambda: server.alive() and frame.exists(), 60, "the handlers server")
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        take = channel.unary_unary(STATS)
        take(b"", timeout=10)
        urls = [f"http://127.0.0.1:{port}/bench.{name}/Check" for name in HANDLERS]
        for _ in range(rounds):
            argv = ["h2load", "-D", f"{round(duration * 1000)}ms", "-c", "4", "-m", "16", "-t", "1",
                    "-d", str(frame), "-H", "content-type: application/grpc", "-H", "te: trailers", *urls]
            if server_cpus:
                argv = ["taskset", "-c", str(cpus[0]), *argv]
            run = parse_h2load(subprocess.run(argv, capture_output=True, text=True, check=True,
                                              timeout=duration + 60).stdout)
            spent = json.loads(take(b"", timeout=10))
            # Every call answered, and the Check's answers all allows: else this measured something else.
            if run["failed"] or set(spent["decisions"]) - {"allow"}:
                raise RuntimeError(f"not a clean round: h2load {run}, Check decisions {spent['decisions']}")
            per_round.append({n: spent.get(n, 0) / max(spent.get(n + "_n", 0), 1) / 1000 for n in HANDLERS})
            waited.append(spent.get("check_waited", 0) / max(spent.get("check_n", 0), 1))
        channel.close()
    finally:
        server.stop()
    medians = {n: statistics.median(r[n] for r in per_round) for n in HANDLERS}
    return {"rounds": per_round, "median_us": medians, "check_waited": waited, "h2load": h2load_version(),
            "settings": {"rounds": rounds, "duration": duration, "server_cpus": sorted(server_cpus or [])}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the server process: its port
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--frame", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        import uvloop
        uvloop.run(serve(args.state, args.serve, args.frame))
        return
    result = measure(args.rounds, args.duration)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print("handler thread CPU per call under shared load, µs (median of rounds):")
    for name, value in result["median_us"].items():
        print(f"  {name:6s} {value:7.1f}   rounds: {[round(r[name], 1) for r in result['rounds']]}")
    print(f"  (Check calls that waited for the audit writer, not timed: "
          f"{[f'{share:.1%}' for share in result['check_waited']]})")


if __name__ == "__main__":
    main()
