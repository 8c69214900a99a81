"""Cluster mode, the Authority's side: what cluster/node.py applies through it, and the wait a revocation
makes for every node.

A mixin of ``Authority``: it reads the Authority's revocation store, status list, keyrings, audit log and
cluster node.
"""

from __future__ import annotations

from typing import Any

from ..config import Config
from .token_ids import TokenIds


class ClusterFlow:
    config: Config
    revocations: Any  # state.revocation.RevocationStore
    status_list: Any  # state.statuslist.StatusListPublisher
    keyrings: dict[str, Any]
    audit: Any
    cluster: Any  # cluster.node.ClusterNode, or None on a single node
    token_ids: TokenIds
    standalone_token_id_key: bytes

    def adopt_token_id_key(self, key: bytes, retired: tuple[bytes, ...] = ()) -> None:
        """Every node's token ids carry the cluster's MAC, so an agent may revoke its token on any node;
        ``retired``, keys the cluster's replaced (cluster/node.py), still name who minted their ids."""
        self.token_ids = TokenIds(key, retired)

    def apply_cluster_records(self, journal: list[dict[str, Any]], minted: list[dict[str, Any]]) -> None:
        """Another node's changes, in stream order: revocations (and their status list marks), keys
        revoked (retired here too, should they be ours), tokens minted (for this node's status list)."""
        self.revocations.apply_remote(journal)
        for r in journal:
            if r["op"] == "task":
                self.status_list.task_ended(r["name"])
            elif r["op"] in ("agent", "ban"):
                self.status_list.agent_revoked(r["name"])
            elif r["op"] == "key":
                for ring in self.keyrings.values():
                    try:
                        ring.retire(r["name"])
                    except KeyError:
                        pass
        for m in minted:
            self.status_list.remember_minted(m["task"], m["subjects"], m["slot"], m["exp"], iat=m["iat"])

    def cluster_event(self, kind: str, **fields: Any) -> None:
        """Joins and recoveries are audited like every other change of what the daemon honours."""
        self.audit.record(kind, node=self.config.cluster.node_id if self.config.cluster else "", **fields)

    def _propagated(self) -> None:
        """In a cluster, answer a revocation once every live node applies it (cluster/node.py)."""
        if self.cluster is not None:
            self.cluster.await_applied()
