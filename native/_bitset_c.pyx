# cython: language_level=3
"""Native revocation bitset: the twin of ``agentauthz/decision/_bitset_py.py``, same API, same buffer layout.

One bit per token slot over a sliding window ``[base, base + capacity)``,
stored in a caller-supplied (or private) buffer: a 16-byte header (``base``
uint64 LE, 8 reserved bytes) then ``capacity / 8`` bytes of bits. Readers take
no lock: a test reads the base and one byte; a single writer sets bits and
advances the window.
"""

from libc.stdint cimport uint64_t
from libc.string cimport memset

HEADER_BYTES = HEADER_BYTES_C
_U64_LIMIT = 1 << 64


def buffer_size(capacity):
    """Bytes of buffer a bitset of ``capacity`` bits needs."""
    return HEADER_BYTES_C + capacity // 8


cdef inline void store_le64(unsigned char *p, uint64_t value) noexcept:
    # Little-endian by definition of the layout, whatever the host order.
    cdef int k
    for k in range(8):
        p[k] = <unsigned char>(value >> (8 * k))


cdef class Bitset:
    """Sliding-window revocation bits; a slot outside the window tests as revoked."""

    def __cinit__(self, capacity, buffer=None):
        # __cinit__, not __init__: no Bitset can exist without a valid buffer,
        # which is what lets test_c skip its bounds checks.
        if capacity <= 0 or capacity % 64:
            raise ValueError("capacity must be a positive multiple of 64")
        if buffer is None:
            buffer = bytearray(buffer_size(capacity))
        view = memoryview(buffer).cast("B")
        if view.readonly or len(view) < buffer_size(capacity):
            raise ValueError("buffer must be writable and at least buffer_size(capacity) bytes")
        self._buf = view
        self._capacity = capacity

    @property
    def capacity(self):
        return self._capacity

    @property
    def base(self):
        """The oldest slot still inside the window."""
        return self._base()

    cdef uint64_t _base(self):
        return load_le64(&self._buf[0])

    def test(self, slot):
        """True when ``slot`` is revoked, or outside the window (fail closed)."""
        cdef uint64_t s
        try:
            s = slot
        except OverflowError:  # negative or >= 2**64: below or beyond any window
            return True
        return self.test_c(s)

    def set(self, slot):
        """Revoke ``slot``; False if it is already behind the window (its token has expired)."""
        base = <object>self._base()
        if slot < base:
            return False
        # Python ints here: base + capacity may not fit in 64 bits.
        if slot >= base + self._capacity or slot >= _U64_LIMIT:
            raise ValueError(f"slot {slot} is beyond the window [{base}, {base + self._capacity})")
        cdef uint64_t i = slot % self._capacity
        self._buf[HEADER_BYTES_C + (i >> 3)] |= <unsigned char>(1 << (i & 7))
        return True

    def advance(self, new_base):
        """Slide the window so it starts at ``new_base``, clearing the bits it leaves behind.

        Only the writer calls this, and only past slots whose tokens have all
        expired, so a reader racing the clear can never see a live token unrevoked.
        """
        cdef uint64_t base = self._base()
        if new_base <= base:
            return
        if new_base >= _U64_LIMIT:
            raise OverflowError("new_base must fit in 64 bits")
        cdef uint64_t target = new_base
        if target - base >= self._capacity:
            memset(&self._buf[HEADER_BYTES_C], 0, self._capacity // 8)
        else:
            self._clear(base, target)
        # Bits first, base last: a reader that sees the new base sees cleared bits.
        store_le64(&self._buf[0], target)

    cdef void _clear(self, uint64_t start, uint64_t stop):
        # Whole bytes with memset, stray bits one at a time; the ring may wrap once.
        # Every index is < capacity, so the buffer accesses stay in bounds.
        cdef uint64_t cap = self._capacity
        cdef uint64_t i, n
        cdef unsigned char *bits = &self._buf[HEADER_BYTES_C]
        while start < stop:
            i = start % cap
            if i % 8 == 0 and stop - start >= 8:
                n = min((stop - start) // 8, (cap - i) // 8)
                memset(bits + (i >> 3), 0, n)
                start += n * 8
            else:
                bits[i >> 3] &= <unsigned char>~(1 << (i & 7))
                start += 1

    def count(self):
        """Number of revoked slots in the window."""
        cdef const unsigned char *bits = &self._buf[HEADER_BYTES_C]
        cdef Py_ssize_t j, total = 0
        cdef unsigned char b
        for j in range(<Py_ssize_t>(self._capacity // 8)):
            b = bits[j]
            while b:
                b &= b - 1
                total += 1
        return total

