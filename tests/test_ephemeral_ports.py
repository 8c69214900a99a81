"""A daemon whose configured ports lie in the kernel's ephemeral range starts every time.

The API's gRPC server listens on a loopback port the kernel picks (tls_front.py: the TLS front pipes
to it). Picked before a configured listener had bound, it could be that listener's port, and the
daemon stopped at start with "address already in use". Linux's bind(2) to port 0 takes an odd port
of ``ip_local_port_range`` while one is free: so in a network namespace of its own whose range is
40000-40009, a daemon listening on all five odd ports leaves the kernel an odd one to pick only if it
binds the backend before its listeners, and an even one once it binds it last.

Run as a script (inside ``unshare --net``), this file is that namespace's side: loopback up, the
range set, the daemon started, and what answered printed as JSON.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RANGE = (40000, 40009)
LISTENERS = {"--check-listen": 40001, "--api-listen": 40003, "--http-listen": 40005,
             "--approval-listen": 40007, "--http-check-listen": 40009}


def _namespaces_allowed() -> bool:
    try:
        done = subprocess.run(["unshare", "--net", "--", "true"], capture_output=True, timeout=10)
        return done.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _namespaces_allowed(), reason="needs `unshare --net` (root, util-linux)")
def test_a_daemon_on_ports_in_the_ephemeral_range_binds_them_before_picking_its_own(tmp_path: Path) -> None:
    done = subprocess.run(["unshare", "--net", "--", sys.executable, __file__, str(tmp_path / "state")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["exited"] is None, seen["log"]
    assert seen["healthz"] == 200, seen["log"]
    assert seen["accepting"] == sorted(LISTENERS.values()), seen["log"]
    backend = seen["backend"]  # the daemon names it in its "serving" line
    assert RANGE[0] <= backend <= RANGE[1] and backend % 2 == 0, seen["log"]


def _loopback_up() -> None:
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sh", fcntl.ioctl(s, siocgifflags, struct.pack("16sh", b"lo", 0)))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))


def _in_namespace(state_dir: Path) -> dict[str, object]:
    sys.path.insert(0, str(ROOT))
    from benchmarks.load.procs import http_get, wait_for

    _loopback_up()
    Path("/proc/sys/net/ipv4/ip_local_port_range").write_text(f"{RANGE[0]} {RANGE[1]}")
    log_path = state_dir.parent / "daemon.log"
    argv = [sys.executable, "-m", "agentauthz", "serve", "--state-dir", str(state_dir)]
    for flag, port in LISTENERS.items():
        argv += [flag, f"127.0.0.1:{port}"]
    with open(log_path, "wb") as log:
        # Not processes.Daemon: it draws new ports when a start fails "address already in use", which
        # is the very failure looked for here.
        daemon = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def healthy() -> bool:
        if daemon.poll() is not None:
            raise RuntimeError("stopped at start")  # not an OSError, which wait_for takes for not yet
        return http_get(f"http://127.0.0.1:{LISTENERS['--http-listen']}/healthz")[0] == 200

    try:
        with contextlib.suppress(RuntimeError, TimeoutError):
            wait_for(healthy, 60, "daemon /healthz")
        healthz = http_get(f"http://127.0.0.1:{LISTENERS['--http-listen']}/healthz")[0] \
            if daemon.poll() is None else 0
        accepting = []
        for port in LISTENERS.values():
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    accepting.append(port)
        exited = daemon.poll()
    finally:
        daemon.terminate()
        daemon.wait(20)
    text = log_path.read_text(errors="replace")
    backend = next((int(line.split("gRPC behind it on 127.0.0.1:")[1].split(")")[0])
                    for line in text.splitlines() if "gRPC behind it on 127.0.0.1:" in line), 0)
    return {"exited": exited, "healthz": healthz, "accepting": sorted(accepting), "backend": backend,
            "log": text[-3000:]}


if __name__ == "__main__":
    print(json.dumps(_in_namespace(Path(sys.argv[1]))))
