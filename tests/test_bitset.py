"""The revocation bitset, against both twins: semantics, buffer layout, window slide, concurrency."""

from __future__ import annotations

import mmap
import struct
import threading
from typing import Any

import pytest

from agentauthz.decision._accel import HotPath

HEADER = 16  # base uint64 LE, 8 reserved bytes


def layout(buffer: Any) -> tuple[int, bytes]:
    """(base, bit bytes) read straight from the shared layout."""
    view = memoryview(buffer).cast("B")
    return struct.unpack_from("<Q", view, 0)[0], bytes(view[HEADER:])


def test_set_test_count(hot: HotPath) -> None:
    bits = hot.Bitset(256)
    assert (bits.capacity, bits.base, bits.count()) == (256, 0, 0)
    assert not any(bits.test(slot) for slot in range(256))
    for slot in (0, 7, 8, 63, 64, 255):
        assert bits.set(slot) is True
    assert bits.set(7) is True  # setting twice is harmless
    assert bits.count() == 6
    assert [slot for slot in range(256) if bits.test(slot)] == [0, 7, 8, 63, 64, 255]


def test_buffer_layout_is_the_documented_one(hot: HotPath) -> None:
    buffer = bytearray(hot.bitset_module.buffer_size(128))
    assert len(buffer) == HEADER + 16 and hot.bitset_module.HEADER_BYTES == HEADER
    bits = hot.Bitset(128, buffer)
    bits.set(0)
    bits.set(9)
    bits.set(127)
    base, raw = layout(buffer)
    assert base == 0
    assert raw == bytes([0b1, 0b10]) + bytes(13) + bytes([0x80])
    bits.advance(72)
    assert layout(buffer)[0] == 72
    assert buffer[8:16] == bytes(8)  # the reserved word is left alone


def test_an_existing_buffer_is_adopted_not_reset(hot: HotPath) -> None:
    buffer = bytearray(hot.bitset_module.buffer_size(64))
    struct.pack_into("<Q", buffer, 0, 1000)
    buffer[HEADER + 1] = 0b100  # ring index 10 -> slot 1034 in the window [1000, 1064)
    bits = hot.Bitset(64, buffer)
    assert bits.base == 1000 and bits.count() == 1
    assert bits.test(1034) and not bits.test(1033)


@pytest.mark.parametrize("capacity", [0, -64, 63, 100])
def test_capacity_must_be_a_positive_multiple_of_64(hot: HotPath, capacity: int) -> None:
    with pytest.raises(ValueError):
        hot.Bitset(capacity)


def test_buffer_must_be_writable_and_large_enough(hot: HotPath) -> None:
    with pytest.raises(ValueError):
        hot.Bitset(64, bytearray(HEADER + 7))
    with pytest.raises(ValueError):
        hot.Bitset(64, bytes(HEADER + 8))
    bits = hot.Bitset(64, bytearray(HEADER + 100))  # larger is fine
    assert bits.set(63) and bits.test(63)


def test_outside_the_window_tests_as_revoked(hot: HotPath) -> None:
    bits = hot.Bitset(64)
    bits.advance(100)
    for slot in (-1, 0, 99, 164, 1 << 63, 1 << 64, 1 << 80):
        assert bits.test(slot) is True, slot
    assert bits.test(100) is False and bits.test(163) is False


def test_set_outside_the_window(hot: HotPath) -> None:
    bits = hot.Bitset(64)
    bits.advance(100)
    assert bits.set(99) is False and bits.set(-5) is False  # already behind: its token has expired
    with pytest.raises(ValueError, match=r"slot 164 is beyond the window \[100, 164\)"):
        bits.set(164)
    with pytest.raises(ValueError):
        bits.set(1 << 70)
    assert bits.count() == 0


def test_advance_clears_what_it_leaves_behind(hot: HotPath) -> None:
    bits = hot.Bitset(64)
    for slot in range(0, 64, 3):
        bits.set(slot)
    bits.advance(20)
    assert bits.base == 20
    assert bits.count() == len(range(21, 64, 3))
    # The ring positions of slots 0..19 now hold slots 64..83: all fresh.
    assert not any(bits.test(slot) for slot in range(64, 84))
    assert all(bits.test(slot) for slot in range(21, 64, 3))
    bits.advance(10)  # backwards is a no-op
    assert bits.base == 20


def test_advance_across_the_wrap(hot: HotPath) -> None:
    bits = hot.Bitset(128)
    bits.advance(100)
    for slot in range(100, 228):
        bits.set(slot)
    assert bits.count() == 128
    bits.advance(190)  # clears ring positions 100..127 and 0..61
    assert bits.count() == 228 - 190
    assert all(bits.test(slot) for slot in range(190, 228))
    assert not any(bits.test(slot) for slot in range(228, 318))


