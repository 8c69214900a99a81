# cython: language_level=3
"""Native hot path: the twin of ``agentauthz/decision/_verify_py.py``, same checks in the same order.

``Verifier.verify`` turns token text into a ``VerifiedToken`` (strict parse,
Ed25519 signature, claims) and caches it by the exact token string, so the
signature check (60-90 µs) runs once per token, with the GIL released around it.
``Verifier.decide`` answers one request in one call; on a cache hit it only
touches C fields, the revocation bits and one memo lookup. Errors are the
classes of ``agentauthz.errors`` with the pure twin's messages; the test suite
runs against both twins and asserts they agree.
"""

from collections import OrderedDict

import nacl.bindings  # importing it runs sodium_init(), required before any libsodium call
from nacl._sodium import ffi as _ffi, lib as _sodium

from agentauthz import errors, reasons
from agentauthz.decision.constraints import Constrained, compile_extras
from agentauthz.identity.spiffe import IdentityError, parse_spiffe_id
from agentauthz.decision.tokens import (
    ALGORITHM, MAX_DELEGATION_DEPTH, MAX_GRANTS, MAX_INTENT_CHARS, SENSITIVITY_RANK, task_key,
)

from cpython.bytes cimport PyBytes_AS_STRING
from cpython.dict cimport PyDict_GetItemWithError
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_CheckExact, PyUnicode_DATA, PyUnicode_GET_LENGTH, PyUnicode_Substring
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from agentauthz.decision._bitset_c cimport Bitset
from agentauthz.decision._strict_c cimport _decode_segment, _json_object

from agentauthz.decision._strict_c import b64url_decode, json_object  # the twin's names, for HotPath and tests

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)
    Py_ssize_t PyUnicode_FindChar(object s, Py_UCS4 ch, Py_ssize_t start, Py_ssize_t end,
                                  int direction) except -2


# -- shared constants ----------------------------------------------------------

TokenError = errors.TokenError
TokenMalformed = errors.TokenMalformed
TokenTooLarge = errors.TokenTooLarge
TokenAlgorithmRejected = errors.TokenAlgorithmRejected
TokenHeaderRejected = errors.TokenHeaderRejected
TokenTypeMismatch = errors.TokenTypeMismatch
TokenKeyUnknown = errors.TokenKeyUnknown
TokenSignatureInvalid = errors.TokenSignatureInvalid
TokenClaimsInvalid = errors.TokenClaimsInvalid
TokenIssuerMismatch = errors.TokenIssuerMismatch
TokenAudienceMismatch = errors.TokenAudienceMismatch
TokenExpired = errors.TokenExpired
TokenNotYetValid = errors.TokenNotYetValid
TokenLifetimeExceeded = errors.TokenLifetimeExceeded

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
cdef object _ALGORITHM = ALGORITHM
cdef long _MAX_GRANTS = MAX_GRANTS
cdef long _MAX_INTENT_CHARS = MAX_INTENT_CHARS
cdef Py_ssize_t _MAX_DELEGATION_DEPTH = MAX_DELEGATION_DEPTH
cdef tuple _HEADER_KEY_MATERIAL = ("jwk", "jku", "x5u", "x5c")
cdef frozenset _HEADER_ALLOWED = frozenset({"alg", "typ", "kid"})
cdef object _TIME_MAX = 1 << 40  # far beyond any real NumericDate; keeps arithmetic exact
cdef object _U64_LIMIT = 1 << 64
MEMO_MAX = 64  # distinct requests remembered per token before the memo is reset
cdef Py_ssize_t _HEADERS_MAX = 256  # accepted header segments remembered before a reset
cdef Py_ssize_t _MEMO_MAX = MEMO_MAX

if _MAX_DELEGATION_DEPTH + 1 > SLOTS_MAX:
    raise ImportError(f"MAX_DELEGATION_DEPTH {MAX_DELEGATION_DEPTH} needs SLOTS_MAX > {SLOTS_MAX}")


# -- libsodium through PyNaCl, without linking it ------------------------------

# PyNaCl's cffi module carries a static libsodium; take crypto_sign_open's
# address from it once, so verification is a plain C call from here: no
# per-call cffi argument conversion, no ffi.new() buffers, no copy of the
# opened message into a new bytes object, and a nogil block we control.
ctypedef int (*sign_open_fn)(unsigned char *m, unsigned long long *mlen_p,
                             const unsigned char *sm, unsigned long long smlen,
                             const unsigned char *pk) noexcept nogil

_SODIUM_LIB = _sodium  # keeps the module that owns the function alive (it never unloads anyway)
_sign_open_address = int(_ffi.cast("uintptr_t", _ffi.addressof(_sodium, "crypto_sign_open")))
if not _sign_open_address:
    raise ImportError("libsodium's crypto_sign_open is not available through PyNaCl")
