"""Task budgets: per (task, tool) call counters shared by every Check worker, exact under concurrency.

The table is a file under the state directory mapped shared (``MAP_SHARED``) before the workers
fork, so every worker reads and writes the same pages, and a restart of the daemon keeps the counts
(a budget cannot be reset by crashing the daemon). Each charge holds a POSIX record lock on the file
(``lockf``: per process, dropped by the kernel if a worker dies holding it) plus a thread lock; only
budgeted requests take them.

Layout: a 64-byte header, then ``capacity`` entries of (key digest, keep-until, calls, tat), open
addressing with linear probing over at most ``PROBE`` slots. Entries are never deleted, only
reused once past their keep-until, so a probe may stop at the first never-used slot. The rate is
a GCRA (a token bucket kept as one "theoretical arrival time", ``tat``).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import mmap
import os
import struct
import threading
from pathlib import Path

from . import reasons
from .constraints import Budget
from .errors import StateError

log = logging.getLogger(__name__)

MAGIC = b"agentauthz-budgets-v1\x00\x00\x00"
HEADER = struct.Struct("<24sQ")  # magic, capacity
HEADER_BYTES = 64
ENTRY = struct.Struct("<16sqQd")  # blake2b-128 of the key, keep-until (unix s), calls, tat (unix s)
EMPTY = bytes(16)
PROBE = 64  # slots one key may land in; beyond them the table counts as full for that key
_SLACK = 1e-6  # float noise in tat arithmetic must not refuse the burst's last call


def file_size(capacity: int) -> int:
    return HEADER_BYTES + capacity * ENTRY.size


class BudgetTable:
    """Counters in a shared mapping; ``charge`` counts one call or says why it may not be made."""

    def __init__(self, fd: int, buffer: mmap.mmap, capacity: int) -> None:
        self._fd = fd
        self._buf = buffer
        self.capacity = capacity
        self._thread_lock = threading.Lock()  # lockf does not exclude threads of one process

    @classmethod
    def open(cls, path: Path, capacity: int) -> BudgetTable:
        """Map ``path`` (created owner-only); another capacity starts afresh, a damaged file is refused."""
        if capacity < 1:
            raise ValueError("budget capacity must be positive")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            try:
                size = file_size(capacity)
                raw = os.pread(fd, HEADER.size, 0)
                fresh = not raw.strip(b"\0")  # new, or sized by a crash before its header: never used
                magic, found = HEADER.unpack(raw.ljust(HEADER.size, b"\0"))
                # Counts that start afresh are budgets handed out again: a new file or a changed
                # capacity may do that, never damage (a crash cannot reset a budget, nor can a bad disk).
                if not fresh and (magic != MAGIC or (found == capacity and os.fstat(fd).st_size != size)):
                    raise StateError(f"{path}: damaged budget table (bad header or size); refusing to start "
                                     "rather than reset every task budget")
                if fresh or found != capacity or os.fstat(fd).st_size != size:
                    if not fresh:
                        log.warning("%s: another capacity; budgets start afresh", path)
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, size)
                    os.pwrite(fd, HEADER.pack(MAGIC, capacity), 0)
                buffer = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, buffer, capacity)

    def close(self) -> None:
        """Unmap and close (idempotent); the counts stay in the file."""
        if self._fd >= 0:
            self._buf.close()
            os.close(self._fd)
            self._fd = -1

    def charge(self, key: str, budget: Budget, now: float, keep_until: int) -> tuple[str, float]:
        """(ALLOW, 0) having counted one call under ``key``, or (reason, seconds to wait) counting none."""
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if digest == EMPTY:  # 2^-128; the empty marker must stay unambiguous
            digest = b"\x01" + digest[1:]
        home = int.from_bytes(digest[:8], "little") % self.capacity
        with self._thread_lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
            try:
                return self._charge(digest, home, budget, now, keep_until)
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _charge(self, digest: bytes, home: int, budget: Budget, now: float,
                keep_until: int) -> tuple[str, float]:
        buf, free = self._buf, None
        calls, tat, kept, at = 0, 0.0, 0, -1
        for i in range(min(PROBE, self.capacity)):
            offset = HEADER_BYTES + ((home + i) % self.capacity) * ENTRY.size
            slot_key, slot_kept, slot_calls, slot_tat = ENTRY.unpack_from(buf, offset)
            if slot_key == digest:
                at = offset
                if slot_kept >= now:  # past keep-until the task is long over: a fresh count
                    calls, tat, kept = slot_calls, slot_tat, slot_kept
                break
            if free is None and (slot_key == EMPTY or slot_kept < now):
                free = offset
            if slot_key == EMPTY:
                break  # never used: the key was never placed beyond it
        if at < 0:
            if free is None:
                return reasons.BUDGET_TABLE_FULL, 0.0
            at = free
        if budget.max_calls and calls >= budget.max_calls:
            return reasons.BUDGET_EXHAUSTED, 0.0
        if budget.rate:
            interval = 1.0 / budget.rate
            tat = max(tat, now)
            wait = tat - now - (budget.burst - 1) * interval
            if wait > _SLACK:
                return reasons.RATE_LIMITED, wait
            tat += interval
        ENTRY.pack_into(buf, at, digest, max(kept, keep_until), calls + 1, tat)
        return reasons.ALLOW, 0.0


def retry_after(seconds: float) -> int:
    """Retry-After delta-seconds (RFC 9110 §10.2.3): whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(seconds))
