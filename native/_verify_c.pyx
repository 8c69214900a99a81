# cython: language_level=3
"""Native verifier and decision: the twin of ``agentauthz/decision/_verify_py.py``, same order.

``Verifier.verify`` turns token text into a ``VerifiedToken`` (the checks of
``_token_c``) and caches it by the exact token string, so the signature check
(60-90 µs) runs once per token, with the GIL released around it.
``Verifier.decide`` answers one request in one call; on a cache hit it only
touches C fields, the revocation bits and one memo lookup. Errors are the
classes of ``agentauthz.errors`` with the pure twin's messages; the test suite
runs against both twins and asserts they agree.
"""

from collections import OrderedDict

from agentauthz import errors, reasons
from agentauthz.decision.constraints import Constrained
from agentauthz.decision._token_py import approval_covers  # the rare path: one pure function for both twins
from agentauthz.decision.tokens import SENSITIVITY_RANK

from cpython.bytes cimport PyBytes_AS_STRING
from cpython.dict cimport PyDict_GetItemWithError
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_CheckExact, PyUnicode_DATA, PyUnicode_Substring

from agentauthz.decision._bitset_c cimport Bitset
from agentauthz.decision._strict_c cimport _decode_segment, _json_object
from agentauthz.decision._token_c cimport (
    Grant, VerifiedToken, _check_claims, _check_header, _check_time, _signature_ok,
)

from agentauthz.decision._token_c import valid_public_key

cdef extern from "Python.h":
    Py_ssize_t PyUnicode_FindChar(object s, Py_UCS4 ch, Py_ssize_t start, Py_ssize_t end,
                                  int direction) except -2


# -- shared constants ----------------------------------------------------------

TokenError = errors.TokenError
TokenMalformed = errors.TokenMalformed
TokenTooLarge = errors.TokenTooLarge
TokenKeyUnknown = errors.TokenKeyUnknown
TokenSignatureInvalid = errors.TokenSignatureInvalid

# C globals: the decision reads these without a module-dict lookup.
cdef object ALLOW = reasons.ALLOW
cdef object REQUEST_INVALID = reasons.REQUEST_INVALID
cdef object SCOPE_DENIED = reasons.SCOPE_DENIED
cdef object SENSITIVITY_EXCEEDED = reasons.SENSITIVITY_EXCEEDED
cdef object POLICY_DENIED = reasons.POLICY_DENIED
cdef object APPROVAL_REQUIRED = reasons.APPROVAL_REQUIRED
cdef object CONSTRAINED = Constrained
cdef object KEY_REVOKED = reasons.KEY_REVOKED
cdef object TASK_ENDED = reasons.TASK_ENDED
cdef object AGENT_REVOKED = reasons.AGENT_REVOKED
# Denials are immutable tuples, so each common one is built once.
cdef tuple DENY_MALFORMED = (reasons.TOKEN_MALFORMED, None)
cdef tuple DENY_EXPIRED = (reasons.TOKEN_EXPIRED, None)
cdef tuple DENY_NOT_YET_VALID = (reasons.TOKEN_NOT_YET_VALID, None)
cdef tuple DENY_REVOKED = (reasons.TOKEN_REVOKED, None)
cdef tuple DENY_DELEGATION_REVOKED = (reasons.DELEGATION_REVOKED, None)
cdef tuple DENY_REQUEST_INVALID = (reasons.REQUEST_INVALID, None)

cdef object _SENSITIVITY_RANK = SENSITIVITY_RANK
MEMO_MAX = 64  # distinct requests remembered per token before the memo is reset
cdef Py_ssize_t _HEADERS_MAX = 256  # accepted header segments remembered before a reset
cdef Py_ssize_t _MEMO_MAX = MEMO_MAX


# -- revocation ----------------------------------------------------------------------

