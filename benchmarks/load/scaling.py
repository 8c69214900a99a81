"""Worker scaling helpers: is ``serve --workers`` there, and how fast does a revocation reach every worker.

Propagation is measured from the moment Revoke (or EndTask) is acknowledged
to the moment every worker denies the token. Workers are told apart by the
decision id, whose first six characters are per process; each probe uses its
own connection (a local subchannel pool), so SO_REUSEPORT spreads the probes
over the workers. The figure that matters most is ``stale_allows``: Checks
allowed after the acknowledgement, which must be zero.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from .daemon import Daemon
from .loadgen import CHECK_PATH

PROBE_CHANNELS = 16
DEADLINE = 5.0  # seconds after the acknowledgement before we give up waiting for every worker


def workers_supported(root: Path) -> bool:
    out = subprocess.run([sys.executable, "-m", "agentauthz", "serve", "--help"], cwd=root,
                         capture_output=True, text=True, timeout=60).stdout
    return "--workers" in out


def _probes(address: str, count: int) -> list[Any]:
    options = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per channel
    return [grpc.insecure_channel(address, options=options).unary_unary(CHECK_PATH) for _ in range(count)]


def _ask(call: Any, body: bytes) -> tuple[bool, str]:
    from agentauthz.client import decision_from
    decision = decision_from(call(body, timeout=5))
    return decision.allowed, decision.decision_id[:6]


def propagation(daemon: Daemon, workers: int, kind: str, trial: int) -> dict[str, Any]:
    """Mint, make every worker allow it, revoke (``token`` or ``task``), time until every worker denies."""
    from agentauthz.client import check_request
    task = f"bench-revoke-{kind}-{trial}"
    minted = daemon.mint_response(task)
    body = check_request(minted.token, "demo", "reports", "read")
    calls = _probes(daemon.check_address, PROBE_CHANNELS)
    seen = {_ask(call, body)[1] for call in calls}
    before_allowed = all(_ask(call, body)[0] for call in calls)
    client = daemon.client()
    started = time.perf_counter()
    if kind == "token":
        client.revoke(token_id=minted.token_id)
    else:
        client.end_task(task)
    acked = time.perf_counter()
    denied_at: dict[str, float] = {}
    stale = probes = 0
    while time.perf_counter() - acked < DEADLINE and not seen <= set(denied_at):
        for call in calls:  # one sweep over every connection, hence every worker we saw
            allowed, worker = _ask(call, body)
            probes += 1
            if allowed:
                stale += 1
            else:
                denied_at.setdefault(worker, time.perf_counter() - acked)
    return {"kind": kind, "workers_configured": workers, "workers_seen": len(seen),
            "allowed_before": before_allowed, "revoke_call_ms": 1000 * (acked - started),
            "all_denied_after_ms": 1000 * max(denied_at.values()) if seen <= set(denied_at) else None,
            "stale_allows": stale, "probes_after_ack": probes}
