"""Check worker processes: one per core, sharing the listener (SO_REUSEPORT) and revocation state.

The revocation bits live in an anonymous shared mapping created before the
fork, so a revoked token is refused by every worker the moment its bit is
set. Everything else a decision reads (task, agent and key cutoffs, the
verification keys, the policy) is replicated by the primary over a pipe, and
a change is acknowledged to the API caller only after every worker has
applied it: "effective for the next Check" holds in every process. A worker
that does not acknowledge in time is killed rather than left deciding on
stale state (fail closed).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from multiprocessing.connection import Connection, Pipe
from typing import Any, Callable

log = logging.getLogger(__name__)

ACK_TIMEOUT = 5.0


class Worker:
    """The primary's handle on one forked Check worker."""

    def __init__(self, number: int, pid: int, conn: Connection) -> None:
        self.number = number
        self.pid = pid
        self.conn = conn
        self.lock = threading.Lock()
        self.alive = True

    def apply(self, message: tuple[Any, ...]) -> None:
        """Send one change and wait until the worker has applied it; kill it if it cannot say so."""
        with self.lock:
            if not self.alive:
                return
            try:
                self.conn.send(message)
                if self.conn.poll(ACK_TIMEOUT) and self.conn.recv() == "ack":
                    return
                reason = "no acknowledgement"
            except (OSError, EOFError) as exc:
                reason = str(exc)
            log.error("worker %d (pid %d) did not apply %s (%s): killing it", self.number, self.pid,
                      message[0], reason)
            self.kill()

    def kill(self) -> None:
        self.alive = False
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class ReplicatedIndex:
    """What the RevocationStore writes through: the primary's index, then every worker's copy."""

    def __init__(self, index: Any, workers: list[Worker]) -> None:
        self._index = index
        self._workers = workers
        self.bits = index.bits  # shared memory: no replication needed

    def _everywhere(self, name: str, *args: Any) -> None:
        getattr(self._index, name)(*args)
        for worker in self._workers:
            worker.apply(("index", name, args))

    def revoke_task(self, task: str, cutoff: int) -> None:
        self._everywhere("revoke_task", task, cutoff)

    def revoke_agent(self, agent: str, cutoff: int) -> None:
        self._everywhere("revoke_agent", agent, cutoff)

    def revoke_key(self, kid: str) -> None:
        self._everywhere("revoke_key", kid)

    def forget(self, tasks: list[str], agents: list[str]) -> None:
        self._everywhere("forget", list(tasks), list(agents))


def broadcast(workers: list[Worker], message: tuple[Any, ...]) -> None:
    for worker in workers:
        worker.apply(message)


def spawn(count: int, serve: Callable[[int, Connection], int]) -> list[Worker]:
    """Fork ``count`` workers running ``serve(number, conn)``; call before any gRPC object exists."""
    workers = []
    for number in range(1, count + 1):
        parent_conn, child_conn = Pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            parent_conn.close()
            code = 1
            try:
                code = serve(number, child_conn)
            except BaseException:
                log.exception("worker %d failed", number)
            finally:
                os._exit(code)
        child_conn.close()
        workers.append(Worker(number, pid, parent_conn))
    return workers


def listen_for_changes(conn: Connection, authority: Any, on_stop: Callable[[], None]) -> threading.Thread:
    """Worker side: apply the primary's changes in a thread, acknowledging each once applied."""
    from .policy import Policy

    def run() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = ("stop",)  # the primary is gone: stop deciding
            kind = message[0]
            if kind == "stop":
                on_stop()
                return
            if kind == "index":
                getattr(authority.index, message[1])(*message[2])
            elif kind == "keys":
                authority.verifiers[message[1]].set_keys(message[2])
            elif kind == "policy":
                authority.adopt_policy(Policy.load(authority.policy_path))
            conn.send("ack")

    thread = threading.Thread(target=run, name="agentauthz-worker-changes", daemon=True)
    thread.start()
    return thread


def stop_all(workers: list[Worker], timeout: float = 15.0) -> None:
    """Ask each worker to drain and exit; kill those that do not within ``timeout``."""
    for worker in workers:
        with worker.lock:
            try:
                worker.conn.send(("stop",))
            except OSError:
                pass
    for worker in workers:
        _wait_or_kill(worker, timeout)


def _wait_or_kill(worker: Worker, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        pid, _ = os.waitpid(worker.pid, os.WNOHANG)
        if pid:
            return
        time.sleep(0.05)
    log.error("worker %d did not stop in %.0f s: killing it", worker.number, timeout)
    worker.kill()
    os.waitpid(worker.pid, 0)
