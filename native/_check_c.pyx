# cython: language_level=3
"""The common Check in one call: the native twin of ``agentauthz/decision/_check_py.py``.

Under load each Python step of a Check ran on cold caches and cost several
times its isolated price; the glue around the decision and the record (the
bearer, the route's fields, the decision id, the prepared record, the
response) was a third of the Check. Here it is C, around the calls it cannot
do without: the verifier's decision, the audit log's ``write_allow``, and for a
token's first allow of a request, ``CheckService._first_allow``.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_GET_LENGTH

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object text, Py_ssize_t *size) except NULL
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec

from agentauthz.decision._token_c cimport VerifiedToken

import threading
import time

from agentauthz import reasons
from agentauthz.decision._check_py import HEADER_AGENT, HEADER_TASK, HEADER_TOKEN_ID, PREFIX_CHARS
from agentauthz.errors import AuditUnavailable
from agentauthz.decision.mcp import EXTENSION

cdef enum:
    PREFIX = 16  # a random 64-bit process prefix, then a 64-bit counter (_check_py says why)
    ID_CHARS = 2 * PREFIX
DECISION_ID_CHARS = ID_CHARS
if PREFIX_CHARS != PREFIX:
    raise ImportError(f"_check_c's decision id prefix is {PREFIX} hex digits, _check_py's {PREFIX_CHARS}")

cdef const char *_HEX = b"0123456789abcdef"
cdef str _AUDIT_UNAVAILABLE = reasons.AUDIT_UNAVAILABLE
cdef object _ALLOW = reasons.ALLOW  # the object decide answers an allow with
cdef str _EXTENSION = EXTENSION


cdef bint _abnormal_path(str path):
    """``_check_py.ABNORMAL_PATH.match(path)`` in one pass: before the query, a "%", backslash, ";"
    or "#", an empty segment, or a "." or ".." segment."""
    cdef Py_ssize_t i, n = PyUnicode_GET_LENGTH(path)
    cdef Py_UCS4 c, previous = 0
    cdef int dots = -1  # dots since the last "/", or -1 once the segment holds anything else
    for i in range(n):
        c = path[i]
        if c == u'?':
            break
        if c == u'%' or c == u'\\' or c == u';' or c == u'#':
            return True
        if c == u'/':
            if previous == u'/' or dots == 1 or dots == 2:
                return True
            dots = 0
        elif c == u'.':
            if dots >= 0:
                dots += 1
        else:
            dots = -1
        previous = c
    return dots == 1 or dots == 2


def abnormal_path(str path not None):
    """The warm path's scan, for the tests that hold it to ``_check_py.ABNORMAL_PATH``."""
    return _abnormal_path(path)


# -- the allow response, by hand ----------------------------------------------------------
# CheckResponse { status: {} (code OK is the default), ok_response: OkHttpResponse { headers:
# [HeaderValueOption { header: HeaderValue { key, value }, append_action:
# OVERWRITE_IF_EXISTS_OR_ADD }] x 3, headers_to_remove: ["authorization"] } }, fields in number
# order as protobuf writes them; tests/test_warm_allow.py holds it to the pure twin's bytes.
cdef enum:
    LEN = 2  # wire type of a length-delimited field
    VARINT = 0
    OVERWRITE_IF_EXISTS_OR_ADD = 2
cdef bytes _STATUS_OK = b"\x0a\x00"  # CheckResponse.status (1), an empty Status
cdef bytes _STRIP_BEARER = b"\x2a\x0dauthorization"  # OkHttpResponse.headers_to_remove (5)
cdef bytes _KEY_AGENT = HEADER_AGENT.encode("ascii")
cdef bytes _KEY_TASK = HEADER_TASK.encode("ascii")
cdef bytes _KEY_TOKEN_ID = HEADER_TOKEN_ID.encode("ascii")


cdef inline Py_ssize_t _varint_size(Py_ssize_t n):
    cdef Py_ssize_t size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


cdef inline char *_varint(char *out, Py_ssize_t n):
    while n >= 0x80:
        out[0] = <char>(n & 0x7F | 0x80)
        n >>= 7
        out += 1
    out[0] = <char>n
    return out + 1


cdef inline Py_ssize_t _field_size(Py_ssize_t n):
    """A length-delimited field of ``n`` bytes, tag included (every tag here is one byte)."""
    return 1 + _varint_size(n) + n


cdef inline char *_field(char *out, int number, const char *data, Py_ssize_t n):
    out[0] = <char>(number << 3 | LEN)
    out = _varint(out + 1, n)
    memcpy(out, data, n)
    return out + n


