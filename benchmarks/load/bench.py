"""A load table's machinery: its targets warmed, loaded in interleaved rounds, each run checked and summed up.

``Bench`` also holds what the tables drive (h2load, the Python client) and the processes they
start; which tables there are, and what is in each, is ``run``'s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import loadgen
from .daemon import Daemon
from .procs import Process, free_port, grpc_answers, pin, rss_bytes, steal_seconds, tree_cpu_seconds, wait_for

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Settings:
    """Every knob of a run; recorded in the results so a figure can be reproduced."""

    duration: float = 1.5        # seconds per measured run: short, so that a round's runs are close in time
    warmup: float = 1.0          # seconds of unmeasured load per target before each table
    rounds: int = 7
    pin: bool = True             # pinned tables: servers on the last CPU, load generators on CPU 0
    h2_clients: int = 4          # h2load connections ...
    h2_streams: int = 16         # ... and concurrent streams on each: 64 calls in flight
    py_concurrency: int = 64     # calls in flight from the Python client (one channel)
    cold_tokens: int = 2000      # distinct tokens cycled in the cold table ...
    cold_cache: int = 1000       # ... through a verified-token cache this small (FIFO): every Check misses
    mint_threads: int = 4
    envoy_clients: int = 16      # HTTP/1.1 connections for the through-Envoy throughput table
    profile_seconds: float = 10.0  # py-spy on the warm daemon under h2load; 0 to skip
    work: str = ""               # scratch directory (default: a fresh one under /tmp, removed after)


@dataclass
class Target:
    """One thing to load in a table: how to drive it and which processes to charge CPU to."""

    name: str
    label: str
    drive: Callable[[float], dict[str, Any]]          # duration -> one run's figures
    cpu: dict[str, int]                               # role -> pid whose CPU is charged
    daemon: Daemon | None = None                      # decisions are checked when set
    notes: list[str] = field(default_factory=list)


def in_scratch(prefix: str, run: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """``run(work)`` in a temporary directory of its own, removed afterwards whatever happens."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


