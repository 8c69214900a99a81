# cython: language_level=3
"""Declarations of the native verifier, the twin of ``agentauthz/decision/_verify_py.py``."""

cimport cython

from agentauthz.decision._bitset_c cimport Bitset
from agentauthz.decision._token_c cimport VerifiedToken


@cython.final
cdef class RevocationIndex:
    cdef Bitset _bits  # never None: the decision tests it without a check
    cdef public dict tasks
    cdef public dict agents
    cdef public set kids
    cdef public long long generation

    cdef object _reason_for(self, VerifiedToken token)


@cython.final
cdef class Verifier:
    cdef public object issuer
    cdef public frozenset audiences
    cdef public object token_type
    cdef public long long leeway
    cdef public long long max_lifetime
    cdef public long long max_token_bytes
    cdef public long long cache_size
    cdef RevocationIndex _revocations
    cdef dict _keys  # kid -> 32-byte Ed25519 public key; replaced whole, never mutated
    cdef dict _headers  # header segment text -> (token_type, kid) of a header that passed
    cdef object _cache  # OrderedDict: token text -> VerifiedToken, oldest first
    cdef object _policy
    cdef long long _policy_gen

    cdef VerifiedToken _verify_uncached(self, object token, double now)
    cdef object _match(self, VerifiedToken entry, object tool, object target, object operation,
                       object sensitivity, object policy)
