"""Process plumbing for the load benchmarks: free ports, readiness, CPU accounting, pinning.

Server CPU per request is read from ``/proc/<pid>/stat`` (utime + stime of the
whole process, every thread included) before and after each run, because that
is what a user pays for a decision regardless of which thread did the work.

On a virtual machine the host may run other guests on our CPUs: the kernel
counts that time as *steal* (``/proc/stat``), and charges it to no process. A
run with much steal had less CPU than its neighbour in the round, so its
requests/s fall while its CPU per request does not.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it is true; connection errors count as "not yet", and so does an answer
    that is not HTTP: a port drawn by ``free_port`` can be taken by another process's ephemeral port
    until the daemon binds it (seen: /healthz answered by HTTP/2 SETTINGS; the daemon then exits with
    "address already in use" and the caller draws new ports)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def grpc_answers(address: str) -> bool:
    """The gRPC server on ``address`` accepts a connection within 2 s (readiness, not correctness)."""
    import grpc
    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=2)
        except grpc.FutureTimeoutError:
            return False
    return True


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of proc(5)


def steal_seconds(cpus: set[int] | None) -> float:
    """CPU seconds the hypervisor took from ``cpus`` (all CPUs if None) since boot: proc(5) ``steal``."""
    total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, _, values = line.partition(" ")
        if name.startswith("cpu") and name != "cpu" and (cpus is None or int(name[3:]) in cpus):
            fields = values.split()
            total += int(fields[7]) if len(fields) > 7 else 0
    return total / CLOCK_TICKS


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (``serve --workers N`` forks its Check workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its descendants, as a user of a pre-forked server pays them."""
    total = 0.0
    for p in process_tree(pid):
        try:
            total += cpu_seconds(p)
        except (FileNotFoundError, ProcessLookupError):
            pass  # exited between listing and reading
    return total


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def pin(pid: int, cpus: set[int] | None) -> None:
    """Restrict every existing thread of ``pid`` and its children to ``cpus`` (None: all CPUs).

    Threads created later inherit their creator's mask, so this covers them too.
    """
    target = cpus or set(range(os.cpu_count() or 1))
    for p in process_tree(pid):
        for tid in os.listdir(f"/proc/{p}/task"):
            try:
                os.sched_setaffinity(int(tid), target)
            except (ProcessLookupError, PermissionError):
                pass  # a thread that just exited


def pinned(argv: Sequence[str], cpus: set[int] | None) -> list[str]:
    """``argv`` started on ``cpus`` only (None: as is), by taskset, which execs it under the same pid.

    Not a ``preexec_fn``: that forks the whole orchestrator, and gRPC's fork handlers then abort the
    child when the parent holds a channel (seen: h2load "exited with -6", epoll_wait EBADF).
    """
    if not cpus:
        return list(argv)
    return ["taskset", "-c", ",".join(str(c) for c in sorted(cpus)), *argv]


class Process:
    """A child process we started, with its log file, CPU counter and a polite stop."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, *, cwd: Path | None = None,
                 cpus: set[int] | None = None, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                pinned(self.argv, cpus), stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time; only ever this one process."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def run_bounded(argv: Sequence[str], timeout: float, cpus: set[int] | None = None,
                cwd: Path | None = None) -> tuple[str, float]:
    """Run a load generator to completion (killed if it overruns); (stdout, its CPU seconds)."""
    before = os.times()
    proc = subprocess.run(pinned(argv, cpus), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    after = os.times()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
    child_cpu = after.children_user + after.children_system - before.children_user - before.children_system
    return proc.stdout, child_cpu
