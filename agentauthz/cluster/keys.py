"""Public keys shared by every node: each publishes its own to a hash, every node verifies with the union.

Private keys never leave their node. A node's keyring changes (rotation, retirement) are published at
once (the follower retries a failure) and announced on the revocation stream, so every node reloads the
union before any token signed by a new key can reach it (a next key is published a whole rotation
interval before it signs).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from typing import Callable

import redis

from ..errors import ClusterUnavailable
from .engine import Engine, unavailable

log = logging.getLogger("agentauthz.cluster")


class SharedKeys:
    """This node's keys and the other nodes', merged per audience into what its verifiers use."""

    def __init__(self, engine: Engine, adopt_keys: Callable[[str, dict[str, bytes]], None]) -> None:
        self._engine = engine
        self._adopt_keys = adopt_keys  # Authority.adopt_keys: the verifiers and every worker's
        self._local: dict[str, dict[str, bytes]] = {}  # audience -> kid -> raw, this node's
        self._remote: dict[str, dict[str, bytes]] = {}  # the other nodes'
        self._lock = threading.RLock()
        self.dirty = False  # a change not yet published
        self.joined = False  # publish only once the node has joined (the epoch is known)

    def local_changed(self, audience: str, keys: dict[str, bytes]) -> None:
        """Keyring subscriber: verify with the union at once; publish (the follower retries a failure)."""
        with self._lock:
            self._local[audience] = dict(keys)
            self._adopt(audience)
            self.dirty = True
        if self.joined:
            try:
                self.publish()
            except ClusterUnavailable as exc:
                log.warning("cannot publish this node's keys yet (retrying): %s", exc)

    def _adopt(self, audience: str) -> None:
        merged = {**self._remote.get(audience, {}), **self._local.get(audience, {})}
        self._adopt_keys(audience, merged)

    def publish(self) -> None:
        """This node's public keys into the keys hash (its retired ones out), then tell every node."""
        with self._lock:
            mine = {kid: (aud, raw) for aud, keys in self._local.items() for kid, raw in keys.items()}
            self.dirty = False
        client = self._engine.client
        try:
            stored = client.hgetall(self._engine.keys.public_keys)
            gone = [k for k, v in stored.items()
                    if json.loads(v).get("node") == self._engine.node and k.decode() not in mine]
            pipe = client.pipeline(transaction=True)
            for kid, (aud, raw) in mine.items():
                pipe.hset(self._engine.keys.public_keys, kid, json.dumps({
                    "aud": aud, "node": self._engine.node,
                    "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode()}))
            if gone:
                pipe.hdel(self._engine.keys.public_keys, *gone)
            pipe.execute()
        except redis.RedisError as exc:
            self.dirty = True
            raise unavailable(exc, "keys") from None
        self._engine.publish([{"op": "keys"}])

    def load(self) -> None:
        """The other nodes' public keys from the keys hash; verifiers verify with the union."""
        try:
            stored = self._engine.client.hgetall(self._engine.keys.public_keys)
        except redis.RedisError as exc:
            raise unavailable(exc, "keys") from None
        remote: dict[str, dict[str, bytes]] = {}
        for kid, raw in stored.items():
            doc = json.loads(raw)
            if doc.get("node") == self._engine.node:
                continue
            x = doc["x"]
            raw_key = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
            remote.setdefault(doc["aud"], {})[kid.decode()] = raw_key
        with self._lock:
            self._remote = remote
            for audience in set(remote) | set(self._local):
                self._adopt(audience)

    def remote(self, audience: str) -> dict[str, bytes]:
        with self._lock:
            return dict(self._remote.get(audience, {}))
