"""Budgets shared by every node: the single-node table's counters, kept in Redis, one atomic script per call.

``SharedBudgets.charge`` means exactly what ``authority/budgets.py``'s ``BudgetTable.charge`` means (a
count of calls per window that starts at the first counted call, a GCRA rate with a burst, all or
nothing over the keys of one call, an exhausted budget before a rate limit), with the arithmetic done
in Lua on the same IEEE doubles. Each key is one Redis string "kept calls tat" under the blake2b-128
digest of the budget key, as in the table, and the table's ledger per task's minting agent (at most
``AGENT_COUNTERS`` counters held) is a sorted set beside them. It is the only Check that touches
Redis, so it runs on its own client with a short timeout and no retries, and every failure denies
``budget_unavailable``: a budget that cannot be counted is not spent. So does a total for one window
after Redis lost data (a node recovered, ``Engine.mark_lost``): the calls it had counted are gone. A
call whose reply timed out may still be counted once Redis answers again: it was denied all the same
(spent, never allowed unspent).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from typing import Any, Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import reasons
from ..decision.constraints import AGENT_COUNTERS, Budget, agent_of
from .engine import Engine, sync_client, unavailable

log = logging.getLogger("agentauthz.budgets")  # the single-node table's logger: operators filter on it

TIMEOUT = 0.25  # the Check waits at most this long for Redis (connect or reply) before it denies
LOG_EVERY = 10.0  # seconds between two log lines about an unreachable engine (one per outage, not per call)
# Counters outlive their window and rate state by this much in Redis, so clock skew between the nodes
# (each passes its own ``now``) cannot expire a count another node still relies on.
KEEP_MARGIN_MS = 60_000

# KEYS: the epoch, when Redis last lost data (node.py's recovery), the owner's ledger (a sorted set of
# the counters it holds, scored by until when: the table's ledger), then one counter per charged key.
# ARGV: the epoch, now, the margin (ms), the ledger's limit, then for each key max_calls, rate, burst,
# window. Returns {0} (counted), {1} (exhausted), {2, wait}, {3}: a total within one window of a
# loss, whose earlier calls are no longer counted anywhere (the count is unknown: not spent), or {4}:
# the owner holds as many counters as one agent may.
# Floats go in as Python's repr and come back via %.17g: both round-trip a double exactly, so the
# result is bit for bit the table's (Lua's tostring would keep only 14 digits).
_CHARGE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('AGENTAUTHZ_EPOCH the cluster epoch changed: the engine lost its data')
end
local now = tonumber(ARGV[2])
local margin = tonumber(ARGV[3])
local lost = tonumber(redis.call('GET', KEYS[2]) or '-1')
local limit = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. string.format('%.17g', now))
local held = redis.call('ZCARD', KEYS[3])
local writes = {}
local exhausted, wait = false, 0
for i = 4, #KEYS do
  local a = 5 + (i - 4) * 4
  local max_calls, rate, burst, window = tonumber(ARGV[a]), tonumber(ARGV[a + 1]),
    tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  if max_calls > 0 and lost >= 0 and now < lost + window then return {3} end
  local kept, calls, tat = 0, 0, 0
  local raw = redis.call('GET', KEYS[i])
  if raw then
    local k, c, t = string.match(raw, '^(%S+) (%S+) (%S+)$')
    kept, calls, tat = tonumber(k), tonumber(c), tonumber(t)
    if kept < now then kept, calls = 0, 0 end  -- the window is over: the count starts again
  end
  if kept == 0 then kept = math.ceil(now) + window end
  if max_calls > 0 and calls >= max_calls then exhausted = true end
  if rate > 0 then
    local interval = 1.0 / rate
    if tat < now then tat = now end
    local late = tat - now - (burst - 1) * interval
    if late > 1e-6 and late > wait then wait = late end
    tat = tat + interval
  end
  local until_ = kept
  if tat > until_ then until_ = tat end
  -- Held in the owner's ledger until the counter may be reused (its window and rate state over).
  if not redis.call('ZSCORE', KEYS[3], KEYS[i]) then
    if held >= limit then return {4} end
    held = held + 1
  end
  writes[#writes + 1] = {KEYS[i], string.format('%.17g %.17g %.17g', kept, calls + 1, tat),
                         string.format('%.0f', math.ceil((until_ - now) * 1000) + margin),
                         math.max(kept, math.ceil(tat))}
end
if exhausted then return {1} end
if wait > 0 then return {2, string.format('%.17g', wait)} end
local last = 0
for _, w in ipairs(writes) do
  redis.call('SET', w[1], w[2], 'PX', w[3])
  redis.call('ZADD', KEYS[3], 'GT', w[4], w[1])
  if tonumber(w[3]) > last then last = tonumber(w[3]) end
end
if redis.call('PTTL', KEYS[3]) < last then redis.call('PEXPIRE', KEYS[3], last) end
return {0}
"""


