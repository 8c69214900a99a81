# cython: language_level=3, boundscheck=False, wraparound=False
"""The audit log's hash chain: the native twin of ``agentauthz/decision/_chain_py.py``.

An allow's record is formatted, hashed and written in one call with no
intermediate Python objects. Under load each Python-level step of the old
record (an f-string, ``float.__repr__``, ``hashlib``, ``hexdigest``,
``os.write``) cost several microseconds of cold caches; here the record is
a few ``memcpy`` into one buffer. The text is byte for byte the pure twin's
(``tests/test_chain.py``), so ``audit_verify`` reads either.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from cpython.mem cimport PyMem_Free
from libc.errno cimport EINTR, errno
from libc.math cimport nearbyint
from libc.stdint cimport uintptr_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy
from posix.unistd cimport write

import ctypes

import nacl.bindings  # importing it runs sodium_init(), required before any libsodium call
from nacl._sodium import ffi as _ffi, lib as _sodium

from agentauthz.decision.redact import _json_str, _redacted

cdef extern from "Python.h":
    char *PyOS_double_to_string(double val, char format_code, int precision, int flags,
                                int *ptype) except NULL
    int Py_DTSF_ADD_DOT_0
    const char *PyUnicode_AsUTF8AndSize(object text, Py_ssize_t *size) except NULL

GENESIS = "0" * 64

cdef enum:
    HASH_HEX = 64
cdef long long SEQ_MAX = 9223372036854775806  # seq + 1 must fit a long long

# SHA-256 from the libcrypto Python's own hashlib loaded (no link-time dependency): OpenSSL's
# SHA-NI/AVX2 block code hashed a ~420-byte record in 0.47 µs where libsodium's portable C took 1.65 µs
# (and ~24,000 instructions under callgrind). The low-level calls, not the one-shot SHA256(), which
# in OpenSSL 3 fetches the algorithm anew on every call. libsodium's (PyNaCl, always there) where
# hashlib has no OpenSSL behind it or that OpenSSL lacks them.
ctypedef int (*sha256_init_fn)(void *ctx) noexcept nogil
ctypedef int (*sha256_update_fn)(void *ctx, const void *data, size_t length) noexcept nogil
ctypedef int (*sha256_final_fn)(unsigned char *out, void *ctx) noexcept nogil
ctypedef int (*sodium_sha256_fn)(unsigned char *out, const unsigned char *data,
                                 unsigned long long length) noexcept nogil
cdef enum:
    SHA256_CTX_WORDS = 32  # room for OpenSSL's SHA256_CTX (112 bytes), 8-byte aligned


def _openssl_sha256():
    """The addresses of SHA256_Init, _Update and _Final in hashlib's libcrypto, or None."""
    try:
        import _hashlib
        lib = ctypes.CDLL(_hashlib.__file__)  # dlsym searches the libcrypto it links, too
        found = tuple(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
                      for name in ("SHA256_Init", "SHA256_Update", "SHA256_Final"))
    except (ImportError, OSError, AttributeError):  # no _hashlib, a static one, no such symbol
        return None
    return found if all(found) else None


_SODIUM_LIB = _sodium
cdef sodium_sha256_fn _sodium_sha256 = <sodium_sha256_fn><uintptr_t>int(
    _ffi.cast("uintptr_t", _ffi.addressof(_sodium, "crypto_hash_sha256")))
_openssl = _openssl_sha256()
SHA256_FROM = "openssl" if _openssl is not None else "libsodium"
cdef sha256_init_fn _sha256_init = NULL
cdef sha256_update_fn _sha256_update = NULL
cdef sha256_final_fn _sha256_final = NULL
if _openssl is not None:
    _sha256_init = <sha256_init_fn><uintptr_t>_openssl[0]
    _sha256_update = <sha256_update_fn><uintptr_t>_openssl[1]
    _sha256_final = <sha256_final_fn><uintptr_t>_openssl[2]


cdef inline void _sha256(const char *data, Py_ssize_t size, unsigned char *digest) noexcept nogil:
    cdef unsigned long long ctx[SHA256_CTX_WORDS]
    if _sha256_init == NULL:
        _sodium_sha256(digest, <const unsigned char *>data, <unsigned long long>size)
        return
    _sha256_init(ctx)
    _sha256_update(ctx, data, <size_t>size)
    _sha256_final(digest, ctx)


