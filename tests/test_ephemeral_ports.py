"""A daemon whose configured ports lie in the kernel's ephemeral range starts every time.

Until a listener binds, its port is the kernel's to give away (serve/listeners.py ``Reserved``):

- The API's gRPC server listens on a loopback port the kernel picks (tls_front.py: the TLS front pipes
  to it). Linux's bind(2) to port 0 takes an odd port of ``ip_local_port_range`` while one is free: so
  in a network namespace of its own whose range is 40000-40009, a daemon listening on all five odd
  ports leaves the kernel an odd one to pick only if the backend binds before its listeners, and an
  even one once it binds last.
- A cluster node connects to Redis before its listeners bind, and connect(2) takes an even port of the
  range first: a node listening on all five even ports finds them taken by its own Redis connections
  unless it holds them from the start.

Run as a script (inside ``unshare --net``), this file is that namespace's side: loopback up, the
range set, (a redis-server on its default port, outside the range,) the daemon started, and what
answered printed as JSON.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
RANGE = (40000, 40009)
FLAGS = ("--check-listen", "--api-listen", "--http-listen", "--approval-listen", "--http-check-listen")
ODD = dict(zip(FLAGS, range(RANGE[0] + 1, RANGE[1] + 1, 2), strict=True))
EVEN = dict(zip(FLAGS, range(RANGE[0], RANGE[1] + 1, 2), strict=True))
REDIS_PORT = 6379


def _namespaces_allowed() -> bool:
    try:
        done = subprocess.run(["unshare", "--net", "--", "true"], capture_output=True, timeout=10)
        return done.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _run_in_namespace(tmp_path: Path, ports: dict[str, int], cluster: bool) -> dict[str, Any]:
    setup = json.dumps({"state": str(tmp_path / "state"), "ports": ports, "cluster": cluster})
    done = subprocess.run(["unshare", "--net", "--", sys.executable, __file__, setup],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    seen: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["exited"] is None, seen["log"]
    assert seen["healthz"] == 200, seen["log"]
    assert seen["accepting"] == sorted(ports.values()), seen["log"]
    return seen


@pytest.mark.skipif(not _namespaces_allowed(), reason="needs `unshare --net` (root, util-linux)")
def test_a_daemon_on_ports_in_the_ephemeral_range_binds_them_before_picking_its_own(tmp_path: Path) -> None:
    backend = _run_in_namespace(tmp_path, ODD, cluster=False)["backend"]
    assert RANGE[0] <= backend <= RANGE[1] and backend % 2 == 0, backend


@pytest.mark.skipif(not _namespaces_allowed(), reason="needs `unshare --net` (root, util-linux)")
def test_a_cluster_node_holds_its_ports_against_its_own_redis_connections(tmp_path: Path) -> None:
    from redis_proc import redis_server_binary  # (not at the top: the namespace side runs without it)
    redis_server_binary()  # skips where there is none
    seen = _run_in_namespace(tmp_path, EVEN, cluster=True)
    assert "joined at stream id" in seen["log"]  # it did connect to Redis before its listeners bound
    # Its Redis connections took what the range had left: odd ports.
    assert seen["redis_sources"] and all(p % 2 == 1 for p in seen["redis_sources"]), seen


def _loopback_up() -> None:
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sh", fcntl.ioctl(s, siocgifflags, struct.pack("16sh", b"lo", 0)))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))


def _in_namespace(setup: dict[str, Any]) -> dict[str, object]:
    sys.path.insert(0, str(ROOT))
    from benchmarks.load.procs import http_get, wait_for

    _loopback_up()
    Path("/proc/sys/net/ipv4/ip_local_port_range").write_text(f"{RANGE[0]} {RANGE[1]}")
    state_dir, ports = Path(setup["state"]), setup["ports"]
    log_path = state_dir.parent / "daemon.log"
    argv = [sys.executable, "-m", "agentauthz", "serve", "--state-dir", str(state_dir)]
    for flag, port in ports.items():
        argv += [flag, f"127.0.0.1:{port}"]
    redis = None
    if setup["cluster"]:
        redis = subprocess.Popen(["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1",
                                  "--dir", str(state_dir.parent), "--save", "", "--appendonly", "no"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        # Not by connecting: the connection's TIME_WAIT would keep its source port, one of the daemon's.
        wait_for(lambda: REDIS_PORT in _tcp(state="0A"), 10, "redis-server listening")
        argv += ["--cluster", f"redis://127.0.0.1:{REDIS_PORT}/0", "--node-id", "node-a"]
    with open(log_path, "wb") as log:
        # Not processes.Daemon: it draws new ports when a start fails "address already in use", which
        # is the very failure looked for here.
        daemon = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def serving() -> bool:
        # Its log, not a connection: a probe connecting before the daemon holds its ports could take
        # one as its own source port (and, being in the range, even connect to itself).
        if daemon.poll() is not None:
            raise RuntimeError("stopped at start")  # not an OSError, which wait_for takes for not yet
        return "serving: check" in log_path.read_text(errors="replace")

    try:
        with contextlib.suppress(RuntimeError, TimeoutError):
            wait_for(serving, 60, "daemon serving")
        healthz = http_get(f"http://127.0.0.1:{ports['--http-listen']}/healthz")[0] \
            if daemon.poll() is None else 0
        accepting = [port for port in ports.values() if _accepting(port)]
        redis_sources = _sources_connected_to(REDIS_PORT, daemon.pid) if daemon.poll() is None else []
        exited = daemon.poll()
    finally:
        daemon.terminate()
        daemon.wait(20)
        if redis is not None:
            redis.terminate()
            redis.wait(20)
    text = log_path.read_text(errors="replace")
    backend = next((int(line.split("gRPC behind it on 127.0.0.1:")[1].split(")")[0])
                    for line in text.splitlines() if "gRPC behind it on 127.0.0.1:" in line), 0)
    return {"exited": exited, "healthz": healthz, "accepting": sorted(accepting), "backend": backend,
            "redis_sources": redis_sources, "log": text[-3000:]}


def _accepting(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _tcp(state: str, inodes: set[str] | None = None, remote: int | None = None) -> list[int]:
    """The local ports of /proc/net/tcp's sockets in ``state`` (0A listening, 01 established), of those
    ``inodes`` only and connected to ``remote`` only when given."""
    ports = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] != state or inodes is not None and fields[9] not in inodes:
            continue
        if remote is None or int(fields[2].split(":")[1], 16) == remote:
            ports.append(int(fields[1].split(":")[1], 16))
    return sorted(ports)


def _sources_connected_to(port: int, pid: int) -> list[int]:
    """The source ports of ``pid``'s established TCP connections to ``port``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return _tcp("01", inodes, port)


if __name__ == "__main__":
    print(json.dumps(_in_namespace(json.loads(sys.argv[1]))))
