# cython: language_level=3, boundscheck=False, wraparound=False
"""Native twin of ``agentauthz/decision/_request_py.py``: the fields of an ext_authz CheckRequest a decision
reads, scanned straight from the wire bytes.

Building the protobuf message and walking it (each attribute and map access makes a wrapper
object) cost a warm Check more than its decision. This scanner knows the part of the schema Envoy
sends and returns the same tuple as the pure twin. Anything else it leaves to the pure twin by
returning None: an unknown field, a wire type the schema does not give that field, a body or raw
header map, non-empty metadata, malformed bytes, or an ``mcp`` route (which reads the body).
Within what it accepts it keeps protobuf's semantics, so both twins answer alike: a repeated
message field merges (its scalars last-wins, its maps key by key), a repeated scalar is last-wins,
and every string field, extracted or not, must be valid UTF-8 (proto3; upb refuses it otherwise).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint64_t
from libc.string cimport memcmp

cdef enum:  # wire types
    VARINT = 0
    I64 = 1
    LEN = 2
    I32 = 5

# Every Span local starts as Span(NULL, 0): _field fills it only for LEN fields, and gcc cannot see that
# callers read it only then (-Wmaybe-uninitialized); the build stays warning-free.
cdef struct Span:
    const unsigned char *p
    Py_ssize_t n


cdef class _Out:
    """What the scan has found so far (last occurrence wins, as protobuf merges)."""
    cdef object authorization, request_id, method, path, principal, certificate
    cdef dict extensions

    def __cinit__(self):
        self.authorization = None
        self.request_id = self.method = self.path = self.principal = self.certificate = ""
        self.extensions = {}


cdef inline Py_ssize_t _varint(const unsigned char *p, Py_ssize_t i, Py_ssize_t end,
                               uint64_t *value) noexcept:
    """Read a varint at ``i``; the index after it, or -1 when it is truncated or over 10 bytes."""
    cdef uint64_t v = 0
    cdef int shift = 0
    cdef unsigned char b
    while i < end and shift < 70:
        b = p[i]
        i += 1
        v |= <uint64_t>(b & 0x7F) << shift
        if b < 0x80:
            value[0] = v
            return i
        shift += 7
    return -1


cdef inline Py_ssize_t _field(const unsigned char *p, Py_ssize_t i, Py_ssize_t end, int *number,
                              int *wire, Span *span) noexcept:
    """Read one field's key and value at ``i``: the index after it, or -1 when malformed.

    ``span`` is the payload of a LEN field; fixed and varint values are skipped (no field this
    scanner extracts is numeric).
    """
    cdef uint64_t key, length
    i = _varint(p, i, end, &key)
    if i < 0 or key >> 3 == 0 or key >> 3 > 536870911:
        return -1
    number[0], wire[0] = <int>(key >> 3), <int>(key & 7)
    if wire[0] == VARINT:
        return _varint(p, i, end, &length)
    if wire[0] == I64:
        return i + 8 if end - i >= 8 else -1
    if wire[0] == I32:
        return i + 4 if end - i >= 4 else -1
    if wire[0] != LEN:
        return -1  # groups: not in this schema
    i = _varint(p, i, end, &length)
    if i < 0 or length > <uint64_t>(end - i):
        return -1
    span.p, span.n = p + i, <Py_ssize_t>length
    return i + <Py_ssize_t>length


cdef inline object _text(Span s):
    """The span as str; None when it is not UTF-8 (the caller defers: upb would refuse it)."""
    try:
        return PyUnicode_DecodeUTF8(<char *>s.p, s.n, NULL)
    except UnicodeDecodeError:
        return None


cdef inline bint _utf8(Span s) except -1:
    """Whether a string field nobody reads is valid UTF-8: ASCII without making a str."""
    cdef Py_ssize_t i
    for i in range(s.n):
        if s.p[i] >= 0x80:
            return _text(s) is not None
    return True


cdef inline bint _is(Span s, const char *name, Py_ssize_t n) noexcept:
    return s.n == n and memcmp(s.p, name, n) == 0


cdef int _strings(Span m, int first, int last, int varints) except -1:
    """A message of string fields ``first``..``last`` and varint fields from ``varints`` (a bit
    set), none extracted: only well-formed, valid UTF-8. False defers."""
    cdef Py_ssize_t i = 0
    cdef int number, wire
    cdef Span s = Span(NULL, 0)
    while i < m.n:
        i = _field(m.p, i, m.n, &number, &wire, &s)
        if i < 0:
            return False
        if number < 31 and varints >> number & 1:
            if wire != VARINT:
                return False
        elif first <= number <= last and wire == LEN:
            if not _utf8(s):
                return False
        else:
            return False
    return True


cdef int _map(Span m, dict into, bint keep) except -1:
    """One map<string, string> entry; stored in ``into`` when ``keep`` (a later key wins)."""
    cdef Py_ssize_t i = 0
    cdef int number, wire
    cdef Span s = Span(NULL, 0)
    cdef object key = "", value = ""
    while i < m.n:
        i = _field(m.p, i, m.n, &number, &wire, &s)
        if i < 0 or wire != LEN or number > 2:
            return False
        if not keep:
            if not _utf8(s):
                return False
            continue
        text = _text(s)
        if text is None:
            return False
        if number == 1:
            key = text
        else:
            value = text
    if keep:
        into[key] = value
    return True


cdef int _header(Span m, _Out out) except -1:
    """One entry of HttpRequest.headers: only ``authorization`` is kept."""
    cdef Py_ssize_t i = 0
    cdef int number, wire
    cdef Span s = Span(NULL, 0)
    cdef bint authorization = False
    cdef Span value = Span(NULL, 0)
    while i < m.n:
        i = _field(m.p, i, m.n, &number, &wire, &s)
        if i < 0 or wire != LEN or number > 2 or not _utf8(s):
            return False
        if number == 1:
            authorization = _is(s, b"authorization", 13)
        else:
            value = s
    if authorization:
        out.authorization = _text(value) if value.n else ""
    return True


cdef int _http(Span m, _Out out) except -1:
    """AttributeContext.HttpRequest: id 1, method 2, headers 3, path 4, host/scheme/query/
    fragment 5-8 and protocol 10 (strings), size 9; body 11, raw_body 12, header_map 13 defer."""
    cdef Py_ssize_t i = 0
    cdef int number, wire
    cdef Span s = Span(NULL, 0)
    while i < m.n:
        i = _field(m.p, i, m.n, &number, &wire, &s)
        if i < 0:
            return False
        if number == 9:
            if wire != VARINT:
                return False
            continue
        if wire != LEN or number > 10:
            return False
        if number == 3:
            if not _header(s, out):
                return False
            continue
        if number == 1 or number == 2 or number == 4:
            text = _text(s)
            if text is None:
                return False
            if number == 1:
                out.request_id = text
            elif number == 2:
                out.method = text
            else:
                out.path = text
        elif not _utf8(s):
            return False
    return True


cdef int _request(Span m, _Out out) except -1:
    """AttributeContext.Request: time 1 (a Timestamp), http 2."""
    cdef Py_ssize_t i = 0
    cdef int number, wire
    cdef Span s = Span(NULL, 0)
    while i < m.n:
        i = _field(m.p, i, m.n, &number, &wire, &s)
        if i < 0 or wire != LEN:
            return False
        if number == 1:
            if not _strings(s, 0, -1, 1 << 1 | 1 << 2):  # seconds, nanos
                return False
        elif number == 2:
            if not _http(s, out):
                return False
        else:
            return False
    return True


cdef int _address(Span m) except -1:
    """config.core.v3.Address: socket_address 1 or pipe 2; other kinds defer."""
    cdef Py_ssize_t i = 0
    cdef int number, wire
    cdef Span s = Span(NULL, 0)
    while i < m.n:
        i = _field(m.p, i, m.n, &number, &wire, &s)
        if i < 0 or wire != LEN:
            return False
        if number == 1:  # protocol 1, port_value 3, ipv4_compat 6; the rest strings
            if not _socket_address(s):
                return False
        elif number == 2:  # Pipe: path 1, mode 2
            if not _strings(s, 1, 1, 1 << 2):
                return False
        else:
            return False
    return True


cdef int _socket_address(Span m) except -1:
    cdef Py_ssize_t i = 0
    cdef int number, wire
    cdef Span s = Span(NULL, 0)
    while i < m.n:
        i = _field(m.p, i, m.n, &number, &wire, &s)
        if i < 0:
            return False
        if number == 1 or number == 3 or number == 6:
            if wire != VARINT:
                return False
        elif 2 <= number <= 7 and wire == LEN:
            if not _utf8(s):
                return False
        else:
            return False
    return True


cdef int _peer(Span m, _Out out, bint source) except -1:
    """AttributeContext.Peer: address 1, service 2, labels 3, principal 4, certificate 5; only the
    source's principal and certificate are kept."""
    cdef Py_ssize_t i = 0
    cdef int number, wire
    cdef Span s = Span(NULL, 0)
    while i < m.n:
        i = _field(m.p, i, m.n, &number, &wire, &s)
        if i < 0 or wire != LEN or number > 5:
            return False
        if number == 1:
            if not _address(s):
                return False
        elif number == 3:
            if not _map(s, None, False):
                return False
        elif source and (number == 4 or number == 5):
            text = _text(s)
            if text is None:
                return False
            if number == 4:
                out.principal = text
            else:
                out.certificate = text
        elif not _utf8(s):
            return False
    return True


