"""An HTTP/1.1 load client cycling many requests, for what h2load cannot send: a different token each time.

    python -m benchmarks.load.h1load --target 127.0.0.1:PORT --requests FILE --connections 64 --duration 5

``FILE`` holds whole requests (request line and headers), one per line as JSON strings; each keep-alive
connection sends the next request in the cycle as soon as its last answer is read. Prints one JSON object
shaped like ``loadgen.h2load``'s (requests/s, percentiles, status classes). Bounded by time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from .loadgen import MAX_REQUESTS, percentiles

CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)


def http_request(method: str, host: str, path: str, headers: dict[str, str]) -> str:
    """One keep-alive HTTP/1.1 request without a body."""
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    return "\r\n".join(lines) + "\r\n\r\n"


async def load(target: str, requests: list[bytes], connections: int, duration: float) -> dict[str, Any]:
    host, _, port = target.rpartition(":")
    turn, count = itertools.count(), len(requests)
    latencies: list[float] = []
    statuses = [0] * 6
    failed = [0]
    stop_at = time.perf_counter() + duration

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while (start := time.perf_counter()) < stop_at and (i := next(turn)) < MAX_REQUESTS:
                writer.write(requests[i % count])
                head = await reader.readuntil(b"\r\n\r\n")
                length = CONTENT_LENGTH.search(head)
                if length is None and b"chunked" in head.lower():
                    raise RuntimeError("a chunked answer: this client reads Content-Length bodies only")
                if length and int(length.group(1)):
                    await reader.readexactly(int(length.group(1)))
                latencies.append(time.perf_counter() - start)
                statuses[min(int(head[9:12]) // 100, 5)] += 1
        except (OSError, asyncio.IncompleteReadError):
            failed[0] += 1
        finally:
            writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(connections)))
    elapsed = time.perf_counter() - began
    result = {"elapsed_s": elapsed, "requests": len(latencies), "rps": len(latencies) / elapsed,
              "succeeded": statuses[2], "failed": failed[0], "status_2xx": statuses[2],
              "status_4xx": statuses[4], "status_5xx": statuses[5], "distinct_requests": count,
              "mean_ms": 1000 * sum(latencies) / len(latencies) if latencies else math.nan}
    result.update({k: v * 1000 for k, v in percentiles(latencies).items()})
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="HOST:PORT")
    parser.add_argument("--requests", type=Path, required=True, help="JSON strings, one request a line")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    requests = [json.loads(line).encode() for line in args.requests.read_text().splitlines() if line]
    import uvloop
    print(json.dumps(uvloop.run(load(args.target, requests, args.connections, args.duration))))


if __name__ == "__main__":
    main()
