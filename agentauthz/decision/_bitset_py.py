"""Pure-Python revocation bitset: the reference twin of ``native/_bitset_c.pyx``.

One bit per token slot over a sliding window ``[base, base + capacity)``. The
window lives in a caller-supplied (or private) buffer laid out as a 16-byte
header (``base``: uint64 LE, reserved: uint64) followed by ``capacity / 8``
bytes of bits, so that a shared-memory mapping can back it later without a
change of format. Readers need no lock: each test reads one byte; a single
writer sets bits and advances the window.
"""

from __future__ import annotations

import struct

HEADER_BYTES = 16
_U64 = struct.Struct("<Q")
_SLOT_LIMIT = 1 << 64  # slots are uint64 like the base: the window never reaches past 2**64 - 1


def buffer_size(capacity: int) -> int:
    """Bytes of buffer a bitset of ``capacity`` bits needs."""
    return HEADER_BYTES + capacity // 8


class Bitset:
    """Sliding-window revocation bits; a slot outside the window tests as revoked."""

    __slots__ = ("_buf", "_capacity")

    def __init__(self, capacity: int, buffer: object = None) -> None:
        if capacity <= 0 or capacity % 64:
            raise ValueError("capacity must be a positive multiple of 64")
        if buffer is None:
            buffer = bytearray(buffer_size(capacity))
        view = memoryview(buffer).cast("B")  # type: ignore[arg-type]
        if view.readonly or len(view) < buffer_size(capacity):
            raise ValueError("buffer must be writable and at least buffer_size(capacity) bytes")
        self._buf = view
        self._capacity = capacity

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def base(self) -> int:
        """The oldest slot still inside the window."""
        return int(_U64.unpack_from(self._buf, 0)[0])

    def test(self, slot: int) -> bool:
        """True when ``slot`` is revoked, or outside the window (fail closed)."""
        base = _U64.unpack_from(self._buf, 0)[0]
        if slot < base or slot >= base + self._capacity or slot >= _SLOT_LIMIT:
            return True
        i = slot % self._capacity
        return bool(self._buf[HEADER_BYTES + (i >> 3)] >> (i & 7) & 1)

    def set(self, slot: int) -> bool:
        """Revoke ``slot``; False if it is already behind the window (its token has expired)."""
        base = self.base
        if slot < base:
            return False
        if slot >= base + self._capacity or slot >= _SLOT_LIMIT:
            raise ValueError(f"slot {slot} is beyond the window [{base}, {base + self._capacity})")
        i = slot % self._capacity
        self._buf[HEADER_BYTES + (i >> 3)] |= 1 << (i & 7)
        return True

    def advance(self, new_base: int) -> None:
        """Slide the window so it starts at ``new_base``, clearing the bits it leaves behind.

        Only the writer calls this, and only past slots whose tokens have all
        expired, so a reader racing the clear can never see a live token unrevoked.
        """
        base = self.base
        if new_base <= base:
            return
        if new_base >= _SLOT_LIMIT:  # checked before any bit is cleared: the header holds a uint64
            raise OverflowError("new_base must fit in 64 bits")
        if new_base - base >= self._capacity:
            self._buf[HEADER_BYTES:HEADER_BYTES + self._capacity // 8] = bytes(self._capacity // 8)
        else:
            self._clear(base, new_base)
        _U64.pack_into(self._buf, 0, new_base)

    def _clear(self, start: int, stop: int) -> None:
        # Whole bytes by slice, stray bits one at a time; the ring may wrap once.
        cap = self._capacity
        while start < stop:
            i = start % cap
            if i % 8 == 0 and stop - start >= 8:
                n = min((stop - start) // 8, (cap - i) // 8)
                at = HEADER_BYTES + (i >> 3)
                self._buf[at:at + n] = bytes(n)
                start += n * 8
            else:
                self._buf[HEADER_BYTES + (i >> 3)] &= ~(1 << (i & 7)) & 0xFF
                start += 1

    def count(self) -> int:
        """Number of revoked slots in the window."""
        bits = self._buf[HEADER_BYTES:HEADER_BYTES + self._capacity // 8]
        return int.from_bytes(bits, "little").bit_count()
