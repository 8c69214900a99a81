"""Human approval requests shared by every node: the file store's interface and rules, kept in Redis.

Every request is one field (its JSON) of a Redis hash; a sorted set holds when each is forgotten.
A mutation reads, decides (with the same functions as the file store, state/approval_records.py),
lets ``commit`` audit it, then writes, all under one cluster-wide lock: an audit record never claims
a change another node won the race for, and two humans deciding one request on two nodes see
exactly one decision go through (the other gets NotPending). The write itself is a Lua script that
checks the epoch and that the lock is still ours, so a node whose lease ran out (or a Redis that lost
its data) writes nothing. Approvals change at human speed, so one lock for all of them costs nothing.
Anything Redis did not take raises ClusterUnavailable: nothing is acknowledged that it does not hold.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import redis

from ..errors import ClusterUnavailable, StateError
from ..state.approval_records import Approval, _load_one, decided, forget_at, live_or_new
from .engine import Engine, unavailable

LEASE_MS = 5000  # a node that dies holding the lock holds it this long at most
LOCK_WAIT = 6.0  # seconds a mutation waits for the lock: past one lease, so a dead holder cannot block it
_POLL = 0.01

_EPOCH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('AGENTAUTHZ_EPOCH the cluster epoch changed: the engine lost its data')
end
"""

# KEYS: epoch, hash. ARGV: epoch, id ("" for every request).
_READ = _EPOCH + """
if ARGV[2] == '' then return redis.call('HGETALL', KEYS[2]) end
return redis.call('HGET', KEYS[2], ARGV[2])
"""