cdef const char *_HEX = b"0123456789abcdef"
# The fixed text of a check record, around its seq, prev, ts, decision id, request id and members.
cdef bytes _HEAD = b'{"seq":'
cdef bytes _PREV = b',"prev":"'
cdef bytes _TS = b'","ts":'
cdef bytes _KIND = b',"kind":"check","decision_id":'
cdef bytes _RID = b',"request_id":'
cdef Py_ssize_t _FIXED = len(_HEAD) + len(_PREV) + HASH_HEX + len(_TS) + len(_KIND) + len(_RID) + 3  # , } \n


# A record's ts: to the microsecond within this many seconds, else repr (_chain_py.ts_text).
cdef double TS_FIXED_MAX = 4294967296.0  # 2**32


cdef int _ts_fixed(double ts, char *out) noexcept:
    """``ts`` in fixed point to the microsecond (``_chain_py.ts_text``) into ``out`` (32 bytes); its size.
    Only for ``-TS_FIXED_MAX < ts < TS_FIXED_MAX``, so the microseconds fit a long long."""
    cdef long long micros = <long long>nearbyint(ts * 1e6)  # half to even, as Python's round()
    cdef bint negative = micros < 0
    cdef unsigned long long rest = <unsigned long long>(-micros if negative else micros)
    cdef unsigned long long whole = rest // 1000000, fraction = rest % 1000000
    cdef char digits[24]
    cdef int n = 0, size = 0, last, i
    while True:
        digits[n] = <char>(48 + whole % 10)
        n += 1
        whole //= 10
        if whole == 0:
            break
    if negative:
        out[size] = 45  # -
        size += 1
    while n:
        n -= 1
        out[size] = digits[n]
        size += 1
    out[size] = 46  # .
    last = size + 1  # at least one decimal, as repr
    for i in range(6):
        out[size + 6 - i] = <char>(48 + fraction % 10)
        fraction //= 10
    for i in range(size + 1, size + 7):
        if out[i] != 48:
            last = i
    return last + 1


cdef bint _plain(const char *text, Py_ssize_t size) noexcept:
    """Whether JSON (ensure_ascii) writes ``text`` as is between quotes: printable ASCII, no quote
    or backslash. Anything else goes through json's own encoder, so the bytes stay the pure twin's."""
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(size):
        c = <unsigned char>text[i]
        if c < 0x20 or c > 0x7e or c == 0x22 or c == 0x5c:
            return False
    return True


