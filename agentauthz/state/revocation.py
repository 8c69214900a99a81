"""Durable revocation state: the fsynced journal behind the RevocationIndex, and the slot allocator."""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import errors
from .journal import NAMED, JournalFile, encode, parse

log = logging.getLogger("agentauthz.revocation")  # the name operators filter on, kept across the layout

COMPACT_BYTES = 1 << 20
# The index cutoff of a banned agent: every token naming it is dead, whenever it was issued.
BANNED = (1 << 63) - 1
# Cluster mode: a node hands out slots from one block for at most this long, so the block's expiry bound
# is known when it is reserved; and slots between known blocks (a block another node reserved but has not
# published yet) are held for this long before the window may slide past them.
BLOCK_USE = 60
HOLE_GRACE = 30

def lift_ban(index: Any, agent: str, cutoff: int) -> None:
    """Lower ``agent``'s cutoff in ``index`` from BANNED to ``cutoff`` in one step.

    The twins' ``revoke_agent`` only ever raises a cutoff, and ``forget`` then ``revoke_agent`` would
    leave a moment with no cutoff at all, in which a token issued before the ban would pass.
    """
    index.agents[agent] = cutoff  # one dict store: a Check sees the old cutoff or the new one
    index.generation += 1  # cached verdicts are recomputed; every writer holds the store's lock


def index_call(index: Any, name: str, args: Any) -> None:
    """Apply one replicated index change (cluster/replication.py): a method of the twins', or ``lift_ban``."""
    if name == "lift_ban":
        lift_ban(index, *args)
    else:
        getattr(index, name)(*args)


class _Block:
    """A reserved run of slots and the latest expiry of any token handed one of them."""

    __slots__ = ("start", "end", "exp", "sealed")

    def __init__(self, start: int, end: int, exp: int = 0, sealed: bool = False) -> None:
        self.start, self.end, self.exp, self.sealed = start, end, exp, sealed

    def record(self) -> dict[str, Any]:
        if self.sealed:
            return {"op": "seal", "from": self.start, "upto": self.end, "exp": self.exp}
        return {"op": "reserve", "from": self.start, "upto": self.end}


