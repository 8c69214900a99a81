"""Check worker processes: one per core, sharing the listener (SO_REUSEPORT) and revocation state.

The revocation bits (and budgets) live in shared mappings created before any
fork, so a revoked token is refused by every worker the moment its bit is set.
Everything else a decision reads (task, agent and key cutoffs, the verification
keys, the policy) is replicated by the primary over a pipe, and a change is
acknowledged to the API caller only after every worker has applied it:
"effective for the next Check" holds in every process. Workers never read the
policy file: they are sent the text the primary validated, so a file edited
after the primary read it cannot reach them.

Workers are forked by a spawner process, itself forked before any gRPC object
or thread exists (gRPC does not survive a fork), so a worker can be replaced at
any time. A worker that dies, or does not acknowledge a change in time (then it
is killed: fail closed), is restarted with back-off; the replacement is sent the
primary's current state and acknowledges it before it serves.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, Pipe, wait
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any, Callable

from ..cluster.replication import index_state

log = logging.getLogger("agentauthz.workers")  # the name operators filter on, kept across the layout

ACK_TIMEOUT = 5.0
STOP_TIMEOUT = 15.0
BACKOFF_FIRST = 0.5  # the first restart is at once; each one soon after doubles the wait from here
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a worker that served this long starts its back-off afresh


class Worker:
    """The primary's handle on one Check worker; its pid and channel change when it is restarted."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.pid = 0
        self.conn: Connection | None = None
        self.lock = threading.Lock()  # held for a whole exchange, so changes arrive in order
        self.alive = False
        self.started = 0.0
        self.failure = ""  # why the primary killed it, if it did
        self.streak = 0  # restarts in a row without a stable run, for the back-off

    def apply(self, message: tuple[Any, ...]) -> None:
        """Send one change and wait until the worker has applied it; kill it if it cannot say so."""
        with self.lock:
            if self.alive:
                self._exchange(message)

    def _exchange(self, message: tuple[Any, ...]) -> bool:
        """Under the lock: send ``message``, True once acknowledged; otherwise the worker is killed."""
        assert self.conn is not None
        try:
            self.conn.send(message)
            if not self.conn.poll(ACK_TIMEOUT):
                reason = f"did not acknowledge {message[0]} within {ACK_TIMEOUT:.0f} s"
            else:
                reply = self.conn.recv()
                if reply == "ack":
                    return True
                reason = f"could not apply {message[0]}: {reply[1] if isinstance(reply, tuple) else reply}"
        except (OSError, EOFError) as exc:
            reason = f"lost its channel while sent {message[0]} ({exc or type(exc).__name__})"
        log.error("worker %d (pid %d) %s: killing it", self.number, self.pid, reason)
        self.kill(reason)
        return False

    def kill(self, reason: str = "") -> None:
        self.alive = False
        self.failure = self.failure or reason
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by signal {sig} ({name})"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