cdef class Chain:
    """The last record's ``seq`` and ``prev`` hash, and the next records linked to them.

    Not thread-safe (``AuditLog`` holds its ``_mutex``); the GIL is kept through the write, so
    nothing else can touch the buffer meanwhile.
    """

    cdef long long _seq
    cdef char _prev[HASH_HEX]
    cdef char *_line  # append_check's last line, newline included
    cdef Py_ssize_t _line_size, _line_cap
    cdef char *_next  # where the next record is formatted before it is committed
    cdef Py_ssize_t _next_cap
    # The inline gate (InlineAllow): the log file an allow is appended to at once, -1 while shut; the
    # bytes left in that file; the allows appended through it since the log last took the count.
    cdef int _inline_fd
    cdef Py_ssize_t _inline_room
    cdef long long _inline_records, _inline_bytes

    def __cinit__(self):
        self._inline_fd = -1

    def __init__(self, seq=0, prev=GENESIS):
        self.seq = seq
        self.prev = prev

    def __dealloc__(self):
        free(self._line)
        free(self._next)

    @property
    def seq(self):
        return self._seq

    @seq.setter
    def seq(self, value):
        if type(value) is not int or not 0 <= value <= SEQ_MAX:
            raise ValueError(f"seq out of range: {value!r}")
        self._seq = value

    @property
    def prev(self):
        return PyBytes_FromStringAndSize(self._prev, HASH_HEX).decode("ascii")

    @prev.setter
    def prev(self, value):
        _check_hash(value)
        memcpy(self._prev, PyBytes_AS_STRING(value.encode("ascii")), HASH_HEX)

    @property
    def last(self):
        return PyBytes_FromStringAndSize(self._line, self._line_size)

    cdef void _advance(self, const char *line, Py_ssize_t size) noexcept:
        cdef unsigned char digest[32]
        cdef int i
        _sha256(line, size, digest)
        for i in range(32):
            self._prev[2 * i] = _HEX[digest[i] >> 4]
            self._prev[2 * i + 1] = _HEX[digest[i] & 15]
        self._seq += 1

    def link(self, bytes line not None):
        """Make ``line`` (one encoded record, no newline) the last record; the bytes to write."""
        if self._seq >= SEQ_MAX:
            raise OverflowError("audit seq exhausted")
        cdef Py_ssize_t size = PyBytes_GET_SIZE(line)
        out = PyBytes_FromStringAndSize(NULL, size + 1)
        cdef char *text = PyBytes_AS_STRING(out)
        memcpy(text, PyBytes_AS_STRING(line), size)
        text[size] = 10  # newline
        self._advance(text, size)
        return out

    cdef Py_ssize_t _format(self, double ts, str decision_id, str request_id, str prepared) except -1:
        """The next check record, newline included, into ``_next``; its size."""
        cdef Py_ssize_t did_size, rid_size, prepared_size, size, at = 0
        cdef const char *did
        cdef const char *rid
        cdef const char *members = PyUnicode_AsUTF8AndSize(prepared, &prepared_size)
        cdef char seq_text[24]
        cdef int seq_size = 0
        cdef long long seq = self._seq + 1
        cdef bint did_plain, rid_plain = False
        cdef object did_json = None, rid_json = None
        cdef char ts_fixed[32]
        cdef char *ts_text = NULL
        cdef Py_ssize_t ts_size = 0
        cdef char *grown
        cdef char *out
        if self._seq >= SEQ_MAX:
            raise OverflowError("audit seq exhausted")
        # Only ASCII text can be plain, and only its UTF-8 is the str's own buffer (no copy, no error).
        did_plain = decision_id.isascii()
        if did_plain:
            did = PyUnicode_AsUTF8AndSize(decision_id, &did_size)
            did_plain = _plain(did, did_size)
        if not did_plain:
            did_json = _json_str(decision_id).encode()
            did, did_size = PyBytes_AS_STRING(did_json), PyBytes_GET_SIZE(did_json)
        if request_id:
            rid_plain = request_id.isascii() and "eyJ" not in request_id  # else it may hold a token: redact
            if rid_plain:
                rid = PyUnicode_AsUTF8AndSize(request_id, &rid_size)
                rid_plain = _plain(rid, rid_size)
            if not rid_plain:
                rid_json = _json_str(_redacted(request_id)).encode()
                rid, rid_size = PyBytes_AS_STRING(rid_json), PyBytes_GET_SIZE(rid_json)
        else:
            rid, rid_size = b"null", 4
        while True:
            seq_text[sizeof(seq_text) - 1 - seq_size] = <char>(48 + seq % 10)
            seq_size += 1
            seq //= 10
            if seq == 0:
                break
        if -TS_FIXED_MAX < ts < TS_FIXED_MAX:
            ts_size = _ts_fixed(ts, ts_fixed)
        else:
            ts_text = PyOS_double_to_string(ts, b"r", 0, Py_DTSF_ADD_DOT_0, NULL)  # repr(ts)
            if ts_text == NULL:
                raise MemoryError()
            while ts_text[ts_size]:
                ts_size += 1
        size = _FIXED + seq_size + ts_size + did_size + 2 * did_plain + rid_size + 2 * rid_plain + prepared_size
        if size > self._next_cap:
            grown = <char *>realloc(self._next, size)
            if grown == NULL:
                if ts_text != NULL:
                    PyMem_Free(ts_text)
                raise MemoryError()
            self._next, self._next_cap = grown, size
        out = self._next
        at = _put(out, at, _HEAD)
        memcpy(out + at, seq_text + sizeof(seq_text) - seq_size, seq_size)
        at = _put(out, at + seq_size, _PREV)
        memcpy(out + at, self._prev, HASH_HEX)
        at = _put(out, at + HASH_HEX, _TS)
        if ts_text == NULL:
            memcpy(out + at, ts_fixed, ts_size)
        else:
            memcpy(out + at, ts_text, ts_size)
            PyMem_Free(ts_text)
        at = _put(out, at + ts_size, _KIND)
        at = _quoted(out, at, did, did_size, did_plain)
        at = _put(out, at, _RID)
        at = _quoted(out, at, rid, rid_size, rid_plain)
        out[at] = 44  # ,
        memcpy(out + at + 1, members, prepared_size)
        at += 1 + prepared_size
        out[at] = 125  # }
        out[at + 1] = 10  # newline
        return at + 2

    def check_record(self, double ts, str decision_id not None, str request_id not None,
                     str prepared not None):
        """The next check record, not linked yet (no newline)."""
        cdef Py_ssize_t size = self._format(ts, decision_id, request_id, prepared)
        return PyBytes_FromStringAndSize(self._next, size - 1)

    def append_check(self, int fd, Py_ssize_t room, double ts, str decision_id not None,
                     str request_id not None, str prepared not None):
        """Link the next check record and write it to ``fd``; the bytes written (all of ``last``).

        None, with nothing changed, when the record (without its newline) needs ``room`` bytes or
        more. An ``OSError`` from the write is raised after the record was linked: part of ``last``
        may be in the file, and ``last`` must still be written for the chain to hold.
        """
        cdef Py_ssize_t size = self._append(fd, room, ts, decision_id, request_id, prepared)
        return size if size else None

    def open_inline(self, int fd, Py_ssize_t room, queue):
        """Let ``InlineAllow`` append to ``fd``, ``room`` bytes short of full, unless ``queue`` holds
        records (they go first). Called with the log's mutex held, once the log was checked as
        ``AuditLog._write_allow`` checks it; whatever changes what was checked shuts the gate again."""
        if fd >= 0 and room > 0 and not queue:  # (the GIL makes the queue's check and the open one step)
            self._inline_fd, self._inline_room = fd, room

    def shut_inline(self):
        """Send every allow to ``AuditLog._write_allow`` until the gate is opened again."""
        self._inline_fd = -1

    def take_inline(self):
        """Shut the gate; (records, bytes) appended through it since the last take."""
        counted = (self._inline_records, self._inline_bytes)
        self._inline_fd = -1
        self._inline_records = self._inline_bytes = 0
        return counted

    cdef Py_ssize_t _append(self, int fd, Py_ssize_t room, double ts, str decision_id, str request_id,
                            str prepared) except -1:
        """``append_check``, 0 for its None."""
        cdef Py_ssize_t size = self._format(ts, decision_id, request_id, prepared)
        cdef Py_ssize_t done = 0, written
        cdef char *swap
        if size - 1 >= room:
            return 0
        self._advance(self._next, size - 1)
        swap, self._line = self._line, self._next
        self._next = swap
        self._line_cap, self._next_cap = self._next_cap, self._line_cap
        self._line_size = size
        while done < size:  # a short write is how a full disk first shows; the next write raises
            written = write(fd, self._line + done, size - done)
            if written < 0:
                if errno == EINTR:
                    PyErr_CheckSignals()  # raises what a signal handler raised, like os.write
                    continue
                PyErr_SetFromErrno(OSError)  # raises
            done += written
        return size


