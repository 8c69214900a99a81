"""Instructions per Check, counted by callgrind: the one figure this noisy machine cannot move.

    python -m benchmarks.load.instructions [--requests 1000] [--out FILE]

Requests/s and CPU per request drift 2x within a minute on a shared VM; an
instruction count does not (two runs of the floor agreed to 0.06%). Each server
runs under ``valgrind --tool=callgrind``; our Python client (the load tables'
``loadgen.check_load``, 64 calls in flight on one channel) sends a warm-up,
callgrind's counters are zeroed, the client sends ``--requests`` Checks, and the
counters are dumped. The client counts the allows: every Check must be one.
The figure is the user-space instructions of every thread of the server, per Check:

* ``floor``  the constant OK (``servers.py floor``);
* ``record`` the bound on a warm Check: parse + one chained audit write,
  answered with agentauthz's allow (``servers.py record``);
* ``warm``   agentauthz, as ``make run`` starts it, one token;
* ``verify`` the bound on a cold Check: ``record`` + one bare PyNaCl verify and a
  ``json.loads`` of the claims;
* ``cold``   agentauthz, 2,000 tokens cycled through a verified-token cache of
  1,000: every Check verifies a signature;
* ``naive``  the PyJWT peer (``servers.py naive``), on the cold tokens (it decodes
  every token anyway).

Instructions are work, not time: the kernel's share (sendmsg, recv, epoll, the
audit write(2)) is not counted, nor are cache misses. The ratios say how much
work a Check adds to the framework's, without the machine's noise.

Valgrind runs the servers ~50x slower, so the daemon's audit flush interval is
scaled by as much (50 ms -> 2.5 s) to keep its checkpoints per Check what they
are natively.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .bench import Settings

ROOT = Path(__file__).resolve().parents[2]
SERVERS = ("floor", "record", "warm", "verify", "cold", "naive")
SLOWDOWN = 50  # valgrind's, roughly: the daemon's flush interval is scaled by it
COLD_TOKENS, COLD_CACHE = Settings.cold_tokens, Settings.cold_cache  # as the load tables' cold row
CONCURRENCY = 64


def _allows(address: str, bodies: list[bytes], requests: int) -> int:
    """Send ``requests`` Checks cycling through ``bodies``; how many were allowed."""
    from .loadgen import check_load
    result = asyncio.run(check_load(address, bodies, CONCURRENCY, duration=3600, max_requests=requests,
                                    timeout=600))
    return int(result["outcomes"].get("allow", 0))


def _count(name: str, argv: list[str], address: str, bodies: list[bytes], requests: int, work: Path) -> float:
    """Instructions per Check of the server ``argv`` starts, answering on ``address``."""
    from .procs import Process, grpc_answers, wait_for
    out = work / f"callgrind.{name}"
    server = Process(name, ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv], work,
                     cwd=ROOT)
    try:
        wait_for(lambda: server.alive() and grpc_answers(address), 600, f"{name} under valgrind")
        warm_up = max(requests // 2, 100)  # caches, imports; a warm token's first allow
        allowed = _allows(address, bodies, warm_up)
        subprocess.run(["callgrind_control", "-z", str(server.pid)], capture_output=True, check=True)
        allowed += _allows(address, bodies[warm_up % len(bodies):] + bodies[:warm_up % len(bodies)], requests)
        subprocess.run(["callgrind_control", "-d", str(server.pid)], capture_output=True, check=True)
    finally:
        server.stop()
    if allowed != warm_up + requests:
        raise RuntimeError(f"{name}: {allowed} of {warm_up + requests} Checks allowed under valgrind")
    dump = out.with_name(out.name + ".1")  # the dump since the zeroing; the final file has the rest
    total = re.search(r"^totals:\s+(\d+)", dump.read_text(), re.M)
    if total is None:
        raise RuntimeError(f"{dump}: no totals line")
    return int(total.group(1)) / requests


def measure(requests: int) -> dict[str, Any]:
    from agentauthz.client import check_request

    from .daemon import Daemon
    from .procs import free_port

    work = Path(tempfile.mkdtemp(prefix="agentauthz-instructions-"))
    # Tokens are minted by the daemon running natively; its state (keys, policy) is reused under valgrind.
    daemon = Daemon("agentauthz", work, ROOT, config={"audit_flush_interval": 0.05 * SLOWDOWN,
                                                      "verified_cache_size": COLD_CACHE})
    try:
        warm = [check_request(daemon.mint(), "demo", "reports", "read")]
        cold = [check_request(t, "demo", "reports", "read") for t in daemon.mint_many(COLD_TOKENS)]
        jwks = work / "jwks.json"
        jwks.write_text(json.dumps(daemon.jwks()))
    finally:
        daemon.process.stop()
    per_check: dict[str, float] = {}
    commands: dict[str, list[str]] = {}
    for name in SERVERS:
        address = f"127.0.0.1:{free_port()}"
        if name in ("warm", "cold"):
            argv = list(daemon.argv)
            argv[argv.index("--check-listen") + 1] = address
        else:
            extra = ["--jwks", str(jwks)] if name in ("verify", "naive") else []
            argv = [sys.executable, "-m", "benchmarks.load.servers", name, "--listen", address, *extra]
        commands[name] = argv
        per_check[name] = _count(name, argv, address, cold if name in ("verify", "cold", "naive") else warm,
                                 requests, work)
    version = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()
    return {"instructions_per_check": per_check, "requests": requests, "valgrind": version,
            "commands": commands, "settings": {"concurrency": CONCURRENCY, "slowdown": SLOWDOWN,
                                               "cold_tokens": COLD_TOKENS, "cold_cache": COLD_CACHE}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = measure(args.requests)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    counts = result["instructions_per_check"]
    for name, count in counts.items():
        print(f"{name:8} {count:12,.0f} instructions/Check   floor/{name} {counts['floor'] / count:.3f}")


if __name__ == "__main__":
    main()
