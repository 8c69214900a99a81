"""Pure-Python verifier and decision: the reference twin of ``native/_verify_c.pyx``.

``Verifier.verify`` turns token text into a ``VerifiedToken`` (the checks of
``_token_py``) and caches it by the exact token string, so the ~90 µs signature
check runs once per token. ``Verifier.decide`` answers one request in one call:
cache, time, revocation, grants, policy. Both twins check in the same order and
raise the same ``errors`` classes; the test suite runs against each and asserts
they agree.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Protocol

from .. import errors, reasons
from ._bitset_py import Bitset
from ._strict_py import b64url_decode, json_object
from ._token_py import (
    VerifiedToken,
    approval_covers,
    check_claims,
    check_header,
    check_time,
    ed25519_verify,
    valid_public_key,
)
from .constraints import Constrained
from .tokens import SENSITIVITY_RANK

MEMO_MAX = 64  # distinct requests remembered per token before the memo is reset


class PolicyView(Protocol):
    """What the decision asks of the policy at the moment of action."""

    def permits(self, agent: str, tool: str, target: str, operation: str, level: int,
                approved: bool = False) -> str | Any:
        """None when allowed, a ``Constrained`` when allowed only under its constraints, otherwise a
        reason constant. Asked again with ``approved=True`` when it answers APPROVAL_REQUIRED for a
        token that carries an approval."""


class RevocationIndex:
    """In-memory revocation view the decision reads: bits plus task/agent/key cutoffs.

    ``generation`` changes on every non-bit revocation so cached tokens
    re-check their task, agent and key only when something could have changed.
    """

    __slots__ = ("bits", "tasks", "agents", "kids", "generation")

    def __init__(self, bits: Bitset) -> None:
        self.bits = bits
        self.tasks: dict[str, int] = {}
        self.agents: dict[str, int] = {}
        self.kids: set[str] = set()
        self.generation = 0

    def revoke_slot(self, slot: int) -> bool:
        return self.bits.set(slot)

    def revoke_task(self, task: str, cutoff: int) -> None:
        """Every token of ``task`` (a ``tokens.task_key``) dies, whatever its iat: an ended task mints
        nothing more, so a token issued after ``cutoff`` comes from a mint racing the end, signed on a
        node that had not applied it yet and whose clock may run ahead of the ending node's. ``cutoff``
        (the end, on the ending node's clock) says when the entry may be forgotten."""
        self.tasks[task] = max(cutoff, self.tasks.get(task, cutoff))
        self.generation += 1

    def revoke_agent(self, agent: str, cutoff: int) -> None:
        """Every token held or delegated by ``agent`` issued at or before ``cutoff`` dies."""
        self.agents[agent] = max(cutoff, self.agents.get(agent, cutoff))
        self.generation += 1

    def revoke_key(self, kid: str) -> None:
        self.kids.add(kid)
        self.generation += 1

    def forget(self, tasks: Iterable[str] = (), agents: Iterable[str] = ()) -> None:
        """Drop cutoffs no live token can fall under any more (journal compaction)."""
        for task in tasks:
            self.tasks.pop(task, None)
        for agent in agents:
            self.agents.pop(agent, None)
        self.generation += 1

    def reason_for(self, token: VerifiedToken) -> str | None:
        """Task, agent or key revocation of ``token``; bits are tested separately."""
        if token.kid in self.kids:
            return reasons.KEY_REVOKED
        if token.task_key in self.tasks:  # whatever its iat (revoke_task)
            return reasons.TASK_ENDED
        for agent in token.subjects:
            cutoff = self.agents.get(agent)
            if cutoff is not None and token.iat <= cutoff:
                return reasons.AGENT_REVOKED
        return None


class Verifier:
    """Verifies tokens and decides requests; one per process, shared by all handlers."""

    def __init__(self, *, issuer: str, audiences: frozenset[str] | set[str], token_type: str,
                 revocations: RevocationIndex, leeway: int = 30, max_lifetime: int = 3600,
                 max_token_bytes: int = 8192, cache_size: int = 100_000) -> None:
        if leeway < 0 or max_lifetime <= 0 or max_token_bytes <= 0 or cache_size <= 0:
            raise ValueError("leeway, max_lifetime, max_token_bytes and cache_size must be positive")
        self.issuer = issuer
        self.audiences = frozenset(audiences)
        self.token_type = token_type
        self.revocations = revocations
        self.leeway = leeway
        self.max_lifetime = max_lifetime
        self.max_token_bytes = max_token_bytes
        self.cache_size = cache_size
        self._keys: dict[str, bytes] = {}
        # popitem(last=False) is O(1); popping a plain dict's first key scans
        # the holes earlier pops left (measured 64 µs per eviction at 100k entries).
        self._cache: OrderedDict[str, VerifiedToken] = OrderedDict()
        self._policy_generations = itertools.count(1)
        # (policy, generation), swapped whole: a reader never pairs one with the other's.
        self._policy_state: tuple[PolicyView | None, int] = (None, 0)

    # -- configuration -------------------------------------------------------

    def set_keys(self, keys: Mapping[str, bytes]) -> None:
        """Replace the verification keys (kid -> 32-byte Ed25519 public key).

        Cached tokens whose key is gone or changed are dropped at once, so a
        retired key's tokens stop verifying at the next request.
        """
        new = {}
        for kid, key in keys.items():
            if not isinstance(kid, str) or not kid or len(bytes(key)) != 32:
                raise ValueError("keys must map non-empty kids to 32-byte Ed25519 public keys")
            if not valid_public_key(bytes(key)):  # a small-order key verifies forged signatures
                raise ValueError("a key is not a canonical Ed25519 public key of prime order")
            new[kid] = bytes(key)
        old, self._keys = self._keys, new
        # Every cached entry was verified under old[entry.kid] (see _verify_uncached).
        # list() copies in one step: request threads insert while we look.
        for t, v in list(self._cache.items()):
            if new.get(v.kid) != old.get(v.kid):
                self._cache.pop(t, None)

    def set_policy(self, policy: PolicyView | None) -> None:
        """Swap the policy consulted at the moment of action; cached answers are re-asked."""
        self._policy_state = (policy, next(self._policy_generations))

    def cache_len(self) -> int:
        return len(self._cache)

    def forget(self, token: str) -> None:
        """Drop one token from the verified cache."""
        self._cache.pop(token, None)

    def purge_expired(self, now: float) -> int:
        """Drop cached tokens past their expiry; returns how many."""
        dead = [t for t, v in list(self._cache.items()) if now >= v.exp]
        for t in dead:
            self._cache.pop(t, None)
        return len(dead)

    # -- verification --------------------------------------------------------

    def verify(self, token: str | bytes, now: float) -> VerifiedToken:
        """Signature, claims and time of ``token``; raises a ``TokenError`` subclass."""
        if isinstance(token, bytes):
            if len(token) > self.max_token_bytes:
                raise errors.TokenTooLarge("token exceeds the size limit")
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError:
                raise errors.TokenMalformed("token is not ASCII") from None
        elif type(token) is not str:
            # Only an exact str is a cache key: a subclass could compare equal
            # to another token, and an unhashable object would raise TypeError.
            raise errors.TokenMalformed("token must be text")
        entry = self._cache.get(token)
        if entry is None:
            entry = self._verify_uncached(token, now)
        else:
            check_time(entry, now, self.leeway)
        return entry

    def _verify_uncached(self, token: str, now: float) -> VerifiedToken:
        if not isinstance(token, str):
            raise errors.TokenMalformed("token must be text")
        if len(token) > self.max_token_bytes:
            raise errors.TokenTooLarge("token exceeds the size limit")
        parts = token.split(".")
        if len(parts) != 3:
            raise errors.TokenMalformed("token must have exactly three segments")
        header_b64, payload_b64, signature_b64 = parts
        header = json_object(b64url_decode(header_b64), "header")
        kid = check_header(header, self.token_type)
        signature = b64url_decode(signature_b64)
        payload = b64url_decode(payload_b64)
        if len(signature) != 64:
            raise errors.TokenMalformed("signature must be 64 bytes")
        key = self._keys.get(kid)
        if key is None:
            raise errors.TokenKeyUnknown("no verification key with this kid")
        signing_input = token[:len(header_b64) + 1 + len(payload_b64)].encode("ascii")
        if not ed25519_verify(key, signing_input, signature):
            raise errors.TokenSignatureInvalid("signature does not verify")
        claims = json_object(payload, "claims")
        entry = check_claims(claims, kid, now, self.issuer, self.audiences, self.max_lifetime, self.leeway)
        # The GIL is released during the signature check: if set_keys retired
        # or replaced this kid meanwhile, answer this once but do not cache it.
        if self._keys.get(kid) == key:
            if len(self._cache) >= self.cache_size and self._cache:
                self._cache.popitem(last=False)  # oldest inserted first
            self._cache[token] = entry
        return entry

    def verify_live(self, token: str, now: float) -> tuple[str, VerifiedToken | None]:
        """``decide`` without a request: verification and every revocation check, no grant or policy.

        ``(ALLOW, token)`` when the token is usable right now, else ``(reason, None)``; never
        raises on input. Delegation asks this of a parent token before narrowing it.
        """
        if type(token) is not str:
            return reasons.TOKEN_MALFORMED, None
        try:
            entry = self.verify(token, now)
        except errors.TokenError as exc:
            return exc.reason, None
        bits = self.revocations.bits
        if bits.test(entry.slots[0]):
            return reasons.TOKEN_REVOKED, None
        for slot in entry.slots[1:]:
            if bits.test(slot):
                return reasons.DELEGATION_REVOKED, None
        # Computed afresh, not from rev_state: this path is rare and must never lag a revocation.
        reason = self.revocations.reason_for(entry)
        return (reasons.ALLOW, entry) if reason is None else (reason, None)

    # -- the decision --------------------------------------------------------

    def decide(self, token: str, tool: str, target: str, operation: str, sensitivity: str,
               now: float) -> tuple[str, VerifiedToken | None]:
        """Allow or deny one request: ``(ALLOW, token)`` or ``(reason, None)``; never raises on input."""
        if type(token) is not str:
            return reasons.TOKEN_MALFORMED, None
        entry = self._cache.get(token)
        if entry is None:
            try:
                entry = self._verify_uncached(token, now)
            except errors.TokenError as exc:
                return exc.reason, None
        else:
            if now >= entry.exp:  # no leeway: see _token_py.check_time
                return reasons.TOKEN_EXPIRED, None
            if now < entry.nbf - self.leeway:
                return reasons.TOKEN_NOT_YET_VALID, None
        revocations = self.revocations
        bits = revocations.bits
        slots = entry.slots
        if bits.test(slots[0]):
            return reasons.TOKEN_REVOKED, None
        for slot in slots[1:]:
            if bits.test(slot):
                return reasons.DELEGATION_REVOKED, None
        # The generation is read before the reason is computed: a revocation
        # landing meanwhile leaves a stale generation behind, so the next
        # request recomputes instead of trusting an answer from before it.
        generation = revocations.generation
        rev_state = entry.rev_state
        if rev_state[0] != generation:
            rev_state = (generation, revocations.reason_for(entry))
            entry.rev_state = rev_state
        if rev_state[1] is not None:
            return rev_state[1], None
        # A new policy generation gets a new memo dict: an answer computed
        # under an older policy (permits() may let another thread swap it)
        # lands in a dict nobody reads any more.
        policy, generation = self._policy_state
        memo_state = entry.memo_state
        if memo_state[0] != generation:
            memo_state = (generation, {})
            entry.memo_state = memo_state
        memo = memo_state[1]
        key = (tool, target, operation, sensitivity)
        try:
            reason = memo.get(key)
        except TypeError:  # an unhashable request attribute names nothing
            return reasons.REQUEST_INVALID, None
        if reason is None:
            reason = self._match(entry, tool, target, operation, sensitivity, policy)
            if len(memo) >= MEMO_MAX:
                memo.clear()
            memo[key] = reason
        if reason == reasons.ALLOW:
            return (reasons.ALLOW, entry)
        if reason.__class__ is Constrained:  # allowed once Check has enforced the policy's constraints
            return reason, entry
        return reason, None

    def _match(self, entry: VerifiedToken, tool: str, target: str, operation: str,
               sensitivity: str, policy: PolicyView | None) -> str:
        if not (isinstance(tool, str) and isinstance(target, str) and isinstance(operation, str)
                and tool and operation):
            return reasons.REQUEST_INVALID
        level = SENSITIVITY_RANK.get(sensitivity) if isinstance(sensitivity, str) else None
        if level is None:
            return reasons.REQUEST_INVALID
        for grant in entry.grants:
            if grant.covers(tool, target, operation, level):
                break
        else:
            # Level 0 is within every grant: tells "wrong scope" from "too sensitive".
            scoped = any(g.covers(tool, target, operation, 0) for g in entry.grants)
            return reasons.SENSITIVITY_EXCEEDED if scoped else reasons.SCOPE_DENIED
        if policy is None:
            return reasons.POLICY_DENIED
        answer = policy.permits(entry.sub, tool, target, operation, level)
        # A token minted under a human's approval carries it (authority/core.py); asked only then, so a
        # policy view that gates nothing need not know the keyword.
        if answer == reasons.APPROVAL_REQUIRED and approval_covers(entry.claims.get("approval"), tool, target,
                                                                  operation, level):
            answer = policy.permits(entry.sub, tool, target, operation, level, approved=True)
        return answer or reasons.ALLOW

