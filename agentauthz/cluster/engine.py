"""The shared engine (Redis 7 / Valkey through redis-py): key names, epoch-guarded writes, connections.

Every write that other nodes rely on runs in a Lua script that first checks the cluster epoch: a Redis
restarted empty (or the wrong instance) has no epoch, so no node can hand out slots from a counter that
restarted at zero or append revocations to a stream the others no longer read. Nothing is acknowledged
that Redis did not take (and, with ``wait_replicas``, that its replicas did not take).
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
from typing import Any, Sequence

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import ClusterUnavailable, StateError
from .settings import ClusterSettings

EPOCH_LOST = "AGENTAUTHZ_EPOCH"

# Append one batch of journal records to the revocation stream, numbered: every entry carries the next
# sequence number, so a node that applied number N and reads one at or below N (or finds the counter
# below N) knows Redis came back with older data (a snapshot, an fsync that never ran, a replica that was
# behind) under the same epoch; a node that applied more than Redis holds cannot publish onto it either.
# Bans are kept in a hash too (the stream is trimmed, a ban lasts until an unban), an unban as a
# tombstone "-at": a ban missing from the hash is a ban Redis lost, not one lifted.
_PUBLISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('AGENTAUTHZ_EPOCH the cluster epoch changed: the engine lost its data')
end
if tonumber(redis.call('GET', KEYS[4]) or '0') < tonumber(ARGV[4]) then
  return redis.error_reply('AGENTAUTHZ_EPOCH the revocation stream went back: the engine lost entries')
end
for _, r in ipairs(cjson.decode(ARGV[3])) do
  if r['op'] == 'ban' then redis.call('HSET', KEYS[3], r['name'], r['at'])
  elseif r['op'] == 'unban' then redis.call('HSET', KEYS[3], r['name'], '-' .. r['at']) end
end
local seq = redis.call('INCR', KEYS[4])
return {redis.call('XADD', KEYS[2], '*', 'n', ARGV[2], 's', seq, 'r', ARGV[3]), seq}
"""

# Reserve the next block of revocation slots, unique cluster-wide; returns the block's end.
_RESERVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('AGENTAUTHZ_EPOCH the cluster epoch changed: the engine lost its data')
end
return redis.call('INCRBY', KEYS[2], ARGV[2])
"""

# Recovery: a counter (slots, the stream's numbers) must pass every value any node knows was used.
_RAISE_FLOOR = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('AGENTAUTHZ_EPOCH the cluster epoch changed: the engine lost its data')
end
local now = tonumber(redis.call('GET', KEYS[2]) or '0')
if now < tonumber(ARGV[2]) then redis.call('SET', KEYS[2], ARGV[2]) return tonumber(ARGV[2]) end
return now
"""


class Keys:
    """Every Redis key of one cluster, under its prefix."""

    def __init__(self, prefix: str) -> None:
        self.epoch = f"{prefix}:epoch"
        self.stream = f"{prefix}:revocations"
        self.slots = f"{prefix}:slots"
        self.bans = f"{prefix}:bans"  # agent -> banned at, or "-" unbanned at
        self.sequence = f"{prefix}:sequence"  # the last stream entry's number (_PUBLISH)
        self.lost_at = f"{prefix}:budgets-lost-at"  # when a node last recovered from lost data (budgets.py)
        self.public_keys = f"{prefix}:keys"
        self.nodes = f"{prefix}:nodes"
        self.applied = f"{prefix}:applied"  # node -> the last stream entry it applied
        self.checkpoints = f"{prefix}:audit-checkpoints"
        self.approvals = f"{prefix}:approvals"
        self.budget = f"{prefix}:budget:"
        self.token_id_key = f"{prefix}:token-id-key"
        self.retired_token_id_keys = f"{prefix}:token-id-keys-retired"  # a set (node.py)


def _connection_args(settings: ClusterSettings, timeout: float) -> dict[str, Any]:
    # No retries: a caller waits one timeout at most, and an answer lost in flight is reported as not
    # acknowledged (the change may still land, as with any timeout; applying it is idempotent).
    args: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                            "health_check_interval": 5}
    if settings.password is not None:
        args["password"] = settings.password
    if settings.tls_ca:
        args["ssl_ca_certs"] = settings.tls_ca
    return args


# Typed Any: redis-py's replies are bytes or str by a constructor flag its annotations cannot follow;
# every client here answers bytes.
def sync_client(settings: ClusterSettings, timeout: float = 2.0) -> Any:
    """A thread-safe (pooled) client for the Authority's writes, made in the process that uses it."""
    args = {**_connection_args(settings, timeout), "retry": Retry(NoBackoff(), 0)}
    if settings.sentinels:
        sentinel = redis.Sentinel(list(settings.sentinels), **args)
        return sentinel.master_for(settings.sentinel_master, **args)
    return redis.Redis.from_url(settings.redis, **args)


def async_client(settings: ClusterSettings, timeout: float) -> Any:
    """An asyncio client for the stream follower, on the daemon's event loop."""
    args = {**_connection_args(settings, timeout), "retry": AsyncRetry(NoBackoff(), 0)}
    if settings.sentinels:
        sentinel = redis.asyncio.Sentinel(list(settings.sentinels), **args)
        return sentinel.master_for(settings.sentinel_master, **args)
    return redis.asyncio.Redis.from_url(settings.redis, **args)


def sequence_number(raw: bytes | None) -> int:
    """The stream counter's value (``Keys.sequence``); StateError if it is no number."""
    try:
        return int(raw or 0)
    except ValueError:
        raise StateError(f"the cluster's stream counter holds {raw!r}, not a number") from None


