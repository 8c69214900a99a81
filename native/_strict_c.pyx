# cython: language_level=3
"""Strict token text, natively: the twin of ``agentauthz/decision/_strict_py.py``, same refusals, same messages.

Strict base64url (RFC 7515 §2) and strict JSON (RFC 8259: UTF-8, no duplicate
keys, no NaN or Infinity, nesting bounded; RFC 7493 I-JSON: no lone surrogate), which every new token's three
segments go through before anything is believed. ``_verify_c`` cimports the
cdef functions; the def ones are what the pure twin, the tests and the fuzzers
call.
"""

import json

import orjson

from agentauthz.decision._strict_py import lone_surrogate
from agentauthz.errors import TokenMalformed
from agentauthz.decision.tokens import MAX_JSON_DEPTH

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DATA, PyUnicode_DecodeUTF8, PyUnicode_GET_LENGTH
from libc.math cimport isfinite
from libc.string cimport memset

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)

cdef Py_ssize_t _MAX_JSON_DEPTH = MAX_JSON_DEPTH

# -- strict base64url ----------------------------------------------------------

_NOT_B64URL = "segment is not unpadded base64url"
_NON_CANONICAL = "segment has non-canonical base64url padding bits"

# 6-bit value of each byte of the RFC 4648 §5 alphabet; 0xFF for every other
# byte, so one AND with 0xC0 over a group finds any stray character.
cdef unsigned char _B64[256]


cdef void _init_b64():
    cdef bytes alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    cdef int k
    memset(_B64, 0xFF, sizeof(_B64))
    for k in range(64):
        _B64[alphabet[k]] = k


_init_b64()


cdef bytes _b64url_decode(const unsigned char *src, Py_ssize_t n):
    """Strict base64url (RFC 7515 §2) of ``n`` ASCII bytes at ``src``.

    Profiled: runs over every byte of every new token. It walks raw pointers
    bounded by ``n``, so there are no bounds checks to switch off.
    """
    cdef Py_ssize_t quads = n >> 2, rem = n & 3, k
    cdef unsigned char a, b, c, d
    cdef unsigned char *dst
    cdef bytes out
    if n == 0 or rem == 1:  # one leftover character cannot encode a whole byte
        raise TokenMalformed(_NOT_B64URL)
    out = PyBytes_FromStringAndSize(NULL, quads * 3 + (rem * 3 >> 2))
    dst = <unsigned char *>PyBytes_AS_STRING(out)
    for k in range(quads):
        a = _B64[src[0]]
        b = _B64[src[1]]
        c = _B64[src[2]]
        d = _B64[src[3]]
        if (a | b | c | d) & 0xC0:
            raise TokenMalformed(_NOT_B64URL)
        dst[0] = <unsigned char>(a << 2 | b >> 4)
        dst[1] = <unsigned char>(b << 4 | c >> 2)
        dst[2] = <unsigned char>(c << 6 | d)
        src += 4
        dst += 3
    if rem:
        a = _B64[src[0]]
        b = _B64[src[1]]
        c = _B64[src[2]] if rem == 3 else 0
        if (a | b | c) & 0xC0:
            raise TokenMalformed(_NOT_B64URL)
        dst[0] = <unsigned char>(a << 2 | b >> 4)
        if rem == 3:
            dst[1] = <unsigned char>(b << 4 | c >> 2)
        # The unused low bits of the last character must be zero, or two
        # strings would decode to one token (a free mutation of every token).
        if (c & 3) if rem == 3 else (b & 15):
            raise TokenMalformed(_NON_CANONICAL)
    return out


cdef bytes _decode_segment(object segment):
    # Anything outside ASCII is outside the alphabet; an ASCII str stores one byte per character.
    if not PyUnicode_IS_ASCII(segment):
        raise TokenMalformed(_NOT_B64URL)
    return _b64url_decode(<const unsigned char *>PyUnicode_DATA(segment), PyUnicode_GET_LENGTH(segment))


def b64url_decode(segment):
    """Strict base64url (RFC 7515 §2): unpadded, URL alphabet only, canonical trailing bits."""
    if not isinstance(segment, str):
        raise TypeError(f"segment must be str, not {type(segment).__name__}")
    return _decode_segment(segment)


# -- strict JSON -----------------------------------------------------------------

def _pairs_no_duplicates(list pairs):
    cdef dict obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    # Rare path: find the first repeated key, for the pure twin's exact message.
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise TokenMalformed(f"duplicate JSON key {key!r}")
        obj[key] = value
    return obj


def _reject_constant(name):
    raise TokenMalformed(f"non-finite number {name} in JSON")


def _finite_float(text):
    value = float(text)
    if not isfinite(value):
        raise TokenMalformed("non-finite number in JSON")
    return value


