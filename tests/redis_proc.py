"""A real redis-server for cluster-mode tests: its own port and directory, every write fsynced to its AOF."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import redis

from benchmarks.load.procs import free_port, wait_for


def redis_server_binary() -> str:
    """Debian's redis-server (`.ci/run` and `make test` install it); skip only where it cannot be."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return path


class RedisServer:
    """One redis-server process with ``appendonly yes`` and ``appendfsync always``, restartable in place."""

    def __init__(self, directory: Path, *, persistent: bool = True, replica_of: int | None = None) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.persistent = persistent
        self.replica_of = replica_of  # the primary's port: a replica of it
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        persistence = (["--appendonly", "yes", "--appendfsync", "always"] if self.persistent
                       else ["--appendonly", "no"])
        if self.replica_of is not None:
            persistence += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        log = open(self.directory / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.directory), "--save", "", "--protected-mode", "no", *persistence],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(self._answers, 10, "redis-server PING")
        return self

    def _answers(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited:\n{(self.directory / 'redis.log').read_text()[-2000:]}")
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """``kill -9``: whatever the AOF holds is what a restart finds."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def wipe(self) -> None:
        """Lose every byte (a Redis restarted empty, or the wrong instance)."""
        self.kill()
        for path in self.directory.iterdir():
            if path.name != "redis.log":
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped server cannot act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class Sentinel:
    """One redis-server in sentinel mode watching the primary named ``master`` (a quorum of one)."""

    def __init__(self, directory: Path, primary_port: int, master: str = "agentauthz") -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.master = master
        # Sentinel rewrites its config file as it learns the topology: one of its own, writable.
        (directory / "sentinel.conf").write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {directory}\n"
            f"sentinel monitor {master} 127.0.0.1 {primary_port} 1\n"
            f"sentinel down-after-milliseconds {master} 500\nsentinel failover-timeout {master} 5000\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sentinel:
        log = open(self.directory / "sentinel.log", "ab")
        self.proc = subprocess.Popen([redis_server_binary(), str(self.directory / "sentinel.conf"),
                                      "--sentinel"], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(self._watching, 10, "sentinel to watch the primary")
        return self

    def _watching(self) -> bool:
        try:
            return bool(self.client().execute_command("SENTINEL", "get-master-addr-by-name", self.master))
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def primary_port(self) -> int:
        return int(self.client().execute_command("SENTINEL", "get-master-addr-by-name", self.master)[1])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
