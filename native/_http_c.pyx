# cython: language_level=3, boundscheck=False, wraparound=False
"""Native twin of ``agentauthz/decision/_http_py.py``: Envoy's HTTP ext_authz request as the fields a decision
reads, and the decision's CheckResponse bytes as the HTTP answer. Same inputs, same answers; see the pure
twin for what each refuses. Here a header name is matched in place (no slice, no method call per header)
and the answer is cut and looked up with C calls: in Python both cost a warm HTTP Check as much as its
decision.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.ref cimport PyObject
from cpython.unicode cimport PyUnicode_Tailmatch
from libc.string cimport memcmp

PATH_HEADER = "x-agentauthz-path"
ROUTE_PREFIX = "x-agentauthz-route-"
ROUTE_KEYS = ("tool", "target", "operation", "sensitivity", "boundary", "mcp")
XFCC = "x-forwarded-client-cert"
DECISION_HEADER = "x-agentauthz-decision-id"
MCP = "mcp"  # decision.mcp.EXTENSION

cdef dict _ROUTE_HEADERS = {ROUTE_PREFIX + key: key for key in ROUTE_KEYS}
cdef str _PREFIX = ROUTE_PREFIX
cdef Py_ssize_t _PREFIX_LEN = len(ROUTE_PREFIX)
cdef str _PATH = PATH_HEADER
cdef str _XFCC = XFCC
cdef str _AUTHORIZATION = "authorization"
cdef str _REQUEST_ID = "x-request-id"


def scan_http(str method not None, str path not None, list header_items not None, Py_ssize_t header_count,
              peer_of):
    """See ``_http_py.scan_http``."""
    cdef dict headers = {}
    cdef dict extensions = {}
    cdef PyObject *found
    cdef tuple item
    cdef str name, value
    for item in header_items:
        name, value = item[0], item[1]
        found = PyDict_GetItem(_ROUTE_HEADERS, name)
        if found is not NULL:
            if (<object>found) in extensions:
                return None
            PyDict_SetItem(extensions, <object>found, value)
            continue
        found = PyDict_GetItem(headers, name)
        if found is not NULL:
            if name == _PATH or name == _XFCC:
                return None
            PyDict_SetItem(headers, name, <str>(<object>found) + "," + value)
        elif len(name) >= _PREFIX_LEN and PyUnicode_Tailmatch(name, _PREFIX, 0, _PREFIX_LEN, -1):
            return None
        else:
            PyDict_SetItem(headers, name, value)
    if len(headers) + len(extensions) != header_count:  # a header granian gave no value of
        return None
    found = PyDict_GetItem(headers, _PATH)
    if found is NULL:
        return None
    cdef str original = <str>(<object>found)
    cdef str bare = original.partition("?")[0]
    if bare != path and "%" not in bare:
        return None
    principal = certificate = ""
    found = PyDict_GetItem(headers, _XFCC)
    if found is not NULL:
        peer = peer_of(<object>found)
        if peer is None:
            return None
        principal, certificate = peer
    return (headers.get(_AUTHORIZATION), headers.get(_REQUEST_ID, ""), method, original, extensions,
            principal, certificate, headers if MCP in extensions else None)


cdef class HttpAnswers:
    """See ``_http_py.HttpAnswers``."""

    cdef bytes _head, _tail
    cdef object _convert
    cdef Py_ssize_t _limit, _framed
    cdef dict _known

    def __init__(self, bytes head not None, bytes tail not None, Py_ssize_t id_chars, convert,
                 Py_ssize_t limit):
        self._head, self._tail, self._convert, self._limit = head, tail, convert, limit
        self._framed = len(head) + id_chars + len(tail)
        self._known = {}

    def __call__(self, bytes response not None):
        cdef Py_ssize_t size = PyBytes_GET_SIZE(response)
        cdef Py_ssize_t cut = size - self._framed
        cdef Py_ssize_t head = PyBytes_GET_SIZE(self._head), tail = PyBytes_GET_SIZE(self._tail)
        cdef const char *at = PyBytes_AS_STRING(response)
        cdef object decision_id = None
        if cut >= 0 and memcmp(at + size - tail, PyBytes_AS_STRING(self._tail), tail) == 0 \
                and memcmp(at + cut, PyBytes_AS_STRING(self._head), head) == 0:
            decision_id = at[cut + head:size - tail].decode("ascii")
            response = at[:cut]
        cdef PyObject *found = PyDict_GetItem(self._known, response)
        cdef tuple known
        if found is NULL:
            known, keep = self._convert(response)
            if keep:
                if len(self._known) >= self._limit:
                    self._known.clear()
                self._known[response] = known
        else:
            known = <tuple>(<object>found)
        if decision_id is None:
            return known
        return (known[0], known[1] + [(DECISION_HEADER, decision_id)], known[2])
