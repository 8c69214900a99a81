"""Budgets: per (agent, tool, window) call counters shared by every Check worker, exact under concurrency.

The table is a file under the state directory mapped shared (``MAP_SHARED``) before the workers
fork, so every worker reads and writes the same pages, and a restart of the daemon keeps the counts
(a budget cannot be reset by crashing the daemon). Each charge holds a POSIX record lock on the file
(``lockf``: per process, dropped by the kernel if a worker dies holding it) plus a thread lock; only
budgeted requests take them. One call may count under several keys (a delegated token's call counts
for every agent on its chain): all of them, or none.

Layout: a 64-byte header, then ``capacity`` entries of (key digest, keep-until, calls, tat), open
addressing with linear probing over at most ``PROBE`` slots. Keep-until is the end of the counter's
window, which starts with its first counted call; past it the count starts again. Entries are never
deleted, only reused once past their window and rate state, so a probe may stop at the first
never-used slot. The rate is a GCRA (a token bucket kept as one "theoretical arrival time", ``tat``).
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
from typing import Sequence

from .. import reasons
from ..decision.constraints import Budget
from ..errors import StateError

log = logging.getLogger("agentauthz.budgets")  # the name operators filter on, kept across the layout

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

    def charge(self, charges: Sequence[tuple[str, Budget]], now: float) -> tuple[str, float]:
        """(ALLOW, 0) having counted one call under every key of ``charges``, each against its budget,
        or (reason, seconds to wait) counting none."""
        digests = []
        for key, budget in charges:
            digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if digest == EMPTY:  # 2^-128; the empty marker must stay unambiguous
                digest = b"\x01" + digest[1:]
            digests.append((digest, budget))
        with self._thread_lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
            try:
                return self._charge(digests, now)
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _charge(self, charges: list[tuple[bytes, Budget]], now: float) -> tuple[str, float]:
        writes = []
        taken: set[int] = set()  # slots claimed by earlier keys of this call
        exhausted, wait = False, 0.0
        for digest, budget in charges:
            at = self._find(digest, now, taken)
            if at < 0:
                return reasons.BUDGET_TABLE_FULL, 0.0
            taken.add(at)
            slot_key, kept, calls, tat = ENTRY.unpack_from(self._buf, at)
            if slot_key != digest:
                kept, calls, tat = 0, 0, 0.0
            elif kept < now:  # the window is over: the count starts again, the rate state carries on
                kept, calls = 0, 0
            if not kept:
                kept = int(math.ceil(now)) + budget.window
            if budget.max_calls and calls >= budget.max_calls:
                exhausted = True
            if budget.rate:
                interval = 1.0 / budget.rate
                tat = max(tat, now)
                late = tat - now - (budget.burst - 1) * interval
                if late > _SLACK:
                    wait = max(wait, late)
                tat += interval
            writes.append((at, digest, kept, calls + 1, tat))
        if exhausted:
            return reasons.BUDGET_EXHAUSTED, 0.0
        if wait:
            return reasons.RATE_LIMITED, wait
        for at, digest, kept, calls, tat in writes:
            ENTRY.pack_into(self._buf, at, digest, kept, calls, tat)
        return reasons.ALLOW, 0.0

    def _find(self, digest: bytes, now: float, taken: set[int]) -> int:
        """The offset of ``digest``'s entry, else of a slot it may take, else -1 (full for this key)."""
        home = int.from_bytes(digest[:8], "little") % self.capacity
        free = -1
        for i in range(min(PROBE, self.capacity)):
            offset = HEADER_BYTES + ((home + i) % self.capacity) * ENTRY.size
            slot_key, slot_kept, _, slot_tat = ENTRY.unpack_from(self._buf, offset)
            if slot_key == digest:
                return offset
            # A slot past its window may be reused, unless its rate state still holds a wait.
            reusable = slot_key == EMPTY or (slot_kept < now and slot_tat <= now)
            if free < 0 and reusable and offset not in taken:
                free = offset
            if slot_key == EMPTY:
                break  # never used: the key was never placed beyond it
        return free


def retry_after(seconds: float) -> int:
    """Retry-After delta-seconds (RFC 9110 §10.2.3): whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(seconds))