class Bench:
    """Holds the processes and the results; each ``table_*`` method produces one table."""

    def __init__(self, settings: Settings, work: Path) -> None:
        self.s = settings
        self.work = work
        self.tables: dict[str, Any] = {}
        self.processes: dict[str, list[str]] = {}
        cpus = os.cpu_count() or 1
        self.server_cpus: set[int] | None = {cpus - 1} if settings.pin and cpus > 1 else None
        self.client_cpus: set[int] | None = {0} if self.server_cpus else None

    # -- running a table ---------------------------------------------------------------------

    def table(self, key: str, title: str, generator: str, targets: list[Target], *, pinned: bool,
              settings: dict[str, Any], note: str = "") -> None:
        """Warm every target up, then ``rounds`` interleaved rounds; store runs and medians."""
        pinned = pinned and self.server_cpus is not None
        for t in targets:
            for pid in t.cpu.values():
                pin(pid, self.server_cpus if pinned else None)
        print(f"\n== {title}  [{generator}{', pinned' if pinned else ''}]", flush=True)
        for t in targets:
            t.drive(self.s.warmup)
        runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        for r in range(self.s.rounds):
            for t in (targets if r % 2 == 0 else targets[::-1]):  # no row always runs first or last
                run = self._measure(t, pinned)
                runs[t.name].append(run)
                flag = "" if run["valid"] else "  INVALID: " + "; ".join(run["problems"])
                print(f"  round {r + 1} {t.name:<15} {run['rps']:9.0f} req/s  p50 {run['p50']:7.3f} ms  "
                      f"p99 {run['p99']:7.3f} ms  cpu/req {self._cpu_text(run)}  "
                      f"steal {100 * run['steal']:.0f}%{flag}", flush=True)
        for t in targets:
            for pid in t.cpu.values():
                pin(pid, None)
        rows = {t.name: {"label": t.label, "notes": t.notes, "summary": self._summary(runs[t.name]),
                         "rounds": runs[t.name]} for t in targets}
        self.tables[key] = {"title": title, "generator": generator, "pinned": pinned,
                            "settings": settings, "note": note, "rows": rows}

    @staticmethod
    def _cpu_text(run: dict[str, Any]) -> str:
        return " ".join(f"{k} {v:.0f}µs" for k, v in run["cpu_us_per_request"].items())

    def _measure(self, t: Target, pinned: bool) -> dict[str, Any]:
        steal_cpus = self.server_cpus if pinned else None
        before = {role: tree_cpu_seconds(pid) for role, pid in t.cpu.items()}
        decisions_before = t.daemon.decisions() if t.daemon else {}
        steal_before, started = steal_seconds(steal_cpus), time.monotonic()
        run = t.drive(self.s.duration)
        # Share of the server CPUs' time (every CPU if not pinned) the hypervisor gave other guests.
        run["steal"] = (steal_seconds(steal_cpus) - steal_before) / (
            (time.monotonic() - started) * (len(steal_cpus) if steal_cpus else os.cpu_count() or 1))
        after = {role: tree_cpu_seconds(pid) for role, pid in t.cpu.items()}
        n = max(run["requests"], 1)
        run["cpu_s"] = {role: after[role] - before[role] for role in t.cpu}
        run["cpu_us_per_request"] = {role: 1e6 * run["cpu_s"][role] / n for role in t.cpu}
        run["rss_mb"] = {role: rss_bytes(pid) / 2**20 for role, pid in t.cpu.items()}
        problems = []
        if run["requests"] == 0:
            problems.append("no request completed")
        if "status_2xx" in run and (run["status_2xx"] != run["requests"] or run["failed"]):
            problems.append(f"{run['requests'] - run['status_2xx']} non-2xx, {run['failed']} failed")
        outcomes = run.get("outcomes", {})
        if set(outcomes) - {"allow"}:
            problems.append(f"outcomes {outcomes}")
        if t.daemon:
            after_d = t.daemon.decisions()
            delta = {k: after_d.get(k, 0) - decisions_before.get(k, 0) for k in after_d}
            run["decisions"] = {k: v for k, v in delta.items() if v}
            if set(run["decisions"]) - {"allow"}:
                problems.append(f"daemon decided {run['decisions']}")
        run["valid"] = not problems
        run["problems"] = problems
        return run

    @staticmethod
    def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
        valid = [r for r in runs if r["valid"]] or runs
        out: dict[str, Any] = {k: _median([r[k] for r in valid])
                               for k in ("rps", "p50", "p90", "p99", "mean_ms")}
        out["rps_min"] = min(r["rps"] for r in valid)
        out["rps_max"] = max(r["rps"] for r in valid)
        out["cpu_us_per_request"] = {role: _median([r["cpu_us_per_request"][role] for r in valid])
                                     for role in valid[0]["cpu_us_per_request"]}
        out["steal"] = _median([r.get("steal", float("nan")) for r in valid])
        out["client_cpu_s_per_s"] = _median([r.get("client_cpu_s", float("nan")) / r["elapsed_s"]
                                             for r in valid])
        out["valid_rounds"] = sum(r["valid"] for r in runs)
        out["rounds"] = len(runs)
        return out

    # -- drivers -----------------------------------------------------------------------------

    def h2load_grpc(self, address: str, body: Path, clients: int, streams: int,
                    pinned: bool) -> Callable[[float], dict[str, Any]]:
        url = f"http://{address}{loadgen.CHECK_PATH}"
        cpus = self.client_cpus if pinned else None
        return lambda d: loadgen.h2load(url, duration=d, clients=clients, streams=streams,
                                        log_file=self.work / "h2load.log", body=body,
                                        headers=loadgen.GRPC_HEADERS, cpus=cpus)

    def python_check(self, address: str, bodies: Path, pinned: bool) -> Callable[[float], dict[str, Any]]:
        cpus = self.client_cpus if pinned else None
        return lambda d: loadgen.python_client(
            ["check", "--target", address, "--bodies", str(bodies), "--concurrency",
             str(self.s.py_concurrency), "--duration", f"{d:g}"], d, cpus, ROOT)

    def h2load_http(self, url: str, token: str, clients: int) -> Callable[[float], dict[str, Any]]:
        return lambda d: loadgen.h2load(url, duration=d, clients=clients, streams=1, h1=True,
                                        log_file=self.work / "h2load.log",
                                        headers=[f"authorization: Bearer {token}"])

    # -- processes ---------------------------------------------------------------------------

    def start_server(self, stack: contextlib.ExitStack, kind: str, *extra: str) -> tuple[Process, str]:
        port = free_port()
        address = f"127.0.0.1:{port}"
        argv = [sys.executable, "-m", "benchmarks.load.servers", kind, "--listen", address, *extra]
        proc = Process(kind, argv, self.work, cwd=ROOT)
        stack.callback(proc.stop)
        self.processes[kind] = argv
        wait_for(lambda: proc.alive() and grpc_answers(address), 30, f"{kind} server")
        return proc, address

    def start_daemon(self, stack: contextlib.ExitStack, name: str, **kwargs: Any) -> Daemon:
        daemon = Daemon(name, self.work, ROOT, **kwargs)
        stack.callback(daemon.stop)
        self.processes[name] = daemon.argv
        return daemon

    def bodies(self, name: str, tokens: list[str]) -> Path:
        from agentauthz.client import check_request
        return loadgen.write_frames(self.work / f"{name}.bin",
                                    [check_request(t, "demo", "reports", "read") for t in tokens])