class RevocationStore:
    """Journal, slot allocator and window of one daemon; every method is thread-safe."""

    def __init__(self, directory: Path, index: Any, *, max_lifetime: int, leeway: int,
                 clock: Callable[[], float], reserve_block: int, compact_bytes: int,
                 shared: bool = False) -> None:
        if max_lifetime <= 0 or leeway < 0 or reserve_block <= 0 or compact_bytes <= 0:
            raise ValueError("max_lifetime, reserve_block and compact_bytes must be positive, leeway >= 0")
        self._journal = JournalFile(directory)
        self.path = self._journal.path
        self._index = index
        self._bits = index.bits
        self._capacity: int = self._bits.capacity
        if self._bits.base or self._bits.count():
            raise ValueError("the store replays into a fresh index; this one already holds state")
        self._max_lifetime, self._leeway, self._clock = max_lifetime, leeway, clock
        # A crash wastes the rest of the block in progress; a quarter window at most keeps minting going.
        self._block = max(1, min(reserve_block, self._capacity // 4))
        self._compact_bytes = compact_bytes
        self._lock = threading.Lock()
        self._blocks: deque[_Block] = deque()  # every possibly-live slot, oldest first
        self._base = self._next = self._reserved = 0
        self._tokens: dict[int, tuple[str, int]] = {}  # slot -> (jti, exp), inside the window only
        self._named: dict[str, dict[str, int]] = {op: {} for op in NAMED}  # op -> name -> at
        self._banned: dict[str, int] = {}  # agent -> when it was banned; kept until unbanned
        # Cluster mode (join_cluster): changes are published before they are applied here, slot blocks
        # come from the cluster-wide counter, and other nodes' blocks arrive through apply_remote.
        self._publish: Callable[[list[dict[str, Any]]], Any] | None = None
        self._reserve: Callable[[int], int] | None = None
        self._slots_end: Callable[[], int] | None = None
        self._limit = 0  # the end of the block this node hands slots from
        self._own_exp = 0  # its expiry bound (cluster mode)
        self._holes: list[tuple[int, int, float]] = []  # (start, end, held until): slots of unseen blocks
        self._shared = shared
        # Bumped whenever a bit is set or the window slides: the published status list is rebuilt
        # only when it moved.
        self.revision = 0

    @classmethod
    def open(cls, directory: Path, index: Any, *, max_lifetime: int, leeway: int,
             clock: Callable[[], float] = time.time, reserve_block: int = 4096,
             compact_bytes: int = COMPACT_BYTES, shared: bool = False) -> RevocationStore:
        """Open (or create) the journal in ``directory`` and replay it into ``index``.

        ``shared``: this node is one of a cluster (``join_cluster`` follows); the window then never
        slides past slots another node may still hand out.
        """
        store = cls(directory, index, max_lifetime=max_lifetime, leeway=leeway, clock=clock,
                    reserve_block=reserve_block, compact_bytes=compact_bytes, shared=shared)
        store._journal = JournalFile.open(Path(directory))
        try:
            store._replay()
        except BaseException:
            store._journal.close()
            raise
        return store

    def replicate(self, index: Any) -> None:
        """Write later changes through ``index`` (``cluster.replication.ReplicatedIndex``, same bits)."""
        with self._lock:
            if index.bits is not self._bits:
                raise ValueError("a replica must share this store's bits")
            self._index = index

    def join_cluster(self, publish: Callable[[list[dict[str, Any]]], Any], reserve: Callable[[int], int],
                     slots_end: Callable[[], int]) -> None:
        """From now on publish every change before applying it (``publish`` raises ClusterUnavailable when
        the cluster did not take it), reserve slot blocks cluster-wide (``reserve(n)`` -> the block's end)
        and ask ``slots_end`` about a slot beyond every block seen here."""
        if not self._shared:
            raise ValueError("open the store with shared=True to join a cluster")
        with self._lock:
            self._publish, self._reserve, self._slots_end = publish, reserve, slots_end
            self._limit = self._next  # a fresh block for this node's next token

    def apply_remote(self, records: list[dict[str, Any]]) -> None:
        """Cluster mode: apply (and journal) changes another node published, in stream order; idempotent.

        Raises StateError for a record that is not one of the journal's (a newer node's, or garbage).
        """
        parsed = [parse(encode(r), "cluster record") for r in records]
        with self._lock:
            now = self._clock()
            local: list[dict[str, Any]] = []
            for r in parsed:
                if r["op"] == "seal":
                    local += self._learn_block(_Block(r["from"], r["upto"], r["exp"], sealed=True), now)
                    continue
                local.append(r)
                if r["op"] == "token":
                    self._reserved = max(self._reserved, r["slot"] + 1)
                    self._set_bit(r["slot"], r["jti"], r["exp"])
                elif r["op"] == "ban":
                    self._apply_ban(r["name"], r["at"])
                elif r["op"] == "unban":
                    if r["name"] in self._banned:
                        self._apply_unban(r["name"], r["at"])
                elif r["op"] in NAMED:
                    self._apply_named(r["op"], r["name"], r["at"])
                else:
                    local.pop()  # base and reserve records are a journal's own, never another node's
            self._journal.append(local)

    def allocate_slot(self, exp: int) -> int:
        """The status slot for a new token expiring at ``exp``; never one a live token may hold."""
        with self._lock:
            now = self._clock()
            # The restart bound (now + max_lifetime + leeway) must cover every token handed a slot.
            if type(exp) is not int or exp > now + self._max_lifetime + self._leeway:
                raise ValueError("exp must be an integer within max_lifetime of now")
            if self._reserve is not None:
                return self._allocate_shared(now)
            if self._next >= self._base + self._capacity:
                raise errors.CapacityExhausted(f"all {self._capacity} revocation slots hold live tokens")
            if self._next >= self._reserved:
                records = []
                if self._blocks and not self._blocks[-1].sealed:
                    self._blocks[-1].sealed = True  # full: its expiry is final
                    records.append(self._blocks[-1].record())
                block = _Block(self._next, self._next + self._block)
                self._append(records + [block.record()])  # on disk before any of its slots leaves
                self._blocks.append(block)
                self._reserved = self._limit = block.end
            slot, self._next = self._next, self._next + 1
            self._blocks[-1].exp = max(self._blocks[-1].exp, exp)
            return slot

    def _allocate_shared(self, now: float) -> int:
        """Cluster mode: a slot from this node's block, reserving the next one cluster-wide when due.

        A block is used for BLOCK_USE seconds at most, so it is sealed when reserved: its expiry bound
        covers every token it can hold (exp <= now + max_lifetime + leeway), on every node at once.
        """
        assert self._reserve is not None and self._publish is not None
        if self._next >= self._limit or now + self._max_lifetime + self._leeway > self._own_exp:
            end = self._reserve(self._block)
            block = _Block(end - self._block, end, int(now) + BLOCK_USE + self._max_lifetime + self._leeway,
                           sealed=True)
            self._publish([block.record()])  # every node knows the block before any token holds a slot of it
            self._journal.append(self._learn_block(block, now))
            self._next, self._limit, self._own_exp = block.start, block.end, block.exp
        if self._next >= self._base + self._capacity:
            raise errors.CapacityExhausted(f"all {self._capacity} revocation slots hold live tokens")
        slot, self._next = self._next, self._next + 1
        return slot

    def _learn_block(self, block: _Block, now: float) -> list[dict[str, Any]]:
        """Cluster mode: hold ``block`` in the window (and the slots between it and the last known block,
        which a block not yet published may hold); the records the local journal needs for it."""
        if block.end <= self._base:
            return []  # dead everywhere already
        index = next((i for i, (s, e, _) in enumerate(self._holes) if s <= block.start < e), None)
        if block.end <= self._reserved and index is None:
            return []  # known already
        if index is not None:  # a late block inside a hole: the hole's slots either side stay held a while
            s, e, until = self._holes.pop(index)
            self._holes += [h for h in ((s, block.start, until), (block.end, e, until)) if h[0] < h[1]]
        elif block.start > self._reserved:
            self._holes.append((self._reserved, block.start, now + HOLE_GRACE))
        bisect.insort(self._blocks, block, key=lambda b: b.start)
        self._reserved = max(self._reserved, block.end)
        return [block.record()]

    def revoke_token(self, jti: str, slot: int, exp: int) -> None:
        """Revoke one token by its status slot; durable when this returns."""
        if not isinstance(jti, str) or not jti or type(slot) is not int or type(exp) is not int:
            raise ValueError("jti must be a non-empty string, slot and exp integers")
        with self._lock:
            if slot >= self._reserved and self._slots_end is not None:
                # Another node's block this node has not seen yet: the cluster's counter says.
                self._reserved = max(self._reserved, min(self._slots_end(), slot + 1))
            if not 0 <= slot < self._reserved:
                raise ValueError(f"slot {slot} was never allocated")
            self._append([{"op": "token", "jti": jti, "slot": slot, "exp": exp}])
            self._set_bit(slot, jti, exp)

    def revoke_task(self, task: str) -> int:
        """Every token of ``task`` dies (``RevocationIndex.revoke_task``); returns the cutoff, now."""
        return self._revoke_named("task", task)

    def revoke_agent(self, agent: str) -> int:
        """Every token held or delegated by ``agent`` issued at or before now dies; returns the cutoff."""
        return self._revoke_named("agent", agent)

    def revoke_key(self, kid: str) -> None:
        """Every token signed by ``kid`` dies."""
        self._revoke_named("key", kid)

    def ban_agent(self, agent: str) -> int:
        """Every token held or delegated by ``agent`` dies, and every later one too, until ``unban_agent``."""
        if not isinstance(agent, str) or not agent:
            raise ValueError("agent must be a non-empty string")
        with self._lock:
            at = int(self._clock())
            self._append([{"op": "ban", "name": agent, "at": at}])
            self._apply_ban(agent, at)
            return at

    def unban_agent(self, agent: str) -> int | None:
        """Lift ``agent``'s ban: its tokens issued before the unban stay dead. None if it was not banned."""
        with self._lock:
            if agent not in self._banned:
                return None
            at = int(self._clock())
            self._append([{"op": "unban", "name": agent, "at": at}])
            self._apply_unban(agent, at)
            return at

    def banned_agents(self) -> dict[str, int]:
        """Every agent banned, and when."""
        with self._lock:
            return dict(self._banned)

    def banned(self, agents: Any) -> str | None:
        """The first of ``agents`` that is banned, if any."""
        banned = self._banned  # read without the lock: a dict lookup is atomic
        return next((a for a in agents if a in banned), None)

    def _apply_ban(self, agent: str, at: int) -> None:
        self._banned[agent] = max(at, self._banned.get(agent, at))
        self._index.revoke_agent(agent, BANNED)

    def _apply_unban(self, agent: str, at: int) -> None:
        banned_at = self._banned.pop(agent, at)
        # Minting was refused from the ban on, so nothing issued since is legitimate: a token a mint
        # racing the ban signed (iat at most a second past the ban) stays dead; the unban's own second
        # is left to the new tokens.
        mirror = self._named["agent"]
        cutoff = mirror[agent] = max(banned_at, at - 1, mirror.get(agent, 0))
        lift = getattr(self._index, "lift_ban", None)
        if lift is not None:
            lift(agent, cutoff)
        else:
            lift_ban(self._index, agent, cutoff)

    def _revoke_named(self, op: str, name: str) -> int:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{op} must be a non-empty string")
        with self._lock:
            at = int(self._clock())
            self._append([{"op": op, "name": name, "at": at}])
            self._apply_named(op, name, at)
            return at

    def _apply_named(self, op: str, name: str, at: int) -> None:
        mirror = self._named[op]
        mirror[name] = max(at, mirror.get(name, at))
        if op == "key":
            self._index.revoke_key(name)
        else:
            getattr(self._index, f"revoke_{op}")(name, at)

    def _set_bit(self, slot: int, jti: str, exp: int) -> None:
        # A slot outside the window already tests as revoked; only the window has bits.
        if self._base <= slot < self._base + self._capacity:
            self._bits.set(slot)
            self._tokens[slot] = (jti, exp)
            self.revision += 1

    def slide(self) -> None:
        """Move the window past dead slots, forget cutoffs no live token can fall under, compact if big."""
        with self._lock:
            self._journal.check_open()
            now = self._clock()
            self._advance(now)
            if self._journal.size >= max(self._compact_bytes, 2 * self._journal.live_size):
                try:
                    self._compact(now)
                except OSError:
                    log.exception("%s: compaction failed; the old journal is intact", self.path)

    def compact(self) -> None:
        """Rewrite the journal with only live state: temp file, fsync, rename, fsync directory."""
        with self._lock:
            self._journal.check_open()
            now = self._clock()
            self._advance(now)
            self._compact(now)

    @property
    def next_slot(self) -> int:
        """Every slot below it may have been handed out: the next this node gives, or in a cluster the end
        of every block any node reserved (so every node's status list covers every node's tokens)."""
        return self._reserved if self._shared else self._next  # one int read, without the lock: it grows

    def stats(self) -> dict[str, int]:
        """Sizes of the revocation state, for status and metrics."""
        with self._lock:
            return {"revoked_tokens": self._bits.count(), "tasks": len(self._named["task"]),
                    "agents": len(self._named["agent"]), "keys": len(self._named["key"]),
                    "banned_agents": len(self._banned),
                    "journal_bytes": self._journal.size, "window_base": self._base, "next_slot": self._next,
                    "reserved": self._reserved, "capacity": self._capacity}

    def close(self) -> None:
        """Record the exact expiry of the block in progress, then release the journal."""
        with self._lock:
            if self._journal.closed:
                return
            try:
                if self._blocks and not self._blocks[-1].sealed and not self._journal.broken:
                    self._blocks[-1].sealed = True
                    self._append([self._blocks[-1].record()])
            finally:
                self._journal.close()

    def _advance(self, now: float) -> None:
        blocks = self._blocks
        # Only whole blocks, fully handed out (or, in cluster mode, reserved with their expiry bound:
        # sealed), whose every token is past exp + leeway.
        while blocks and (blocks[0].sealed or blocks[0].end <= self._next) \
                and blocks[0].exp + self._leeway < now:
            blocks.popleft()
        base = blocks[0].start if blocks else self._reserved
        self._holes = [h for h in self._holes if h[2] >= now and h[1] > self._base]
        base = min([base] + [h[0] for h in self._holes])
        if base > self._base:
            self._bits.advance(base)
            self._base = base
            self.revision += 1  # the published list changes with the window, not only with a bit
            self._tokens = {s: t for s, t in self._tokens.items() if s >= base}
        # A token issued at or before such a cutoff has expired (exp <= iat + max_lifetime);
        # a key is kept as long, so every token it signed before its revocation is dead. An ended task
        # one leeway longer: its entry takes the tokens of a mint that raced the end on a node whose
        # clock ran ahead (RevocationIndex.revoke_task), by up to the leeway any iat is allowed.
        horizon = now - self._max_lifetime - self._leeway
        stale = {op: [n for n, at in names.items() if at < horizon - (self._leeway if op == "task" else 0)]
                 for op, names in self._named.items()}
        for op, names in stale.items():
            for name in names:
                del self._named[op][name]
        # A ban outlives every cutoff: its index entry stays until the unban replaces it.
        stale["agent"] = [a for a in stale["agent"] if a not in self._banned]
        if stale["task"] or stale["agent"]:
            self._index.forget(stale["task"], stale["agent"])

    def snapshot(self) -> list[dict[str, Any]]:
        """Every live record, as compaction writes them (cluster mode re-publishes it to a new engine)."""
        with self._lock:
            return self._live_records(self._clock())

    def _compact(self, now: float) -> None:
        self._journal.rewrite(self._live_records(now))

    def _live_records(self, now: float) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = [{"op": "base", "base": self._base}]
        records += [b.record() for b in self._blocks]
        records += [{"op": "token", "jti": jti, "slot": slot, "exp": exp}
                    for slot, (jti, exp) in self._tokens.items() if exp + self._leeway >= now]
        records += [{"op": op, "name": name, "at": at}
                    for op, names in self._named.items() for name, at in names.items()]
        records += [{"op": "ban", "name": agent, "at": at} for agent, at in self._banned.items()]
        return records

    def _append(self, records: list[dict[str, Any]]) -> None:
        """Journal ``records``; in cluster mode publish them first: nothing is applied that the cluster
        did not take (ClusterUnavailable propagates before any local change)."""
        self._journal.check_open()
        if self._publish is not None:
            self._publish(records)
        self._journal.append(records)

    def _replay(self) -> None:
        blocks: dict[int, _Block] = {}
        tokens: dict[int, tuple[str, int]] = {}
        base = 0
        for lineno, r in enumerate(self._journal.records(), 1):
            if r["op"] in ("reserve", "seal"):
                block = blocks.setdefault(r["from"], _Block(r["from"], r["upto"]))
                if block.end != r["upto"]:
                    raise errors.StateError(f"{self.path}:{lineno}: slot block overlaps another")
                if r["op"] == "seal":
                    block.exp, block.sealed = max(block.exp, r["exp"]), True
            elif r["op"] == "base":
                base = max(base, r["base"])
            elif r["op"] == "token":
                tokens[r["slot"]] = (r["jti"], r["exp"])
            elif r["op"] == "ban":
                self._apply_ban(r["name"], r["at"])
            elif r["op"] == "unban":
                self._apply_unban(r["name"], r["at"])
            else:
                self._apply_named(r["op"], r["name"], r["at"])
        now = self._clock()
        # Blocks in progress at a crash: their tokens' expiries died with the process,
        # but none outlives now + max_lifetime + leeway (allocate_slot enforces it).
        unsealed = [b for b in blocks.values() if not b.sealed]
        for block in unsealed:
            block.exp, block.sealed = max(block.exp, int(now) + self._max_lifetime + self._leeway), True
        if unsealed:
            self._append([b.record() for b in unsealed])
        self._blocks = deque(sorted((b for b in blocks.values() if b.end > base), key=lambda b: b.start))
        self._reserved = self._next = self._limit = max([base] + [b.end for b in blocks.values()])
        self._base = self._blocks[0].start if self._blocks else self._next
        if self._shared:  # slots between known blocks may be another node's, published any moment now
            self._base, edge = base, base
            for block in self._blocks:
                if block.start > edge:
                    self._holes.append((edge, block.start, now + HOLE_GRACE))
                edge = max(edge, block.end)
        self._bits.advance(self._base)
        for slot, (jti, exp) in tokens.items():
            self._set_bit(slot, jti, exp)
        self._advance(now)
