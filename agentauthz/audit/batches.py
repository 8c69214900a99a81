"""The audit writer thread's side: queued records chained into batches, written with signed checkpoints.

``writer.AuditLog`` is the front (enqueue, inline allows, group commit on the event loop) and owns
the state; this half takes batches off its queue, writes and fsyncs them, retries after a failure,
and answers the allows waiting on them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .. import durable
from ..decision._chain_py import ts_text
from ..errors import AuditUnavailable, StateError
from .files import append, cut_tail, last_line, log_files
from .records import _b64, _canon, _dumps, _redacted_fields

log = logging.getLogger("agentauthz.audit")  # the name operators filter on, kept across the layout

_BACKOFF_MAX = 1.0
_CHECK = object()  # marks record_check()'s queue items
WITHDRAWN = "checks_withdrawn"  # allows answered audit_unavailable because their record could not be written


def _micros(ts: float) -> float:
    """``ts`` as every record gives it: the number an allow's record writes (``_chain_py.ts_text``)."""
    return float(ts_text(ts))


class BatchWriter:
    """Turns the queue into durable, chained batches; the writer thread runs ``_run``.

    A base of ``AuditLog``, whose ``__init__`` sets every field below; ``_take`` and ``_write_out``
    also run on the event loop's thread (``AuditLog._kick``), always with ``_mutex`` held.
    """

    # The queue and its signals, shared with the front (writer.AuditLog).
    _q: collections.deque[Any]
    _wake: threading.Event
    _mutex: threading.Lock
    _ok: bool
    _closed: bool
    _stopping: bool
    _interval: float
    _batch: int
    _clock: Callable[[], float]
    # The chain, the files and the batch in flight.
    _dir: Path
    _key: Ed25519PrivateKey
    _kid: str
    _chain: Any
    _cp_every: int
    _max_bytes: int
    _batches: int
    _since_cp: int
    _cp_at: float
    _file: str
    _offset: int
    _fd: int
    _fd_name: str
    _cp_fd: int
    _cp_offset: int
    _out: bytes | None
    _out_n: int
    _out_cp: bytes
    _cp_pending: bytes  # the writer thread's: a checkpoint for the checkpoints file, once fsynced
    _unsynced: bool  # the writer thread's: its last batch awaits _copy_checkpoint's fsync
    _out_waiters: list[threading.Event]
    _out_durable: list[tuple[asyncio.Future[None], str]]

    @property
    def pending(self) -> int:
        """Records taken but not yet durable."""
        return len(self._q) + self._out_n

    def _resume(self) -> list[dict[str, Any] | None]:
        """Where the chain ends on disk (seq, prev; the file and offset to append at); the cut torn tail."""
        files = log_files(self._dir)
        self._file, self._offset = "", 0
        if not files:
            return []
        # Only the file being appended to at a crash can be torn; a torn earlier file is damage.
        end, line = last_line(files[-1][1])
        cut = cut_tail(files[-1][1], end)
        self._file, self._offset = files[-1][1].name, end
        for _, path in reversed(files[:-1]):
            if line is not None:
                break
            end, line = last_line(path)
            if end != path.stat().st_size:
                raise StateError(f"{path}: torn line inside the log; run `agentauthz audit verify`")
        if line is not None:
            self._chain.seq, self._chain.prev = json.loads(line)["seq"], hashlib.sha256(line).hexdigest()
        return [cut]

    def _run(self) -> None:
        backoff, recovered = 0.0, False
        try:
            while True:
                if not (self._out is not None or self._out_cp or self._cp_pending or self._out_waiters):
                    # Just recovered: the backoff's clear() may have swallowed a flush() or a waiting
                    # allow's wake-up, so take what is queued now rather than a flush interval later.
                    if len(self._q) < self._batch and not self._stopping and not recovered:
                        self._wake.wait(self._interval)
                    recovered = False
                    self._wake.clear()  # clear before taking: a set() after this is never lost
                    with self._held():  # _kick may have left a batch that failed to write: never replace it
                        took = self._out is not None or bool(self._out_cp or self._cp_pending) or self._take()
                    if not took:
                        if self._stopping and not self._q:
                            break
                        continue
                try:
                    with self._held():
                        self._write_out(sync_after=True)
                    self._copy_checkpoint()
                except OSError as exc:  # ENOSPC, EIO...: keep the batch, report unhealthy, retry
                    if self._ok:
                        log.error("audit: write failed, holding %d records: %s", self.pending, exc)
                    self._ok, backoff = False, min(max(backoff * 2, 0.01), _BACKOFF_MAX)
                    self._chain.shut_inline()
                    with self._held():
                        self._withdraw(exc)
                    self._wake.wait(backoff)  # flush() and stop() cut it short
                    self._wake.clear()  # else one early set() would turn the backoff into a busy loop
                    continue
                if not self._ok:
                    log.warning("audit: writing again")
                    recovered = True
                self._ok, backoff = True, 0.0
        except BaseException as exc:
            log.exception("audit: writer died; the log is closed")
            self._closed, self._ok = True, False
            self._chain.shut_inline()
            self._withdraw(exc)  # nobody will write them: answer the waiting allows now
            raise

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        """``_mutex``, with the allows written inline until then counted (``_fold``)."""
        with self._mutex:
            self._fold()
            yield

    def _fold(self) -> None:
        """Shut the inline gate and count what ``InlineAllow`` wrote through it: the file's end moved,
        and each of those allows is a batch of its own. ``_mutex`` held."""
        records, size = self._chain.take_inline()
        if records:
            self._offset += size
            self._batches += records
            self._since_cp += records

    def _line(self, ts: float, kind: str, fields: dict[str, Any]) -> bytes:
        head = {"seq": self._chain.seq + 1, "prev": self._chain.prev, "ts": _micros(ts), "kind": kind}
        return self._chain.link(_dumps({**head, **fields}))

    def _take(self, checkpoint: bool = True) -> bool:
        """Chain up to a batch of queued records (+ a checkpoint) into self._out; True if there is work.

        Only with ``_mutex`` held and no batch in flight (``_out`` None, no ``_out_cp``). Without
        ``checkpoint`` (the loop's unsynced batch, ``_write_queued``) it stops at a flush() waiter:
        flush() promises an fsync, so the waiter and what follows it are the writer thread's.
        """
        lines: list[bytes] = []
        q = self._q
        while q and len(lines) < self._batch:
            if not checkpoint and isinstance(q[0], threading.Event):
                break
            item = q.popleft()
            if isinstance(item, threading.Event):
                self._out_waiters.append(item)
                continue
            if item[0] is _CHECK:
                lines.append(self._chain.link(self._chain.check_record(item[1], item[2], item[3], item[4])))
                if item[5] is not None:
                    self._out_durable.append((item[5], item[2]))
                continue
            kind, ts, fields = item
            try:
                lines.append(self._line(ts, kind, _redacted_fields(fields)))
            except (ValueError, TypeError):  # e.g. a non-str dict key: keep that it happened
                lines.append(self._line(ts, kind, {"unencodable": sorted(fields)}))
        final = self._stopping and not q and self._since_cp + len(lines) > 0
        # Group commit writes as often as allows wait: checkpoint those batches at most once a flush
        # interval (a signature and a second fsync each), the rest as configured.
        eager = bool(self._out_durable) and time.monotonic() - self._cp_at < self._interval
        if lines:
            self._file_for(sum(map(len, lines)), len(lines))
        self._batches += 1 if lines else 0
        self._since_cp += len(lines)
        if checkpoint and (final or (self._batches >= self._cp_every and not eager)):
            self._cp_at = time.monotonic()
            now = _micros(self._clock())
            cp = {"seq": self._chain.seq, "hash": self._chain.prev, "file": self._file, "ts": now,
                  "kid": self._kid}
            sig = _b64(self._key.sign(_canon(cp)))
            lines.append(self._line(now, "checkpoint", {"checkpoint": cp, "sig": sig}))
            self._out_cp = _dumps({**cp, "sig": sig}) + b"\n"
            self._batches = self._since_cp = 0
        if lines:
            self._out, self._out_n = b"".join(lines), len(lines)
        return bool(lines or self._out_waiters)

    def _file_for(self, size: int, records: int = 1) -> None:
        """Start a new file (named for its first record) when ``size`` more bytes would overfill this one."""
        if not self._file or (self._offset and self._offset + size > self._max_bytes):
            self._file, self._offset = f"audit-{self._chain.seq - records + 1:010d}.jsonl", 0

    def _write_out(self, sync_after: bool = False) -> None:
        """Write the batch in flight; ``_mutex`` held, by either thread.

        It fsyncs only what must be durable now: a checkpoint (it names only durable records),
        flush() waiters, a retry after a failure. Allows need only be written, as an inline allow is;
        the next checkpoint, within a flush interval, fsyncs them. An fsync for every batch of
        waiting allows kept the writer in fsync, holding the log, ~135 times a second under load.
        With ``sync_after`` (the writer thread) that fsync is ``_copy_checkpoint``'s, after ``_mutex``
        is released: while the writer holds the log or a batch is in flight, allows cannot be written
        inline, and each one that waits costs several times an inline one (~8% of them did, under load).
        A retry after a failure still fsyncs here, before anything follows its batch.
        """
        sync = bool(self._out_cp or self._out_waiters) or not self._ok
        if sync and sync_after and self._ok:
            sync, self._unsynced = False, True
        if self._out is None and self._out_waiters and self._since_cp and self._fd >= 0:
            # flush() with nothing new to write, but records written unsynced since the last
            # checkpoint (inline allows, or batches with checkpoint_every > 1): it promises an fsync.
            os.fsync(self._fd)
        if self._out is not None:
            if self._fd_name != self._file:
                if self._fd >= 0:
                    os.fsync(self._fd)  # allows written inline or unsynced since the last checkpoint
                    os.close(self._fd)
                self._fd = os.open(self._dir / self._file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                durable.fsync_dir(self._dir)  # the new name must survive a crash as much as its content
                self._fd_name = self._file
            # After a failure (not _ok) the file may hold a torn try.
            self._offset = append(self._fd, self._offset, self._out, retry=not self._ok, sync=sync)
            self._out, self._out_n = None, 0
            if self._out_durable:  # written (and fsynced if sync): what an inline allow gets
                _resolve(self._out_durable, None)
                self._out_durable = []
        if self._out_cp:
            self._cp_pending, self._out_cp = self._out_cp, b""

    def _copy_checkpoint(self) -> None:
        """fsync what ``_write_out`` left unsynced, then append its checkpoint to the checkpoints file
        and answer flush() waiters: the writer thread's, outside ``_mutex``, so that allows go on
        being written inline meanwhile. A failed fsync is a failed batch (the kernel reports it once
        and may have dropped the pages): its checkpoint is never copied, and a new one follows."""
        if self._unsynced:
            with self._held():  # the loop's thread may move to the next file meanwhile: sync this one's copy
                fd = os.dup(self._fd)
            try:
                os.fsync(fd)
            except OSError:  # _run says so and denies; the next checkpoint batch is fsynced under _mutex
                with self._held():
                    self._cp_pending = b""
                    self._batches = max(self._batches, self._cp_every)
                raise
            finally:
                os.close(fd)
                self._unsynced = False
        if self._cp_pending:  # after the log fsync: a checkpoint never names a record that is not durable
            self._cp_offset = append(self._cp_fd, self._cp_offset, self._cp_pending, retry=not self._ok)
            self._cp_pending = b""
        for done in self._out_waiters:
            done.set()
        self._out_waiters = []

    def _withdraw(self, exc: BaseException) -> None:
        """The disk failed: answer every allow still waiting (in the batch in flight or queued) with
        AuditUnavailable now, and say so in the log right after the records that name them."""
        failed = self._out_durable
        self._out_durable = []
        for item in list(self._q):  # a snapshot: request threads keep appending
            if item.__class__ is tuple and item[0] is _CHECK and item[5] is not None and not item[5].done():
                failed.append((item[5], item[2]))
        if failed:
            # appendleft: chained right after the held batch once the disk takes it again.
            self._q.appendleft((WITHDRAWN, self._clock(), {
                "decision_ids": [d for _, d in failed], "reason": "audit_unavailable", "error": str(exc)}))
            _resolve(failed, AuditUnavailable(f"audit log cannot be written: {exc}"))


def _resolve(waiting: list[tuple[asyncio.Future[None], str]], error: BaseException | None) -> None:
    """Complete futures of (usually one) event loop: at once on that loop's thread (_kick), else with
    one thread-safe wake-up per loop (the writer thread)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for future, _ in waiting:
        by_loop.setdefault(future.get_loop(), []).append(future)
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    for loop, futures in by_loop.items():
        if loop is running:
            _complete(futures, error)
            continue
        try:
            loop.call_soon_threadsafe(_complete, futures, error)
        except RuntimeError:  # that loop has closed: nobody waits any more
            pass


def _complete(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if not future.done():  # a cancelled Check (client gone) cancelled its future
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
