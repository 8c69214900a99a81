"""A daemon the tests start with this directory on PYTHONPATH reads a wall clock running
AGENTAUTHZ_TEST_CLOCK_AHEAD seconds ahead (a node whose NTP is off); its monotonic clock is untouched.
Python imports ``sitecustomize`` before anything else, so every ``time.time`` the daemon binds is this."""

import os
import time

_ahead = float(os.environ.get("AGENTAUTHZ_TEST_CLOCK_AHEAD", "0") or 0)
if _ahead:
    _wall, _wall_ns = time.time, time.time_ns
    time.time = lambda: _wall() + _ahead
    time.time_ns = lambda: _wall_ns() + int(_ahead * 1e9)