def test_advance_by_more_than_the_capacity_clears_everything(hot: HotPath) -> None:
    bits = hot.Bitset(64)
    for slot in range(64):
        bits.set(slot)
    bits.advance(10_000)
    assert bits.base == 10_000 and bits.count() == 0


def test_advance_refuses_a_base_beyond_64_bits_before_clearing(hot: HotPath) -> None:
    bits = hot.Bitset(64)
    bits.set(5)
    with pytest.raises(OverflowError):
        bits.advance(1 << 64)
    assert bits.base == 0 and bits.test(5)


def test_window_near_the_top_of_the_64_bit_range(hot: HotPath) -> None:
    bits = hot.Bitset(64)
    top = (1 << 64) - 10
    bits.advance(top)
    assert bits.set(top + 3) and bits.test(top + 3)
    assert not bits.test(top + 9)
    # base + capacity passes 2**64, but slots are uint64 like the base: none lies beyond.
    assert bits.test(1 << 64) and bits.test((1 << 64) + 20)
    with pytest.raises(ValueError):
        bits.set(1 << 64)
    with pytest.raises(ValueError):
        bits.set(top + 64)


def test_memory_stays_constant_as_the_window_slides(hot: HotPath) -> None:
    capacity = 1024
    buffer = bytearray(hot.bitset_module.buffer_size(capacity))
    bits = hot.Bitset(capacity, buffer)
    size = len(buffer)
    for step in range(50):
        base = step * 300
        bits.advance(base)
        for slot in range(base, base + capacity):
            if slot % 7 == 0:
                bits.set(slot)
        window = range(base, base + capacity)
        assert [s for s in window if bits.test(s)] == [s for s in window if s % 7 == 0]
    assert len(buffer) == size and bits.base == 49 * 300
    assert bits.count() == len([s for s in range(49 * 300, 49 * 300 + capacity) if s % 7 == 0])


def test_two_views_of_one_buffer_agree(hot: HotPath) -> None:
    """What shared memory will look like: a writer and a reader over the same bytes."""
    shared = mmap.mmap(-1, hot.bitset_module.buffer_size(256))
    writer, reader = hot.Bitset(256, shared), hot.Bitset(256, shared)
    writer.set(42)
    assert reader.test(42)
    writer.advance(43)  # the reader re-reads the base on every test
    assert reader.base == 43 and reader.test(42) and not reader.test(43 + 256 - 1)
    writer.set(298)
    assert reader.test(298) and reader.count() == 1
    del writer, reader
    shared.close()


def test_both_twins_write_the_same_bytes(hot: HotPath) -> None:
    from agentauthz.decision import _accel
    pure = _accel.pure()
    buffers = [bytearray(hot.bitset_module.buffer_size(512)) for _ in range(2)]
    twins = [hot.Bitset(512, buffers[0]), pure.Bitset(512, buffers[1])]
    for bits in twins:
        for slot in range(0, 512, 5):
            bits.set(slot)
        bits.advance(333)
        for slot in range(512, 700, 11):
            bits.set(slot)
    assert buffers[0] == buffers[1]


def test_concurrent_readers_never_see_a_set_bit_cleared(hot: HotPath) -> None:
    """One writer revokes slots in order and slides the window; readers test meanwhile.

    A slot revoked before a read must test revoked (set, or left behind the
    window: both fail closed); only advance() clears bits, and only behind the base.
    """
    capacity = 4096
    bits = hot.Bitset(capacity)
    revoked_below = [0]  # every slot < this has been revoked (or slid past)
    done = threading.Event()
    failures: list[str] = []

    def writer() -> None:
        slot = 0
        while slot < 60_000:
            bits.set(slot)
            slot += 1
            revoked_below[0] = slot
            if slot % 512 == 0:
                bits.advance(slot - 1024)
        done.set()

    def reader(seed: int) -> None:
        probe = seed
        while not done.is_set():
            limit = revoked_below[0]
            if not limit:
                continue
            probe = (probe * 1103515245 + 12345) % (1 << 31)
            slot = probe % limit
            # A revoked slot may test live only if the window slid past it
            # during the test (the writer advances only past expired tokens);
            # had it slid before, the test would have seen it behind the base.
            if not bits.test(slot) and bits.base <= slot:
                failures.append(f"slot {slot} < {limit} tested as live (base {bits.base})")
            if not bits.test(1_000_000):  # the window never gets there in this run
                failures.append("a slot beyond the window tested live")

    readers = [threading.Thread(target=reader, args=(seed,)) for seed in range(4)]
    for thread in readers:
        thread.start()
    writer()
    for thread in readers:
        thread.join()
    assert failures == []
    assert bits.base == 60_000 - 1024 - (60_000 % 512)