class EpochLost(ClusterUnavailable):
    """The engine's epoch is not the one this node joined: Redis lost its data or is another instance."""


def unavailable(exc: Exception, what: str) -> ClusterUnavailable:
    """The error a caller sees when the engine did not take ``what``."""
    if isinstance(exc, redis.ResponseError) and str(exc).startswith(EPOCH_LOST):
        return EpochLost(f"{what}: the cluster engine lost its data; this node is recovering")
    return ClusterUnavailable(f"{what}: the cluster engine is unreachable ({type(exc).__name__}: {exc})")


class Engine:
    """The writes of one node, each atomic and epoch-guarded; raises ClusterUnavailable when not taken."""

    def __init__(self, settings: ClusterSettings, client: Any = None) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.node = settings.node_id
        # The epoch this node joined (node.py sets it), in a shared mapping made before the Check workers
        # fork: their budget scripts check the epoch the primary holds now, not the one at the fork.
        self._epoch = mmap.mmap(-1, mmap.PAGESIZE)
        self._client = client
        self._pid = os.getpid() if client is not None else -1
        self._scripts: dict[str, Any] = {}
        self.applied_seq = 0  # the number of the last stream entry this node applied (node.py; _PUBLISH)

    @property
    def epoch(self) -> str:
        raw = self._epoch[:64]
        return raw[:raw.find(b"\0")].decode() if b"\0" in raw else raw.decode()

    @epoch.setter
    def epoch(self, value: str) -> None:
        data = value.encode()
        if len(data) >= 64:
            raise ValueError("an epoch is at most 63 bytes")
        self._epoch[:64] = data.ljust(64, b"\0")

    @property
    def client(self) -> Any:
        # A pool made before a fork must not be used after it: each process makes its own.
        if self._client is None or self._pid != os.getpid():
            self._client = sync_client(self.settings)
            self._pid = os.getpid()
            self._scripts = {}
        if not self._scripts:
            self._scripts = {name: self._client.register_script(text)
                             for name, text in (("publish", _PUBLISH), ("reserve", _RESERVE),
                                                ("floor", _RAISE_FLOOR))}
        return self._client

    def _run(self, what: str, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        client = self.client
        try:
            return self._scripts[name](keys=list(keys), args=list(args), client=client)
        except redis.RedisError as exc:
            raise unavailable(exc, what) from None

    def publish(self, records: Sequence[dict[str, Any]]) -> str:
        """Append ``records`` to the revocation stream; the entry id, once Redis (and replicas) hold it.
        EpochLost if the stream's numbering is below ``applied_seq``, the last number this node applied."""
        body = json.dumps(list(records), separators=(",", ":"), allow_nan=False)
        k = self.keys
        entry, _ = self._run("revocation", "publish", (k.epoch, k.stream, k.bans, k.sequence),
                             (self.epoch, self.node, body, self.applied_seq))
        self._wait("revocation")
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    def sequence(self) -> int:
        """The number of the stream's last entry (0: none yet)."""
        try:
            raw = self.client.get(self.keys.sequence)
        except redis.RedisError as exc:
            raise unavailable(exc, "stream sequence") from None
        return sequence_number(raw)

    def raise_sequence_floor(self, floor: int) -> int:
        """Number the next entries past ``floor`` (a recovery: the counter may have been lost)."""
        keys = (self.keys.epoch, self.keys.sequence)
        return int(self._run("stream sequence", "floor", keys, (self.epoch, floor)))

    def mark_lost(self, at: float) -> None:
        """Budgets counted before ``at`` may be gone (a recovery): cluster/budgets.py denies them a window."""
        try:
            self.client.set(self.keys.lost_at, repr(float(at)))
        except redis.RedisError as exc:
            raise unavailable(exc, "budgets") from None

    def reserve(self, count: int) -> int:
        """Reserve ``count`` slots cluster-wide; returns the end of the block."""
        keys = (self.keys.epoch, self.keys.slots)
        return int(self._run("slot block", "reserve", keys, (self.epoch, count)))

    def raise_slot_floor(self, floor: int) -> int:
        return int(self._run("slot floor", "floor", (self.keys.epoch, self.keys.slots), (self.epoch, floor)))

    def _wait(self, what: str) -> None:
        wanted = self.settings.wait_replicas
        if not wanted:
            return
        try:
            got = int(self.client.execute_command("WAIT", wanted, int(self.settings.wait_timeout * 1000)))
        except redis.RedisError as exc:
            raise unavailable(exc, what) from None
        if got < wanted:
            raise ClusterUnavailable(f"{what}: {got} of {wanted} Redis replicas confirmed it within "
                                     f"{self.settings.wait_timeout} s; not acknowledged")

    # -- epoch ------------------------------------------------------------------

    def current_epoch(self) -> str | None:
        try:
            raw = self.client.get(self.keys.epoch)
        except redis.RedisError as exc:
            raise unavailable(exc, "epoch") from None
        return None if raw is None else raw.decode()

    def found_epoch(self) -> str:
        """Start a new epoch if Redis has none (SET NX: one founder however many nodes race); the epoch."""
        try:
            self.client.set(self.keys.epoch, secrets.token_hex(16), nx=True)
            raw = self.client.get(self.keys.epoch)
        except redis.RedisError as exc:
            raise unavailable(exc, "epoch") from None
        if raw is None:
            raise ClusterUnavailable("epoch: Redis did not keep the epoch it was given")
        return raw.decode()