cdef sign_open_fn _sign_open = <sign_open_fn><uintptr_t>_sign_open_address


cdef bint _signature_ok(const unsigned char *signature, const char *message, Py_ssize_t mlen,
                        const unsigned char *public_key) except -1:
    """Ed25519 over ``message``; the GIL is released for the tens of µs the curve arithmetic takes."""
    cdef unsigned long long smlen = 64 + <unsigned long long>mlen
    cdef unsigned long long opened = 0
    cdef unsigned char pk[32]
    cdef unsigned char *sm
    cdef int rc
    # Copies: nothing the C call reads may be a Python object's memory once the GIL is gone.
    memcpy(pk, public_key, 32)
    # crypto_sign_open takes sig||message and writes the message back out:
    # one allocation holds both.
    sm = <unsigned char *>malloc(2 * smlen)
    if sm == NULL:
        raise MemoryError()
    memcpy(sm, signature, 64)
    memcpy(sm + 64, message, mlen)
    with nogil:
        rc = _sign_open(sm + smlen, &opened, sm, smlen, pk)
    free(sm)
    return rc == 0


def ed25519_verify(public_key, message, signature):
    """Ed25519 (RFC 8032 §5.1.7) as token verification checks it: libsodium, strict encodings."""
    cdef bytes pk = bytes(public_key), msg = bytes(message), sig = bytes(signature)
    if len(pk) != 32 or len(sig) != 64:
        return False
    return _signature_ok(<const unsigned char *>PyBytes_AS_STRING(sig), PyBytes_AS_STRING(msg), len(msg),
                         <const unsigned char *>PyBytes_AS_STRING(pk))


def valid_public_key(key):
    """A canonical encoding of a point of prime order (RFC 8032 §5.1.3): not small order, no torsion."""
    return len(key) == 32 and bool(nacl.bindings.crypto_core_ed25519_is_valid_point(bytes(key)))


cdef Py_ssize_t _AGENTS_MAX = 4096
cdef dict _AGENTS = {}  # SPIFFE IDs already found valid: a cold verify parses each agent once


def is_agent(value):
    """A workload's SPIFFE ID in its one spelling (SPIFFE-ID §2, ASCII only), as mint writes ``sub``."""
    if not PyUnicode_CheckExact(value) or not (<str>value).isascii():
        return False
    if value in _AGENTS:
        return True
    try:
        if not parse_spiffe_id(value).path:
            return False
    except IdentityError:
        return False
    if len(_AGENTS) >= _AGENTS_MAX:
        _AGENTS.clear()
    _AGENTS[value] = True
    return True


# -- grants ----------------------------------------------------------------------

cdef class Grant:
    """One grant: tool, target pattern, operations, maximum sensitivity rank, optional constraints."""

    def __init__(self, tool, target, ops, long level, extras=None):
        self._init(tool, target, ops, level)
        self.extras = extras

    cdef int _init(self, object tool, object target, object ops, long level) except -1:
        self.tool = tool
        self.target = target
        # "*" matches any target, "p*" any target starting with p, else exact.
        self.prefix = target[:-1] if target.endswith("*") else None
        self.ops = ops
        self.level = level
        return 0

    def covers(self, tool, target, operation, long level):
        return self._covers(tool, target, operation, level)

    cdef bint _covers(self, object tool, object target, object operation, long level) except -1:
        if tool != self.tool or operation not in self.ops or level > self.level:
            return False
        if self.prefix is None:
            return target == self.target
        return target.startswith(self.prefix)

    def __repr__(self):
        return f"Grant({self.tool!r}, {self.target!r}, {sorted(self.ops)!r}, {self.level})"


cdef frozenset _distinct_texts(list ops):
    """``ops`` as a frozenset when they are distinct non-empty strings, else None."""
    for op in ops:
        if not isinstance(op, str) or not op:
            return None
    # One hashing pass: the same set checks distinctness and becomes Grant.ops.
    distinct = frozenset(ops)
    return distinct if len(distinct) == len(ops) else None