cdef inline Py_ssize_t _header_value_size(Py_ssize_t key, Py_ssize_t value):
    # proto3 leaves an empty string out
    return _field_size(key) + (_field_size(value) if value else 0)


cdef inline Py_ssize_t _option_size(Py_ssize_t key, Py_ssize_t value):
    return _field_size(_header_value_size(key, value)) + 2  # + append_action (3)


cdef char *_option(char *out, bytes key, const char *value, Py_ssize_t n):
    """OkHttpResponse.headers (2): one HeaderValueOption."""
    cdef Py_ssize_t k = PyBytes_GET_SIZE(key)
    out[0] = <char>(2 << 3 | LEN)
    out = _varint(out + 1, _option_size(k, n))
    out[0] = <char>(1 << 3 | LEN)  # HeaderValueOption.header
    out = _varint(out + 1, _header_value_size(k, n))
    out = _field(out, 1, PyBytes_AS_STRING(key), k)  # HeaderValue.key
    if n:
        out = _field(out, 2, value, n)  # HeaderValue.value
    out[0] = <char>(3 << 3 | VARINT)
    out[1] = <char>OVERWRITE_IF_EXISTS_OR_ADD
    return out + 2


def allow_response(str agent not None, str task not None, str token_id not None):
    """The serialized CheckResponse allowing a token's request (the pure twin's docstring says
    what it holds), written directly: protobuf's copy and serialize took 2.7 µs of a new token's
    first Check."""
    cdef Py_ssize_t na, nt, ni, ok, size
    cdef const char *a = PyUnicode_AsUTF8AndSize(agent, &na)
    cdef const char *t = PyUnicode_AsUTF8AndSize(task, &nt)
    cdef const char *i = PyUnicode_AsUTF8AndSize(token_id, &ni)
    ok = (_field_size(_option_size(len(_KEY_AGENT), na)) + _field_size(_option_size(len(_KEY_TASK), nt))
          + _field_size(_option_size(len(_KEY_TOKEN_ID), ni)) + len(_STRIP_BEARER))
    size = len(_STATUS_OK) + _field_size(ok)
    cdef bytes response = PyBytes_FromStringAndSize(NULL, size)
    cdef char *out = PyBytes_AS_STRING(response)
    memcpy(out, PyBytes_AS_STRING(_STATUS_OK), len(_STATUS_OK))
    out[2] = <char>(3 << 3 | LEN)  # CheckResponse.ok_response
    out = _varint(out + 3, ok)
    out = _option(out, _KEY_AGENT, a, na)
    out = _option(out, _KEY_TASK, t, nt)
    out = _option(out, _KEY_TOKEN_ID, i, ni)
    memcpy(out, PyBytes_AS_STRING(_STRIP_BEARER), len(_STRIP_BEARER))
    if out + len(_STRIP_BEARER) != PyBytes_AS_STRING(response) + size:
        raise SystemError("allow_response: sized and written lengths differ")
    return response


cdef class DecisionIds:
    """Fixed-width decision ids, unique per ``prefix``, spliced into pre-built metadata bytes.

    ``head`` and ``tail`` are a serialized CheckResponse ``dynamic_metadata`` field around the id
    (``extauthz.DecisionIds``); protobuf merges concatenated fields into one message.
    """

    cdef char _text[ID_CHARS]  # the prefix, then the counter's hex digits
    cdef bytes _head, _tail
    cdef unsigned long long _counter

    def __init__(self, str prefix not None, bytes head not None, bytes tail not None):
        if len(prefix) != PREFIX or not all(c in "0123456789abcdef" for c in prefix):
            raise ValueError(f"a decision id prefix is {PREFIX} lowercase hex digits: {prefix!r}")
        memcpy(self._text, PyBytes_AS_STRING(prefix.encode("ascii")), PREFIX)
        self._head, self._tail = head, tail
        self._counter = 0

    cdef void _advance(self) noexcept:
        cdef unsigned long long n
        cdef int i
        self._counter += 1
        n = self._counter
        for i in range(ID_CHARS - 1, PREFIX - 1, -1):
            self._text[i] = _HEX[n & 15]
            n >>= 4

    def next(self):
        self._advance()
        return self._text[:ID_CHARS].decode("ascii")

    def metadata(self, str decision_id not None):
        """``dynamic_metadata`` naming ``decision_id``, as serialized CheckResponse bytes."""
        return self._head + decision_id.encode("ascii") + self._tail

    cdef bytes _response(self, bytes body, str decision_id):
        """``body`` and the metadata naming ``decision_id`` (one of ours), in one allocation."""
        cdef Py_ssize_t size = PyBytes_GET_SIZE(body), id_size
        cdef const char *id_text = PyUnicode_AsUTF8AndSize(decision_id, &id_size)
        if id_size != ID_CHARS:
            raise ValueError(f"not a decision id: {decision_id!r}")
        cdef Py_ssize_t head = PyBytes_GET_SIZE(self._head), tail = PyBytes_GET_SIZE(self._tail)
        out = PyBytes_FromStringAndSize(NULL, size + head + ID_CHARS + tail)
        cdef char *at = PyBytes_AS_STRING(out)
        memcpy(at, PyBytes_AS_STRING(body), size)
        at += size
        memcpy(at, PyBytes_AS_STRING(self._head), head)
        at += head
        memcpy(at, id_text, ID_CHARS)
        memcpy(at + ID_CHARS, PyBytes_AS_STRING(self._tail), tail)
        return out


