"""Denials by agent and reason for /metrics, in bounded memory: a space-saving counter per Check process.

Agent ids are unbounded (every workload of the trust domain, and whatever an unverified token
claims is never counted under its own name), so neither memory nor the metric's label set may grow
with them. Each Check process counts the denials it decides, only those (never the warm allow
path), into its own region of one anonymous shared mapping made before any worker is forked, as
``metrics.MeterTable`` does. A region holds ``slots`` (agent, reason) counters kept by the
space-saving algorithm (Metwally et al., 2005): a new pair takes the least-counted slot once all are
taken, inheriting its count as a bound on its error. Any pair denied more than 1/``slots`` of a
process's denials is always held, and a count is high by at most the error kept beside it.

The primary reads every region when scraped and exports the top ``top_n`` agents by denials, each
by reason, and the remainder of every reason under agent="other": at most ``top_n`` + 1 agent label
values, whatever the traffic. Denials of a token that did not verify count under "unverified".
"""

from __future__ import annotations

import hashlib
import mmap
from collections import Counter
from typing import Iterable

from .. import reasons
from .metrics import REASONS

OTHER, UNVERIFIED = "other", "unverified"
AGENT_BYTES = 248  # a SPIFFE ID may be 2048 bytes: a longer one is kept as a prefix and its hash
# A slot, in unsigned 64-bit words: version (odd while written), count, error, reason, agent length,
# then the agent's bytes.
_VERSION, _COUNT, _ERROR, _REASON, _LENGTH, _AGENT = range(6)
SLOT = _AGENT + AGENT_BYTES // 8
_REASON_AT = {reason: at + 1 for at, reason in enumerate(REASONS)}  # 0: a reason outside the vocabulary
_REASON_OF = {at: reason for reason, at in _REASON_AT.items()}


def slots_for(top_n: int) -> int:
    """Slots per process for exporting ``top_n`` agents: room for each of them under a few reasons."""
    return max(64, 4 * top_n)


def agent_key(agent: str | None) -> bytes:
    """The bytes a slot keeps for ``agent``: at most AGENT_BYTES, a longer id as prefix + hash."""
    raw = (agent or UNVERIFIED).encode("utf-8", "replace")
    if len(raw) <= AGENT_BYTES:
        return raw
    return raw[:AGENT_BYTES - 17] + b"~" + hashlib.sha256(raw).hexdigest()[:16].encode()


class DenialTable:
    """Every Check process's region of (agent, reason) denial counters, in memory shared across fork."""

    def __init__(self, processes: int, slots: int) -> None:
        self.processes, self.slots = processes, slots
        self._buffer = mmap.mmap(-1, processes * slots * SLOT * 8)  # anonymous, MAP_SHARED: zeroed
        self._view = memoryview(self._buffer).cast("Q")
        self._bytes = memoryview(self._buffer)

    def counter(self, process: int) -> DenialCounter:
        """The writer of ``process``'s region: only that process (one thread) counts into it."""
        return DenialCounter(self, process)

    def _slot(self, process: int, slot: int) -> int:
        return (process * self.slots + slot) * SLOT

    def read(self) -> Counter[tuple[str, str]]:
        """(agent, reason) -> denials, summed over every process (each slot read whole or not at all)."""
        found: Counter[tuple[str, str]] = Counter()
        view = self._view
        for process in range(self.processes):
            for slot in range(self.slots):
                at = self._slot(process, slot)
                for _ in range(3):  # a slot being rewritten reads again; it is rewritten in microseconds
                    version = view[at + _VERSION]
                    count, reason, length = view[at + _COUNT], view[at + _REASON], view[at + _LENGTH]
                    start = (at + _AGENT) * 8
                    agent = bytes(self._bytes[start:start + min(length, AGENT_BYTES)])
                    if version % 2 == 0 and view[at + _VERSION] == version:
                        break
                else:
                    continue
                if count:
                    found[(agent.decode("utf-8", "replace"), _REASON_OF.get(reason, OTHER))] += count
        return found


class DenialCounter:
    """One process's space-saving counter: ``count(agent, reason)`` on every denial it decides."""

    __slots__ = ("_table", "_base", "_index", "_counts", "_keys", "_free")

    def __init__(self, table: DenialTable, process: int) -> None:
        self._table, self._base = table, table._slot(process, 0)
        self._index: dict[tuple[bytes, int], int] = {}  # (agent, reason) -> slot
        self._counts = [0] * table.slots  # this writer's mirror of its slots' counts: eviction scans it
        self._keys: list[tuple[bytes, int] | None] = [None] * table.slots
        view, raw = table._view, table._bytes
        for slot in range(table.slots):  # a restarted worker counts on from its predecessor's slots
            at = self._base + slot * SLOT
            if view[at + _VERSION] % 2:  # the predecessor died writing it: whole again as it stands
                view[at + _VERSION] += 1
            if view[at + _COUNT]:
                length = min(view[at + _LENGTH], AGENT_BYTES)
                key = (bytes(raw[(at + _AGENT) * 8:(at + _AGENT) * 8 + length]), view[at + _REASON])
                self._index[key], self._keys[slot], self._counts[slot] = slot, key, view[at + _COUNT]
        free = [slot for slot, key in enumerate(self._keys) if key is None]
        self._free = free[::-1]  # taken from the end: the lowest slot first

    def count(self, agent: str | None, reason: str) -> None:
        key = (agent_key(agent), _REASON_AT.get(reason, 0))
        view = self._table._view
        slot = self._index.get(key)
        if slot is not None:
            self._counts[slot] += 1
            view[self._base + slot * SLOT + _COUNT] = self._counts[slot]
            return
        if self._free:
            slot, error = self._free.pop(), 0
        else:  # every slot taken: the least counted gives way, its count the newcomer's error bound
            slot = min(range(len(self._counts)), key=self._counts.__getitem__)
            error = self._counts[slot]
            del self._index[self._keys[slot]]  # type: ignore[arg-type]
        self._index[key], self._keys[slot] = slot, key
        self._counts[slot] = error + 1
        at = self._base + slot * SLOT
        view[at + _VERSION] += 1  # odd: a reader skips the slot until it is whole again
        view[at + _COUNT], view[at + _ERROR], view[at + _REASON], view[at + _LENGTH] = \
            error + 1, error, key[1], len(key[0])
        start = (at + _AGENT) * 8
        self._table._bytes[start:start + len(key[0])] = key[0]
        view[at + _VERSION] += 1


def top_agents(counts: Counter[tuple[str, str]], denied: dict[str, int], top_n: int
               ) -> Iterable[tuple[str, str, int]]:
    """(agent, reason, denials) of the ``top_n`` agents by denials, then (OTHER, reason, the rest of
    that reason's ``denied``, the exact count every process keeps) for every denial reason."""
    by_agent: Counter[str] = Counter()
    for (agent, _), n in counts.items():
        by_agent[agent] += n
    top = {agent for agent, _ in by_agent.most_common(top_n)}
    shown: Counter[str] = Counter()
    for (agent, reason), n in sorted(counts.items()):
        if agent in top:
            shown[reason] += n
            yield agent, reason, n
    for reason, n in sorted(denied.items()):
        if reason != reasons.ALLOW and n > shown[reason]:
            yield OTHER, reason, n - shown[reason]
