"""One node of a cluster: join (replay the shared revocation stream before serving), follow it, share keys.

Every change a node makes is published (engine.py) before it is applied; every node applies every other
node's changes from the stream, in stream order, through the same Authority methods as its own (so its
forked workers get them through cluster/replication.py like any local change). The Check path never
waits on Redis: it only asks ``Freshness`` whether the follower has completed a read lately.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import redis

from .. import durable
from ..errors import ClusterUnavailable, StateError
from .checkpoints import CheckpointCopier
from .engine import Engine, async_client, sequence_number, unavailable
from .freshness import Freshness
from .keys import SharedKeys
from .settings import ClusterSettings

log = logging.getLogger("agentauthz.cluster")

STATE_FILE = "cluster.json"
TOKEN_ID_KEY = "cluster-token-id.key"
RETIRED_TOKEN_ID_KEYS = "cluster-token-id.retired"  # keys the cluster's replaced, 32 bytes each
JOURNAL_OPS = frozenset({"seal", "token", "task", "agent", "key", "ban", "unban", "base", "reserve"})
BATCH = 1000  # stream entries per read
STATUS_INTERVAL = 1.0  # seconds between this node's status writes (nodes hash, last id on disk)
TRIM_INTERVAL = 60.0


class StreamWentBack(StateError):
    """Redis holds fewer stream entries than this node applied, under the same epoch: it lost data."""


def stream_ms(entry_id: str) -> int:
    """The millisecond time Redis gave a stream entry id ``<ms>-<seq>``."""
    return int(entry_id.partition("-")[0] or 0)


def id_after(a: str, b: str) -> bool:
    ams, _, aseq = a.partition("-")
    bms, _, bseq = b.partition("-")
    return (int(ams), int(aseq or 0)) > (int(bms), int(bseq or 0))


class ClusterNode:
    """This daemon as one of a cluster; ``authority`` is the Authority it keeps in step (duck-typed)."""

    def __init__(self, settings: ClusterSettings, authority: Any, state_dir: Path, freshness: Freshness,
                 *, horizon: float) -> None:
        self.settings = settings
        self.engine = Engine(settings)
        self.keys = self.engine.keys
        self.freshness = freshness
        self._authority = authority
        self._state_path = state_dir / STATE_FILE
        self._token_id_path = state_dir / TOKEN_ID_KEY
        self._retired_path = state_dir / RETIRED_TOKEN_ID_KEYS
        self._horizon = horizon  # stream entries older than this can matter to no live token
        self.last_id = "0-0"
        self.applied = 0
        self.recoveries = 0
        self.joined = False
        self.public_keys = SharedKeys(self.engine, authority.adopt_keys)
        self._saved_id = ""
        self._recovering = False  # a recovery that failed part way is finished before anything else
        self._rereading = False  # reading the stream again from its start after a recovery (apply)
        self._retired_read_at = -1.0  # when reload_retired_token_id_keys last read Redis (monotonic)
        self._checkpoints = CheckpointCopier(self.engine, state_dir / "audit")
        self._published = "0-0"  # the newest entry this node published
        self._published_lock = threading.Lock()

    # -- joining -----------------------------------------------------------------

    def join(self) -> None:
        """Before serving: agree on the epoch, adopt the shared state, replay every entry not yet applied."""
        local = self._read_state()
        if local.get("node", self.settings.node_id) != self.settings.node_id:
            raise StateError(f"{self._state_path}: this state directory is node {local['node']!r}'s, "
                             f"not {self.settings.node_id!r}")
        known, current = local.get("epoch"), self.engine.current_epoch()
        recovered = False
        if known is None:  # a new node: found the cluster, or join the one there is
            self.engine.epoch = current or self.engine.found_epoch()
            self.last_id = "0-0"
            # A daemon that ran on its own before brings its revocations (the other nodes will trust its
            # keys) and its slots (no cluster token may be given one of them).
            republished = self._republish()
            self._authority.cluster_event("cluster_join", epoch=self.engine.epoch, founded=current is None,
                                          republished=republished)
        elif current == known and not self._stream_went_back(local.get("last_id", "0-0"),
                                                             local.get("seq", 0)):
            self.engine.epoch = known
            self.last_id = local.get("last_id", "0-0")
            self.engine.applied_seq = local.get("seq", 0)
        else:
            self._recover("the engine has no epoch or another one" if current != known
                          else "the revocation stream went back")
            recovered = True  # the recovery offered the token-id key and published this node's keys
        if not recovered:
            self.adopt_token_id_key()
        self._sync_bans()
        sent = time.monotonic()
        try:
            self.catch_up(skip_own=False)
        except StreamWentBack as exc:
            self._recover(str(exc))
            self.catch_up(skip_own=False)
        self._authority.revocations.join_cluster(self.publish, self.engine.reserve, self._slots_end)
        self._report_applied(self.engine.client)
        if not recovered:
            self.public_keys.publish()
        self.public_keys.load()
        self._write_state()
        self.joined = self.public_keys.joined = True
        self.freshness.heard(sent, self.settings.max_staleness)

    def _read_state(self) -> dict[str, Any]:
        try:
            raw = json.loads(self._state_path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StateError(f"{self._state_path}: unreadable ({exc}); refusing to guess the cluster "
                             "state") from None
        if not isinstance(raw, dict) or not all(isinstance(raw.get(k, ""), str)
                                                for k in ("epoch", "last_id", "node")) \
                or type(raw.get("seq", 0)) is not int:
            raise StateError(f"{self._state_path}: not a cluster state file")
        return raw

    def _write_state(self) -> None:
        if self._saved_id == self.last_id:
            return
        doc = {"node": self.settings.node_id, "epoch": self.engine.epoch, "last_id": self.last_id,
               "seq": self.engine.applied_seq}
        durable.replace(self._state_path, json.dumps(doc).encode())
        self._saved_id = self.last_id

    def _stream_went_back(self, last_id: str, seq: int) -> bool:
        """Whether Redis lost entries this node applied: its numbering is below ``seq`` (the number of
        the last one applied here), or its newest id is older than ``last_id``."""
        if self.engine.sequence() < seq:
            return True
        if last_id == "0-0":
            return False
        try:
            info = self.engine.client.xinfo_stream(self.keys.stream)
        except redis.ResponseError:
            return True  # no stream at all, yet this node applied entries of it
        except redis.RedisError as exc:
            raise unavailable(exc, "stream") from None
        newest = info["last-generated-id"]
        newest = newest.decode() if isinstance(newest, bytes) else str(newest)
        return id_after(last_id, newest)

    def publish(self, records: list[dict[str, Any]]) -> str:
        """Publish through the engine, remembering the newest entry for ``await_applied``."""
        entry = self.engine.publish(records)
        with self._published_lock:
            if id_after(entry, self._published):
                self._published = entry
        return entry

    def await_applied(self) -> bool:
        """Return once every live node has applied every entry this node published, or max_staleness
        after: by then a node that has not is denying revocation_stale. True if all had applied.

        A revoke is acknowledged only after this, so the very next Check on any node denies the token.
        A node counts as live while it reports its status (about once a second)."""
        target = self._published
        deadline = time.monotonic() + self.settings.max_staleness
        live = 3 * STATUS_INTERVAL + self.settings.max_staleness
        pause = 0.0005
        while True:
            try:
                pipe = self.engine.client.pipeline(transaction=False)
                pipe.hgetall(self.keys.nodes)
                pipe.hgetall(self.keys.applied)
                reports, applied = pipe.execute()
            except redis.RedisError:
                return False  # the revocation is in Redis; the staleness bound still holds
            now = time.time()
            waiting = [n for n, raw in reports.items() if n.decode() != self.settings.node_id
                       and now - json.loads(raw).get("heard_at", 0) < live
                       and id_after(target, applied.get(n, b"0-0").decode())]
            if not waiting:
                return True
            if time.monotonic() >= deadline:
                log.warning("nodes %s did not apply entry %s within max_staleness; they deny "
                            "revocation_stale until they do", sorted(n.decode() for n in waiting), target)
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def _report_applied(self, client: Any) -> Any:
        return client.hset(self.keys.applied, self.settings.node_id, self.last_id)

    def _slots_end(self) -> int:
        """Every slot below this may have been handed out by some node."""
        try:
            return int(self.engine.client.get(self.keys.slots) or 0)
        except redis.RedisError as exc:
            raise unavailable(exc, "slot counter") from None

    def adopt_token_id_key(self) -> None:
        """Token ids carry a MAC only the minting agent's node could check; in a cluster every node must.

        The cluster's key is the first one offered (SET NX). A key of this node's that the cluster's
        replaced (Redis lost it and another node offered its own first) is retired, not forgotten: kept
        here and in Redis for every node, so the ids it signed still name their agent to revoke them.
        """
        had = self._token_id_path.read_bytes() if self._token_id_path.exists() else None
        mine = had or os.urandom(32)
        client, keys = self.engine.client, self.keys
        try:
            client.set(keys.token_id_key, mine, nx=True)
            shared = client.get(keys.token_id_key)
            if had is not None and shared != had:
                client.sadd(keys.retired_token_id_keys, had)
            retired = client.smembers(keys.retired_token_id_keys)
        except redis.RedisError as exc:
            raise unavailable(exc, "token-id key") from None
        if not shared or len(shared) != 32:
            raise StateError("the cluster's token-id key in Redis is not 32 bytes")
        kept = self._retired_token_id_keys()
        if had is not None and shared != had and had not in kept:
            kept.append(had)
            durable.replace(self._retired_path, b"".join(kept), 0o600)
        if shared != had:
            durable.replace(self._token_id_path, shared, 0o600)
        self._adopt(shared, retired, kept)

    def _adopt(self, shared: bytes, *retired: Any) -> None:
        """Token ids under ``shared``, and under every ``retired`` key (Redis's set, this node's file)."""
        # This daemon's own key from before it joined, too: tokens it minted then are its agents' still.
        own = self._authority.standalone_token_id_key
        accepted = {k for keys in retired for k in keys if len(k) == 32 and k != shared}
        accepted |= {own} if own != shared else set()
        self._authority.adopt_token_id_key(shared, tuple(sorted(accepted)))

    def reload_retired_token_id_keys(self) -> None:
        """Re-read the keys other nodes retired (a revoke by id this node's keys refuse), at most once a
        second; with Redis unreachable, the keys held stand (the revoke is refused, and audited)."""
        now = time.monotonic()
        if now - self._retired_read_at < 1.0:
            return
        self._retired_read_at = now
        try:
            retired = self.engine.client.smembers(self.keys.retired_token_id_keys)
        except redis.RedisError as exc:
            log.warning("cannot re-read the retired token-id keys: %s", unavailable(exc, "token-id key"))
            return
        self._adopt(self._authority.token_ids.key, retired, self._retired_token_id_keys())

    def _retired_token_id_keys(self) -> list[bytes]:
        try:
            raw = self._retired_path.read_bytes()
        except FileNotFoundError:
            return []
        return [raw[at:at + 32] for at in range(0, len(raw) - len(raw) % 32, 32)]

    def _sync_bans(self) -> None:
        """Bans outlive the trimmed stream: the bans hash holds each agent's last ban or unban, written
        in stream order (an unban as a tombstone, "-at"). A ban here the hash lacks stays: only an unban
        lifts a ban, and a ban Redis lost is published again by the recovery that notices the loss."""
        try:
            raw = self.engine.client.hgetall(self.keys.bans)
        except redis.RedisError as exc:
            raise unavailable(exc, "bans") from None
        try:
            shared = {k.decode(): int(v) for k, v in raw.items()}
        except ValueError:
            raise StateError(f"the cluster's bans ({self.keys.bans}) hold a value that is no time") from None
        local = self._authority.revocations.banned_agents()
        records = [{"op": "ban", "name": a, "at": at} for a, at in shared.items()
                   if at >= 0 and a not in local]
        records += [{"op": "unban", "name": a, "at": -shared[a]} for a in local if shared.get(a, 0) < 0]
        if records:
            self._authority.apply_cluster_records(records, [])

    def catch_up(self, *, skip_own: bool) -> None:
        """Apply every entry after ``last_id`` (synchronously: joining, or recovering)."""
        while True:
            try:
                entries = self.engine.client.xrange(self.keys.stream, min=f"({self.last_id}", count=BATCH)
            except redis.RedisError as exc:
                raise unavailable(exc, "stream") from None
            if not entries:
                self._rereading = False
                return
            self.apply(entries, skip_own=skip_own)

    # -- applying ----------------------------------------------------------------

    def apply(self, entries: list[tuple[Any, dict[bytes, bytes]]], *, skip_own: bool) -> None:
        # skip_own: while following (not joining), this node's own minted records are known here already.
        """Apply stream entries in order; StateError (and nothing after it) for one this node cannot read."""
        journal: list[dict[str, Any]] = []
        minted: list[dict[str, Any]] = []
        keys_changed = False
        last = self.last_id
        seq = self.engine.applied_seq
        for entry_id, fields in entries:
            entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            node = fields.get(b"n", b"").decode()
            try:
                number = int(fields.get(b"s", 0))
            except ValueError:
                raise StateError(f"cluster stream entry {entry_id}: unreadable number") from None
            # Numbered again after a loss: the entries in between are gone. Not while the stream is read
            # again from its start after a recovery: it is taken as it is (the journals were re-published),
            # and numbers from before a counter Redis lost may run ahead of newer ones.
            if number and number <= seq and not self._rereading:
                raise StreamWentBack(f"the revocation stream went back: entry {entry_id} is number {number}"
                                     f", this node applied {seq}")
            seq = max(seq, number)
            try:
                records = json.loads(fields[b"r"])
                if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                    raise ValueError("not a list of records")
            except (KeyError, ValueError) as exc:
                raise StateError(f"cluster stream entry {entry_id}: unreadable ({exc})") from None
            # Our own changes were applied when published, but applied again all the same: a publish this
            # node saw fail (a timeout) may still have reached the stream, and every other node applies it.
            # Applying is idempotent; only the minted records of a live node are its status list's already.
            own = skip_own and node == self.settings.node_id
            for record in records:
                op = record.get("op")
                if op in JOURNAL_OPS:
                    journal.append(record)
                elif op == "minted":
                    if not own:
                        minted.append(record)
                elif op == "keys":
                    keys_changed = True
                elif op != "checkpoint":
                    # A kind of change this version does not know might be a revocation: never skip it.
                    raise StateError(f"cluster stream entry {entry_id}: unknown change {op!r} from "
                                     f"{node}; upgrade this node")
            last = entry_id
        self._authority.apply_cluster_records(journal, minted)
        if keys_changed:
            self.public_keys.load()
        self.last_id = last
        self.engine.applied_seq = seq
        self.applied += len(entries)

    # -- losing the engine ----------------------------------------------------------

    def _recover(self, reason: str) -> None:
        """Redis lost its data (or is another instance): found (or join) a new epoch and re-publish
        everything this node's journal holds, so that no acknowledged revocation is forgotten."""
        self.freshness.lose()
        self._recovering = True
        log.error("cluster engine lost its data (%s): re-publishing this node's revocations", reason)
        self.engine.epoch = self.engine.found_epoch()
        # New entries are numbered past every one this node applied (a counter Redis lost restarts at 0).
        self.engine.raise_sequence_floor(self.engine.applied_seq)
        # Budget counts went with the data: cluster/budgets.py denies what they counted for a window.
        self.engine.mark_lost(self._authority.clock())
        republished = self._republish()
        # The keys hash and the token-id key were lost too: without them the next "keys" entry (any node
        # joining or rotating) leaves every node unable to verify the others' tokens, and a new node
        # would found another token-id key. Every recovering node offers the same key (SET NX).
        self.adopt_token_id_key()
        self.public_keys.publish()
        # The stream is read again from its start, as it is (apply): numbering starts over with it.
        self.last_id = "0-0"
        self.engine.applied_seq = 0
        self._rereading = True
        self._saved_id = ""
        self._recovering = False
        self.recoveries += 1
        self._authority.cluster_event("cluster_recover", reason=reason, epoch=self.engine.epoch,
                                      republished=republished)

    def _republish(self) -> int:
        """Publish everything this node's journal holds (idempotent for every node that has it already)
        and raise the slot counter past every slot it knows was handed out; the records published."""
        store = self._authority.revocations
        self.engine.raise_slot_floor(store.stats()["reserved"])
        records = [r for r in store.snapshot() if r["op"] not in ("base", "reserve")]
        for at in range(0, len(records), 500):
            self.publish(records[at:at + 500])
        return len(records)

    # -- following ------------------------------------------------------------------

    async def follow(self, stopping: asyncio.Event) -> None:
        """Apply other nodes' changes as they come; keep ``freshness`` moving while reads complete."""
        max_staleness = self.settings.max_staleness
        block_ms = max(10, min(250, int(max_staleness * 250)))
        client = async_client(self.settings, timeout=block_ms / 1000 + max_staleness)
        next_status = next_trim = 0.0
        failing = False
        try:
            while not stopping.is_set():
                sent = time.monotonic()
                try:
                    epoch, seq = await client.mget(self.keys.epoch, self.keys.sequence)
                    if self._recovering or epoch is None or epoch.decode() != self.engine.epoch:
                        await asyncio.to_thread(self._recover, "the engine's epoch changed")
                        continue
                    if sequence_number(seq) < self.engine.applied_seq:  # no entry may come to show it
                        await asyncio.to_thread(self._recover, "the revocation stream went back")
                        continue
                    reply = await client.xread({self.keys.stream: self.last_id}, count=BATCH, block=block_ms)
                    entries = reply[0][1] if reply else []
                    if entries:
                        try:
                            await asyncio.to_thread(self.apply, entries, skip_own=True)
                        except StreamWentBack as exc:
                            await asyncio.to_thread(self._recover, str(exc))
                            continue
                        await self._report_applied(client)  # what a revoking node waits for
                    if len(entries) < BATCH:  # caught up as of ``sent``
                        self._rereading = False
                        self.freshness.heard(sent, max_staleness)
                    if sent >= next_status:
                        next_status = sent + STATUS_INTERVAL
                        await asyncio.to_thread(self._housekeep, sent >= next_trim)
                        next_trim = next_trim if sent < next_trim else sent + TRIM_INTERVAL
                    failing = False
                except (redis.RedisError, ClusterUnavailable, OSError) as exc:
                    if not failing:
                        log.warning("cluster stream unreachable (Checks deny revocation_stale after %.1f s "
                                    "without it): %s", max_staleness, exc)
                    failing = True
                    await asyncio.sleep(min(0.1, max_staleness / 4))
                except StateError:
                    log.exception("cannot apply the cluster stream; denying revocation_stale until fixed")
                    await asyncio.sleep(1.0)
        finally:
            await client.aclose()

    def _housekeep(self, trim: bool) -> None:
        """Publish this node's status (first: revoking nodes wait for the nodes that report it), persist
        the last applied id, publish dirty keys and new audit checkpoints; trim the stream."""
        status = {"last_id": self.last_id, "heard_at": time.time(), "pid": os.getpid(),
                  "stale": not self.freshness.fresh(), "applied": self.applied, "recoveries": self.recoveries,
                  "staleness": self.freshness.staleness(self.settings.max_staleness)}
        client = self.engine.client
        client.hset(self.keys.nodes, self.settings.node_id, json.dumps(status))
        self._write_state()
        if self.public_keys.dirty:
            self.public_keys.publish()
        self._checkpoints.copy()
        if trim:
            oldest = int((time.time() - self._horizon) * 1000)
            client.xtrim(self.keys.stream, minid=oldest, approximate=True)

    def status(self) -> dict[str, Any]:
        """This node's view, for /metrics."""
        return {"last_id": self.last_id, "fresh": self.freshness.fresh(), "applied": self.applied,
                "recoveries": self.recoveries,
                "staleness": self.freshness.staleness(self.settings.max_staleness),
                "last_applied_ms": stream_ms(self.last_id)}