cdef class InlineAllow:
    """``AuditLog.write_allow``: an allow's record written to the log file now, on the caller's thread,
    in one native call while the chain's inline gate is open (``_chain_py.InlineAllow`` says when).

    The gate stands for every check ``AuditLog._write_allow`` makes (the log healthy and open, no
    batch in flight, nothing queued, its file open and not full), made by that method while it
    held the log's mutex; whatever changes one of them shuts it. With the gate shut, or no ``ts``,
    the call is ``_write_allow``'s. The mutex is still taken: the writer thread writes batches and
    moves to the next file with it held.
    """

    cdef Chain _chain
    cdef object _acquire, _release, _slow, _failed

    def __init__(self, Chain chain not None, mutex, slow, failed):
        self._chain = chain
        self._acquire, self._release = mutex.acquire, mutex.release
        self._slow, self._failed = slow, failed

    def __call__(self, str decision_id not None, str request_id not None, str prepared not None,
                 ts=None):
        cdef Chain chain = self._chain
        cdef Py_ssize_t written
        if chain._inline_fd < 0 or ts is None:
            return self._slow(decision_id, request_id, prepared, ts)
        # A lock's non-blocking acquire keeps the GIL: the gate cannot have shut since it was read.
        if not self._acquire(False):
            return False  # the writer holds the log: the caller waits for it
        try:
            try:
                written = chain._append(chain._inline_fd, chain._inline_room, ts, decision_id,
                                        request_id, prepared)
            except OSError as exc:
                chain._inline_fd = -1
                self._failed(exc, decision_id)  # raises AuditUnavailable
                raise
            if written == 0:
                chain._inline_fd = -1  # this file is full: the writer starts the next
                return False
            chain._inline_room -= written
            chain._inline_records += 1
            chain._inline_bytes += written
            return True
        finally:
            self._release()


cdef inline Py_ssize_t _put(char *out, Py_ssize_t at, bytes text) noexcept:
    cdef Py_ssize_t size = PyBytes_GET_SIZE(text)
    memcpy(out + at, PyBytes_AS_STRING(text), size)
    return at + size


cdef inline Py_ssize_t _quoted(char *out, Py_ssize_t at, const char *text, Py_ssize_t size,
                               bint quote) noexcept:
    if quote:
        out[at] = 34  # "
        at += 1
    memcpy(out + at, text, size)
    at += size
    if quote:
        out[at] = 34
        at += 1
    return at


def _check_hash(value):
    if not (isinstance(value, str) and len(value) == HASH_HEX
            and all(c in "0123456789abcdef" for c in value)):
        raise ValueError(f"prev must be {HASH_HEX} lowercase hex digits: {value!r}")
