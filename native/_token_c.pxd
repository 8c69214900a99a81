# cython: language_level=3
"""Declarations of the native token checks, the twin of ``agentauthz/decision/_token_py.py``."""

cimport cython
from libc.stdint cimport uint64_t

cdef enum:
    # Status slots one token can carry: its own plus one per delegating
    # ancestor. tokens.MAX_DELEGATION_DEPTH + 1 must fit; checked at import.
    SLOTS_MAX = 16


@cython.final
cdef class Grant:
    cdef readonly object tool
    cdef readonly object target
    cdef readonly object prefix  # target without its trailing "*", or None for an exact target
    cdef readonly object ops
    cdef readonly long level
    cdef readonly object extras  # argument constraints and budget (constraints.py), None for most grants

    cdef int _init(self, object tool, object target, object ops, long level) except -1
    cdef bint _covers(self, object tool, object target, object operation, long level) except -1


@cython.final
cdef class VerifiedToken:
    cdef readonly dict claims
    cdef readonly str kid
    cdef readonly str jti
    cdef readonly str sub
    cdef readonly str task
    cdef readonly str task_key  # tokens.task_key(root agent, task): what EndTask revokes
    cdef readonly long long iat
    cdef readonly long long nbf
    cdef readonly long long exp
    cdef readonly tuple grants
    cdef readonly tuple slots  # own status slot first, then each delegating ancestor's
    cdef readonly tuple subjects  # sub, then each actor up the delegation chain
    cdef public object attachment  # free for the transport, e.g. a pre-built response
    cdef readonly bint constrained  # Check must look past the decision's allow (arguments, budgets)

    # Decision state, read and written only with the GIL held.
    cdef dict memo  # (tool, target, operation, sensitivity) -> reason, for policy generation pol_gen
    cdef long long pol_gen
    # The last request and its memo answer: a repeat skips building and hashing the memo key.
    cdef str last_tool, last_target, last_operation, last_sensitivity
    cdef object last_reason  # None: no last request for policy generation pol_gen
    cdef long long rev_gen  # RevocationIndex.generation rev_reason was computed for
    cdef object rev_reason
    # ``slots`` as C integers, so the decision tests bits without touching Python ints.
    cdef Py_ssize_t n_slots
    cdef uint64_t slot_c[SLOTS_MAX]
    cdef unsigned int slot_outside  # bit i set: slots[i] does not fit in 64 bits, always revoked

    cdef int _fill(self, dict claims, str kid, tuple grants, tuple slots, tuple subjects) except -1


# What the verifier (_verify_c) calls, once per new token: C calls through the module's C API.
cdef bint _signature_ok(const unsigned char *signature, const char *message, Py_ssize_t mlen,
                        const unsigned char *public_key) except -1
cdef str _check_header(dict header, object token_type)
cdef VerifiedToken _check_claims(dict claims, str kid, double now, object issuer, frozenset audiences,
                                 long long max_lifetime, long long leeway)
cdef int _check_time(VerifiedToken entry, double now, long long leeway) except -1