# KEYS: epoch, hash, forget set, lock. ARGV: epoch, lock token, now, count of requests to write, then
# (id, json, forget-at) for each, then the ids to drop. Requests past their forget time go too.
_WRITE = _EPOCH + """
if redis.call('GET', KEYS[4]) ~= ARGV[2] then
  return redis.error_reply('AGENTAUTHZ_LOCK the approvals lock lease ran out before the change was written')
end
local n = tonumber(ARGV[4])
for i = 0, n - 1 do
  redis.call('HSET', KEYS[2], ARGV[5 + 3 * i], ARGV[6 + 3 * i])
  redis.call('ZADD', KEYS[3], ARGV[7 + 3 * i], ARGV[5 + 3 * i])
end
for i = 5 + 3 * n, #ARGV do
  redis.call('HDEL', KEYS[2], ARGV[i])
  redis.call('ZREM', KEYS[3], ARGV[i])
end
local stale = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[3])
for _, id in ipairs(stale) do
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
end
return #stale
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

Commit = Callable[[Sequence[Approval]], None]


def _dump(a: Approval) -> str:
    return json.dumps(dataclasses.asdict(a), sort_keys=True, separators=(",", ":"))


def _load(raw: bytes) -> Approval:
    try:
        return _load_one(json.loads(raw))
    except ValueError as exc:  # only nodes write here: a record that does not parse is damage, not guessed at
        raise StateError(f"an approval request in Redis is unreadable: {exc}") from None


class SharedApprovals:
    """``ApprovalStore`` over Redis: thread-safe, every mutation atomic cluster-wide and audited first."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time) -> None:
        self._engine, self._clock = engine, clock
        self._lock = threading.Lock()  # threads of one node queue here rather than poll the Redis lock
        self._scripts: dict[str, Any] = {}
        keys = engine.keys
        self._hash, self._forget = keys.approvals, f"{keys.approvals}:forget"
        self._lease = f"{keys.approvals}:lock"

    def _run(self, name: str, text: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        client = self._engine.client
        if name not in self._scripts:
            self._scripts[name] = client.register_script(text)
        try:
            return self._scripts[name](keys=list(keys), args=list(args), client=client)
        except redis.ResponseError as exc:
            if str(exc).startswith("AGENTAUTHZ_LOCK"):
                why = str(exc).partition(" ")[2]
                raise ClusterUnavailable(f"approvals: {why}; not acknowledged") from None
            raise unavailable(exc, "approvals") from None
        except redis.RedisError as exc:
            raise unavailable(exc, "approvals") from None

    def _read(self, approval_id: str = "") -> Any:
        keys = (self._engine.keys.epoch, self._hash)
        return self._run("read", _READ, keys, (self._engine.epoch, approval_id))

    def _all(self) -> list[Approval]:
        raw = self._read()
        return [_load(raw[i + 1]) for i in range(0, len(raw), 2)]  # HGETALL: field, value, field, value...

    @contextmanager
    def _held(self) -> Iterator[str]:
        """The cluster-wide lock, held for one read-decide-audit-write; yields the token the write shows."""
        client, token, deadline = self._engine.client, secrets.token_hex(16), time.monotonic() + LOCK_WAIT
        while True:
            try:
                if client.set(self._lease, token, nx=True, px=LEASE_MS):
                    break
            except redis.RedisError as exc:
                raise unavailable(exc, "approvals lock") from None
            if time.monotonic() >= deadline:
                raise ClusterUnavailable(f"approvals: another node held the lock for {LOCK_WAIT} s")
            time.sleep(_POLL)
        try:
            yield token
        finally:
            try:
                self._run("release", _RELEASE, (self._lease,), (token,))
            except ClusterUnavailable:
                pass  # the lease lapses on its own; the change (or its refusal) is already decided

    def _write(self, token: str, changed: Sequence[Approval], dropped: Sequence[str]) -> None:
        args: list[Any] = [self._engine.epoch, token, repr(float(self._clock())), len(changed)]
        for a in changed:
            args += [a.id, _dump(a), forget_at(a)]
        args += list(dropped)
        self._run("write", _WRITE, (self._engine.keys.epoch, self._hash, self._forget, self._lease), args)

    def _apply(self, token: str, changed: Sequence[Approval], dropped: Sequence[str], commit: Commit) -> None:
        commit(changed)  # the audit record first: if it cannot be written, nothing changes
        self._write(token, changed, dropped)

    # -- the interface of authority/approvals.py ApprovalStore --------------------------------------------

    def get(self, approval_id: str) -> Approval | None:
        raw = self._read(approval_id) if approval_id else None  # "" would read every request
        return None if raw is None else _load(raw)

    def by_state(self, state: str) -> list[Approval]:
        """Requests in ``state`` (as of now), oldest first."""
        now = self._clock()
        return sorted((a for a in self._all() if a.state_at(now) == state),
                      key=lambda a: (a.created_at, a.id))

    def request(self, agent: str, task: str, intent: str, grants: list[dict[str, Any]], ttl: int,
                commit: Commit) -> tuple[Approval, bool]:
        """The live request for exactly these grants of this task, or a new pending one; (it, is_new)."""
        with self._lock, self._held() as token:
            now = int(self._clock())
            approval, new = live_or_new(self._all(), agent, task, intent, grants, ttl, now)
            if new:
                self._apply(token, [approval], [], commit)
            return approval, new

    def decide(self, approval_id: str, approve: bool, subject: str, issuer: str, comment: str, ttl: int,
               commit: Commit) -> Approval:
        """Approve (usable for ``ttl`` seconds from now) or reject a pending request."""
        with self._lock, self._held() as token:
            now = int(self._clock())
            current = self.get(approval_id)
            if current is None:
                raise KeyError(approval_id)
            done = decided(current, approve, subject, issuer, comment, ttl, now)
            self._apply(token, [done], [], commit)
            return done

    def drop(self, agent: str, task: str | None, commit: Commit) -> list[Approval]:
        """Forget ``agent``'s requests (of ``task`` only, if named): they never outlive what they were for."""
        with self._lock, self._held() as token:
            gone = [a for a in self._all() if a.agent == agent and task in (None, a.task)]
            if gone:
                self._apply(token, [], [a.id for a in gone], lambda _: commit(gone))
            return gone

    def drop_where(self, doomed: Callable[[Approval], bool]) -> list[Approval]:
        """Forget the requests ``doomed`` names (at start: tasks ended, agents revoked while we were down)."""
        with self._lock, self._held() as token:
            gone = [a for a in self._all() if doomed(a)]
            if gone:
                self._apply(token, [], [a.id for a in gone], lambda _: None)
            return gone
