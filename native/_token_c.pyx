# cython: language_level=3
"""Native token checks: the twin of ``agentauthz/decision/_token_py.py``, same checks in the same order.

What a token must be before the verifier (``_verify_c``) believes it: a JOSE
header this daemon accepts, an Ed25519 signature (libsodium, the GIL released),
claims of the right shape and times, grants compiled once; the result is a
``VerifiedToken``, whose C fields the decision reads. The verifier cimports
what it calls (``_token_c.pxd``): plain C calls, no Python-level ones.
"""

import nacl.bindings  # importing it runs sodium_init(), required before any libsodium call
from nacl._sodium import ffi as _ffi, lib as _sodium

from agentauthz import errors
from agentauthz.decision.constraints import compile_extras
from agentauthz.decision.tokens import (
    ALGORITHM, MAX_DELEGATION_DEPTH, MAX_GRANTS, MAX_INTENT_CHARS, SENSITIVITY_RANK, is_agent, task_key,
)

from cpython.bytes cimport PyBytes_AS_STRING
from cpython.unicode cimport PyUnicode_CheckExact, PyUnicode_DATA, PyUnicode_GET_LENGTH
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)


# -- shared constants ----------------------------------------------------------

TokenMalformed = errors.TokenMalformed
TokenAlgorithmRejected = errors.TokenAlgorithmRejected
TokenHeaderRejected = errors.TokenHeaderRejected
TokenTypeMismatch = errors.TokenTypeMismatch
TokenClaimsInvalid = errors.TokenClaimsInvalid
TokenIssuerMismatch = errors.TokenIssuerMismatch
TokenAudienceMismatch = errors.TokenAudienceMismatch
TokenExpired = errors.TokenExpired
TokenNotYetValid = errors.TokenNotYetValid
TokenLifetimeExceeded = errors.TokenLifetimeExceeded

cdef object _SENSITIVITY_RANK = SENSITIVITY_RANK
cdef object _ALGORITHM = ALGORITHM
cdef long _MAX_GRANTS = MAX_GRANTS
cdef long _MAX_INTENT_CHARS = MAX_INTENT_CHARS
cdef Py_ssize_t _MAX_DELEGATION_DEPTH = MAX_DELEGATION_DEPTH
cdef tuple _HEADER_KEY_MATERIAL = ("jwk", "jku", "x5u", "x5c")
cdef frozenset _HEADER_ALLOWED = frozenset({"alg", "typ", "kid"})
cdef object _TIME_MAX = 1 << 40  # far beyond any real NumericDate; keeps arithmetic exact
cdef object _U64_LIMIT = 1 << 64

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


# -- header and claims -------------------------------------------------------------

cdef str _check_header(dict header, object token_type):
    """The ``kid`` of a JOSE header this daemon accepts (EdDSA, its ``typ``, no key material); else raises."""
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
    if header.get("typ") != token_type:
        raise TokenTypeMismatch("typ is not this daemon's token type")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise TokenMalformed("kid must be a non-empty string")
    return kid


cdef VerifiedToken _check_claims(dict claims, str kid, double now, object issuer, frozenset audiences,
                                 long long max_lifetime, long long leeway):
    """The ``VerifiedToken`` of signed ``claims``, checked in the order both twins keep; else raises."""
    cdef long long iat, nbf, exp
    cdef VerifiedToken entry
    if claims.get("iss") != issuer:
        raise TokenIssuerMismatch("iss is not this daemon")
    aud = claims.get("aud")
    if not isinstance(aud, str) or aud not in audiences:
        raise TokenAudienceMismatch("aud is not an accepted audience")
    iat = _time(claims, "iat")
    nbf = _time(claims, "nbf")
    exp = _time(claims, "exp")
    if not iat <= nbf < exp:
        raise TokenClaimsInvalid("times must satisfy iat <= nbf < exp")
    if exp - iat > max_lifetime:
        raise TokenLifetimeExceeded("token lifetime exceeds the cap")
    if <double>iat > now + <double>leeway:
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
    _check_time(entry, now, leeway)
    return entry


cdef int _check_time(VerifiedToken entry, double now, long long leeway) except -1:
    """Whether a verified token is live at ``now``: raises TokenExpired or TokenNotYetValid."""
    # In doubles, like the pure twin's float ``now``: exact for any real NumericDate. No leeway
    # for exp, the pure twin's check_time says why.
    if now >= <double>entry.exp:
        raise TokenExpired("token has expired")
    if now < <double>entry.nbf - <double>leeway:
        raise TokenNotYetValid("token is not valid yet")
    return 0
