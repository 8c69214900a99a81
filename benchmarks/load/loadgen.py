"""Load generators: h2load (C, HTTP/2 and HTTP/1.1) and a small asyncio gRPC client of our own.

h2load is the real load generator: it costs the least CPU per request, so the
server, not the client, is what saturates. It sends one body for every
request, though, so it can only drive a single token. The cold-cache case
needs many distinct tokens, and Unix sockets are beyond h2load, so for those
(and, for an apples-to-apples table, for the same servers again) we use a
grpc.aio + uvloop client that cycles through a file of request frames:

    python -m benchmarks.load.loadgen check --target 127.0.0.1:PORT --bodies FILE \
        --concurrency 64 --duration 5
    python -m benchmarks.load.loadgen mint --api localhost:PORT --identity DIR --threads 4 --duration 5

Both print one JSON object. Every run is bounded by ``--duration`` and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import math
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import grpc

from .procs import run_bounded

CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
# A CheckResponse whose first field is an empty google.rpc.Status (code 0): every OK
# response of the four servers starts so, every denial carries a non-zero code there.
# Checking the prefix keeps the client's per-call cost down; run.py sanity-checks
# each server with a full parse before it is loaded.
ALLOW_PREFIX = b"\x0a\x00"
MAX_REQUESTS = 2_000_000  # per run and client: a second bound besides the duration


# --- request bodies -------------------------------------------------------------------------

def grpc_frame(message: bytes) -> bytes:
    """gRPC length-prefixed message: flag 0 (uncompressed), 4-byte big-endian length, bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def write_frames(path: Path, messages: Sequence[bytes]) -> Path:
    path.write_bytes(b"".join(grpc_frame(m) for m in messages))
    return path


def read_frames(path: Path) -> list[bytes]:
    """The messages of a file of concatenated gRPC frames (what h2load posts, one frame)."""
    data, out, at = path.read_bytes(), [], 0
    while at < len(data):
        length = int.from_bytes(data[at + 1:at + 5], "big")
        out.append(data[at + 5:at + 5 + length])
        at += 5 + length
    return out