cdef int _attributes(Span m, _Out out) except -1:
    """AttributeContext: source 1, destination 2, request 4, context_extensions 10, tls_session 12
    (sni); metadata_context 11 and route_metadata_context 13 only when empty."""
    cdef Py_ssize_t i = 0
    cdef int number, wire
    cdef Span s = Span(NULL, 0)
    while i < m.n:
        i = _field(m.p, i, m.n, &number, &wire, &s)
        if i < 0 or wire != LEN:
            return False
        if number == 1 or number == 2:
            if not _peer(s, out, number == 1):
                return False
        elif number == 4:
            if not _request(s, out):
                return False
        elif number == 12:
            if not _strings(s, 1, 1, 0):
                return False
        elif number == 10:
            if not _map(s, out.extensions, True):
                return False
        elif (number == 11 or number == 13) and s.n == 0:
            pass
        else:
            return False
    return True


def scan(raw):
    """(authorization or None, request id, method, path, context_extensions, source principal,
    source certificate, None) from a serialized CheckRequest; None to leave it to the pure twin."""
    cdef Span whole
    cdef Span s = Span(NULL, 0)
    cdef Py_ssize_t i = 0
    cdef int number, wire
    cdef bint seen = False
    cdef _Out out = _Out()
    if type(raw) is not bytes:
        raw = bytes(raw)
    whole.p, whole.n = <const unsigned char *>PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw)
    while i < whole.n:
        i = _field(whole.p, i, whole.n, &number, &wire, &s)
        if i < 0 or number != 1 or wire != LEN or not _attributes(s, out):
            return None
        seen = True
    if not seen or "mcp" in out.extensions:
        return None
    return (out.authorization, out.request_id, out.method, out.path, out.extensions,
            out.principal, out.certificate, None)
