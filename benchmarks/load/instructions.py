"""Instructions per Check, counted by callgrind: the one figure this noisy machine cannot move.

    python -m benchmarks.load.instructions [--requests 1000] [--out FILE]

Requests/s and CPU per request drift 2x within a minute on a shared VM; an
instruction count does not (two runs of the floor agreed to 0.06%). Each server
runs under ``valgrind --tool=callgrind``: h2load sends a warm-up, callgrind's
counters are zeroed, h2load sends ``--requests`` Checks at the load tables'
concurrency (4 connections x 16 streams, the same warm request bytes for all),
and the counters are dumped. The figure is the user-space instructions of every
thread of the process, per Check:

* ``floor``  the constant OK (``servers.py floor``);
* ``record`` the bound on a warm Check: parse + one chained audit write,
  answered with agentauthz's allow (``servers.py record``);
* ``agentauthz`` the daemon, as ``make run`` starts it, with a warm token.

Instructions are work, not time: the kernel's share (sendmsg, recv, epoll, the
audit write(2)) is not counted, nor are cache misses. The ratios say how much
work a Check adds to the framework's, without the machine's noise.

Valgrind runs the servers ~50x slower, so the daemon's audit flush interval is
scaled by as much (50 ms -> 2.5 s) to keep its checkpoints per Check what they
are natively.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
SERVERS = ("floor", "record", "agentauthz")
SLOWDOWN = 50  # valgrind's, roughly: the daemon's flush interval is scaled by it


def _ready(address: str) -> bool:
    import grpc
    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=2)
        except grpc.FutureTimeoutError:
            return False
    return True


def _load(address: str, body: Path, requests: int) -> int:
    """h2load sends ``requests`` Checks; the number that succeeded."""
    argv = ["h2load", "-n", str(requests), "-c", "4", "-m", "16", "-t", "1", "-d", str(body),
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            f"http://{address}/envoy.service.auth.v3.Authorization/Check"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=True).stdout
    found = re.search(r"(\d+) succeeded", out)
    return int(found.group(1)) if found else 0


def _count(name: str, argv: list[str], address: str, body: Path, requests: int, work: Path,
           allowed: Callable[[], float] | None = None) -> float:
    """Instructions per Check of the server ``argv`` starts, answering on ``address``; ``allowed``
    reads how many Checks the server has allowed so far, where it can tell."""
    from .procs import Process, wait_for
    out = work / f"callgrind.{name}"
    server = Process(name, ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv], work,
                     cwd=ROOT)
    try:
        wait_for(lambda: server.alive() and _ready(address), 600, f"{name} under valgrind")
        _load(address, body, max(requests // 4, 100))  # warm-up: caches, imports, the token's first allow
        subprocess.run(["callgrind_control", "-z", str(server.pid)], capture_output=True, check=True)
        answered = _load(address, body, requests)
        subprocess.run(["callgrind_control", "-d", str(server.pid)], capture_output=True, check=True)
        # h2load cannot see a gRPC status: the daemon's own count says every Check was an allow.
        allows = allowed() if allowed else None
    finally:
        server.stop()
    warm_up = max(requests // 4, 100)
    if answered != requests or allows not in (None, warm_up + requests):
        raise RuntimeError(f"{name}: {answered} of {requests} Checks answered, {allows} allowed of "
                           f"{warm_up + requests} under valgrind")
    dump = out.with_name(out.name + ".1")  # the dump since the zeroing; the final file has the rest
    total = re.search(r"^totals:\s+(\d+)", dump.read_text(), re.M)
    if total is None:
        raise RuntimeError(f"{dump}: no totals line")
    return int(total.group(1)) / requests


def measure(requests: int) -> dict[str, Any]:
    from agentauthz.client import check_request

    from . import loadgen
    from .daemon import Daemon
    from .procs import free_port

    work = Path(tempfile.mkdtemp(prefix="agentauthz-instructions-"))
    # The token is minted by the daemon running natively; its state (keys, policy) is reused under valgrind.
    daemon = Daemon("agentauthz", work, ROOT, config={"audit_flush_interval": 0.05 * SLOWDOWN})
    try:
        token = daemon.mint()
    finally:
        daemon.process.stop()
    body = loadgen.write_frames(work / "warm.bin", [check_request(token, "demo", "reports", "read")])
    per_check: dict[str, float] = {}
    argvs: dict[str, list[str]] = {}
    for name in SERVERS:
        address = f"127.0.0.1:{free_port()}"
        if name == "agentauthz":
            argv = list(daemon.argv)
            argv[argv.index("--check-listen") + 1] = address
        else:
            argv = [sys.executable, "-m", "benchmarks.load.servers", name, "--listen", address]
        argvs[name] = argv
        allowed = (lambda: daemon.decisions().get("allow", 0)) if name == "agentauthz" else None
        per_check[name] = _count(name, argv, address, body, requests, work, allowed)
    version = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()
    return {"instructions_per_check": per_check, "requests": requests, "valgrind": version,
            "commands": argvs, "settings": {"connections": 4, "streams": 16, "slowdown": SLOWDOWN}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = measure(args.requests)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    counts = result["instructions_per_check"]
    for name, count in counts.items():
        print(f"{name:12} {count:12,.0f} instructions/Check   floor/{name} {counts['floor'] / count:.3f}")


if __name__ == "__main__":
    main()