cdef class RevocationIndex:
    """In-memory revocation view the decision reads: bits plus task/agent/key cutoffs.

    ``generation`` changes on every non-bit revocation so cached tokens
    re-check their task, agent and key only when something could have changed.
    """

    def __cinit__(self, bits):
        # __cinit__: the decision dereferences _bits, so it can never be unset.
        self.bits = bits
        self.tasks = {}
        self.agents = {}
        self.kids = set()
        self.generation = 0

    @property
    def bits(self):
        return self._bits

    @bits.setter
    def bits(self, Bitset bits not None):
        self._bits = bits

    def revoke_slot(self, slot):
        return self._bits.set(slot)

    def revoke_task(self, task, cutoff):
        """See ``_verify_py.RevocationIndex.revoke_task``: every token of ``task``, whatever its iat."""
        self.tasks[task] = max(cutoff, self.tasks.get(task, cutoff))
        self.generation += 1

    def revoke_agent(self, agent, cutoff):
        """Every token held or delegated by ``agent`` issued at or before ``cutoff`` dies."""
        self.agents[agent] = max(cutoff, self.agents.get(agent, cutoff))
        self.generation += 1

    def revoke_key(self, kid):
        self.kids.add(kid)
        self.generation += 1

    def forget(self, tasks=(), agents=()):
        """Drop cutoffs no live token can fall under any more (journal compaction)."""
        for task in tasks:
            self.tasks.pop(task, None)
        for agent in agents:
            self.agents.pop(agent, None)
        self.generation += 1

    def reason_for(self, VerifiedToken token not None):
        """Task, agent or key revocation of ``token``; bits are tested separately."""
        return self._reason_for(token)

    cdef object _reason_for(self, VerifiedToken token):
        if token.kid in self.kids:
            return KEY_REVOKED
        if token.task_key in self.tasks:  # whatever its iat (revoke_task)
            return TASK_ENDED
        for agent in token.subjects:
            cutoff = self.agents.get(agent)
            if cutoff is not None and token.iat <= cutoff:
                return AGENT_REVOKED
        return None


# -- the verifier ----------------------------------------------------------------------