class Fleet:
    """The primary's Check workers: replicates every change to them and restarts any that dies.

    Create it before any gRPC object or thread exists (it forks the spawner), give it to
    ``Authority.replicate_to`` (which sets the keys and policy), then ``start`` it.
    """

    def __init__(self, count: int, serve: Callable[[int, Connection], int], index: Any,
                 on_restart: Callable[..., None] = lambda **_: None) -> None:
        self.workers = [Worker(number) for number in range(1, count + 1)]
        self.restarts = {"died": 0, "unresponsive": 0}  # by cause, for /metrics
        self._index = index
        self._on_restart = on_restart
        self._keys: dict[str, dict[str, bytes]] = {}
        self._policy: tuple[str, str] | None = None  # (text, sha256 digest) the primary validated
        self._stopping = False
        self._exits: deque[tuple[Any, ...]] = deque()  # spawner reports read while awaiting a spawn
        self._due: dict[int, tuple[float, str, str, int]] = {}  # worker -> (at, reason, cause, old pid)
        self._thread: threading.Thread | None = None
        spawner_end, self._spawner = Pipe()
        self._spawner_pid = os.fork()
        if self._spawner_pid == 0:  # the spawner
            self._spawner.close()
            code = 1
            try:
                code = _run_spawner(spawner_end, serve)
            except BaseException:
                log.exception("worker spawner failed")
            finally:
                os._exit(code)
        spawner_end.close()

    # -- replication ---------------------------------------------------------

    def broadcast(self, message: tuple[Any, ...]) -> None:
        for worker in self.workers:
            worker.apply(message)

    def set_keys(self, audience: str, keys: dict[str, bytes]) -> None:
        self._keys[audience] = dict(keys)
        self.broadcast(("keys", audience, keys))

    def set_policy(self, text: str, digest: str) -> None:
        self._policy = (text, digest)
        self.broadcast(("policy", text, digest))

    def snapshot(self) -> tuple[Any, ...]:
        """Everything a new worker needs before it serves, as of now.

        Taken under the worker's lock: a change made meanwhile is either in it or is sent after it
        (changes are applied to the primary, then sent), and applying one twice changes nothing.
        """
        assert self._policy is not None, "replicate_to sets the policy before start"
        return ("state", {"index": index_state(self._index), "keys": dict(self._keys),
                          "policy": self._policy})

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Fork every worker; each serves once it has acknowledged the current state."""
        for worker in self.workers:
            with worker.lock:
                self._replace(worker)
        self._thread = threading.Thread(target=self._supervise, name="agentauthz-workers", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Ask each worker to drain and exit; the spawner kills those that do not within ``timeout``."""
        self._stopping = True
        for worker in self.workers:
            with worker.lock:
                worker.alive = False
                try:
                    if worker.conn is not None:
                        worker.conn.send(("stop",))
                except OSError:
                    pass
        try:
            self._spawner.send(("stop", timeout))
        except OSError:
            pass
        end = time.monotonic() + timeout + 5.0
        while not os.waitpid(self._spawner_pid, os.WNOHANG)[0]:
            if time.monotonic() >= end:
                log.error("worker spawner did not stop: killing it")
                os.kill(self._spawner_pid, signal.SIGKILL)
                os.waitpid(self._spawner_pid, 0)
                break
            time.sleep(0.05)
        if self._thread is not None:
            self._thread.join(5.0)

    # -- supervision (the supervisor thread, and start) ------------------------

    def _replace(self, worker: Worker) -> None:
        """Under the worker's lock: fork a new worker ``number`` and hand it the current state."""
        parent_end, child_end = Pipe()
        self._spawner.send(("spawn", worker.number))
        send_handle(self._spawner, child_end.fileno(), self._spawner_pid)
        child_end.close()
        while True:
            report = self._spawner.recv()
            if report[0] == "spawned" and report[1] == worker.number:
                break
            self._exits.append(report)
        if worker.conn is not None:
            worker.conn.close()
        worker.pid, worker.conn, worker.started, worker.failure = report[2], parent_end, time.monotonic(), ""
        worker.alive = worker._exchange(self.snapshot())
        if worker.alive:
            log.info("worker %d (pid %d) started", worker.number, worker.pid)

    def _supervise(self) -> None:
        while True:
            while self._exits:
                self._exited(*self._exits.popleft()[1:])
            now = time.monotonic()
            for number, (at, reason, cause, pid) in sorted(self._due.items(), key=lambda item: item[1][0]):
                if at <= now and not self._stopping:
                    del self._due[number]
                    self._restart(self.workers[number - 1], reason, cause, pid)
            wait_for = min((due[0] for due in self._due.values()), default=now + 3600) - time.monotonic()
            try:
                if self._exits or not self._spawner.poll(max(0.0, wait_for)):
                    continue
                self._exits.append(self._spawner.recv())
            except (EOFError, OSError):
                if not self._stopping:
                    log.error("the worker spawner is gone: dead workers can no longer be restarted")
                return

    def _exited(self, number: int, pid: int, status: int) -> None:
        """The spawner reaped worker ``number``'s process ``pid``: schedule its replacement."""
        worker = self.workers[number - 1]
        if pid != worker.pid or self._stopping:
            return
        worker.alive, worker.pid = False, 0
        reason = describe_exit(status) + (f" after it {worker.failure}" if worker.failure else "")
        cause = "unresponsive" if worker.failure else "died"
        if time.monotonic() - worker.started >= STABLE_AFTER:
            worker.streak = 0
        delay = 0.0 if worker.streak == 0 else min(BACKOFF_FIRST * 2 ** (worker.streak - 1), BACKOFF_MAX)
        worker.streak += 1
        log.error("worker %d (pid %d) %s: restarting it in %.1f s", number, pid, reason, delay)
        self._due[number] = (time.monotonic() + delay, reason, cause, pid)

    def _restart(self, worker: Worker, reason: str, cause: str, old: int) -> None:
        with worker.lock:
            if self._stopping:
                return
            try:
                self._replace(worker)
            except (OSError, EOFError) as exc:
                log.error("cannot restart worker %d: %s", worker.number, exc)
        self.restarts[cause] = self.restarts.get(cause, 0) + 1
        self._on_restart(worker=worker.number, reason=reason, cause=cause, pid=worker.pid or None,
                         started=worker.alive, previous_pid=old)


def _run_spawner(conn: Connection, serve: Callable[[int, Connection], int]) -> int:
    """The spawner process: forks a worker on each request of the primary and reports its exit.

    It stops when the primary says so or is gone, after its workers (whose channels close with the
    primary) have stopped or been killed.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the primary decides when the workers stop
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes wait() below through wake_r
    children: dict[int, int] = {}  # pid -> worker number
    timeout = STOP_TIMEOUT
    while True:
        ready = wait([conn, wake_r])
        if wake_r in ready:
            while True:
                try:
                    if not os.read(wake_r, 512):
                        break
                except BlockingIOError:
                    break
        if conn in ready:
            try:
                request = conn.recv()
            except (EOFError, OSError):
                break
            if request[0] == "stop":
                timeout = request[1]
                break
            number, fd = request[1], recv_handle(conn)
            pid = os.fork()
            if pid == 0:  # the worker
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGCHLD, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                for own in (wake_r, wake_w):
                    os.close(own)
                conn.close()
                code = 1
                try:
                    code = serve(number, Connection(fd))
                except BaseException:
                    log.exception("worker %d failed", number)
                finally:
                    os._exit(code)
            os.close(fd)
            children[pid] = number
            conn.send(("spawned", number, pid))
        _reap(children, conn)
    _stop_children(children, timeout)
    return 0


def _reap(children: dict[int, int], conn: Connection | None) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return
        number = children.pop(pid, None)
        if number is not None and conn is not None:
            try:
                conn.send(("exited", number, pid, status))
            except OSError:
                pass  # the primary is gone


def _stop_children(children: dict[int, int], timeout: float) -> None:
    """Wait for the workers to drain and exit (their channels are closing); kill stragglers."""
    end = time.monotonic() + timeout
    while children and time.monotonic() < end:
        _reap(children, None)
        time.sleep(0.05)
    for pid, number in list(children.items()):
        log.error("worker %d did not stop in %.0f s: killing it", number, timeout)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
