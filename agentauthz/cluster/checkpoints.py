"""Each node's signed audit checkpoints, copied to Redis: a node's log cut short shows from the cluster.

The audit writer signs a checkpoint (the seq and hash of the last durable record) into each log's
``checkpoints.jsonl``. The follower copies the newest of each log to the checkpoints stream about once a
second; ``agentauthz audit verify DIR --cluster URL`` then verifies the node's logs against those copies,
which whoever truncates or rewrites the node's files (checkpoints file included) cannot reach.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import redis

from ..audit.files import CHECKPOINTS
from ..audit.verify import VerifyReport, log_dirs, verify_dir
from .engine import Engine, Keys, sync_client, unavailable
from .settings import ClusterSettings

log = logging.getLogger("agentauthz.cluster")

KEEP = 100_000  # checkpoint copies kept in the stream (all nodes): about a day of one node's, per second


def newest_checkpoint(directory: Path) -> bytes | None:
    """The last whole line of ``directory``'s checkpoints file, if any."""
    try:
        with open(directory / CHECKPOINTS, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 4096))
            tail = f.read()
    except FileNotFoundError:
        return None
    lines = tail[:tail.rfind(b"\n") + 1].splitlines()
    return lines[-1] if lines else None


class CheckpointCopier:
    """Copies each log's newest checkpoint to the checkpoints stream when it changed."""

    def __init__(self, engine: Engine, audit_dir: Path) -> None:
        self._engine = engine
        self._audit_dir = audit_dir
        self._sent: dict[str, bytes] = {}

    def copy(self) -> int:
        """Publish what is new; the number of checkpoints published."""
        sent = 0
        for name, directory in log_dirs(self._audit_dir):
            line = newest_checkpoint(directory)
            if line is None or self._sent.get(name) == line:
                continue
            try:
                self._engine.client.xadd(self._engine.keys.checkpoints,
                                         {"n": self._engine.node, "log": name, "cp": line},
                                         maxlen=KEEP, approximate=True)
            except redis.RedisError as exc:
                raise unavailable(exc, "audit checkpoint") from None
            self._sent[name] = line
            sent += 1
        return sent


def published(settings: ClusterSettings, node: str) -> dict[str, list[bytes]]:
    """Every checkpoint copy ``node`` published, by log name, oldest first."""
    client = sync_client(settings)
    keys = Keys(settings.key_prefix)
    out: dict[str, list[bytes]] = {}
    last = "-"
    try:
        while True:
            entries = client.xrange(keys.checkpoints, min=last, count=10_000)
            if not entries:
                return out
            for _, fields in entries:
                if fields.get(b"n", b"").decode() == node:
                    out.setdefault(fields.get(b"log", b"").decode(), []).append(fields[b"cp"])
            last = "(" + entries[-1][0].decode()
    except redis.RedisError as exc:
        raise unavailable(exc, "audit checkpoints") from None


def verify_against_cluster(audit_dir: Path, public_key: bytes, settings: ClusterSettings,
                           node: str) -> list[tuple[str, VerifyReport]]:
    """Verify each of the node's logs against the checkpoints it published to the cluster.

    A log the cluster holds checkpoints of but that is missing here fails too (deleted whole).
    """
    copies = published(settings, node)
    reports: list[tuple[str, VerifyReport]] = []
    dirs = dict(log_dirs(audit_dir))
    for name in sorted(set(copies) | set(dirs)):
        directory = dirs.get(name)
        if directory is None:
            reports.append((name, VerifyReport(False, 0, 0, f"{name}: the cluster holds checkpoints of this "
                                               "log, but it is gone")))
            continue
        with tempfile.NamedTemporaryFile(suffix=".jsonl") as anchors:
            anchors.write(b"".join(line + b"\n" for line in copies.get(name, [])))
            anchors.flush()
            reports.append((name, verify_dir(directory, public_key, Path(anchors.name))))
    return reports


def node_of(state_dir: Path) -> str | None:
    """The node id a cluster state dir recorded when it joined (cluster.json), if any."""
    try:
        doc: Any = json.loads((state_dir / "cluster.json").read_bytes())
    except (OSError, ValueError):
        return None
    return doc.get("node") if isinstance(doc, dict) else None
