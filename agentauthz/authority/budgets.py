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

Agents are kept from filling the table for each other: a second mapping (``NAME-agents``) holds each
agent's ledger of the counters it holds and until when (``AGENT_COUNTERS`` at most). A call that
would place one more is refused ``budget_agent_limit`` for that agent alone. A delegated call's
counters (one per agent of its chain) all go in the ledger of the agent that minted the task: the
agents it delegates to are any it names, so a ledger each would let it place counters without end.
The ledger is a limit, not a budget: one lost or damaged starts afresh (counters already placed are
entered at their next call).
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
from typing import Any, Sequence

from .. import reasons
from ..decision.constraints import AGENT_COUNTERS, Budget, agent_of
from ..errors import StateError

log = logging.getLogger("agentauthz.budgets")  # the name operators filter on, kept across the layout

MAGIC = b"agentauthz-budgets-v1\x00\x00\x00"
HEADER = struct.Struct("<24sQ")  # magic, capacity
HEADER_BYTES = 64
ENTRY = struct.Struct("<16sqQd")  # blake2b-128 of the key, keep-until (unix s), calls, tat (unix s)
EMPTY = bytes(16)
PROBE = 64  # slots one key may land in; beyond them the table counts as full for that key
_SLACK = 1e-6  # float noise in tat arithmetic must not refuse the burst's last call
LEDGER_MAGIC = b"agentauthz-bud-agents-v1"
UNUSED = bytes(8)  # a ledger cell holding no counter
LEDGER = struct.Struct("<16s" + "8sq" * AGENT_COUNTERS)  # agent digest, then (counter digest, until) cells


def file_size(capacity: int) -> int:
    return HEADER_BYTES + capacity * ENTRY.size


def ledger_capacity(capacity: int) -> int:
    return max(64, capacity // 32)  # agents with counters: most agents hold several


def _digest(text: str) -> bytes:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return b"\x01" + digest[1:] if digest == EMPTY else digest  # 2^-128; the empty marker stays unambiguous


class BudgetTable:
    """Counters in a shared mapping; ``charge`` counts one call or says why it may not be made."""

    def __init__(self, fd: int, buffer: mmap.mmap, capacity: int, ledger: mmap.mmap | None = None) -> None:
        self._fd = fd
        self._buf = buffer
        self.capacity = capacity
        self._ledgers = ledger if ledger is not None else mmap.mmap(-1, _ledger_size(capacity))
        self.agents = ledger_capacity(capacity)
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
        return cls(fd, buffer, capacity, _open_ledgers(path.with_name(path.name + "-agents"), capacity))

    def close(self) -> None:
        """Unmap and close (idempotent); the counts stay in the file."""
        if self._fd >= 0:
            self._buf.close()
            self._ledgers.close()
            os.close(self._fd)
            self._fd = -1

    def charge(self, charges: Sequence[tuple[str, Budget]], now: float,
               owner: str | None = None) -> tuple[str, float]:
        """(ALLOW, 0) having counted one call under every key of ``charges``, each against its budget,
        or (reason, seconds to wait) counting none. Every counter the call holds is entered in the
        ledger of ``owner`` (by default the first key's agent): the agent that minted the task, for a
        call of a delegation chain, since the agents it delegates to are any it names."""
        if not charges:
            return reasons.ALLOW, 0.0
        digests = [(_digest(key), budget) for key, budget in charges]
        agent = _digest(owner if owner is not None else agent_of(charges[0][0]))
        with self._thread_lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
            try:
                return self._charge(digests, agent, now)
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _charge(self, charges: list[tuple[bytes, Budget]], agent: bytes, now: float) -> tuple[str, float]:
        writes = []
        taken: set[int] = set()  # slots claimed by earlier keys of this call
        ledger = self._ledger(agent, now)
        if ledger is None:
            return reasons.BUDGET_TABLE_FULL, 0.0
        at_ledger, cells = ledger
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
            # The counter may be reused once past both its window and its rate state: so long it is held.
            if not _enter(cells, digest[:8], max(kept, math.ceil(tat)), now):
                return reasons.BUDGET_AGENT_LIMIT, 0.0
        if exhausted:
            return reasons.BUDGET_EXHAUSTED, 0.0
        if wait:
            return reasons.RATE_LIMITED, wait
        for at, digest, kept, calls, tat in writes:
            ENTRY.pack_into(self._buf, at, digest, kept, calls, tat)
        LEDGER.pack_into(self._ledgers, at_ledger, agent, *(v for cell in cells for v in cell))
        return reasons.ALLOW, 0.0

    def _ledger(self, agent: bytes, now: float) -> tuple[int, list[list[Any]]] | None:
        """``agent``'s ledger (offset, cells), or a slot for a new one; None when none is free."""
        home = int.from_bytes(agent[:8], "little") % self.agents
        free = None
        for i in range(min(PROBE, self.agents)):
            at = LEDGER_HEADER + ((home + i) % self.agents) * LEDGER.size
            owner = self._ledgers[at:at + 16]  # the cells are read only for the owner's or a free one
            if owner == EMPTY:
                return free or (at, [[UNUSED, 0] for _ in range(AGENT_COUNTERS)])
            if owner != agent and free is not None:
                continue
            _, *flat = LEDGER.unpack_from(self._ledgers, at)
            cells = [[flat[j], flat[j + 1]] for j in range(0, len(flat), 2)]
            if owner == agent:
                return at, cells
            if all(c == UNUSED or until < now for c, until in cells):
                free = at, [[UNUSED, 0] for _ in cells]
        return free

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


def _enter(cells: list[list[Any]], counter: bytes, until: int, now: float) -> bool:
    """Hold ``counter`` in an agent's ledger ``cells`` until ``until``; False when all are held by others."""
    for cell in cells:
        if cell[0] == counter and cell[1] >= now:
            cell[1] = max(cell[1], until)
            return True
    for cell in cells:
        if cell[0] == UNUSED or cell[1] < now:
            cell[:] = [counter, until]
            return True
    return False


LEDGER_HEADER = 64


def _ledger_size(capacity: int) -> int:
    return LEDGER_HEADER + ledger_capacity(capacity) * LEDGER.size


def _open_ledgers(path: Path, capacity: int) -> mmap.mmap:
    """Map the agents' ledgers (created owner-only); another layout or capacity starts afresh."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)  # released by close
        size = _ledger_size(capacity)
        header = HEADER.pack(LEDGER_MAGIC, capacity)
        if os.pread(fd, HEADER.size, 0) != header or os.fstat(fd).st_size != size:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
            os.pwrite(fd, header, 0)
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)  # the mapping keeps the pages; every charge holds the table's own lock


def retry_after(seconds: float) -> int:
    """Retry-After delta-seconds (RFC 9110 §10.2.3): whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(seconds))