cdef inline double _monotonic() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return now.tv_sec + now.tv_nsec * 1e-9


cdef enum:
    MAX_BOUNDS = 32


cdef inline double _seconds(timespec now) noexcept nogil:
    """A clock reading as ``time.time()`` and ``time.monotonic()`` give it: nanoseconds over 1e9."""
    cdef long long ns = now.tv_sec * 1000000000LL + now.tv_nsec
    if ns % 1000000000LL == 0:
        return <double>(ns // 1000000000LL)
    return <double>ns / 1e9


cdef class SteadyClock:
    """See ``_check_py.SteadyClock``: the wall and monotonic clocks read in C when they are the
    system's (``time.time``, ``time.monotonic``)."""

    cdef object _wall, _monotonic, _stepped
    cdef bint _system
    cdef public object lock
    cdef public double last, last_mono
    cdef public bint behind

    def __init__(self, wall, monotonic, stepped):
        self._wall, self._monotonic, self._stepped = wall, monotonic, stepped
        self._system = wall is time.time and monotonic is time.monotonic
        self.lock = threading.Lock()
        self.last, self.last_mono = wall(), monotonic()
        self.behind = False

    def __call__(self):
        cdef timespec now
        cdef double wall, mono
        if self._system:
            clock_gettime(CLOCK_REALTIME, &now)
            wall = _seconds(now)
            clock_gettime(CLOCK_MONOTONIC, &now)
            mono = _seconds(now)
        else:
            wall, mono = self._wall(), self._monotonic()
        if wall >= self.last and not self.behind:
            self.last, self.last_mono = wall, mono
            return wall
        return self._stepped(self, wall, mono)


cdef class Latency:
    """A Check latency histogram counted into ``counts`` (unsigned 64-bit: one counter per bucket of
    ``bounds_ns``, then +Inf, then the sum in ns), with one clock read at each end of a Check."""

    cdef unsigned long long[::1] _view
    cdef unsigned long long *_counts
    cdef unsigned long long _bounds[MAX_BOUNDS]
    cdef Py_ssize_t _n

    def __init__(self, counts, tuple bounds_ns not None):
        if (len(bounds_ns) > MAX_BOUNDS or len(counts) != len(bounds_ns) + 2
                or list(bounds_ns) != sorted(bounds_ns)):
            raise ValueError("Latency takes ascending bounds and a counter per bucket, +Inf and the sum")
        self._view = counts
        self._counts = &self._view[0]
        self._n = len(bounds_ns)
        for i in range(self._n):
            self._bounds[i] = bounds_ns[i]

    def now(self):
        """The start of a Check, for observe (CLOCK_MONOTONIC, seconds)."""
        return _monotonic()

    def observe(self, double started):
        """Count one Check that started at ``now()``: in the first bucket whose bound it is within."""
        self._count(started)

    cdef inline void _count(self, double started) noexcept:
        cdef double elapsed = (_monotonic() - started) * 1e9
        cdef unsigned long long ns = <unsigned long long>elapsed if elapsed > 0 else 0
        cdef Py_ssize_t i = 0
        while i < self._n and ns > self._bounds[i]:
            i += 1
        self._counts[i] += 1
        self._counts[self._n + 1] += ns


cdef class WarmAllow:
    """See the module docstring. ``__call__`` returns the response bytes, or ``(reason, entry)``
    when it decided but the full path must answer, or None when it did not decide."""

    cdef dict _verifiers
    cdef str _default
    cdef object _default_verifier
    cdef object _policy, _policy_seen
    cdef frozenset _binding  # boundaries of _policy_seen that require binding
    cdef object _write_allow, _clock
    cdef DecisionIds _ids
    cdef dict _prepared
    cdef bytes _unrecorded  # the audit_unavailable denial, without its decision id
    cdef object _decisions  # reason -> count (a Counter), for the rare outcomes
    # (entry, tool, target, operation, sensitivity) -> the record's shared members, after building
    # them and entry.attachment, the response: the first allow of a token for a request
    cdef object _first_allow
    # The allows answered here, in one unsigned 64-bit counter (a row of metrics.MeterTable: shared
    # with the primary, which reads it for /metrics); the full path counts its own.
    cdef unsigned long long[::1] _allowed_view
    cdef unsigned long long *_allowed
    cdef Latency _latency  # times the Checks answered here; None: untimed
    # When the last call began (Latency.now's clock): the full path times from there what it answers.
    cdef readonly double started

    def __init__(self, verifiers, policy, audit, DecisionIds ids not None, dict prepared not None,
                 clock, bytes unrecorded not None, decisions, first_allow, allowed=None,
                 Latency latency=None):
        self._verifiers = dict(verifiers)
        self._default, self._default_verifier = next(iter(self._verifiers.items()))
        self._policy = policy
        self._policy_seen = None
        self._binding = frozenset()
        self._write_allow, self._clock = audit.write_allow, clock
        self._ids, self._prepared = ids, prepared
        self._unrecorded, self._decisions, self._first_allow = unrecorded, decisions, first_allow
        self._allowed_view = allowed if allowed is not None else memoryview(bytearray(8)).cast("Q")
        self._allowed = &self._allowed_view[0]
        self._latency = latency

    @property
    def allowed(self):
        return self._allowed[0]

    def __call__(self, tuple fields not None):
        cdef str authorization
        cdef dict extensions
        cdef str token, boundary
        cdef VerifiedToken entry
        self.started = _monotonic()
        if len(fields) != 8:
            raise ValueError(f"not a CheckRequest's fields: {len(fields)} items")
        authorization, extensions = fields[0], fields[4]
        if fields[5] or fields[6] or _EXTENSION in extensions:
            return None  # a peer to match, or an MCP body to read: only the full path does that
        if _abnormal_path(<str?>fields[3]):
            return None  # the full path refuses it (extauthz.request_fields)
        if authorization is None or PyUnicode_GET_LENGTH(authorization) < 8 or not (
                authorization.startswith("Bearer ") or authorization.startswith("bearer ")):
            return None
        token = authorization[7:]
        if " " in token:
            return None
        tool = extensions.get("tool")
        target = extensions.get("target")
        operation = extensions.get("operation")
        sensitivity = extensions.get("sensitivity")
        if tool is None or target is None or not operation or not sensitivity:
            return None  # the policy's request defaults fill in the rest: the full path
        boundary = extensions.get("boundary")
        if boundary:
            verifier = self._verifiers.get(boundary)
            if verifier is None:
                return None
        else:
            boundary, verifier = self._default, self._default_verifier
        policy = self._policy()
        if policy is not self._policy_seen:
            self._binding = frozenset([name for name, b in policy.boundaries.items()
                                       if b.require_certificate_binding])
            self._policy_seen = policy
        if boundary in self._binding:
            return None  # a token bound to no certificate needs a peer here: the full path says so
        now = self._clock()
        decided = verifier.decide(token, tool, target, operation, sensitivity, now)
        found = (<tuple?>decided)[1]
        if found is None or type(found) is not VerifiedToken:  # a denial, or the pure twin's token
            return decided
        entry = <VerifiedToken>found
        # Constraints (the token's, or the policy's: then the decision is not ALLOW) are the full path's.
        if entry.constrained or (<tuple>decided)[0] is not _ALLOW:
            return decided
        prepared = self._prepared.get(((<tuple>decided)[0], entry.jti, tool, target, operation, sensitivity))
        body = entry.attachment
        if prepared is None or body is None:
            prepared = self._first_allow(entry, tool, target, operation, sensitivity)
            body = entry.attachment
        if type(body) is not bytes:
            return decided
        self._ids._advance()
        decision_id = self._ids._text[:ID_CHARS].decode("ascii")
        try:
            # Declined when the log is not healthy too: the full path then answers audit_unavailable.
            if not self._write_allow(decision_id, fields[1], prepared, now):
                return decided  # the full path waits for the writer (record_check_durable)
        except AuditUnavailable:  # written nowhere, and withdrawn in the log under this decision id
            self._decisions[_AUDIT_UNAVAILABLE] += 1
            response = self._ids._response(self._unrecorded, decision_id)
        else:
            self._allowed[0] += 1
            response = self._ids._response(<bytes>body, decision_id)
        if self._latency is not None:
            self._latency._count(self.started)
        return response