def percentiles(values: Sequence[float], points: Sequence[int] = (50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles (no interpolation: every figure is a latency that happened)."""
    if not values:
        return {f"p{p}": math.nan for p in points}
    ordered = sorted(values)
    return {f"p{p}": ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]
            for p in points}


# --- h2load ---------------------------------------------------------------------------------

def h2load_version() -> str:
    if not shutil.which("h2load"):
        return "missing"
    out = subprocess.run(["h2load", "--version"], capture_output=True, text=True, timeout=10).stdout
    return out.strip()


def h2load(url: str | Sequence[str], *, duration: float, clients: int, streams: int, log_file: Path,
           body: Path | None = None, headers: Sequence[str] = (), h1: bool = False,
           cpus: set[int] | None = None) -> dict[str, Any]:
    """One timed h2load run; requests/s from h2load, percentiles from its per-request log.

    Several URLs (one authority) are requested round robin.
    """
    argv = ["h2load", "-D", f"{round(duration * 1000)}ms", "-c", str(clients), "-m", str(streams), "-t", "1",
            "--log-file", str(log_file)]
    if body is not None:
        argv += ["-d", str(body)]
    for h in headers:
        argv += ["-H", h]
    if h1:
        argv.append("--h1")
    argv += [url] if isinstance(url, str) else list(url)
    stdout, client_cpu = run_bounded(argv, timeout=duration + 60, cpus=cpus)
    result = parse_h2load(stdout)
    latencies_us = []
    failed = 0
    for line in log_file.read_text().splitlines():
        cols = line.split("\t")
        if len(cols) >= 3:
            if cols[1].startswith("-"):
                failed += 1
            else:
                latencies_us.append(int(cols[2]))
    log_file.unlink()
    result.update({k: v / 1000.0 for k, v in percentiles(latencies_us).items()})  # µs -> ms
    result["mean_ms"] = sum(latencies_us) / len(latencies_us) / 1000.0 if latencies_us else math.nan
    result.update(failed_in_log=failed, client_cpu_s=client_cpu, command=" ".join(argv))
    return result


def parse_h2load(text: str) -> dict[str, Any]:
    """The figures of h2load's summary we use; a run without them is an error, not a zero."""
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", text)
    r = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", text)
    s = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if not (m and r and s):
        raise RuntimeError(f"cannot parse h2load output:\n{text[-2000:]}")
    seconds = float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)
    return {"elapsed_s": seconds, "rps": float(m.group(3)), "requests": int(r.group(3)),
            "succeeded": int(r.group(4)), "failed": int(r.group(5)) + int(r.group(6)) + int(r.group(7)),
            "status_2xx": int(s.group(1)), "status_4xx": int(s.group(3)), "status_5xx": int(s.group(4))}


# --- the Python gRPC client -----------------------------------------------------------------

async def check_load(target: str, bodies: Sequence[bytes], concurrency: int, duration: float,
                     max_requests: int = MAX_REQUESTS, timeout: float = 5.0) -> dict[str, Any]:
    """``concurrency`` calls in flight on one channel, cycling through ``bodies``, for ``duration`` s.

    Bounded twice: by time, and by ``max_requests`` calls started, whichever comes first.
    """
    channel = grpc.aio.insecure_channel(target)
    await asyncio.wait_for(channel.channel_ready(), 10)
    call = channel.unary_unary(CHECK_PATH)  # no serializers: raw bytes both ways
    latencies: list[float] = []
    outcomes: collections.Counter[str] = collections.Counter()
    turn = itertools.count()
    count = len(bodies)
    stop_at = time.perf_counter() + duration

    async def worker() -> None:
        while True:
            start = time.perf_counter()
            i = next(turn)
            if start >= stop_at or i >= max_requests:
                return
            try:
                raw = await call(bodies[i % count], timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                outcomes[f"error_{exc.code().name.lower()}"] += 1
                continue
            latencies.append(time.perf_counter() - start)
            outcomes["allow" if raw.startswith(ALLOW_PREFIX) else "deny"] += 1

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    await channel.close()
    result = {"elapsed_s": elapsed, "requests": len(latencies), "rps": len(latencies) / elapsed,
              "outcomes": dict(outcomes), "distinct_bodies": count,
              "mean_ms": 1000 * sum(latencies) / len(latencies) if latencies else math.nan}
    result.update({k: v * 1000 for k, v in percentiles(latencies).items()})
    return result


def mint_load(api: str, identity_dir: Path, threads: int, duration: float) -> dict[str, Any]:
    """Mint over mTLS from ``threads`` threads, each on its own channel, for ``duration`` s."""
    from agentauthz.client import Client, Identity
    identity = Identity.from_dir(identity_dir)
    clients = [Client(api, identity, timeout=10) for _ in range(threads)]
    for i, c in enumerate(clients):  # connect and handshake outside the measured window
        c.mint(f"bench-mint-{i}", ["demo:*:read"], ttl=60)

    def worker(i: int, stop_at: float) -> tuple[list[float], int]:
        latencies, errors = [], 0
        for _ in range(MAX_REQUESTS):
            if (start := time.perf_counter()) >= stop_at:
                break
            try:
                clients[i].mint(f"bench-mint-{i}", ["demo:*:read"], ttl=60)
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)
        return latencies, errors

    began = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        parts = list(pool.map(worker, range(threads), [began + duration] * threads))
    elapsed = time.perf_counter() - began
    latencies = [x for lat, _ in parts for x in lat]
    result = {"elapsed_s": elapsed, "requests": len(latencies), "rps": len(latencies) / elapsed,
              "errors": sum(e for _, e in parts), "threads": threads,
              "mean_ms": 1000 * sum(latencies) / len(latencies) if latencies else math.nan}
    result.update({k: v * 1000 for k, v in percentiles(latencies).items()})
    return result


def python_client(argv: Sequence[str], duration: float, cpus: set[int] | None,
                  cwd: Path) -> dict[str, Any]:
    """Run this module's CLI as a separate process (its CPU must not be the orchestrator's)."""
    import sys
    stdout, client_cpu = run_bounded([sys.executable, "-m", "benchmarks.load.loadgen", *argv],
                                     timeout=duration + 60, cpus=cpus, cwd=cwd)
    result: dict[str, Any] = json.loads(stdout)
    result.update(client_cpu_s=client_cpu, command="python -m benchmarks.load.loadgen " + " ".join(argv))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    check = sub.add_parser("check", help="Check load, cycling through request frames")
    check.add_argument("--target", required=True, help="HOST:PORT or unix:PATH")
    check.add_argument("--bodies", type=Path, required=True, help="file of gRPC-framed CheckRequests")
    check.add_argument("--concurrency", type=int, default=64)
    check.add_argument("--duration", type=float, default=5.0)
    mint = sub.add_parser("mint", help="Mint load over mTLS")
    mint.add_argument("--api", required=True)
    mint.add_argument("--identity", type=Path, required=True)
    mint.add_argument("--threads", type=int, default=4)
    mint.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.mode == "check":
        import uvloop
        bodies = read_frames(args.bodies)
        result = uvloop.run(check_load(args.target, bodies, args.concurrency, args.duration))
    else:
        result = mint_load(args.api, args.identity, args.threads, args.duration)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