cdef Grant _compile_grant(raw):
    cdef Grant grant
    cdef frozenset distinct = None
    if not isinstance(raw, dict):
        raise TokenClaimsInvalid("grant is not an object")
    tool, target, ops = raw.get("tool"), raw.get("target"), raw.get("ops")
    sensitivity = raw.get("sensitivity")
    if not isinstance(tool, str) or not tool:
        raise TokenClaimsInvalid("grant tool must be a non-empty string")
    if not isinstance(target, str) or not target or "*" in target[:-1]:
        raise TokenClaimsInvalid("grant target must be a non-empty pattern with '*' only at the end")
    if not isinstance(ops, list) or not ops or len(ops) > 64:
        raise TokenClaimsInvalid("grant ops must be a non-empty list of distinct strings")
    distinct = _distinct_texts(ops)
    if distinct is None:
        raise TokenClaimsInvalid("grant ops must be a non-empty list of distinct strings")
    if not isinstance(sensitivity, str) or sensitivity not in _SENSITIVITY_RANK:
        raise TokenClaimsInvalid("grant sensitivity is not a known level")
    grant = Grant.__new__(Grant)  # skips __init__'s argument parsing; _init does the work
    grant._init(tool, target, distinct, _SENSITIVITY_RANK[sensitivity])
    # Cold (once per token) and shared with the pure twin, so both accept and refuse alike.
    grant.extras = compile_extras(raw)
    return grant


def compile_grant(raw):
    """Validate one grant object from a token; raises TokenClaimsInvalid."""
    return _compile_grant(raw)


# -- claims helpers ----------------------------------------------------------------

cdef long long _time(dict claims, str name) except -1:
    value = claims.get(name)
    # bool is an int subclass; a time is never true or false.
    if type(value) is not int or not 0 <= value < _TIME_MAX:
        raise TokenClaimsInvalid(f"{name} must be an integer NumericDate")
    return value


cdef bint _visible_ascii(str value):
    """Whether ``value`` is ASCII from "!" to "~" only; False also for any other str, which
    ``_text`` then asks str.isprintable about (3x slower on the ASCII of every new token)."""
    cdef const unsigned char *c
    cdef Py_ssize_t i
    if not PyUnicode_IS_ASCII(value):
        return False
    c = <const unsigned char *>PyUnicode_DATA(value)
    for i in range(PyUnicode_GET_LENGTH(value)):
        if not 0x21 <= c[i] <= 0x7E:
            return False
    return True


cdef str _text(dict claims, str name):
    value = claims.get(name)
    # sub, jti and task reach the upstream as header values: no control or format characters, no
    # spaces (RFC 9110 §5.5: CR, LF and NUL in a field value are invalid and dangerous).
    if not isinstance(value, str) or not value or not (
            _visible_ascii(value) or ((<str>value).isprintable() and " " not in value)):
        raise TokenClaimsInvalid(f"{name} must be a non-empty string of printable characters")
    return value


cdef object _slot(object holder, str what):
    value = holder.get("idx") if isinstance(holder, dict) else None
    if type(value) is not int or value < 0:
        raise TokenClaimsInvalid(f"{what} must carry a non-negative integer idx")
    return value


# -- verified tokens ---------------------------------------------------------------

