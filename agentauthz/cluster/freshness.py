"""How fresh this node's view of the cluster's revocations is, shared with its forked Check workers.

One double in an anonymous shared mapping (made before the workers fork): the monotonic time until which
the view counts as fresh. The stream follower moves it forward after every completed read; a Check past
it is denied revocation_stale. CLOCK_MONOTONIC is one clock for every process of the machine.
"""

from __future__ import annotations

import mmap
import struct
import time

_DEADLINE = struct.Struct("=d")


class Freshness:
    """``fresh()`` is the Check path's one question; only the follower (in the primary) writes."""

    def __init__(self) -> None:
        self._buffer = mmap.mmap(-1, mmap.PAGESIZE)
        self._view = memoryview(self._buffer)[:_DEADLINE.size]
        self._unpack = _DEADLINE.unpack_from
        self._clock = time.monotonic

    def fresh(self) -> bool:
        return self._clock() <= self._unpack(self._view)[0]

    def heard(self, sent_at: float, max_staleness: float) -> None:
        """A read sent at ``sent_at`` (monotonic) completed: everything acknowledged before it is applied."""
        _DEADLINE.pack_into(self._view, 0, max(self.deadline, sent_at + max_staleness))

    def lose(self) -> None:
        """Stale at once (the engine lost its data): deny until recovered."""
        _DEADLINE.pack_into(self._view, 0, 0.0)

    @property
    def deadline(self) -> float:
        return float(self._unpack(self._view)[0])

    def staleness(self, max_staleness: float) -> float:
        """Seconds since the last completed read (0 while fresh reads keep coming)."""
        return max(0.0, self._clock() - (self.deadline - max_staleness))
