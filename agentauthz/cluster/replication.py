"""The one seam through which state changes reach every decider: revocations, keys and policy, replicated.

The primary writes each change through ``ReplicatedIndex`` (and the keyring and policy listeners
``Authority.replicate_to`` subscribes), which sends it over the fleet's channel; a worker applies it
with ``adopt_state`` and ``listen_for_changes`` and acknowledges it. Today the deciders are forked
Check workers (``serve.workers.Fleet`` carries the messages); remote replicas would plug in here.
"""

from __future__ import annotations

import logging
import threading
from multiprocessing.connection import Connection
from typing import Any, Callable, Protocol

log = logging.getLogger("agentauthz.workers")  # the name operators filter on, kept across the layout


class Fleet(Protocol):
    """What replication needs of the deciders it keeps in step (``serve.workers.Fleet``)."""

    def broadcast(self, message: tuple[Any, ...]) -> None: ...


class ReplicatedIndex:
    """What the RevocationStore writes through: the primary's index, then every worker's copy."""

    def __init__(self, index: Any, fleet: Fleet) -> None:
        self._index = index
        self._fleet = fleet
        self.bits = index.bits  # shared memory: no replication needed

    def _everywhere(self, name: str, *args: Any) -> None:
        from ..state.revocation import index_call
        index_call(self._index, name, args)
        self._fleet.broadcast(("index", name, args))

    def revoke_task(self, task: str, cutoff: int) -> None:
        self._everywhere("revoke_task", task, cutoff)

    def revoke_agent(self, agent: str, cutoff: int) -> None:
        self._everywhere("revoke_agent", agent, cutoff)

    def revoke_key(self, kid: str) -> None:
        self._everywhere("revoke_key", kid)

    def forget(self, tasks: list[str], agents: list[str]) -> None:
        self._everywhere("forget", list(tasks), list(agents))

    def lift_ban(self, agent: str, cutoff: int) -> None:
        self._everywhere("lift_ban", agent, cutoff)


def index_state(index: Any) -> dict[str, Any]:
    """The cutoffs a worker must hold (the bits are shared): task and agent cutoffs, revoked keys."""
    return {"tasks": dict(index.tasks), "agents": dict(index.agents), "kids": sorted(index.kids)}


def restore_index(index: Any, state: dict[str, Any]) -> None:
    """Make ``index`` hold exactly ``state``'s cutoffs (a forked copy may hold stale ones)."""
    index.forget(list(index.tasks), list(index.agents))
    for task, cutoff in state["tasks"].items():
        index.revoke_task(task, cutoff)
    for agent, cutoff in state["agents"].items():
        index.revoke_agent(agent, cutoff)
    for kid in state["kids"]:
        index.revoke_key(kid)


def adopt_state(conn: Connection, authority: Any) -> bool:
    """Worker side, before serving: wait for the primary's current state, apply it, acknowledge it."""
    try:
        message = conn.recv()
    except (EOFError, OSError):
        return False
    if message[0] != "state":
        return False
    return _apply(conn, authority, message)


def listen_for_changes(conn: Connection, authority: Any, on_stop: Callable[[], None]) -> threading.Thread:
    """Worker side: apply the primary's changes in a thread, acknowledging each once applied."""

    def run() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = ("stop",)  # the primary is gone: stop deciding
            if message[0] == "stop":
                on_stop()
                return
            _apply(conn, authority, message)

    thread = threading.Thread(target=run, name="agentauthz-worker-changes", daemon=True)
    thread.start()
    return thread


def _apply(conn: Connection, authority: Any, message: tuple[Any, ...]) -> bool:
    """Apply one change; acknowledge it, or say why not (the primary then replaces this worker)."""
    try:
        kind = message[0]
        if kind == "index":
            from ..state.revocation import index_call
            index_call(authority.index, message[1], message[2])
        elif kind == "keys":
            authority.verifiers[message[1]].set_keys(message[2])
        elif kind == "policy":
            _adopt_policy(authority, message[1], message[2])
        elif kind == "state":
            state = message[1]
            restore_index(authority.index, state["index"])
            for audience, keys in state["keys"].items():
                authority.verifiers[audience].set_keys(keys)
            _adopt_policy(authority, *state["policy"])
        else:
            raise ValueError(f"unknown change {kind!r}")
    except Exception as exc:  # never decide on a state half applied: the primary kills us
        log.exception("worker cannot apply %s", message[0])
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return False
    conn.send("ack")
    return True


def _adopt_policy(authority: Any, text: str, digest: str) -> None:
    """Compile the policy text the primary validated (never the file, which may have changed since)."""
    from ..decision.policy import Policy
    policy = Policy.from_text(text, str(authority.policy_path))
    if policy.digest != digest:
        raise ValueError(f"policy digest {policy.digest[:12]} is not the primary's {digest[:12]}")
    authority.policy_text = text
    authority.adopt_policy(policy)
