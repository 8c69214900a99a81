"""py-spy profiles of the daemon under load, and a plain-text summary of where the time goes.

A Check server in Python is bound by its event-loop thread, so the summary
looks at the main thread only. ``--native`` is needed to see inside gRPC's
Cython core and uvloop (most of the time is there); it requires py-spy to
pause the process for each sample, which is why profiles are taken in runs of
their own and never during a measured run.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

IDLE_LEAVES = ("epoll_wait", "epoll_pwait", "poll (", "select (", "pthread_cond_wait", "futex")
# Substrings that name where a frame belongs; first match wins, checked from the leaf upwards.
BUCKETS = (
    ("signature verify (libsodium)", ("crypto_sign", "sodium", "ed25519", "ge25519", "fe25519")),
    ("agentauthz decision (native decide)", ("decide", "_verify_c", "_token_c", "_bitset_c")),
    ("agentauthz audit enqueue", ("agentauthz/audit/writer.py", "agentauthz/audit/batches.py")),
    ("agentauthz Check handler (Python)", ("agentauthz/serve/extauthz.py",)),
    ("protobuf (upb) parse", ("upb", "FromString")),
    ("syscalls (write/sendmsg/eventfd/recv)", ("write (", "sendmsg", "recvmsg", "recv (", "eventfd",
                                               "syscall (", "read (")),
    ("gRPC core + cygrpc", ("cygrpc", "grpc/")),
    ("asyncio/uvloop scheduling", ("loop.c", "uv_", "uv__", "asyncio", "_asynciomodule")),
)


def pyspy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def record(pid: int, seconds: float, out: Path, *, fmt: str = "raw", gil: bool = False,
           rate: int = 100) -> list[str]:
    """One py-spy recording of ``pid``; returns the command (raises if py-spy fails)."""
    exe = pyspy()
    if exe is None:
        raise FileNotFoundError("py-spy is not installed")
    command = [exe, "record", "--pid", str(pid), "-d", f"{seconds:g}", "-r", str(rate), "--native",
               "--threads", "--format", fmt, "-o", str(out)]
    if gil:
        command.append("--gil")
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed: {done.stderr.strip()[-500:]}")
    return command


def _bucket(frames: Sequence[str]) -> str:
    for frame in reversed(frames[1:]):  # frames[0] names the thread
        for name, needles in BUCKETS:
            if any(n in frame for n in needles):
                return name
    return "other"


def summarize(collapsed: str, top: int = 12, gil: bool = False) -> dict[str, Any]:
    """A ``--format raw`` profile: busy samples per thread, then the main thread's buckets and frames.

    With ``--gil`` the per-thread shares say who holds the GIL: time the audit
    writer holds it is time the event loop cannot answer a Check. Without it,
    threads blocked in unsymbolized libc waits look busy, so no shares are given.
    """
    buckets: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    project: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        n = int(count)
        if any(leaf in frames[-1] for leaf in IDLE_LEAVES):
            idle += n if "MainThread" in frames[0] else 0
            continue
        threads[frames[0].partition(": ")[2] or frames[0]] += n
        if "MainThread" not in frames[0]:
            continue
        total += n
        buckets[_bucket(frames)] += n
        leaves[frames[-1]] += n
        for f in set(frames):
            if "agentauthz/" in f and not any(s in f for s in ("cli.py", "__main__.py", "server.py")):
                project[f.split(" (")[0] + " (" + f.split("agentauthz/")[-1]] += n
    share = (lambda n: round(100.0 * n / total, 1)) if total else (lambda n: 0.0)
    all_threads = sum(threads.values())
    return {"samples": total, "idle_samples": idle,
            "gil_holder_pct": {k: round(100.0 * v / all_threads, 1) for k, v in threads.most_common()}
            if gil and all_threads else None,
            "buckets_pct": {k: share(v) for k, v in buckets.most_common()},
            "top_leaf_pct": [[k, share(v)] for k, v in leaves.most_common(top)],
            "agentauthz_frames_pct": [[k, share(v)] for k, v in project.most_common(top)]}