def counter_key(prefix: str, key: str) -> str:
    """The Redis key of one budget key: the table's digest, so no agent-chosen text names a Redis key."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return prefix + digest


class SharedBudgets:
    """``BudgetTable``'s ``charge`` over Redis; never raises: an engine it cannot count on denies."""

    def __init__(self, engine: Engine, timeout: float = TIMEOUT) -> None:
        self._engine = engine
        self._timeout = timeout
        self._client: redis.Redis | None = None
        self._pid = -1
        self._lock = threading.Lock()
        self._script: Any = None
        self._logged_at = -LOG_EVERY

    def _connection(self) -> redis.Redis:
        # Made in the process that uses it: a pool inherited across the workers' fork would share sockets.
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                client = sync_client(self._engine.settings, self._timeout)
                # No retries: a retried script whose first reply was lost would count the call twice, and
                # redis-py's default (10 retries with backoff) would hold the Check for seconds.
                client.set_retry(Retry(NoBackoff(), 0))
                self._client, self._pid = client, os.getpid()
                self._script = client.register_script(_CHARGE)
            return self._client

    def charge(self, charges: Sequence[tuple[str, Budget]], now: float,
               owner: str | None = None) -> tuple[str, float]:
        """(ALLOW, 0) having counted one call under every key of ``charges``, each against its budget,
        or (reason, seconds to wait) counting none; (BUDGET_UNAVAILABLE, 0) when Redis cannot say.
        Every counter the call holds is in ``owner``'s ledger, as in ``BudgetTable.charge``."""
        if not charges:
            return reasons.ALLOW, 0.0
        prefix = self._engine.keys.budget
        ledger = counter_key(prefix + "agent:", owner if owner is not None else agent_of(charges[0][0]))
        keys = [self._engine.keys.epoch, self._engine.keys.lost_at, ledger]
        args: list[str | int] = [self._engine.epoch, repr(float(now)), KEEP_MARGIN_MS, AGENT_COUNTERS]
        for key, budget in charges:
            keys.append(counter_key(prefix, key))
            args += [budget.max_calls, repr(float(budget.rate)), budget.burst, budget.window]
        try:
            client = self._connection()
            answer = self._script(keys=keys, args=args, client=client)
        except (redis.RedisError, OSError) as exc:
            self._log(exc)
            return reasons.BUDGET_UNAVAILABLE, 0.0
        if answer[0] == 0:
            return reasons.ALLOW, 0.0
        if answer[0] == 1:
            return reasons.BUDGET_EXHAUSTED, 0.0
        if answer[0] == 3:
            return reasons.BUDGET_UNAVAILABLE, 0.0
        if answer[0] == 4:
            return reasons.BUDGET_AGENT_LIMIT, 0.0
        return reasons.RATE_LIMITED, float(answer[1])

    def _log(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY:  # racing threads may both log: harmless, and lock-free
            self._logged_at = now
            cause = unavailable(exc, "budget") if isinstance(exc, redis.RedisError) else exc
            log.error("budgeted calls denied budget_unavailable: %s", cause)

    def close(self) -> None:
        """Drop this process's connections (idempotent); the counts stay in Redis."""
        with self._lock:
            if self._client is not None and self._pid == os.getpid():
                self._client.close()
            self._client = None
