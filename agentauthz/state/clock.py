"""The daemon's clock: the wall clock, except that it never runs backwards.

Token times (``iat``/``nbf``/``exp``, RFC 7519 §4.1) are wall-clock seconds, so a decision must read
the wall clock; but the wall clock jumps (an NTP step, a VM resumed from a snapshot, ``date -s``).
Forward is safe: tokens expire early and keys rotate once (fail closed). Backward is not: a token
that has expired would verify again, and every live token would look issued in the future. So
when the wall clock goes back, this clock keeps counting forward on the monotonic clock from the
last time it read, until the wall clock catches up; then it follows the wall clock again. While the
wall clock moves forward it is returned exactly (NTP slewing included), so nothing drifts.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger("agentauthz.clock")  # the name operators filter on, kept across the layout

# Readers on two threads may each read the wall, then store in the other order: the later store
# then looks like a step back of however long the first reader was held up (a GIL switch, ~5 ms).
# A step back this small holds the clock still instead of being declared and logged as one.
RACE_SECONDS = 0.05


class SteadyClock:
    """``wall()`` while it moves forward; after it steps back, the last reading plus monotonic time."""

    def __init__(self, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._wall, self._monotonic = wall, monotonic
        self._lock = threading.Lock()  # readers on every thread: the request loop, writer, rotation
        self._last, self._last_mono = wall(), monotonic()
        self._behind = False  # for logging once per step back

    def __call__(self) -> float:
        wall, mono = self._wall(), self._monotonic()
        if wall >= self._last and not self._behind:
            # The common case, read on every Check: no lock. Racing readers may store each other's
            # (wall, mono) pair a few microseconds apart; a step back is still measured from there.
            self._last, self._last_mono = wall, mono
            return wall
        with self._lock:
            if wall >= self._last:
                now, behind = wall, False
            elif not self._behind and self._last - wall < RACE_SECONDS:
                return self._last  # a reading overtaken by another thread's, or a tiny step: stand still
            else:
                now, behind = self._last + max(0.0, mono - self._last_mono), True
            if behind != self._behind:
                self._behind = behind
                if behind:
                    log.warning("the wall clock went back %.3f s; counting on from %.3f until it catches up",
                                self._last - wall, self._last)
                else:
                    log.warning("the wall clock has caught up; following it again")
            self._last, self._last_mono = now, mono
            return now
