"""The daemon's state and its operations: mint, revoke, end task; transports stay thin around it.

Assembles the keyring, revocation store, policy, verifier and audit log from
one ``Config`` and keeps them consistent: key changes reach the verifier,
a policy reload swaps atomically, every operation is audited.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import mmap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .. import reasons
from ..audit import files as audit_files
from ..audit.metrics import Operations
from ..audit.records import thumbprint
from ..audit.writer import AuditLog
from ..cluster.freshness import Freshness
from ..config import Config
from ..decision import _accel, tokens
from ..decision.policy import DEV_POLICY, Policy, read_text
from ..decision.tokens import APPROVED_FIELDS, task_key
from ..errors import AuditUnavailable, PolicyError
from ..state import statuslist
from ..state.clock import steady_clock
from ..state.keys import Keyring
from ..state.revocation import BLOCK_USE, HOLE_GRACE, RevocationStore
from .approval_flow import ApprovalFlow
from .approvals import ApprovalStore
from .budgets import BudgetTable
from .cluster_flow import ClusterFlow
from .delegation import DelegationFlow
from .outcomes import NEEDS_APPROVAL, NOT_PERMITTED, NOTHING_GRANTED, UNKNOWN_TOKEN_ID, Minted, Refused
from .token_ids import TokenIds

log = logging.getLogger("agentauthz.authority")  # the name operators filter on, kept across the layout

STATUS_PATH = "/status-list"
AUDIT_KEY_PATH = "/.well-known/agentauthz-audit-key"


def open_audit(config: Config, directory: Path, key: Ed25519PrivateKey,
               clock: Callable[[], float] = time.time) -> AuditLog:
    """An audit log as configured (the daemon's, or a worker's own); ``key`` signs its checkpoints."""
    return AuditLog.open(directory, key=key, flush_interval=config.audit_flush_interval,
                         batch_size=config.audit_batch_size, queue_max=config.audit_queue_max, clock=clock)


def check_task_name(task: str) -> None:
    """Refuse (request_invalid) a task name no token can carry. It reaches the upstream as
    x-agentauthz-task: no control or format characters either."""
    if not task or len(task) > 256 or any(c.isspace() for c in task) or not task.isprintable():
        raise Refused(reasons.REQUEST_INVALID, "task must be 1-256 printable characters without spaces")


def keys_dir(state: Path, config: Config, audience: str) -> Path:
    """The default boundary keeps ``keys/`` (as before boundaries); every other one ``keys-NAME/``."""
    return state / "keys" if audience == config.audiences[0] else state / f"keys-{audience}"


class Authority(DelegationFlow, ApprovalFlow, ClusterFlow):
    """Everything the daemon decides with, loaded and validated before any listener opens."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        # Everything below reads this one clock, which never runs backwards (clock.py): a wall clock
        # stepped back must not revive an expired token nor refuse a live one.
        self.clock = clock = steady_clock(clock)
        self.operations = Operations()  # what _audit recorded, for /metrics
        state = config.state_dir
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.policy_path = Path(config.policy_file) if config.policy_file else DEV_POLICY
        # The text too: workers are sent exactly what was validated here, never the file (cluster/).
        self.policy_text = read_text(self.policy_path)
        self.policy = Policy.from_text(self.policy_text, str(self.policy_path))
        # One keyring per trust boundary (audience): a key that leaks from one boundary cannot mint
        # for another, because each boundary's verifier knows only its own keys.
        self.keyrings = {aud: Keyring.open(keys_dir(state, config, aud),
                                           rotation_interval=config.rotation_interval,
                                           max_token_lifetime=config.max_token_lifetime,
                                           leeway=config.leeway, clock=clock)
                         for aud in config.audiences}
        self.keyring = self.keyrings[config.audiences[0]]  # the default boundary's
        # An anonymous shared mapping: worker processes forked later see every bit as it is set.
        bits_buffer = mmap.mmap(-1, _accel.bitset_buffer_size(config.revocation_capacity))
        self.revocation_bits_bytes = len(bits_buffer)  # for /metrics: the memory the bits take
        self.index = _accel.RevocationIndex(_accel.Bitset(config.revocation_capacity, bits_buffer))
        self.revocations = RevocationStore.open(state / "revocations", self.index,
                                                max_lifetime=config.max_token_lifetime,
                                                leeway=config.leeway, clock=clock,
                                                shared=config.cluster is not None)
        self.token_ids = TokenIds.open(state / "token-id.key")
        self.standalone_token_id_key = self.token_ids.key  # a cluster's replaces it (cluster/node.py)
        self.verifiers = {aud: _accel.Verifier(
            issuer=config.issuer, audiences=frozenset({aud}), token_type=config.token_type,
            revocations=self.index, leeway=config.leeway, max_lifetime=config.max_token_lifetime,
            max_token_bytes=config.max_token_bytes, cache_size=config.verified_cache_size)
            for aud in config.audiences}
        self.verifier = self.verifiers[config.audiences[0]]
        # What each boundary's verifiers verify with: its keyring's keys, and in a cluster every node's.
        self._adopted_keys: dict[str, dict[str, bytes]] = {}
        self._key_listeners: list[Callable[[str, dict[str, bytes]], None]] = []
        # Made before the workers fork: they read it on every Check (cluster mode only).
        self.freshness: Freshness | None = None
        self.cluster = None
        if config.cluster is not None:
            from ..cluster.node import ClusterNode
            self.freshness = Freshness()
            # Stream entries older than this matter to no live token (nor to a block that may hold one;
            # an ended task's entry, a leeway longer: RevocationIndex.revoke_task).
            self.cluster = ClusterNode(config.cluster, self, state, self.freshness, horizon=(
                config.max_token_lifetime + 2 * config.leeway + BLOCK_USE + HOLE_GRACE))
        # Shared with the Check workers forked later, like the revocation bits (budgets.py); in a cluster,
        # counted in Redis by every node (the one Check that leaves the process: a budgeted one).
        if self.cluster is None:
            self.budgets: Any = BudgetTable.open(state / "budgets", config.budget_capacity)
        else:
            from ..cluster.budgets import SharedBudgets
            self.budgets = SharedBudgets(self.cluster.engine)
        for aud, verifier in self.verifiers.items():
            verifier.set_policy(self.policy)
            self.keyrings[aud].subscribe(functools.partial(
                self.adopt_keys if self.cluster is None else self.cluster.public_keys.local_changed, aud))
        # Outside the audit directory: whoever can write the log must not be able to re-sign it.
        self.audit_key, created = audit_files.open_key(state / audit_files.KEY_DIR, state / "audit")
        self._announce_audit_key(state / audit_files.KEY_DIR / audit_files.PINNED_FILE, created)
        self.audit = open_audit(config, state / "audit", self.audit_key, clock)
        if self.cluster is None:
            self.approvals: Any = ApprovalStore.open(state / "approvals.json", clock)
            # A crash between ending a task (or revoking an agent) and dropping its approvals leaves them
            # on disk; the durable revocations say which ones are dead.
            self.approvals.drop_where(self._approval_dropped)
        else:  # in Redis: a human approves on any node, the agent mints under it on any other
            from ..cluster.approvals import SharedApprovals
            self.approvals = SharedApprovals(self.cluster.engine, clock)
        self._policy_lock = threading.Lock()
        self._policy_listeners: list[Callable[[], None]] = []
        # GET /status-list: the bits as a signed Token Status List, plus ended tasks and revoked agents;
        # /status-list/<boundary> the same, signed by that boundary's key, for its tokens.
        base = f"http://{config.http_listen}{STATUS_PATH}"
        self.status_list = statuslist.StatusListPublisher(
            bits_buffer, capacity=config.revocation_capacity, store=self.revocations, index=self.index,
            lists={aud: (ring, base if ring is self.keyring else f"{base}/{aud}")
                   for aud, ring in self.keyrings.items()},
            issuer=config.issuer, leeway=config.leeway, clock=clock)

    # -- lifecycle -----------------------------------------------------------

    def start(self, worker_logs: Sequence[str] = ()) -> None:
        """Start the audit writer and record the start; ``worker_logs``: the logs the Check workers
        started (and wrote a first record in) so far, which `audit verify` then requires."""
        self.audit.start()
        self.audit.record("start", policy_digest=self.policy.digest,
                          keys=sorted(self.verification_keys()), worker_logs=list(worker_logs))

    def stop(self) -> None:
        self.audit.record("stop")
        self.audit.stop()
        self.revocations.close()
        self.budgets.close()

    def reload_policy(self) -> bool:
        """Load the policy file again; a bad file keeps the old policy and says why."""
        with self._policy_lock:
            try:
                text = read_text(self.policy_path)
                policy = Policy.from_text(text, str(self.policy_path))
            except PolicyError as exc:
                log.error("policy reload refused, keeping %s: %s", self.policy.digest[:12], exc)
                self.audit.record("policy_reload", decision=False, reason=str(exc))
                return False
            self.policy_text = text
            self.adopt_policy(policy)
            for listener in self._policy_listeners:
                listener()
        log.info("policy reloaded: %s (%d rules)", policy.digest[:12], policy.rule_count)
        self.audit.record("policy_reload", decision=True, policy_digest=policy.digest)
        return True

    def adopt_policy(self, policy: Policy) -> None:
        """Decide under ``policy`` from the next Check on (and read its request defaults)."""
        self.policy = policy
        for verifier in self.verifiers.values():
            verifier.set_policy(policy)

    def audit_key_document(self) -> dict[str, Any]:
        """The checkpoint key as a public JWK (RFC 8037) for operators to pin; served at AUDIT_KEY_PATH."""
        raw = self.audit_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": tokens.b64url(raw), "alg": "EdDSA", "use": "sig",
                "kid": thumbprint(self.audit_key.public_key()), "agentauthz_use": "audit-checkpoints"}

    def _announce_audit_key(self, pinned: Path, created: bool) -> None:
        doc = self.audit_key_document()
        if created:  # the one moment the operator should copy it somewhere the log's writers cannot reach
            log.warning("audit: new checkpoint signing key %s; pin its public key %s (kept in %s, served "
                        "at http://%s%s); verify with `agentauthz audit verify DIR --key=%s`", doc["kid"],
                        doc["x"], pinned, self.config.http_listen, AUDIT_KEY_PATH, doc["x"])
        else:
            log.info("audit: checkpoints signed by %s (public key %s, pinned copy %s)", doc["kid"], doc["x"],
                     pinned)

    def verification_keys(self) -> dict[str, bytes]:
        """Every boundary's published keys, kid -> raw Ed25519 public key (kids are thumbprints)."""
        return {kid: key for ring in self.keyrings.values() for kid, key in ring.verification_keys().items()}

    def jwks(self) -> dict[str, Any]:
        """One JWK Set for every boundary (in a cluster, every node's keys); each key names its boundary
        in ``agentauthz_boundary``."""
        keys = []
        for aud, ring in self.keyrings.items():
            keys += [{**jwk, "agentauthz_boundary": aud} for jwk in ring.jwks()["keys"]]
            if self.cluster is not None:
                keys += [{"kty": "OKP", "crv": "Ed25519", "x": tokens.b64url(raw), "kid": kid, "use": "sig",
                          "alg": tokens.ALGORITHM, "agentauthz_boundary": aud}
                         for kid, raw in sorted(self.cluster.public_keys.remote(aud).items())]
        return {"keys": keys}

    def adopt_keys(self, audience: str, keys: dict[str, bytes]) -> None:
        """Verify ``audience``'s tokens with ``keys`` from now on, here and in every worker."""
        self._adopted_keys[audience] = dict(keys)
        self.verifiers[audience].set_keys(dict(keys))
        for listener in self._key_listeners:
            listener(audience, dict(keys))

    def replicate_to(self, fleet: Any) -> None:
        """Keep forked Check workers (a ``workers.Fleet``) in step through the ``cluster`` seam: revocations,
        keys and the validated policy text reach them before any ack, and a restarted worker starts from the
        latest of each."""
        from ..cluster.replication import ReplicatedIndex
        self.revocations.replicate(ReplicatedIndex(self.index, fleet))
        for aud, keys in self._adopted_keys.items():
            fleet.set_keys(aud, keys)
        self._key_listeners.append(fleet.set_keys)
        fleet.set_policy(self.policy_text, self.policy.digest)
        self._policy_listeners.append(lambda: fleet.set_policy(self.policy_text, self.policy.digest))

    def _audit(self, kind: str, **fields: Any) -> None:
        if not self.audit.record(kind, **fields):
            raise AuditUnavailable("the audit log cannot record this operation")
        self.operations.count(kind, fields)

    # -- mint ----------------------------------------------------------------

    def _issue(self, agent: str, task: str, audience: str, grants: list[dict[str, Any]], *, now: int,
               ttl: int, intent: str, owner: str, cnf: Mapping[str, Any] | None = None,
               act: Mapping[str, Any] | None = None,
               extra: Mapping[str, Any] | None = None) -> tuple[str, str, int, str]:
        """Slot, id and signature of one new token, for mint and delegate: (token, token id, exp, kid).

        ``owner`` is the agent whose id MAC the token id carries: the one that may revoke it by id.
        """
        exp = now + ttl
        # Checked again here, after ``now``: a ban that lands before this cannot be raced by a mint or
        # delegation in flight, and one that lands after has a cutoff at or past ``now``.
        banned = self.revocations.banned(statuslist.chain(agent, act))
        if banned:
            raise Refused(reasons.AGENT_BANNED, f"{banned} is banned until an admin lifts the ban")
        slot = self.revocations.allocate_slot(exp)
        token_id = self.token_ids.make(slot, exp, owner)
        keyring = self.keyrings[audience]
        kid, _ = keyring.signer()
        claims = tokens.build_claims(
            issuer=self.config.issuer, audience=audience, subject=agent, task=task, grants=grants,
            issued_at=now, ttl=ttl, slot=slot, status_uri=self.status_list.uri(audience), intent=intent,
            token_id=token_id, act=act, cnf=cnf, extra=extra)
        subjects = statuslist.chain(agent, act)
        if self.cluster is not None:  # every node's status list marks it when its task or agent is revoked
            self.cluster.engine.publish([{"op": "minted", "task": task_key(subjects[-1], task),
                                          "subjects": subjects, "slot": slot, "exp": exp, "iat": now}])
        self.status_list.remember_minted(task_key(subjects[-1], task), subjects, slot, exp, iat=now)
        return keyring.sign(claims), token_id, exp, kid

    def mint(self, agent: str, task: str, grants: Sequence[Mapping[str, Any]], *, intent: str = "",
             ttl: int = 0, audience: str = "", cnf: Mapping[str, Any] | None = None,
             not_after: int | None = None, approval_id: str = "") -> Minted:
        """A token for ``agent``'s ``task``: the requested grants as narrowed by policy.

        Grants the policy gates behind a human mint nothing until approved: the answer is the
        pending request instead. With ``approval_id`` (approved, same agent and task, the gated
        grants inside the approved ones) they are granted, and the token expires with the approval.
        """
        self._refuse_banned("mint", agent, agent=agent, task=task, intent=intent, requested=list(grants))
        check_task_name(task)
        if len(intent) > tokens.MAX_INTENT_CHARS:
            raise Refused(reasons.REQUEST_INVALID, "intent is too long")
        audience = audience or self.config.audiences[0]
        if audience not in self.config.audiences:
            raise Refused(reasons.TOKEN_AUDIENCE, f"audience {audience!r} is not served here")
        if task_key(agent, task) in self.index.tasks:
            raise Refused(reasons.TASK_ENDED, "this task has ended; start a new one")
        if ttl < 0:
            raise Refused(reasons.REQUEST_INVALID, "ttl must not be negative")
        for g in grants:  # policy.narrow would deny it as malformed: say why instead, and mint nothing
            if isinstance(g, Mapping) and isinstance(g.get("ops"), (list, tuple)) and "*" in g["ops"]:
                raise Refused(reasons.REQUEST_INVALID, f"grant {g.get('tool')}:{g.get('target')}: '*' is "
                              "no operation: a token names the operations it carries (an MCP session: "
                              "session,tools/list); '*' belongs in policy rules")
        narrowed = self.policy.narrow(agent, list(grants), ttl or self.config.max_token_lifetime)
        approval = None
        if narrowed.needs_approval and not approval_id:
            return self._request_approval(agent, task, intent, narrowed)
        approved: list[dict[str, Any]] = []
        if approval_id:
            approval = self._usable_approval(agent, task, approval_id, narrowed.needs_approval, grants)
            # What the human approved, and all the approval stands for in the token (tokens.approval_covers):
            # a grant the policy gates only later (a reload) asks a human again. Nothing gated: none carried.
            approved = [{k: g[k] for k in APPROVED_FIELDS} for g in narrowed.needs_approval]
            approval = approval if approved else None
            # The gated rules' own TTL caps count too, not only the ungated ones narrow() used.
            gated_ttl = self.policy.narrow(agent, narrowed.needs_approval, narrowed.ttl).ttl or narrowed.ttl
            narrowed = dataclasses.replace(narrowed, granted=narrowed.granted + narrowed.needs_approval,
                                           needs_approval=[], ttl=min(narrowed.ttl, gated_ttl))
        if not narrowed.granted:
            reason = NEEDS_APPROVAL if narrowed.needs_approval else NOTHING_GRANTED
            self._audit("mint", decision=False, reason=reason, agent=agent, task=task, intent=intent,
                        requested=list(grants))
            if narrowed.needs_approval:
                raise Refused(reason, "policy allows none of the requested grants without a human approval")
            # Name what the policy does give this agent for those tools: an unknown operation (a typo)
            # would otherwise look the same as a forbidden one.
            tools = [str(g.get("tool")) for g in grants if isinstance(g, dict)]
            raise Refused(reason, "policy allows none of the requested grants (it gives this agent "
                          f"{self.policy.offered(agent, tools) or 'nothing'})")
        now = int(self.clock())
        ttl = min(narrowed.ttl, self.config.max_token_lifetime, self.policy.boundary(audience).max_ttl)
        if not_after is not None:
            ttl = min(ttl, not_after - now)
            if ttl <= 0:
                raise Refused(reasons.IDENTITY_INVALID, "the caller's identity document (certificate or "
                              "JWT-SVID) has expired")
        if approval is not None:  # a token never outlives the human's approval it carries
            ttl = min(ttl, approval.expires_at - now)
            if ttl <= 0:
                raise Refused(reasons.APPROVAL_EXPIRED, "the approval has expired")
        token, token_id, exp, kid = self._issue(
            agent, task, audience, narrowed.granted, now=now, ttl=ttl, intent=intent, owner=agent, cnf=cnf,
            extra=None if approval is None else {"approval": {
                "id": approval.id,
                "approver": {"sub": approval.approver_subject, "iss": approval.approver_issuer},
                "grants": approved}})
        self._audit("mint", decision=True, reason=reasons.ALLOW, agent=agent, task=task, intent=intent,
                    token_id=token_id, grants=narrowed.granted, denied=narrowed.denied,
                    needs_approval=narrowed.needs_approval, expires_at=exp, key_id=kid, audience=audience,
                    # Which certificate the agent minted over: the audit report sees one identity on many.
                    **({} if not cnf else {"cnf": dict(cnf)}),
                    **({} if approval is None else {"approval_id": approval.id,
                                                    "approver": approval.approver}))
        return Minted(token, token_id, exp, narrowed.granted, task, agent, kid,
                      narrowed.denied, narrowed.needs_approval, approval=approval)

    # -- revoke --------------------------------------------------------------

    def is_admin(self, caller: str) -> bool:
        return caller in self.config.admins

    def revoke_token(self, caller: str, token_id: str) -> int:
        slot, exp, _ = self.token_ids.parse(token_id)
        permitted = self.is_admin(caller) or self.token_ids.minted_by(token_id, caller)
        if not permitted and self.cluster is not None:
            self.cluster.reload_retired_token_id_keys()  # another node may have retired one since
            permitted = self.token_ids.minted_by(token_id, caller)
        if not permitted:
            self._audit("revoke", decision=False, reason=NOT_PERMITTED, agent=caller, token_id=token_id)
            raise Refused(NOT_PERMITTED, "only the agent that minted a token (or an admin) may revoke it")
        try:
            self.revocations.revoke_token(token_id, slot, exp)
        except ValueError as exc:  # a slot never handed out: not a token of ours
            raise Refused(UNKNOWN_TOKEN_ID, str(exc)) from None
        self._audit("revoke", decision=True, scope="token", agent=caller, token_id=token_id)
        self._propagated()
        return int(self.clock())

    def end_task(self, caller: str, task: str, owner: str | None = None) -> int:
        """End ``owner``'s task (the caller's own unless an admin names another agent)."""
        check_task_name(task)  # no task has another name: nothing else goes in the journal and the log
        owner = owner or caller
        if owner != caller and not self.is_admin(caller):
            self._audit("revoke", decision=False, reason=NOT_PERMITTED, agent=caller, task=task)
            raise Refused(NOT_PERMITTED, "an agent may end only its own tasks")
        cutoff = self.revocations.revoke_task(task_key(owner, task))
        self.status_list.task_ended(task_key(owner, task))
        self._audit("revoke", decision=True, scope="task", agent=caller, owner=owner, task=task)
        self._drop_approvals(owner, task)
        self._propagated()
        return cutoff

    def revoke_agent(self, caller: str, agent: str) -> int:
        """Ban ``agent``: every token it holds or delegated dies, and it mints, delegates and is
        delegated nothing until an admin lifts the ban (``unban_agent``). Durable, in every worker."""
        if agent != caller and not self.is_admin(caller):
            self._audit("ban", decision=False, reason=NOT_PERMITTED, agent=caller, target_agent=agent)
            raise Refused(NOT_PERMITTED, "an agent may revoke only itself unless it is an admin")
        cutoff = self.revocations.ban_agent(agent)
        self.status_list.agent_revoked(agent)
        self._audit("ban", decision=True, reason=reasons.AGENT_BANNED, agent=caller, target_agent=agent,
                    banned_at=cutoff)
        self._drop_approvals(agent, None)
        self._propagated()
        return cutoff

    def unban_agent(self, caller: str, agent: str) -> int:
        """Lift ``agent``'s ban (an admin only): it may mint again; tokens from before stay dead."""
        if not self.is_admin(caller):
            self._audit("unban", decision=False, reason=NOT_PERMITTED, agent=caller, target_agent=agent)
            raise Refused(NOT_PERMITTED, "only an admin may lift an agent's ban")
        if not agent:
            raise Refused(reasons.REQUEST_INVALID, "name the agent to unban")
        at = self.revocations.unban_agent(agent)
        if at is None:
            raise Refused(reasons.AGENT_NOT_BANNED, f"{agent} is not banned")
        self._audit("unban", decision=True, agent=caller, target_agent=agent, unbanned_at=at)
        return at

    def _refuse_banned(self, kind: str, *agents: str, **fields: Any) -> None:
        """Refuse (and audit) ``kind`` when any of ``agents`` is banned."""
        banned = self.revocations.banned(agents)
        if banned:
            self._audit(kind, decision=False, reason=reasons.AGENT_BANNED, banned_agent=banned, **fields)
            raise Refused(reasons.AGENT_BANNED, f"{banned} is banned until an admin lifts the ban")

    def revoke_key(self, caller: str, kid: str) -> int:
        if not self.is_admin(caller):
            self._audit("revoke", decision=False, reason=NOT_PERMITTED, agent=caller, key_id=kid)
            raise Refused(NOT_PERMITTED, "only an admin may revoke a signing key")
        self.revocations.revoke_key(kid)
        for ring in self.keyrings.values():
            try:
                ring.retire(kid)
            except KeyError:
                pass  # not this boundary's, or already gone; the durable revocation still stands
        self._audit("revoke", decision=True, scope="key", agent=caller, key_id=kid)
        self._propagated()
        return int(self.clock())

    def rotate_keys(self, caller: str) -> str:
        if not self.is_admin(caller):
            raise Refused(NOT_PERMITTED, "only an admin may rotate keys")
        kid = self.keyring.rotate()
        for ring in self.keyrings.values():
            if ring is not self.keyring:
                ring.rotate()
        self._audit("rotate", agent=caller, key_id=kid)
        return kid