cdef class VerifiedToken:
    """A token whose signature and claims have been checked once; cached by its exact text."""

    def __init__(self, dict claims, str kid, tuple grants, tuple slots, tuple subjects):
        self._fill(claims, kid, grants, slots, subjects)

    cdef int _fill(self, dict claims, str kid, tuple grants, tuple slots, tuple subjects) except -1:
        cdef Py_ssize_t i
        if not 0 < len(slots) <= SLOTS_MAX:
            raise ValueError(f"a token carries 1 to {SLOTS_MAX} status slots")
        self.claims = claims
        self.kid = kid
        self.jti = claims["jti"]
        self.sub = claims["sub"]
        self.task = claims["task"]
        self.task_key = task_key(subjects[-1], self.task)
        self.iat = claims["iat"]
        self.nbf = claims["nbf"]
        self.exp = claims["exp"]
        self.grants = grants
        self.slots = slots
        self.subjects = subjects
        self.n_slots = len(slots)
        self.slot_outside = 0
        for i in range(self.n_slots):
            slot = slots[i]
            if 0 <= slot < _U64_LIMIT:
                self.slot_c[i] = slot
            else:  # no window reaches it: it tests as revoked, as in the pure bitset
                self.slot_c[i] = 0
                self.slot_outside |= 1u << i
        self.memo = None  # created by the first decide: pol_gen -1 never matches a generation
        self.pol_gen = -1
        self.rev_gen = -1
        self.rev_reason = None
        self.attachment = None
        self.constrained = False
        for grant in grants:
            if (<Grant?>grant).extras is not None:
                self.constrained = True
        return 0

    def __repr__(self):
        return f"VerifiedToken(jti={self.jti!r}, sub={self.sub!r}, task={self.task!r}, exp={self.exp})"


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
        """Every token of ``task`` (a ``tokens.task_key``) issued at or before ``cutoff`` dies."""
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
        cutoff = self.tasks.get(token.task_key)
        if cutoff is not None and token.iat <= cutoff:
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
        self._check_time(entry, now)
        return entry

    cdef int _check_time(self, VerifiedToken entry, double now) except -1:
        # In doubles, like the pure twin's float ``now``: exact for any real NumericDate. No leeway
        # for exp, the pure twin's _check_time says why.
        if now >= <double>entry.exp:
            raise TokenExpired("token has expired")
        if now < <double>entry.nbf - <double>self.leeway:
            raise TokenNotYetValid("token is not valid yet")
        return 0

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
            kid = self._check_header(_json_object(_decode_segment(header_b64), "header"))
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
        entry = self._check_claims(claims, kid, now)
        # The GIL was released: if set_keys retired or replaced this kid
        # meanwhile, answer this once but do not cache under the old key.
        if self._keys.get(kid) == key:
            if len(self._cache) >= self.cache_size and self._cache:
                self._cache.popitem(last=False)  # oldest inserted first
            self._cache[token] = entry
        return entry

    cdef str _check_header(self, dict header):
        for name in _HEADER_KEY_MATERIAL:
            if name in header:
                raise TokenHeaderRejected("header may not carry key material or key URLs")
        if "crit" in header:
            raise TokenHeaderRejected("no critical header extension is understood")
        if header.get("alg") != _ALGORITHM:
            raise TokenAlgorithmRejected("only EdDSA is accepted")
        for name in header:
            if name not in _HEADER_ALLOWED:
                raise TokenHeaderRejected("header has parameters other than alg, typ, kid")
        if header.get("typ") != self.token_type:
            raise TokenTypeMismatch("typ is not this daemon's token type")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenMalformed("kid must be a non-empty string")
        return kid

    cdef VerifiedToken _check_claims(self, dict claims, str kid, double now):
        cdef long long iat, nbf, exp
        cdef VerifiedToken entry
        if claims.get("iss") != self.issuer:
            raise TokenIssuerMismatch("iss is not this daemon")
        aud = claims.get("aud")
        if not isinstance(aud, str) or aud not in self.audiences:
            raise TokenAudienceMismatch("aud is not an accepted audience")
        iat = _time(claims, "iat")
        nbf = _time(claims, "nbf")
        exp = _time(claims, "exp")
        if not iat <= nbf < exp:
            raise TokenClaimsInvalid("times must satisfy iat <= nbf < exp")
        if exp - iat > self.max_lifetime:
            raise TokenLifetimeExceeded("token lifetime exceeds the cap")
        if <double>iat > now + <double>self.leeway:
            raise TokenNotYetValid("token was issued in the future")
        sub = _text(claims, "sub")
        _text(claims, "jti")
        _text(claims, "task")
        if not is_agent(sub):  # one spelling per agent: policy and revocation compare it as text
            raise TokenClaimsInvalid("sub must be a SPIFFE ID")
        intent = claims.get("intent", "")
        if not isinstance(intent, str) or len(intent) > _MAX_INTENT_CHARS:
            raise TokenClaimsInvalid("intent must be a short string")
        raw_grants = claims.get("grants")
        if not isinstance(raw_grants, list) or not raw_grants or len(raw_grants) > _MAX_GRANTS:
            raise TokenClaimsInvalid("grants must be a non-empty list")
        grants = tuple([_compile_grant(g) for g in raw_grants])
        status = claims.get("status")
        # Tuples from the start: most tokens have no delegation chain, and
        # every container spared here is one less object for the cyclic GC.
        slots = (_slot(status.get("status_list") if isinstance(status, dict) else None,
                       "status.status_list"),)
        subjects = (sub,)
        act = claims.get("act")
        while act is not None:
            if len(subjects) > _MAX_DELEGATION_DEPTH:
                raise TokenClaimsInvalid("delegation chain is too deep")
            if not isinstance(act, dict) or not is_agent(act.get("sub")):
                raise TokenClaimsInvalid("act must be an object with a sub")
            subjects += (act["sub"],)
            slots += (_slot(act, "act"),)
            act = act.get("act")
        cnf = claims.get("cnf")
        if cnf is not None and not isinstance(cnf, dict):
            raise TokenClaimsInvalid("cnf must be an object")
        entry = VerifiedToken.__new__(VerifiedToken)
        entry._fill(claims, kid, grants, slots, subjects)
        self._check_time(entry, now)
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
            if now >= <double>entry.exp:  # no leeway: see _check_time
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
        if answer == APPROVAL_REQUIRED and isinstance(entry.claims.get("approval"), dict):
            answer = policy.permits(entry.sub, tool, target, operation, rank, approved=True)
        return answer or ALLOW
