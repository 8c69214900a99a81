"""Audit log: O(1) enqueue, inline allows and group commit in front of the batch writer thread.

The writer thread's half (batches, hash chain, files, signed checkpoints) is ``audit.batches``;
the offline verifier is ``audit.verify``.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..decision import _accel
from ..errors import AuditUnavailable, StateError
from .batches import _CHECK, WITHDRAWN, BatchWriter, log
from .files import CHECKPOINTS, cut_tail, last_line
from .records import thumbprint

__all__ = ["WITHDRAWN", "AuditLog"]


class AuditLog(BatchWriter):
    """Bounded in-memory queue in front of one writer thread that owns every byte on disk (BatchWriter)."""

    @classmethod
    def open(cls, directory: Path, *, key: Ed25519PrivateKey, flush_interval: float = 0.05,
             batch_size: int = 512, queue_max: int = 65536, checkpoint_every: int = 1,
             max_file_bytes: int = 64 << 20, clock: Callable[[], float] = time.time,
             hot: _accel.HotPath = _accel.ACTIVE) -> AuditLog:
        """Open (or create) the log in ``directory``, cutting a torn tail; the writer is not started.

        ``key`` signs the checkpoints; it is kept outside ``directory`` (``files.open_key``).
        """
        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = os.open(directory / "audit.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:  # two writers would fork the chain
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateError(f"{directory}: audit log is open in another process") from None
            return cls(directory, lock, key, flush_interval, batch_size, queue_max,
                       checkpoint_every, max_file_bytes, clock, hot)
        except BaseException:
            os.close(lock)
            raise

    def __init__(self, directory: Path, lock: int, key: Ed25519PrivateKey, flush_interval: float,
                 batch_size: int, queue_max: int, checkpoint_every: int, max_file_bytes: int,
                 clock: Callable[[], float], hot: _accel.HotPath = _accel.ACTIVE) -> None:
        self._dir, self._lock, self._key, self._kid = directory, lock, key, thumbprint(key.public_key())
        self._interval, self._batch, self._max = flush_interval, batch_size, queue_max
        self._cp_every, self._max_bytes, self._clock = checkpoint_every, max_file_bytes, clock
        # deque.append/popleft are atomic under the GIL: the request path takes no lock.
        self._q: collections.deque[Any] = collections.deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = self._stopping = False
        self._ok, self._fd, self._fd_name = True, -1, ""
        self._chain = hot.Chain()  # seq and prev: only with _mutex held, or before start
        self._batches = self._since_cp = 0
        # The batch in flight: kept until durable and retried byte for byte, so the chain never forks.
        self._out: bytes | None = None
        self._out_n, self._out_cp, self._cp_pending, self._unsynced = 0, b"", b"", False
        self._out_waiters: list[threading.Event] = []
        # Group commit (record_check_durable): (future, decision id) of allows waiting for the batch in
        # flight, and when the last checkpoint was written (checkpoints are throttled, see _take).
        self._out_durable: list[tuple[asyncio.Future[None], str]] = []
        self._kick_pending = False  # a _kick is scheduled on the event loop (record_check_durable)
        # Taking, chaining and writing a batch: the writer thread, or the event loop's _kick.
        self._mutex = threading.Lock()
        # An allow's record, written now: in one native call while the chain's inline gate is open,
        # else by _write_allow, which opens it again once it has checked the log.
        self.write_allow: Callable[..., bool] = hot.InlineAllow(self._chain, self._mutex, self._write_allow,
                                                                self._inline_failed)
        self._cp_at = -float("inf")
        cuts = self._resume()
        cp_path = directory / CHECKPOINTS
        cp_path.touch(mode=0o600)
        cuts.append(cut_tail(cp_path, last_line(cp_path, chained=False)[0]))
        self._cp_fd = os.open(cp_path, os.O_WRONLY | os.O_APPEND)
        self._cp_offset = cp_path.stat().st_size
        # A cut is itself audited, first thing after it, so the gap is explained in the chain.
        self._q.extend(("audit_truncated", clock(), cut) for cut in cuts if cut)

    def start(self) -> None:
        """Start the writer thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()

    def record(self, kind: str, **fields: Any) -> bool:
        """Enqueue one record; False means it was NOT taken (queue full or log closed): fail closed.

        While the disk fails, records are still taken and held (``healthy`` is False) until the queue is full.
        """
        if "seq" in fields or "prev" in fields or "ts" in fields or kind == "checkpoint":
            raise ValueError("seq, prev, ts and checkpoint records belong to the audit log")
        return self._enqueue((kind, self._clock(), fields))

    def _enqueue(self, item: Any) -> bool:
        """Take ``item`` unless the queue is full or the log closed (then False: the caller fails closed)."""
        q = self._q
        if len(q) >= self._max:
            return False
        q.append(item)
        self._chain.shut_inline()  # queued records go before the next allow (_write_allow)
        if self._closed:  # checked after the append, so a racing stop() cannot strand the record
            try:
                q.remove(item)
                return False
            except ValueError:
                pass  # the writer already took it: it will be written
        if len(q) == self._batch:  # '==': a backlog must not cut the writer's backoff short on every call
            self._wake.set()
        return True

    def record_check(self, decision_id: str, request_id: str, prepared: str) -> bool:
        """``record("check", ...)`` for members made by ``prepare``, plus the two per-call ids."""
        return self._enqueue((_CHECK, self._clock(), decision_id, request_id, prepared, None))

    def _write_allow(self, decision_id: str, request_id: str, prepared: str, ts: float | None = None) -> bool:
        """``write_allow`` (``hot.InlineAllow``) while its inline gate is shut: write an allow's record
        (at ``ts``, else now) to the log file now, on the caller's thread; True once written.

        An allow's record takes no queue, no thread hand-off, no future (each cost more than the
        Check). Written means the kernel has it, so a killed daemon loses none; the writer thread's
        next batch, within a flush interval, fsyncs it and signs a checkpoint. False, with nothing
        recorded, when it cannot be done at once (records queued ahead of it, a batch in flight, a
        failing disk, no writer running, no file open yet or this one full): the caller then takes
        ``record_check_durable``, or answers audit_unavailable when the log is not ``healthy``.
        A write that fails is withdrawn and raises ``AuditUnavailable``. Once written, the gate opens:
        the next allows are ``InlineAllow``'s alone, until something changes what was checked here.
        """
        if not self._ok or self._closed or self._thread is None or self._out is not None \
                or self._out_cp or not self._mutex.acquire(blocking=False):
            return False
        try:
            self._fold()
            if self._out is not None or self._out_cp:
                return False  # the writer took a batch meanwhile
            if self._q:
                # Records queued ahead (allows that found the writer holding the log a moment ago) go
                # first, as _kick would write them: else every allow after them would queue too until
                # the next loop iteration, each costing several times an inline one.
                self._write_queued()
                if self._q or not self._ok or self._out is not None:
                    return False
            if self._fd < 0 or self._fd_name != self._file:
                return False  # a file is still to be opened
            try:
                written = self._chain.append_check(self._fd, self._max_bytes - self._offset,
                                                   self._clock() if ts is None else ts,
                                                   decision_id, request_id, prepared)
            except OSError as exc:
                self._inline_failed(exc, decision_id)
            if written is None:
                return False  # the writer starts the next file
            self._batches += 1
            self._since_cp += 1
            self._offset += written
            if self._ok and not self._closed:  # (a stop() on another thread shuts it again)
                self._chain.open_inline(self._fd, self._max_bytes - self._offset, self._q)
            return True
        finally:
            self._mutex.release()

    def _inline_failed(self, exc: OSError, decision_id: str) -> NoReturn:
        """An allow's record, linked, failed to be written (``_mutex`` held, the gate shut): held, byte
        for byte, for the writer to retry, and the allow withdrawn."""
        self._fold()  # the allows written before it
        self._batches += 1
        self._since_cp += 1
        try:
            os.ftruncate(self._fd, self._offset)
        except OSError:
            pass  # the writer's retry truncates first
        self._out, self._out_n = self._chain.last, 1
        self._fail(exc, decision_id)
        raise AuditUnavailable(f"audit log cannot be written: {exc}") from None

    def record_check_durable(self, decision_id: str, request_id: str,
                             prepared: str) -> asyncio.Future[None] | None:
        """``record_check`` for an allow: a future of the running loop, done once the record is written.

        None means the record was not taken. The future fails with ``AuditUnavailable`` if the disk
        fails first; the record is then still written once it can be, followed by a ``checks_withdrawn``
        record naming the decision. A process killed at any moment has therefore written every allow
        it answered. The slow path of ``write_allow``: committed once per event-loop iteration, after
        every Check that iteration handles has enqueued (``_kick``), or by the writer thread.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        if not self._enqueue((_CHECK, self._clock(), decision_id, request_id, prepared, done)):
            return None
        if not self._kick_pending:  # only the loop's thread reads or writes it
            self._kick_pending = True
            loop.call_soon(self._kick)
        return done

    def _kick(self) -> None:
        """Commit the allows this loop iteration enqueued, on the loop's own thread.

        Handing each batch to the writer thread cost more than the Check itself (a wake-up and two
        GIL hand-offs per batch of one or two); here the loop encodes and writes the batch itself.
        The writer thread keeps the rest: fsync and checkpoints on its interval, other records,
        retries after a failure.
        """
        self._kick_pending = False
        if not self._mutex.acquire(blocking=False):
            self._wake.set()  # the writer is mid-batch: it takes ours next
            return
        try:
            self._fold()
            if self._ok and self._out is None and not self._out_cp:
                self._write_queued()
        finally:
            self._mutex.release()

    def _write_queued(self) -> None:
        """Chain what is queued and write it on the loop's thread (_kick); if that fails, every allow
        waiting on it is withdrawn. ``_mutex`` held, no batch in flight.

        Written, fsynced only as ``_write_out`` rules: a killed process loses none of it (the kernel
        has it). The writer's next checkpoint, within a flush interval, fsyncs it; after a failure the
        writer retries with backoff.
        """
        took = self._take(checkpoint=False)
        if self._q:
            self._wake.set()  # a flush() waiter or a full batch is left for the writer: wake it now
        if not took:
            return
        try:
            self._write_out()
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError, also_withdraw: str = "") -> None:
        """A write on the loop's thread failed: hold the batch for the writer, withdraw the allows."""
        log.error("audit: write failed, holding %d records: %s", self.pending, exc)
        self._ok = False
        self._chain.shut_inline()
        if also_withdraw:
            self._q.appendleft((WITHDRAWN, self._clock(), {
                "decision_ids": [also_withdraw], "reason": "audit_unavailable", "error": str(exc)}))
        self._withdraw(exc)
        self._wake.set()

    def flush(self, timeout: float = 5.0) -> bool:
        """Block until everything enqueued so far is fsynced; False on timeout or a dead writer."""
        if self._thread is None or not self._thread.is_alive():
            return False
        done = threading.Event()
        self._q.append(done)
        self._chain.shut_inline()
        self._wake.set()
        return done.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Refuse new records, drain the queue, write a final checkpoint, join the writer."""
        self.start()
        self._closed = self._stopping = True
        self._chain.shut_inline()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("audit: writer did not drain in %.1fs, %d records pending", timeout, self.pending)
                return
        for fd in (self._fd, self._cp_fd, self._lock):
            if fd >= 0:
                os.close(fd)
        self._fd = self._cp_fd = self._lock = -1

    @property
    def healthy(self) -> bool:
        """True while the writer runs and its last write succeeded."""
        # Read on every Check: plain flags only. The writer clears _ok/sets _closed itself when it
        # fails or dies (see _run), so Thread.is_alive() (~1 µs, a lock) adds nothing.
        return self._ok and not self._closed and self._thread is not None