# The pure twin calls json.loads with these hooks, which builds a decoder per
# call and makes every object a Python call. Here a token's claims take
# orjson (RFC 8259 strict, ~3x faster than json's scanner on them), followed
# by a C check that the hooks would have had nothing to refuse. Anything else
# goes through the hooked scanner, built once, which is json.loads's own, so
# every refusal and message is the pure twin's.
cdef object _orjson_loads = orjson.loads
cdef object _OrjsonError = orjson.JSONDecodeError
cdef object _strict_scan_once = json.JSONDecoder(
    object_pairs_hook=_pairs_no_duplicates, parse_constant=_reject_constant,
    parse_float=_finite_float).scan_once
_JSONDecodeError = json.JSONDecodeError


cdef Py_ssize_t _skip_json_space(str text, Py_ssize_t i):
    # JSON's four whitespace characters (RFC 8259 §2), as json.decoder.WHITESPACE.
    cdef Py_ssize_t n = len(text)
    cdef Py_UCS4 ch
    while i < n:
        ch = text[i]
        if ch != u' ' and ch != u'\t' and ch != u'\n' and ch != u'\r':
            break
        i += 1
    return i


cdef Py_ssize_t _json_members(const unsigned char *p, Py_ssize_t n, Py_ssize_t max_depth) noexcept:
    """Object members in a valid JSON text (one ':' outside strings each, RFC 8259 §4), or -1 as soon
    as more than ``max_depth`` arrays and objects are open at once. One pass over the bytes for both.

    '"', backslash, ':' and brackets are ASCII and never occur inside a multi-byte UTF-8 sequence.
    """
    cdef Py_ssize_t i = 0, members = 0, depth = 0
    cdef bint in_string = False
    cdef unsigned char c
    while i < n:
        c = p[i]
        if in_string:
            if c == b'\\':
                i += 1  # the escaped character cannot end the string
            elif c == b'"':
                in_string = False
        elif c == b'"':
            in_string = True
        elif c == b':':
            members += 1
        elif c == b'[' or c == b'{':
            depth += 1
            if depth > max_depth:
                return -1
        elif c == b']' or c == b'}':
            depth -= 1
        i += 1
    return members


cdef Py_ssize_t _distinct_members(object node) except -2:
    """Members of every object in a parsed value, or -1 if it holds a float.

    A dict holds one entry per distinct key, so fewer entries than members
    in the text means a duplicate key. Depth is bounded: _json_object refuses
    texts nested deeper than MAX_JSON_DEPTH before ``node`` is built.
    """
    cdef Py_ssize_t total = 0, inner
    if type(node) is dict:
        total = len(<dict>node)
        for value in (<dict>node).values():
            inner = _distinct_members(value)
            if inner < 0:
                return -1
            total += inner
    elif type(node) is list:
        for value in <list>node:
            inner = _distinct_members(value)
            if inner < 0:
                return -1
            total += inner
    elif type(node) is float:
        return -1
    return total


cdef object _fast_json(bytes raw, Py_ssize_t members):
    """orjson's value of ``raw`` when it holds no float and no duplicate key, else None.

    orjson reads an integer beyond 64 bits as a float where json reads an int, and its floats need
    the twin's finiteness check: a value with any float is left to the hooked scanner, whose numbers
    are the pure twin's. Token claims hold none. ``members``: what _json_members counted in ``raw``."""
    try:
        value = _orjson_loads(raw)
    except _OrjsonError:
        return None
    if _distinct_members(value) != members:
        return None
    return value


cdef object _strict_json(str text):
    """JSONDecoder.decode around the hooked scanner: json.loads with the pure twin's hooks."""
    cdef Py_ssize_t end
    try:
        value, end = _strict_scan_once(text, _skip_json_space(text, 0))
    except StopIteration as exc:
        raise _JSONDecodeError("Expecting value", text, exc.value) from None
    if _skip_json_space(text, end) != len(text):
        raise _JSONDecodeError("Extra data", text, end)
    return value


cdef dict _json_object(bytes raw, str what):
    cdef Py_ssize_t members
    try:
        members = _json_members(<const unsigned char *>PyBytes_AS_STRING(raw), len(raw), _MAX_JSON_DEPTH)
        if members < 0:
            raise TokenMalformed(f"{what} is nested too deeply")
        # orjson refuses what is not UTF-8 as strictly as the decoder below (surrogates too), so
        # only the hooked scanner needs the text decoded.
        obj = _fast_json(raw, members)
        if obj is None:  # never a valid result: a JSON null is not an object either
            obj = _strict_json(PyUnicode_DecodeUTF8(raw, len(raw), NULL))
            # orjson refuses a lone surrogate escape (RFC 7493 §2.1); json reads it: refused here.
            if lone_surrogate(raw, obj):
                raise TokenMalformed(f"{what} holds a lone surrogate escape (RFC 7493)")
    except TokenMalformed:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TokenMalformed(f"{what} is not valid JSON") from exc
    if not isinstance(obj, dict):
        raise TokenMalformed(f"{what} is not a JSON object")
    return obj


def json_object(raw, what):
    """Strict JSON: UTF-8 only, an object, no duplicate keys, no NaN/Infinity, no lone surrogate, at
    most MAX_JSON_DEPTH deep."""
    return _json_object(bytes(raw), what)
