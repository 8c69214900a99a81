"""``agentauthz cluster status``: every node's view of the cluster as it last reported it to Redis."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from .engine import Keys, sync_client, unavailable
from .node import STATUS_INTERVAL, id_after, stream_ms
from .settings import ClusterSettings


def cluster_status(settings: ClusterSettings) -> dict[str, Any]:
    """The epoch, the stream's newest entry and, per node: last entry applied, lag behind the stream,
    seconds since it last reported, and whether it is denying revocation_stale."""
    keys = Keys(settings.key_prefix)
    client = sync_client(settings)
    try:
        epoch = client.get(keys.epoch)
        try:
            info = client.xinfo_stream(keys.stream)
            newest = _text(info["last-generated-id"])
            length = int(info["length"])
        except redis.ResponseError:  # no stream yet: nothing was ever published
            newest, length = "0-0", 0
        reports = {_text(k): json.loads(v) for k, v in client.hgetall(keys.nodes).items()}
        # Each node's lag as of its own report: how far its last applied entry was behind the newest entry
        # the stream held then (a node reports once a second; entries added since are no lag of its).
        newest_then = {name: client.xrevrange(keys.stream, max=int(float(r.get("heard_at", 0)) * 1000),
                                              count=1) for name, r in reports.items()}
    except redis.RedisError as exc:
        raise unavailable(exc, "cluster status") from None
    now = time.time()
    nodes = []
    for name, report in sorted(reports.items()):
        last = report.get("last_id", "0-0")
        silent = max(0.0, now - float(report.get("heard_at", 0)))
        then = _text(newest_then[name][0][0]) if newest_then[name] else "0-0"
        nodes.append({
            "node": name, "last_id": last,
            "lag_seconds": max(0, stream_ms(then) - stream_ms(last)) / 1000 if id_after(then, last) else 0.0,
            "reported_seconds_ago": round(silent, 3),
            # A node that stopped reporting is down or cut off: its own Checks deny revocation_stale.
            "state": "stale" if report.get("stale") else ("silent" if silent > 5 * STATUS_INTERVAL
                                                           else "fresh"),
            "staleness_seconds": round(float(report.get("staleness", 0.0)), 3),
            "entries_applied": report.get("applied", 0), "recoveries": report.get("recoveries", 0)})
    return {"epoch": _text(epoch) if epoch else None, "stream_last_id": newest, "stream_length": length,
            "nodes": nodes}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def render(status: dict[str, Any]) -> str:
    lines = [f"epoch {status['epoch'] or '(none: no node has joined, or Redis lost its data)'}  "
             f"stream {status['stream_last_id']} ({status['stream_length']} entries)"]
    lines.append(f"{'NODE':<20} {'STATE':<7} {'LAST APPLIED':<20} {'LAG s':>7} {'REPORTED s AGO':>15}")
    for n in status["nodes"]:
        lines.append(f"{n['node']:<20} {n['state']:<7} {n['last_id']:<20} {n['lag_seconds']:>7.3f} "
                     f"{n['reported_seconds_ago']:>15.1f}")
    return "\n".join(lines)
