"""Each Check handler's own CPU per call, all under one shared load: the steady figure behind the tables.

    python -m benchmarks.load.handlers [--rounds 5] [--duration 4] [--out FILE]

Requests/s ratios between separate servers move by 0.1-0.2 from round to round
on a shared 2-core VM, too much to see a 10 µs change. Here one process serves,
on one gRPC server configured like the daemon's Check listener, the real Check
(on a real Authority) next to the comparison handlers and the Check's own steps:

* ``floor``  the constant OK;
* ``bound``  the bound's parse + one chained record (``servers.bound_handler``);
* ``record`` that record written the way the audit log writes an allow's (the
  native chain: format, SHA-256, ``write(2)``), alone;
* ``decide`` reading the bearer and deciding on the cached token, alone;
* ``check``  the whole warm Check.

One h2load run spreads its calls over all of them round robin, so every
handler runs under the same load at the same moments, and each handler's
thread CPU per call is summed around its body. ``parse`` is the deserializer's
(parse_check_request), summed the same way over every call but the floor's; the
gRPC framework is outside every figure. Under load a step costs several times
its isolated price (cold caches between requests), which is why this is
measured under load at all.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
HANDLERS = ("floor", "bound", "record", "decide", "check")
FIGURES = ("parse", *HANDLERS)
STATS = "/bench.Handlers/Stats"


async def serve(state: Path, port: int, frame: Path) -> None:
    import grpc

    from agentauthz.authority.core import Authority
    from agentauthz.client import check_request
    from agentauthz.config import Config
    from agentauthz.decision import _accel
    from agentauthz.serve import extauthz

    from .bound import ALLOW_MEMBERS
    from .loadgen import write_frames
    from .servers import OK_RESPONSE, bound_handler

    config = Config(state_dir=state)
    authority = Authority(config)
    authority.start()
    service = extauthz.CheckService(authority.verifiers, authority.audit, lambda: authority.policy,
                                    authority.clock, budgets=authority.budgets)
    spent: collections.Counter[str] = collections.Counter()  # handler -> ns; handler + "_n" -> calls
    entered = [0]  # calls that entered any handler, so far

    async def floor(request: Any, context: Any) -> bytes:
        return OK_RESPONSE

    chain = _accel.ACTIVE.Chain()
    log = os.open(state / "record.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    decision_ids = extauthz.decision_ids(_accel.ACTIVE)

    async def record(request: Any, context: Any) -> bytes:
        extauthz.bearer_token(request[0])
        chain.append_check(log, 1 << 40, time.time(), decision_ids.next(), request[1], ALLOW_MEMBERS)
        return OK_RESPONSE

    verifier = authority.verifiers[config.audiences[0]]

    async def decide(request: Any, context: Any) -> bytes:
        verifier.decide(extauthz.bearer_token(request[0]), "demo", "reports", "read", "internal",
                        authority.clock())
        return OK_RESPONSE

    bodies: dict[str, Callable[..., Any]] = {"floor": floor, "bound": bound_handler({}), "record": record,
                                             "decide": decide, "check": service.check}
    server = grpc.aio.server(maximum_concurrent_rpcs=config.check_max_concurrent_rpcs)
    parse = _timed_parse(extauthz.parse_check_request, spent)
    for name in HANDLERS:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(f"bench.{name}", {
            "Check": grpc.unary_unary_rpc_method_handler(
                _timed(name, bodies[name], spent, entered), response_serializer=None,
                request_deserializer=None if name == "floor" else parse)}),))

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


def _timed_parse(parse: Callable[[bytes], Any], spent: collections.Counter[str]) -> Callable[[bytes], Any]:
    clock = time.thread_time_ns

    def timed(raw: bytes) -> Any:
        began = clock()
        fields = parse(raw)
        spent["parse"] += clock() - began
        spent["parse_n"] += 1
        return fields

    return timed


def _timed(name: str, body: Callable[..., Any], spent: collections.Counter[str],
           entered: list[int]) -> Callable[..., Any]:
    """``body`` with its thread CPU summed per call. A call during which another handler started
    (an allow that waited for the audit writer while the loop ran other calls) is counted apart,
    not timed: its thread CPU would hold theirs. ``entered`` counts entries into every handler."""
    clock = time.thread_time_ns

    async def handler(request: Any, context: Any) -> Any:
        entered[0] += 1
        mine = entered[0]
        began = clock()
        out = await body(request, context)
        if entered[0] == mine:
            spent[name] += clock() - began
            spent[name + "_n"] += 1
        else:
            spent[name + "_waited"] += 1
        return out

    return handler


def measure(rounds: int, duration: float) -> dict[str, Any]:
    import grpc

    from .loadgen import h2load, h2load_version
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
        previous = 0
        for _ in range(rounds):
            run = h2load(urls, duration=duration, clients=4, streams=16, log_file=work / "h2load.log",
                         body=frame, headers=("content-type: application/grpc", "te: trailers"),
                         cpus={cpus[0]} if server_cpus else None)
            spent = json.loads(take(b"", timeout=10))
            # Every call answered, every Check an allow (h2load cannot see a gRPC error: the Check's
            # own count of allows must match its calls): else this measured something else.
            allowed = spent["decisions"].get("allow", 0)  # since the start: decisions are never reset
            checks = spent.get("check_n", 0) + spent.get("check_waited", 0)
            if run["failed"] or set(spent["decisions"]) - {"allow"} or allowed - previous != checks:
                raise RuntimeError(f"not a clean round: h2load {run}, Check calls {checks}, "
                                   f"decisions {spent['decisions']}")
            previous = allowed
            per_round.append({n: spent.get(n, 0) / max(spent.get(n + "_n", 0), 1) / 1000 for n in FIGURES})
            waited.append(spent.get("check_waited", 0) / max(spent.get("check_n", 0), 1))
        channel.close()
    finally:
        server.stop()
    medians = {n: statistics.median(r[n] for r in per_round) for n in FIGURES}
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
