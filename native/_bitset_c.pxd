# cython: language_level=3
"""Declarations of the native revocation bitset, the twin of ``agentauthz/decision/_bitset_py.py``.

The buffer layout is the contract shared with the pure twin and, later, with
other worker processes through shared memory: ``base`` (uint64 LE) at offset
0, 8 reserved bytes, then ``capacity / 8`` bytes of bits, bit ``i`` of the
ring at byte ``16 + i // 8``, bit ``i % 8``.
"""

cimport cython
from libc.stdint cimport uint64_t

cdef enum:
    HEADER_BYTES_C = 16


cdef inline uint64_t load_le64(const unsigned char *p) noexcept nogil:
    # Byte by byte: the header is little-endian whatever the host, and a
    # caller's buffer need not be 8-byte aligned. GCC and Clang fold this
    # into a single load on little-endian machines.
    return (<uint64_t>p[0] | <uint64_t>p[1] << 8 | <uint64_t>p[2] << 16 | <uint64_t>p[3] << 24
            | <uint64_t>p[4] << 32 | <uint64_t>p[5] << 40 | <uint64_t>p[6] << 48
            | <uint64_t>p[7] << 56)


@cython.final
cdef class Bitset:
    # The typed memoryview keeps the exporter (bytearray, mmap, SharedMemory)
    # pinned for the bitset's lifetime, so its memory can never move or vanish.
    cdef unsigned char[::1] _buf
    cdef uint64_t _capacity

    cdef uint64_t _base(self)
    cdef void _clear(self, uint64_t start, uint64_t stop)

    # Profiled: runs for every slot of every decision. __cinit__ guarantees
    # len(_buf) >= HEADER_BYTES_C + capacity / 8 and the index below is
    # < HEADER_BYTES_C + capacity / 8, so bounds and wraparound checks are
    # dead weight (and would force an exception path onto a noexcept call).
    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef inline bint test_c(self, uint64_t slot) noexcept:
        """True when ``slot`` is revoked or outside the window (fail closed)."""
        # Re-read the base every time: another process may slide the window.
        cdef uint64_t base = load_le64(&self._buf[0])
        cdef uint64_t i
        # Subtract rather than compare with base + capacity, which can wrap.
        if slot < base or slot - base >= self._capacity:
            return True
        i = slot % self._capacity
        return (self._buf[HEADER_BYTES_C + (i >> 3)] >> (i & 7)) & 1
