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
import time
from typing import Any, Callable

from ..decision import _accel

log = logging.getLogger("agentauthz.clock")  # the name operators filter on, kept across the layout

# Readers on two threads may each read the wall, then store in the other order: the later store
# then looks like a step back of however long the first reader was held up (a GIL switch, ~5 ms).
# A step back this small holds the clock still instead of being declared and logged as one.
RACE_SECONDS = 0.05


def steady_clock(wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 hot: _accel.HotPath = _accel.ACTIVE) -> Callable[[], float]:
    """``wall()`` while it moves forward; after it steps back, the last reading plus monotonic time.

    The hot path's ``SteadyClock`` answers the common case (read on every Check); ``stepped`` the rest.
    """
    return hot.SteadyClock(wall, monotonic, stepped)  # type: ignore[no-any-return]


def stepped(clock: Any, wall: float, mono: float) -> float:
    """A reading ``wall`` (``mono`` on the monotonic clock) behind ``clock``'s last, or while it is behind."""
    with clock.lock:
        if wall >= clock.last:
            now, behind = wall, False
        elif not clock.behind and clock.last - wall < RACE_SECONDS:
            return clock.last  # a reading overtaken by another thread's, or a tiny step: stand still
        else:
            now, behind = clock.last + max(0.0, mono - clock.last_mono), True
        if behind != clock.behind:
            clock.behind = behind
            if behind:
                log.warning("the wall clock went back %.3f s; counting on from %.3f until it catches up",
                            clock.last - wall, clock.last)
            else:
                log.warning("the wall clock has caught up; following it again")
        clock.last, clock.last_mono = now, mono
        return now
