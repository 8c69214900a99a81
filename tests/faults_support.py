"""Real faults for tests/test_faults*.py: full filesystems, failing fsync, load that remembers what it saw."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from processes import Daemon, http_get

from agentauthz.client import CHECK_METHOD, check_request, decision_from

AGENT = "spiffe://dev.local/agent/alpha"
AUTHZ = "envoy.service.auth.v3.Authorization"


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30)


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a size-limited filesystem")


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A size-limited tmpfs at ``path`` (created, owner-only): writes past ``size`` fail with ENOSPC."""
    _need_root()
    path.mkdir(parents=True, exist_ok=True)
    done = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path))
    if done.returncode:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        _run("umount", "-l", str(path))


@dataclass
class FailingDisk:
    """An ext2 filesystem on a loop device whose backing file lives on a tiny tmpfs.

    Filling the tmpfs (``exhaust``) leaves the ext2 filesystem believing it has room: ``write``
    still succeeds into the page cache, and the failure arrives where it hurts, at ``fsync``
    (ENOSPC, then EIO: the kernel could not write the pages back).
    """

    mount: Path
    backing: Path

    def exhaust(self) -> None:
        fill(self.backing / "filler")

    def restore(self) -> None:
        (self.backing / "filler").unlink(missing_ok=True)


@contextmanager
def failing_fsync_disk(work: Path, mount: Path) -> Iterator[FailingDisk]:
    """Mount a ``FailingDisk`` at ``mount``; skips (saying why) where loop devices are unavailable."""
    _need_root()
    backing = work / "backing"
    with tmpfs(backing, "8m"):
        image = backing / "disk.img"
        with open(image, "wb") as f:
            f.truncate(32 << 20)  # sparse: the tmpfs holds only the blocks ext2 really writes
        made = _run("mkfs.ext2", "-q", "-F", str(image))
        if made.returncode:
            pytest.skip(f"cannot make an ext2 image: {made.stderr.strip()}")
        loop = _run("losetup", "-f", "--show", str(image))
        if loop.returncode:
            pytest.skip(f"no loop device: {loop.stderr.strip()}")
        device = loop.stdout.strip()
        try:
            mount.mkdir(parents=True, exist_ok=True)
            # errors=continue: a failed write-back must not remount read-only; we want it to heal.
            mounted = _run("mount", "-o", "errors=continue", device, str(mount))
            if mounted.returncode:
                pytest.skip(f"cannot mount {device}: {mounted.stderr.strip()}")
            mount.chmod(0o700)
            try:
                yield FailingDisk(mount, backing)
            finally:
                _run("umount", "-l", str(mount))
        finally:
            _run("losetup", "-d", device)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until its filesystem is full."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        try:
            while True:  # the last partial page
                f.write(b"\0" * 512)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


def grpc_health(address: str, service: str = "") -> int:
    """The gRPC health status (health_pb2.HealthCheckResponse.*) ``address`` reports for ``service``."""
    with grpc.insecure_channel(address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(answer.status)


def healthz(daemon: Daemon) -> int:
    return http_get(f"http://127.0.0.1:{daemon.http_port}/healthz")[0]


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Seen:
    """What the load clients were told: decision id -> (allowed, reason), plus transport errors."""

    decisions: dict[str, tuple[bool, str]] = field(default_factory=dict)
    errors: list[grpc.StatusCode] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def allowed(self) -> set[str]:
        with self.lock:
            return {d for d, (ok, _) in self.decisions.items() if ok}

    def reasons(self) -> set[str]:
        with self.lock:
            return {r for _, r in self.decisions.values()}


class Load:
    """``threads`` clients sending Checks with ``token`` until stopped, each remembering every answer."""

    def __init__(self, address: str, token: str, threads: int = 4, timeout: float = 5.0) -> None:
        self.seen = Seen()
        self._address, self._token, self._timeout = address, token, timeout
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def count(self) -> int:
        with self.seen.lock:
            return len(self.seen.decisions)

    def _run(self) -> None:
        request = check_request(self._token, "demo", "a", "read")
        with grpc.insecure_channel(self._address) as channel:
            call = channel.unary_unary(CHECK_METHOD)
            while not self._stop.is_set():
                try:
                    decision = decision_from(call(request, timeout=self._timeout))
                except grpc.RpcError as exc:
                    with self.seen.lock:
                        self.seen.errors.append(exc.code())
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        time.sleep(0.01)  # the daemon is gone or going: do not spin
                    continue
                with self.seen.lock:
                    self.seen.decisions[decision.decision_id] = (decision.allowed, decision.reason)


class StalledChecks:
    """Check calls that send their headers and then nothing: each holds a slot of the daemon's Check
    server until released (a client, or an Envoy, stuck mid-request). Runs its own event loop."""

    PER_CONNECTION = 100

    def __init__(self, address: str) -> None:
        self._address = address
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._calls: list[Any] = []
        self._channels: list[Any] = []
        self._gate = self._call(self._make_gate())

    def _call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _make_gate(self) -> asyncio.Event:
        return asyncio.Event()

    async def _open(self, n: int) -> list[Any]:
        request = check_request(None, "demo", "a", "read")

        async def never() -> Any:
            await self._gate.wait()
            yield request

        calls = []
        for _ in range(n):
            if len(self._calls) % self.PER_CONNECTION == 0:
                self._channels.append(grpc.aio.insecure_channel(self._address))
            call = self._channels[-1].stream_unary(CHECK_METHOD)(never())
            self._calls.append(call)
            calls.append(call)
        await asyncio.sleep(0)
        return calls

    def open(self, n: int) -> list[Any]:
        """Start ``n`` more stalled calls."""
        return list(self._call(self._open(n)))

    async def _codes(self, calls: list[Any]) -> list[grpc.StatusCode | None]:
        return [await c.code() if c.done() else None for c in calls]

    def codes(self, calls: list[Any]) -> list[grpc.StatusCode | None]:
        """The status each call ended with; None while it is still stalled."""
        return list(self._call(self._codes(calls)))

    async def _close(self) -> None:
        self._gate.set()
        for call in self._calls:
            call.cancel()
        for channel in self._channels:
            await channel.close()
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in left:  # the calls' request feeders
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)

    def close(self) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
