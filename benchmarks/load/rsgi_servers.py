"""granian serving the HTTP Check's comparison apps (rsgi_floor.py, rsgi_bound.py), and where a granian
server's CPU goes, thread by thread.

Every thread of a granian worker (and of the daemon) is named ``python``, so threads are told apart by
role: a process's main thread runs the Python event loop (granian's RSGI app, the daemon's Check); of the
others, the busiest under HTTP load is granian's Rust runtime (``--runtime-threads 1``); the rest are
everything else (the daemon's audit writer, gRPC's poller, granian's helpers).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from .bench import ROOT, Bench
from .bound import DIR_ENV, JWKS_ENV
from .procs import CLOCK_TICKS, Process, free_port, http_get, process_tree, wait_for

LOOP, RUNTIME, REST = ("Python event loop (main thread)", "busiest other thread (Rust runtime)",
                       "other threads")


def start_granian(bench: Bench, stack: contextlib.ExitStack, name: str, app: str,
                  env: dict[str, str] | None = None, batch: bool = True) -> tuple[Process, str]:
    """granian, one worker, one runtime thread, uvloop, serving the RSGI ``app`` on the server core;
    with ``batch``, on the daemon's scheduling (``batch_io_threads``)."""
    port = free_port()
    argv = [sys.executable, "-m", "granian", "--interface", "rsgi", "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1", "--runtime-threads", "1", "--no-ws", "--loop", "uvloop",
            "--log-level", "warning", app]
    proc = Process(name, argv, bench.work, cwd=ROOT, cpus=bench.server_cpus,
                   env={**os.environ, **env} if env else None)
    stack.callback(proc.stop)
    bench.processes[name] = [*(f"{k}={v}" for k, v in (env or {}).items()), *argv]
    wait_for(lambda: proc.alive() and http_get(f"http://127.0.0.1:{port}/")[0] > 0, 30, name)
    if batch:
        batch_io_threads(proc.pid)
    return proc, f"127.0.0.1:{port}"


def batch_io_threads(pid: int) -> None:
    """What the daemon does to its granian threads (serve/http_check.native_threads_batch), done to a
    stock granian from outside: every thread but each process's main one (the event loop) SCHED_BATCH,
    so a floor or bound is measured on the same scheduling as the Check it bounds. Threads granian
    starts later inherit it from theirs."""
    for p in process_tree(pid):
        for tid in os.listdir(f"/proc/{p}/task"):
            if int(tid) != p:
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    os.sched_setscheduler(int(tid), os.SCHED_BATCH, os.sched_param(0))


def start_granian_floor(bench: Bench, stack: contextlib.ExitStack, batch: bool = True) -> tuple[Process, str]:
    """The constant-200 RSGI app (rsgi_floor.py): the most an RSGI Check can reach; without ``batch``,
    stock granian (issue 21's floor)."""
    return start_granian(bench, stack, "granian-floor" if batch else "granian-floor-stock",
                         "benchmarks.load.rsgi_floor:app", batch=batch)


def start_granian_bound(bench: Bench, stack: contextlib.ExitStack,
                        jwks: dict[str, Any] | None) -> tuple[Process, str]:
    """rsgi_bound.py: an audited allow's least work; cold (a verify per request) with ``jwks``."""
    name = f"granian-bound-{'cold' if jwks else 'warm'}"
    env = {DIR_ENV: str(bench.work)}
    if jwks:
        path = bench.work / f"{name}-jwks.json"
        path.write_text(json.dumps(jwks))
        env[JWKS_ENV] = str(path)
    return start_granian(bench, stack, name, "benchmarks.load.rsgi_bound:app", env)


def thread_cpu(pid: int) -> dict[tuple[int, int], float]:
    """(process, thread) -> CPU seconds, for every thread of ``pid`` and its descendants."""
    out = {}
    for p in process_tree(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    stat = Path(f"/proc/{p}/task/{tid}/stat").read_text()
                    fields = stat[stat.rindex(")") + 2:].split()
                    out[(p, int(tid))] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return out


def split(before: dict[tuple[int, int], float], after: dict[tuple[int, int], float],
          requests: int) -> dict[str, float]:
    """CPU µs per request by role: main threads, the busiest other thread, the rest."""
    spent = {key: after[key] - before.get(key, 0.0) for key in after}
    main = sum(v for (p, t), v in spent.items() if p == t)
    others = sorted((v for (p, t), v in spent.items() if p != t), reverse=True)
    n = max(requests, 1)
    return {LOOP: 1e6 * main / n, RUNTIME: 1e6 * (others[0] if others else 0.0) / n,
            REST: 1e6 * sum(others[1:]) / n}


def per_thread(pid: int, drive: Callable[[float], dict[str, Any]]) -> Callable[[float], dict[str, Any]]:
    """``drive``, each run also carrying ``threads_us_per_request``: ``pid``'s CPU split by thread."""
    def run(duration: float) -> dict[str, Any]:
        before = thread_cpu(pid)
        result = drive(duration)
        result["threads_us_per_request"] = split(before, thread_cpu(pid), result["requests"])
        return result
    return run