cdef class Verifier:
    """Verifies tokens and decides requests; one per process, shared by all handlers."""

    def __cinit__(self, *, issuer, audiences, token_type, revocations, leeway=30,
                  max_lifetime=3600, max_token_bytes=8192, cache_size=100_000):
        # __cinit__: no Verifier exists without its revocation index and cache.
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
        self._keys = {}
        self._headers = {}
        self._cache = OrderedDict()  # popitem(last=False) is O(1); popping a dict's first key is not
        self._policy = None
        self._policy_gen = 0

    @property
    def revocations(self):
        return self._revocations

    @revocations.setter
    def revocations(self, RevocationIndex revocations not None):
        self._revocations = revocations

    # -- configuration -------------------------------------------------------

    def set_keys(self, keys):
        """Replace the verification keys (kid -> 32-byte Ed25519 public key).

        Cached tokens whose key is gone or changed are dropped at once, so a
        retired key's tokens stop verifying at the next request.
        """
        cdef dict new = {}
        cdef dict old = self._keys
        cdef VerifiedToken entry
        for kid, key in keys.items():
            if not isinstance(kid, str) or not kid or len(bytes(key)) != 32:
                raise ValueError("keys must map non-empty kids to 32-byte Ed25519 public keys")
            if not valid_public_key(bytes(key)):  # a small-order key verifies forged signatures
                raise ValueError("a key is not a canonical Ed25519 public key of prime order")
            new[kid] = bytes(key)
        self._keys = new
        # Every cached entry was verified under old[entry.kid] (see _verify_uncached).
        for token, entry in list(self._cache.items()):
            if new.get(entry.kid) != old.get(entry.kid):
                self._cache.pop(token, None)

    def set_policy(self, policy):
        """Swap the policy consulted at the moment of action; cached answers are re-asked."""
        self._policy = policy
        self._policy_gen += 1

    def cache_len(self):
        return len(self._cache)

    def forget(self, token):
        """Drop one token from the verified cache."""
        self._cache.pop(token, None)

    def purge_expired(self, double now):
        """Drop cached tokens past their expiry; returns how many."""
        cdef VerifiedToken entry
        cdef Py_ssize_t dead = 0
        for token, entry in list(self._cache.items()):
            if now >= <double>entry.exp:
                self._cache.pop(token, None)
                dead += 1
        return dead

    # -- verification --------------------------------------------------------

    def verify(self, token, double now):
        """Signature, claims and time of ``token``; raises a ``TokenError`` subclass."""
        cdef PyObject *found
        cdef VerifiedToken entry
        if isinstance(token, bytes):
            if len(token) > self.max_token_bytes:
                raise TokenTooLarge("token exceeds the size limit")
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError:
                raise TokenMalformed("token is not ASCII") from None
        elif not PyUnicode_CheckExact(token):
            # Only an exact str is a cache key: a subclass could compare equal to another token.
            raise TokenMalformed("token must be text")
        found = PyDict_GetItemWithError(self._cache, token)
        if found == NULL:
            return self._verify_uncached(token, now)
        entry = <VerifiedToken>found
        _check_time(entry, now, self.leeway)
        return entry

    cdef VerifiedToken _verify_uncached(self, object token, double now):
        cdef VerifiedToken entry
        cdef bytes signature, payload, key
        cdef Py_ssize_t signed_len, n, first, second
        if not isinstance(token, str):
            raise TokenMalformed("token must be text")
        if len(token) > self.max_token_bytes:
            raise TokenTooLarge("token exceeds the size limit")
        # memchr finds the dots; str.split walks a 700-character token one character at a time.
        n = len(token)
        first = PyUnicode_FindChar(token, 46, 0, n, 1)  # "."
        second = PyUnicode_FindChar(token, 46, first + 1, n, 1) if first >= 0 else -1
        if second < 0 or PyUnicode_FindChar(token, 46, second + 1, n, 1) >= 0:
            raise TokenMalformed("token must have exactly three segments")
        header_b64 = PyUnicode_Substring(token, 0, first)
        payload_b64 = PyUnicode_Substring(token, first + 1, second)
        signature_b64 = PyUnicode_Substring(token, second + 1, n)
        # The header check is a function of the segment's text and token_type
        # only, and the tokens of one key share one header: remember it.
        known = self._headers.get(header_b64)
        if known is not None and (<tuple>known)[0] is self.token_type:
            kid = (<tuple>known)[1]
        else:
            kid = _check_header(_json_object(_decode_segment(header_b64), "header"), self.token_type)
            if len(self._headers) >= _HEADERS_MAX:
                self._headers.clear()
            self._headers[header_b64] = (self.token_type, kid)
        signature = _decode_segment(signature_b64)
        payload = _decode_segment(payload_b64)
        if len(signature) != 64:
            raise TokenMalformed("signature must be 64 bytes")
        key = self._keys.get(kid)
        if key is None:
            raise TokenKeyUnknown("no verification key with this kid")
        # All three segments decoded, so the token is ASCII: its str data is
        # the signing input's bytes, header "." payload, with no copy.
        signed_len = len(header_b64) + 1 + len(payload_b64)
        if not _signature_ok(<const unsigned char *>PyBytes_AS_STRING(signature),
                             <const char *>PyUnicode_DATA(token), signed_len,
                             <const unsigned char *>PyBytes_AS_STRING(key)):
            raise TokenSignatureInvalid("signature does not verify")
        claims = _json_object(payload, "claims")
        entry = _check_claims(claims, kid, now, self.issuer, self.audiences, self.max_lifetime, self.leeway)
        # The GIL was released: if set_keys retired or replaced this kid
        # meanwhile, answer this once but do not cache under the old key.
        if self._keys.get(kid) == key:
            if len(self._cache) >= self.cache_size and self._cache:
                self._cache.popitem(last=False)  # oldest inserted first
            self._cache[token] = entry
        return entry

    def verify_live(self, token, double now):
        """``decide`` without a request: verification and every revocation check, no grant or policy.

        ``(ALLOW, token)`` when the token is usable right now, else ``(reason, None)``; never
        raises on input. Delegation asks this of a parent token before narrowing it.
        """
        cdef VerifiedToken entry
        cdef Bitset bits
        cdef Py_ssize_t i
        if not PyUnicode_CheckExact(token):
            return DENY_MALFORMED
        try:
            entry = self.verify(token, now)
        except TokenError as exc:
            return exc.reason, None
        bits = self._revocations._bits
        if entry.slot_outside & 1 or bits.test_c(entry.slot_c[0]):
            return DENY_REVOKED
        for i in range(1, entry.n_slots):
            if entry.slot_outside >> i & 1 or bits.test_c(entry.slot_c[i]):
                return DENY_DELEGATION_REVOKED
        # Computed afresh, not from rev_reason: this path is rare and must never lag a revocation.
        reason = self._revocations._reason_for(entry)
        return (ALLOW, entry) if reason is None else (reason, None)

    # -- the decision --------------------------------------------------------

    def decide(self, token, tool, target, operation, sensitivity, double now):
        """Allow or deny one request: ``(ALLOW, token)`` or ``(reason, None)``; never raises on input."""
        cdef PyObject *found
        cdef VerifiedToken entry
        cdef RevocationIndex revocations
        cdef Bitset bits
        cdef object policy, reason
        cdef dict memo
        cdef long long generation
        cdef Py_ssize_t i
        if not PyUnicode_CheckExact(token):
            return DENY_MALFORMED
        found = PyDict_GetItemWithError(self._cache, token)
        if found == NULL:
            try:
                entry = self._verify_uncached(token, now)
            except TokenError as exc:
                return exc.reason, None
        else:
            entry = <VerifiedToken>found
            if now >= <double>entry.exp:  # no leeway: see _token_c._check_time
                return DENY_EXPIRED
            if now < <double>entry.nbf - <double>self.leeway:
                return DENY_NOT_YET_VALID

        revocations = self._revocations
        bits = revocations._bits
        if entry.slot_outside & 1 or bits.test_c(entry.slot_c[0]):
            return DENY_REVOKED
        for i in range(1, entry.n_slots):
            if entry.slot_outside >> i & 1 or bits.test_c(entry.slot_c[i]):
                return DENY_DELEGATION_REVOKED
        generation = revocations.generation
        if entry.rev_gen != generation:
            entry.rev_reason = revocations._reason_for(entry)
            entry.rev_gen = generation
        if entry.rev_reason is not None:
            return entry.rev_reason, None

        # Policy and generation are read together; a new generation gets a new
        # memo dict, so an answer computed under an older policy (permits()
        # is Python and may let another thread swap the policy) lands in a
        # dict nobody reads any more instead of the current one.
        policy = self._policy
        generation = self._policy_gen
        if entry.pol_gen != generation:
            entry.memo = {}
            entry.last_reason = None
            entry.pol_gen = generation
        elif (entry.last_reason is not None and PyUnicode_CheckExact(tool) and PyUnicode_CheckExact(target)
              and PyUnicode_CheckExact(operation) and PyUnicode_CheckExact(sensitivity)
              and <str>tool == entry.last_tool and <str>target == entry.last_target
              and <str>operation == entry.last_operation and <str>sensitivity == entry.last_sensitivity):
            reason = entry.last_reason
            if reason is ALLOW:
                return (ALLOW, entry)
            if type(reason) is CONSTRAINED:  # allowed once Check has enforced the policy's constraints
                return reason, entry
            return reason, None
        memo = entry.memo
        key = (tool, target, operation, sensitivity)
        try:
            found = PyDict_GetItemWithError(memo, key)
        except TypeError:  # an unhashable request attribute names nothing
            return DENY_REQUEST_INVALID
        if found == NULL:
            reason = self._match(entry, tool, target, operation, sensitivity, policy)
            if len(memo) >= _MEMO_MAX:
                memo.clear()
            memo[key] = reason
        else:
            reason = <object>found
        if reason == ALLOW:
            reason = ALLOW  # the canonical object: the fast path above compares by identity
        # Only if the policy did not change while _match ran Python code (permits may release the GIL).
        if (entry.pol_gen == generation and PyUnicode_CheckExact(tool) and PyUnicode_CheckExact(target)
                and PyUnicode_CheckExact(operation) and PyUnicode_CheckExact(sensitivity)):
            entry.last_tool, entry.last_target = tool, target
            entry.last_operation, entry.last_sensitivity = operation, sensitivity
            entry.last_reason = reason
        if reason is ALLOW:
            return (ALLOW, entry)
        if type(reason) is CONSTRAINED:
            return reason, entry
        return reason, None

    cdef object _match(self, VerifiedToken entry, object tool, object target, object operation,
                       object sensitivity, object policy):
        cdef long level
        cdef Grant grant
        if not (isinstance(tool, str) and isinstance(target, str) and isinstance(operation, str)
                and tool and operation):
            return REQUEST_INVALID
        rank = _SENSITIVITY_RANK.get(sensitivity) if isinstance(sensitivity, str) else None
        if rank is None:
            return REQUEST_INVALID
        level = rank
        for grant in entry.grants:
            if grant._covers(tool, target, operation, level):
                break
        else:
            # Level 0 is within every grant: tells "wrong scope" from "too sensitive".
            for grant in entry.grants:
                if grant._covers(tool, target, operation, 0):
                    return SENSITIVITY_EXCEEDED
            return SCOPE_DENIED
        if policy is None:
            return POLICY_DENIED
        answer = policy.permits(entry.sub, tool, target, operation, rank)
        # A token minted under a human's approval carries it (authority.py); asked only then, so a
        # policy view that gates nothing need not know the keyword.
        if answer == APPROVAL_REQUIRED and approval_covers(entry.claims.get("approval"), tool, target,
                                                          operation, rank):
            answer = policy.permits(entry.sub, tool, target, operation, rank, approved=True)
        return answer or ALLOW
